#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh machine, then runs it.
# System packages: Debian's chromium (browser test, driven by Playwright; never `playwright install`)
# and postgresql (the store's PostgreSQL test starts a throwaway cluster of its own).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -r requirements-test.txt
exec python3 -m pytest "$@"
