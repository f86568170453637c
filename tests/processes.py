"""Helpers for tests that drive real engine processes."""
import os
import subprocess
import sys
import time


def engine(*args, db=None, check=False, timeout=600, env=None):
    """`python -m engine ARGS [--db DB]`, captured; with check, fail the test (showing stderr) unless it
    exits 0. env entries are added to this process's environment."""
    out = subprocess.run([sys.executable, "-m", "engine", *args, *(["--db", db] if db else [])], capture_output=True,
                         text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def start_worker(db, *extra, log=None, env=None):
    """`python -m engine worker` on db, polling fast; env entries are added to this process's environment."""
    return subprocess.Popen([sys.executable, "-m", "engine", "worker", "--db", db, "--poll", "0.2", *extra],
                            stdout=subprocess.DEVNULL, stderr=log or subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def wait_for(predicate, timeout=120.0, every=0.1):
    """Poll until predicate() is truthy and return its value; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not reached in time")
