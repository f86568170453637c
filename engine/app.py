"""`spherelab app` (`python -m engine app`): the worker and the dashboard together; Ctrl-C stops both.

Torch-free: it only starts processes. The dashboard listens on 127.0.0.1 (this machine only)
unless SPHERELAB_ADDRESS says otherwise; there is no login, so an address other machines reach
lets anyone there launch, stop and delete runs. Port: SPHERELAB_PORT (8501). Runs trained at
once: SPHERELAB_PARALLEL (2). Store: --db, else SPHERELAB_DB, else the default file.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# The folder holding the engine, storage and dashboard packages and streamlit_app.py: the
# repository, or site-packages after `pip install`, so the app starts from any directory.
ROOT = Path(__file__).resolve().parent.parent
LOCAL = ("127.0.0.1", "localhost", "::1")


def streamlit_command(address: str, port: str) -> list[str]:
    # the flags repeat .streamlit/config.toml, which Streamlit only reads from the current directory
    return [sys.executable, "-m", "streamlit", "run", str(ROOT / "streamlit_app.py"), "--server.headless", "true",
            "--server.address", address, "--server.port", port, "--browser.gatherUsageStats", "false",
            "--client.toolbarMode", "minimal", "--theme.primaryColor", "#2856a3"]


def main(args) -> int:
    env = {**os.environ, **({"SPHERELAB_DB": args.db} if args.db else {})}
    address, port = env.get("SPHERELAB_ADDRESS", "127.0.0.1"), env.get("SPHERELAB_PORT", "8501")
    worker = subprocess.Popen([sys.executable, "-m", "engine", "worker", "--max-parallel",
                               env.get("SPHERELAB_PARALLEL", "2")], cwd=ROOT, env=env)
    host = "localhost" if address in LOCAL else address
    print(f"spherelab: dashboard on http://{host}:{port}, worker pid {worker.pid}; Ctrl-C stops both.", flush=True)
    if address not in LOCAL:
        print(f"spherelab: listening on {address} with no login: anyone who can reach this machine can "
              "launch, stop and delete runs.", file=sys.stderr, flush=True)
    try:
        return subprocess.call(streamlit_command(address, port), cwd=ROOT, env=env)
    except KeyboardInterrupt:
        return 130
    finally:
        worker.terminate()   # an orderly stop: its runs are marked interrupted and resume next time
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
