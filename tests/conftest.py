"""Shared fixtures: a throwaway PostgreSQL server (initdb + pg_ctl in a temp dir, on a free port), a
new SQLite store, an empty store's path, a small study trained once for the whole session, and
in-memory training whose traces are shared by every test that trains the same configurations.

The test process trains on one torch thread: the models under test are tiny, and on a 2-core
machine shared with worker subprocesses extra threads only spin.

Under pytest-xdist (scripts/test.sh) each worker process has its own session: its own PostgreSQL
server on its own free port, its own tmp_path. What is trained once for everybody (small_study,
`trained`) is trained by the first worker that asks, under a file lock, in the run's shared temporary folder.
"""

import glob
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import uuid

import pandas as pd
import pytest
import torch
from filelock import FileLock

from storage import Store
from tests.processes import engine

torch.set_num_threads(1)


# Under pytest-xdist's --dist loadfile (scripts/test.sh) a file is one unit of work, handed out in
# collection order: the longest files go first, so that no long file starts last and runs alone while
# the other worker idles (longest-processing-time-first). Measured CPU seconds per file, largest first.
LONGEST_FIRST = ("test_hardening_worker.py", "test_browser.py", "test_presets.py", "test_ray.py", "test_worker.py",
                 "test_solutions.py", "test_regimes.py", "test_packed.py", "test_study.py", "test_hardening.py",
                 "test_cli.py", "test_dashboard_teach.py", "test_dashboard.py", "test_calibrate.py", "test_trainer.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))     # stable: each file keeps its order


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


@pytest.fixture
def sqlite_store(tmp_path):
    """A new, empty SQLite store, closed after the test."""
    with Store(tmp_path / "store.db") as opened:
        yield opened


@pytest.fixture
def store(sqlite_store):
    """A new, empty store (SQLite; tests/test_storage.py runs its store tests on PostgreSQL too)."""
    return sqlite_store


@pytest.fixture
def empty_db(tmp_path):
    """The path of a store that does not exist yet (the app and the CLI create it)."""
    return tmp_path / "empty.db"


# the ticks toy, small: 3 PLRs (one per regime) x 2 seeds, 2 FLRs, SWA of 3 — about 15 s on 2 CPU cores
SMALL_STUDY = ["--dataset", "ticks", "--norm", "layer", "--width", "16", "--depth", "2", "--batch-size", "16",
               "--log-every", "32", "--eval-every", "320", "--pretrain-elr", "1e-3", "3e-2", "1",
               "--pretrain-epochs", "30", "--finetune-elr", "1e-4", "1e-3", "--finetune-epochs", "10",
               "--average", "3", "--points", "5", "--seed", "0", "1", "--no-refine"]


def _shared_dir(tmp_path_factory) -> str:
    """A folder every xdist worker of this run sees (the base temp's parent); the base temp alone."""
    base = tmp_path_factory.getbasetemp()
    return str(base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base)


@pytest.fixture(scope="session")
def small_study(tmp_path_factory):
    """(db path, study id): a small study run to its end by `python -m engine study`, once per test run.
    Tests only read it; a test that writes copies it first (copy_store)."""
    root = os.path.join(_shared_dir(tmp_path_factory), "small-study")
    os.makedirs(root, exist_ok=True)
    db, done = os.path.join(root, "study.db"), os.path.join(root, "study-id")
    with FileLock(os.path.join(root, "lock")):
        if not os.path.exists(done):
            out = engine("study", *SMALL_STUDY, db=db, check=True, timeout=900)
            with open(done, "w") as mark:
                mark.write(out.stdout.split()[-1])
    with open(done) as mark:
        return db, int(mark.read())



@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """engine.trainer.train_traces, shared by the whole test run: a preset's test and its Teach demo's
    check different promises of the same runs, and train them once. Keyed by the configurations in
    their order, so runs pack exactly as in an uncached call; the kernel path is the run's own."""
    from engine.trainer import train_traces
    root = os.path.join(_shared_dir(tmp_path_factory), "traces")
    os.makedirs(root, exist_ok=True)

    def train(cfgs) -> list[pd.DataFrame]:
        key = hashlib.sha256(json.dumps([c.to_dict() for c in cfgs], sort_keys=True).encode()).hexdigest()[:24]
        path = os.path.join(root, f"{key}.pkl")
        with FileLock(f"{path}.lock"):
            if not os.path.exists(path):
                pd.to_pickle(train_traces(cfgs), f"{path}.part")
                os.replace(f"{path}.part", path)
        return pd.read_pickle(path)
    return train


@pytest.fixture(scope="session")
def preset_traces(trained):
    """(configs, traces) of a preset's runs for the given seeds, seed by seed, through `trained`: the
    preset tests and the Teach demos' tests ask for the same seeds and share one training."""
    from engine.presets import PRESETS

    def traces(name: str, seeds) -> tuple[list, list[pd.DataFrame]]:
        cfgs = [cfg.replace(seed=seed) for seed in seeds for cfg in PRESETS[name].configs()]
        return cfgs, trained(cfgs)
    return traces
