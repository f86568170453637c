"""Helpers for tests that drive the engine: the one `engine()` every test file calls (the CLI in this
process, or a real one), a worker process, and a wait on an event."""
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The workers tests start look for stale runs and jobs this often (engine.worker.STALE_CHECK_EVERY_S,
# 5 s for users): a test that waits for a stale check then waits for that event, not for 5 s.
STALE_CHECK_S = 0.5


# Commands that run here (engine.cli.main in the test's own process) unless a test asks for a real
# process: they are most of the suite's CLI calls, and each real one paid ~2 s of CPU importing torch
# again. `worker` and `app` always get a process (they supervise processes and own their signals), as
# does a call with its own environment (the product reads its timings from it at import).
OWN_PROCESS = {"worker", "app"}


def engine(*args, db=None, check=False, timeout=600, env=None, real_process=False):
    """`python -m engine ARGS [--db DB]`, captured, as a CompletedProcess; with check, fail the test
    (showing stderr) unless it exits 0. env entries are added to the environment of a real process
    (`python -m engine` in the repository root, as with real_process=True); otherwise the command runs
    in this process through engine.cli.main, with the same arguments, outputs and exit status."""
    argv = [*map(str, args), *(["--db", str(db)] if db else [])]
    if real_process or env or args[0] in OWN_PROCESS:
        out = subprocess.run([sys.executable, "-m", "engine", *argv], capture_output=True, text=True,
                             timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    else:
        out = _in_this_process(argv)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def _in_this_process(argv: list[str]) -> subprocess.CompletedProcess:
    """engine.cli.main(argv) with stdout and stderr captured; what a command sets for its whole process
    (argv, cwd, the environment (`--artifacts` sets SPHERELAB_ARTIFACTS for the processes it starts), the
    Ctrl-C handler, torch threads) is put back afterwards."""
    import contextlib
    import io
    import signal

    import torch

    from engine.cli import main
    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv, os.getcwd(), dict(os.environ), signal.getsignal(signal.SIGINT), torch.get_num_threads()
    sys.argv = [str(ROOT / "engine" / "__main__.py"), *argv]     # how the CLI names itself in its messages
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:                               # argparse: usage errors, --help
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv, cwd, environ, handler, threads = saved
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)
        signal.signal(signal.SIGINT, handler)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess([sys.executable, "-m", "engine", *argv], code, out.getvalue(), err.getvalue())


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
