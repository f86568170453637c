#!/usr/bin/env bash
# Installs spherelab and starts it: the engine worker (background) and the dashboard.
# Store: $SPHERELAB_DB if set, else ~/.spherelab/spherelab.db. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check -r requirements.txt
python3 -m engine worker --max-parallel "${SPHERELAB_PARALLEL:-2}" &
worker=$!
trap 'kill "$worker" 2>/dev/null; wait "$worker" 2>/dev/null' EXIT
python3 -m streamlit run streamlit_app.py --server.headless true --server.port "${SPHERELAB_PORT:-8501}"
