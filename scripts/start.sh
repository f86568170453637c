#!/usr/bin/env bash
# Installs spherelab's pinned requirements and starts it: the engine worker and the dashboard
# (python -m engine app: http://localhost:8501, bound to 127.0.0.1). Ctrl-C stops both.
# Store: $SPHERELAB_DB, else ~/.spherelab/spherelab.db. SPHERELAB_PORT, SPHERELAB_PARALLEL and
# SPHERELAB_ADDRESS (e.g. 0.0.0.0 to expose it: no login, see README) change the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check -r requirements.txt
exec python3 -m engine app
