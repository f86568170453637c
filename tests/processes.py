"""Helpers for tests that drive real engine processes: the one `engine()` every test file calls, a
worker, and a wait on an event."""
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The workers tests start look for stale runs and jobs this often (engine.worker.STALE_CHECK_EVERY_S,
# 5 s for users): a test that waits for a stale check then waits for that event, not for 5 s.
STALE_CHECK_S = 0.5


def engine(*args, db=None, check=False, timeout=600, env=None):
    """`python -m engine ARGS [--db DB]` in the repository root, captured; with check, fail the test
    (showing stderr) unless it exits 0. env entries are added to this process's environment."""
    out = subprocess.run([sys.executable, "-m", "engine", *args, *(["--db", str(db)] if db else [])],
                         capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                         env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def start_worker(db, *extra, log=None, env=None, cwd=ROOT, new_session=False):
    """`python -m engine worker` on db, polling fast and checking for stale work every STALE_CHECK_S; env
    entries are added to this process's environment. new_session: its own process group (killpg stops
    it with its run processes, as a machine going down would)."""
    return subprocess.Popen([sys.executable, "-m", "engine", "worker", "--db", str(db), "--poll", "0.2", *extra],
                            stdout=subprocess.DEVNULL, stderr=log or subprocess.DEVNULL, cwd=cwd,
                            start_new_session=new_session,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "SPHERELAB_STALE_CHECK_S": str(STALE_CHECK_S),
                                 **(env or {})})


def wait_for(predicate, timeout=120.0, every=0.1):
    """Poll until predicate() is truthy and return its value; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not reached in time")


def copy_store(source, target) -> str:
    """A consistent copy of a SQLite store (its WAL included) at target, for a test that writes, with its
    checkpoint files (hard links to the source's, in the copy's own artifact folder beside it)."""
    import shutil
    import sqlite3
    src, dst = sqlite3.connect(str(source)), sqlite3.connect(str(target))
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
    folder = Path(f"{source}.checkpoints")
    if folder.is_dir():
        shutil.copytree(folder, f"{target}.checkpoints", copy_function=os.link)
    return str(target)
