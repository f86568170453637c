"""Shared fixtures: a throwaway PostgreSQL server (initdb + pg_ctl in a temp dir, on a free port).

The test process trains on one torch thread: the models under test are tiny, and on a 2-core
machine shared with worker subprocesses extra threads only spin.
"""

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid

import pytest
import torch

torch.set_num_threads(1)


def _postgres_bindir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda path: int(path.split("/")[4]) if path.split("/")[4].isdigit() else 0)
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


def _unavailable(reason: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL is required in CI but {reason}")
    pytest.skip(f"PostgreSQL unavailable: {reason}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_server():
    """Connection settings of a PostgreSQL server that lives for the test session."""
    bindir = _postgres_bindir()
    if bindir is None:
        _unavailable("no initdb under /usr/lib/postgresql/*/bin or on PATH")
    # postgres refuses to run as root: run the server as the `postgres` system user then
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = tempfile.mkdtemp(prefix="spherelab-pg-")
    data, port = os.path.join(root, "data"), _free_port()

    def run(*args):
        return subprocess.run([*as_postgres, *args], capture_output=True, text=True, timeout=120)

    try:
        if as_postgres:
            shutil.chown(root, "postgres", "postgres")
        done = run(f"{bindir}/initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        if done.returncode:
            _unavailable(f"initdb failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        done = run(f"{bindir}/pg_ctl", "-D", data, "-l", os.path.join(root, "server.log"), "-w", "-t", "60",
                   "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        if done.returncode:
            _unavailable(f"pg_ctl start failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        try:
            yield {"host": "127.0.0.1", "port": port, "user": "postgres"}
        finally:
            run(f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "stop")
    except (OSError, subprocess.SubprocessError, LookupError) as exc:
        _unavailable(str(exc))
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A SQLAlchemy URL of a new, empty database on the session's server."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(dbname="postgres", autocommit=True, **postgres_server) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    return f"postgresql+psycopg://postgres@127.0.0.1:{postgres_server['port']}/{name}"
