#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh machine (skipping what is already there), then
# runs it in two passes at once:
#   1. the whole suite, spread over the CPU cores (pytest-xdist, one worker more than the cores, at most
#      3: many tests wait on a worker, a browser or a heartbeat, and a third worker fills those waits);
#   2. the `science` tests again under ATEN_CPU_CAPABILITY=default: PyTorch's scalar kernels, which
#      every CPU has and which round differently from the vectorised ones pass 1 used, so a test that
#      only holds on one kernel path fails here rather than on a user's machine.
# Both passes always run and print their output; the exit status fails if either fails (a second
# pass that selects no test is a failure too). Extra arguments go to both passes.
# System packages: Debian's chromium (browser test, driven by Playwright; never `playwright install`)
# and postgresql (the store's PostgreSQL test starts a throwaway cluster of its own).
set -uo pipefail
cd "$(dirname "$0")/.."

need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq || exit 1
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null || exit 1
fi
# pip only when a pinned package is missing or at another version (a no-op pip run costs seconds)
if ! python3 scripts/requirements_met.py requirements-test.txt; then
  python3 -m pip install -q --disable-pip-version-check -r requirements-test.txt || exit 1
fi

workers=$(python3 -c "import os; print(min(3, len(os.sched_getaffinity(0)) + 1))")
# The two passes run at the same time: the first one's waits (on a worker, a browser, a heartbeat)
# leave the cores idle often enough for the second one's training. The second pass has its own
# temporary folder (its own trained runs: another kernel path) and prints when the first is done.
pass2_dir=$(mktemp -d)
echo "== pass 2 (in the background): the science tests on the scalar kernels (ATEN_CPU_CAPABILITY=default)"
ATEN_CPU_CAPABILITY=default python3 -m pytest -m science --basetemp "$pass2_dir/tmp" -p no:cacheprovider "$@" \
  > "$pass2_dir/log" 2>&1 &
pass2=$!
echo "== pass 1: the whole suite on $workers worker(s)"
python3 -m pytest -n "$workers" --dist loadfile "$@"
main=$?
wait "$pass2"
science=$?
echo "== pass 2: the science tests on the scalar kernels (ATEN_CPU_CAPABILITY=default)"
cat "$pass2_dir/log"
rm -rf "$pass2_dir"
if [ "$science" = 5 ]; then
  echo "pass 2 selected no test: the science marker must select the seed-sensitive tests" >&2
fi
echo "== pass 1 exit $main, pass 2 exit $science"
[ "$main" = 0 ] && [ "$science" = 0 ]
