"""`spherelab app` (`python -m engine app`): the worker and the dashboard together; Ctrl-C stops both.

Torch-free: it only starts processes. The dashboard listens on 127.0.0.1 (this machine only)
unless SPHERELAB_ADDRESS says otherwise; there is no login, so an address other machines reach
lets anyone there launch, stop and delete runs. Port: SPHERELAB_PORT (8501). Runs trained at
once: SPHERELAB_PARALLEL (2). Store: --db, else SPHERELAB_DB, else the default file.
"""
from __future__ import annotations

import os
import signal
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


class _Stop(Exception):
    """SIGTERM or SIGHUP reached the app: stop the worker and the dashboard, then exit."""


def _raise_stop(signum, _frame):
    raise _Stop(signum)


def main(args) -> int:
    env = {**os.environ, **({"SPHERELAB_DB": args.db} if args.db else {})}
    address, port = env.get("SPHERELAB_ADDRESS", "127.0.0.1"), env.get("SPHERELAB_PORT", "8501")
    # SIGTERM (kill, systemd, docker stop) and SIGHUP (the terminal closed) stop all three processes, as
    # Ctrl-C does; without a handler they ended this process alone and left the others serving.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_stop)
    children: list[subprocess.Popen] = []
    try:
        children.append(subprocess.Popen([sys.executable, "-m", "engine", "worker", "--max-parallel",
                                          env.get("SPHERELAB_PARALLEL", "2")], cwd=ROOT, env=env))
        host = "localhost" if address in LOCAL else address
        print(f"spherelab: dashboard on http://{host}:{port}, worker pid {children[0].pid}; Ctrl-C stops both.",
              flush=True)
        if address not in LOCAL:
            print(f"spherelab: listening on {address} with no login: anyone who can reach this machine can "
                  "launch, stop and delete runs.", file=sys.stderr, flush=True)
        children.append(subprocess.Popen(streamlit_command(address, port), cwd=ROOT, env=env))
        return children[1].wait()
    except KeyboardInterrupt:
        return 130
    except _Stop as stop:
        return 128 + stop.args[0]
    finally:
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)       # a second signal must not cut the cleanup short
        for child in reversed(children):
            if child.poll() is None:
                child.terminate()   # the worker's stop is orderly: its runs are marked interrupted and resume
        for child in reversed(children):
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
