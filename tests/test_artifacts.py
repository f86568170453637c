"""Checkpoints as artifacts (storage.artifacts): recorded by key under one root, never a host's path. A
recorded checkpoint that cannot be found is never a fresh start; an older store's paths become keys;
an S3 root (a local moto server) carries resumes, forks, averages and bundles; a run killed on one
"host" resumes on another from its checkpoint."""
import json
import os
import shutil
import signal
import sqlite3
from pathlib import Path

import pytest
import torch

from engine import runner
from engine.config import RunConfig
from engine.trainer import Trainer
from storage import Store, StoreError
from storage.artifacts import ENV_VAR
from tests.processes import ROOT, engine, start_worker, wait_for

TINY = dict(width=16, depth=2, log_every=5, device="cpu")


def half_trained(store: Store, *, epochs: int = 4, done: int = 2) -> int:
    """A run of `epochs` trained `done` epochs here, a kept checkpoint at each, then left interrupted
    with its resume checkpoint at epoch `done` (as a killed worker leaves it)."""
    cfg = RunConfig(**TINY, epochs=epochs, elr=0.01, keep_every=1)
    [run_id] = store.create_runs([{"config": cfg.to_dict(), "name": "half"}])
    info = store.claim_next_run("here")
    torch.set_num_threads(1)
    trainer = Trainer([cfg])
    m = trainer.members[0]
    m.run_id, m.claim, m.recorder = run_id, info.claim, runner.StoreRecorder(store, run_id)
    trainer.measure([])
    for _ in range(done):
        for _ in range(m.steps_per_epoch):
            trainer.train_step()
        runner.save_checkpoint(store, m, keep=True)
    m.recorder.close()
    store.update_run(run_id, step=m.step, total_steps=m.total_steps)
    store.set_status(run_id, "interrupted")
    return run_id


def trace(store: Store, run_id: int):
    return store.read_metrics(run_id, ["train_loss"])


def resume_events(store: Store, run_id: int) -> list[int]:
    return [e.payload["from_step"] for e in store.events(run_id, ["resume"])]


# ---- key-based, local --------------------------------------------------------------------------------

def test_checkpoints_are_recorded_by_key_and_a_path_is_refused(tmp_path):
    store = Store(tmp_path / "k.db")
    run_id = half_trained(store, epochs=3, done=1)
    run = store.get_run(run_id)
    assert run.checkpoint_path.startswith(f"runs/{run_id}/resume-") and not os.path.isabs(run.checkpoint_path)
    assert [c.path.startswith(f"runs/{run_id}/epoch-1-") for c in store.checkpoints(run_id)] == [True]
    assert store.artifacts.root == f"{tmp_path}/k.db.checkpoints"         # the folder earlier versions used
    with pytest.raises(StoreError, match="is not an artifact key"):
        store.update_run(run_id, checkpoint_path=str(tmp_path / "elsewhere.pt"))


def test_a_missing_checkpoint_waits_for_its_file_and_never_restarts_the_run(tmp_path):
    """Before: a recorded checkpoint that was not found started the run again from step 0 and deleted
    its trace. Now the run goes interrupted naming the key and the root, the worker does not take it
    again (worker --once ends), `resume` is refused until the file is back, then it resumes."""
    db = str(tmp_path / "m.db")
    store = Store(db)
    run_id = half_trained(store)
    before = trace(store, run_id)
    key, resumed_from = store.get_run(run_id).checkpoint_path, store.get_run(run_id).checkpoint_step
    file = Path(store.artifacts.path(key))
    aside = tmp_path / "aside.pt"
    file.rename(aside)

    worker = start_worker(db, "--once")
    assert worker.wait(timeout=180) == 0            # it ends: it does not claim the run again and again
    run = store.get_run(run_id)
    assert (run.status, run.waiting_for) == ("interrupted", key)
    assert key in run.error and store.artifacts.root in run.error and "\n" not in run.error
    assert run.error.endswith(f"then `python -m engine resume {run_id}`")
    assert trace(store, run_id).equals(before) and resume_events(store, run_id) == []   # trace untouched

    refused = engine("resume", str(run_id), db=db)
    assert refused.returncode == 2 and key in refused.stderr and "missing" in refused.stderr
    assert store.get_run(run_id).waiting_for == key

    aside.rename(file)
    assert engine("resume", str(run_id), db=db).returncode == 0
    assert store.get_run(run_id).waiting_for is None
    assert start_worker(db, "--once").wait(timeout=180) == 0
    done = store.get_run(run_id)
    assert done.status == "finished" and done.step == done.total_steps
    assert resumed_from == done.total_steps // 2                      # epoch 2 of 4
    assert resume_events(store, run_id) == [resumed_from]
    after = trace(store, run_id)
    kept = after[after["step"] <= resumed_from].reset_index(drop=True)
    assert kept.equals(before[before["step"] <= resumed_from].reset_index(drop=True))  # not rewritten
    assert after["step"].max() == done.total_steps


def test_a_fork_whose_parent_checkpoint_is_missing_waits_too(tmp_path):
    db = str(tmp_path / "f.db")
    store = Store(db)
    parent = half_trained(store, epochs=3, done=1)
    child = int(engine("fork", str(parent), "--at", "1", "--epochs", "1", "--submit", db=db, check=True)
                .stdout.split()[-1])
    kept = store.checkpoints(parent)[0].path
    file = Path(store.artifacts.path(kept))
    file.rename(tmp_path / "aside.pt")
    assert start_worker(db, "--once").wait(timeout=180) == 0
    run = store.get_run(child)
    assert (run.status, run.waiting_for, run.step) == ("interrupted", kept, 0) and kept in run.error
    assert store.read_metrics(child, ["train_loss"]).empty
    (tmp_path / "aside.pt").rename(file)
    assert engine("resume", str(child), db=db).returncode == 0
    assert start_worker(db, "--once").wait(timeout=180) == 0
    assert store.get_run(child).status == "finished"


def test_a_postgresql_store_without_an_artifact_root_is_refused_in_one_line(postgres_url, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    out = engine("train", "--epochs", "1", "--db", postgres_url, env={ENV_VAR: ""})
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "no artifact root" in out.stderr and ENV_VAR in out.stderr and "--artifacts" in out.stderr
    assert Store(postgres_url).list_runs() == []                 # refused before anything was queued


# ---- migration -----------------------------------------------------------------------------------------

def old_layout(db: str) -> None:
    """Turn a store into what schema version 5 wrote: checkpoint files flat in <db>.checkpoints, recorded
    by absolute path, no runs.waiting_for."""
    store = Store(db)
    root = store.artifacts.base
    moves = {}
    for run in store.list_runs():
        keys = ([run.checkpoint_path] if run.checkpoint_path else []) + [c.path for c in store.checkpoints(run.id)]
        for key in keys:
            flat = key.replace("/", "-")
            os.replace(f"{root}/{key}", f"{root}/{flat}")
            moves[key] = f"{root}/{flat}"
    store.close()
    with sqlite3.connect(db) as raw:
        for key, path in moves.items():
            raw.execute("UPDATE runs SET checkpoint_path = ? WHERE checkpoint_path = ?", (path, key))
            raw.execute("UPDATE checkpoints SET path = ? WHERE path = ?", (path, key))
        raw.execute("ALTER TABLE runs DROP COLUMN waiting_for")
        raw.execute("UPDATE meta SET value = '5' WHERE key = 'schema_version'")
    shutil.rmtree(f"{root}/runs")


def test_an_older_store_moved_elsewhere_opens_resumes_and_forks(tmp_path):
    """Before: checkpoints were recorded by absolute path, so a store whose folder moved lost them (and
    its interrupted runs restarted from step 0). Opening converts the paths to keys."""
    old = tmp_path / "old"
    old.mkdir()
    store = Store(old / "s.db")
    run_id = half_trained(store)
    before = trace(store, run_id)
    store.close()
    old_layout(str(old / "s.db"))
    with sqlite3.connect(old / "s.db") as raw:
        assert raw.execute("SELECT checkpoint_path FROM runs").fetchone()[0].startswith(str(old))
    moved = tmp_path / "moved"
    old.rename(moved)
    db = str(moved / "s.db")

    store = Store(db)
    assert store.schema_version == 6
    run = store.get_run(run_id)
    assert not os.path.isabs(run.checkpoint_path) and os.path.isfile(store.artifacts.path(run.checkpoint_path))
    assert all(os.path.isfile(store.artifacts.path(c.path)) for c in store.checkpoints(run_id))
    assert start_worker(db, "--once").wait(timeout=180) == 0
    done = store.get_run(run_id)
    assert done.status == "finished" and len(resume_events(store, run_id)) == 1
    resumed_from = resume_events(store, run_id)[0]
    assert resumed_from > 0
    after = trace(store, run_id)
    assert after[after["step"] <= resumed_from].reset_index(drop=True).equals(
        before[before["step"] <= resumed_from].reset_index(drop=True))
    child = engine("fork", str(run_id), "--at", "1", "--epochs", "1", db=db, check=True)
    assert store.get_run(int(child.stdout.split()[-1])).status == "finished"


# ---- S3 (a local moto server) ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3_endpoint():
    pytest.importorskip("moto.server", reason="moto[server] (requirements-test.txt) runs the local S3 server")
    from moto.server import ThreadedMotoServer
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_root(s3_endpoint, monkeypatch, request):
    """A fresh bucket on the local S3 server, the environment pointed at it (for this process and the
    engine processes it starts): the artifact root URL."""
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": s3_endpoint}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    import fsspec
    bucket = f"lab-{abs(hash(request.node.name)) % 10**8}"
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(bucket)
    root = f"s3://{bucket}/spherelab"
    monkeypatch.setenv(ENV_VAR, root)
    return root


def test_resume_fork_average_and_bundle_through_s3(tmp_path, s3_root):
    db = str(tmp_path / "s3.db")
    store = Store(db)
    assert store.artifacts.root == s3_root and not store.artifacts.local
    run_id = half_trained(store, epochs=3, done=2)
    assert not os.path.exists(f"{db}.checkpoints")                  # nothing beside the database
    assert start_worker(db, "--once").wait(timeout=180) == 0
    assert store.get_run(run_id).status == "finished" and len(resume_events(store, run_id)) == 1
    assert sorted(c.epoch for c in store.checkpoints(run_id)) == [1, 2, 3]
    child = engine("fork", str(run_id), "--at", "2", "--epochs", "1", db=db, check=True)
    assert store.get_run(int(child.stdout.split()[-1])).status == "finished"
    average = json.loads(engine("average", str(run_id), "--at", "1", "2", "3", "--json", db=db,
                                check=True).stdout)
    assert average["epochs"] == [1, 2, 3] and 0 <= average["test_acc"] <= 1

    bundle = str(tmp_path / "run.zip")
    engine("bundle", str(run_id), "--with-checkpoints", "--out", bundle, db=db, check=True)
    theirs = str(tmp_path / "theirs.db")
    [imported] = [int(x) for x in engine("import", bundle, db=theirs, check=True).stdout.split()]
    other = Store(theirs)
    mine = {c.epoch: store.artifacts.source(c.path).read() for c in store.checkpoints(run_id)}
    assert {c.epoch: other.artifacts.source(c.path).read() for c in other.checkpoints(imported)} == mine
    grandchild = engine("fork", str(imported), "--at", "3", "--epochs", "1", db=theirs, check=True)
    assert other.get_run(int(grandchild.stdout.split()[-1])).status == "finished"


def test_gc_lists_then_removes_only_unreferenced_artifacts(tmp_path, s3_root):
    db = str(tmp_path / "gc.db")
    store = Store(db)
    run_id = half_trained(store, epochs=3, done=1)
    referenced = {store.get_run(run_id).checkpoint_path, *(c.path for c in store.checkpoints(run_id))}
    store.artifacts.write("runs/99/resume-orphan.pt", lambda f: f.write(b"left by a deleted run"))
    dry = engine("gc", db=db, env={"SPHERELAB_GC_GRACE_S": "0.001"}, check=True)
    assert "runs/99/resume-orphan.pt" in dry.stdout and "dry run" in dry.stdout
    assert store.artifacts.exists("runs/99/resume-orphan.pt")
    assert engine("gc", "--delete", db=db, env={"SPHERELAB_GC_GRACE_S": "0.001"}, check=True).returncode == 0
    assert set(store.artifacts.keys()) == referenced


# ---- two hosts ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_run_killed_on_one_host_resumes_on_another_from_its_checkpoint(tmp_path, s3_root, kind, request):
    """Two workers with their own working folder and home, one store, one S3 artifact root: host A is
    killed (SIGKILL, its run process too) mid-run; host B resumes the run from A's last checkpoint and
    the trace continues from there (no restart, no truncation before it)."""
    db = str(tmp_path / "shared.db") if kind == "sqlite" else request.getfixturevalue("postgres_url")
    out = engine("submit", "--epochs", "40", "--width", "16", "--depth", "2", "--log-every", "5",
                 "--keep-every", "1", db=db, check=True)
    run_id = int(out.stdout.split()[-1])
    store = Store(db)
    hosts = {}
    for name in ("a", "b"):
        home = tmp_path / f"host-{name}"
        home.mkdir()
        hosts[name] = dict(cwd=home, env={"HOME": str(home), "PYTHONPATH": str(ROOT)})
    a = start_worker(db, "--stale-after", "3", new_session=True, **hosts["a"])
    try:
        wait_for(lambda: (store.get_run(run_id).checkpoint_step or 0) >= 2 * 44, timeout=240)
    finally:
        os.killpg(a.pid, signal.SIGKILL)
        a.wait()
    killed = store.get_run(run_id)
    # the step of the file A left (a kill between its write and the row's update leaves the row one
    # checkpoint behind the file under the same key: metrics are flushed first, so the trace covers it)
    checkpoint_step = torch.load(store.artifacts.source(killed.checkpoint_path), weights_only=True)["step"]
    steps_before = trace(store, run_id)
    assert killed.status == "running" and 0 < killed.checkpoint_step <= checkpoint_step < killed.total_steps
    b = start_worker(db, "--stale-after", "3", **hosts["b"])     # it finds A's run stale, then resumes it
    try:
        wait_for(lambda: store.get_run(run_id).status in ("finished", "failed"), timeout=300)
    finally:
        b.terminate()
        b.wait(timeout=60)
    done = store.get_run(run_id)
    assert done.status == "finished" and done.step == done.total_steps
    assert resume_events(store, run_id) == [checkpoint_step]
    after = trace(store, run_id)
    assert after[after["step"] <= checkpoint_step].reset_index(drop=True).equals(
        steps_before[steps_before["step"] <= checkpoint_step].reset_index(drop=True))
    print(f"two hosts ({kind}): A logged metrics up to step {int(steps_before['step'].max())} before the kill, "
          f"resumed on B from step {checkpoint_step}, finished at step {done.step} of {done.total_steps}")


def test_the_run_page_shows_a_waiting_run_and_its_resume_button_lets_workers_take_it(tmp_path, monkeypatch):
    from dashboard.plain import md
    from tests.test_dashboard import open_app, texts
    db = str(tmp_path / "page.db")
    store = Store(db)
    run_id = half_trained(store, epochs=3, done=1)
    key = store.get_run(run_id).checkpoint_path
    file = Path(store.artifacts.path(key))
    file.rename(tmp_path / "aside.pt")
    assert start_worker(db, "--once").wait(timeout=180) == 0
    at = open_app(db, monkeypatch, "run", run=run_id)
    assert md(key) in texts(at) and "missing" in texts(at)
    at.button(key=f"resume-{run_id}").click().run()
    assert md(key) in " ".join(e.value for e in at.error)        # still missing: refused, nothing changed
    assert store.get_run(run_id).waiting_for == key
    (tmp_path / "aside.pt").rename(file)
    at.button(key=f"resume-{run_id}").click().run()
    assert not at.exception and store.get_run(run_id).waiting_for is None
    assert store.get_run(run_id).status == "interrupted"         # claimable again
    assert store.claim_interrupted("w").id == run_id


def test_the_artifacts_flag_puts_checkpoints_under_its_root_and_an_empty_one_is_refused(tmp_path):
    db, root = str(tmp_path / "f.db"), tmp_path / "elsewhere"
    out = engine("train", "--epochs", "1", "--keep-every", "1", "--width", "16", "--artifacts", str(root), db=db,
                 check=True)
    run_id = int(out.stdout.split()[-1])
    [kept] = Store(db, artifacts=str(root)).checkpoints(run_id)
    assert (root / kept.path).is_file() and not os.path.exists(f"{db}.checkpoints")
    empty = engine("runs", "--artifacts", " ", db=db)
    assert empty.returncode == 2 and "--artifacts" in empty.stderr and len(empty.stderr.strip().splitlines()) == 1


def test_a_failed_run_whose_damaged_checkpoint_was_replaced_resumes(tmp_path):
    db = str(tmp_path / "d.db")
    store = Store(db)
    run_id = half_trained(store, epochs=3, done=1)
    key = store.get_run(run_id).checkpoint_path
    good = Path(store.artifacts.path(key)).read_bytes()
    Path(store.artifacts.path(key)).write_bytes(b"PK\x03\x04 truncated")
    assert start_worker(db, "--once").wait(timeout=180) == 0
    failed = store.get_run(run_id)
    assert failed.status == "failed" and key in failed.error and store.artifacts.root in failed.error
    Path(store.artifacts.path(key)).write_bytes(good)
    assert engine("resume", str(run_id), db=db).returncode == 0
    assert start_worker(db, "--once").wait(timeout=180) == 0
    assert store.get_run(run_id).status == "finished" and resume_events(store, run_id) == [failed.checkpoint_step]


def test_the_worker_command_the_dashboard_shows_names_a_postgresql_stores_artifact_root(postgres_url, monkeypatch,
                                                                                        tmp_path):
    from tests.test_dashboard import open_app
    monkeypatch.delenv(ENV_VAR, raising=False)
    shown = " ".join(c.value for c in open_app(postgres_url, monkeypatch, "launch").code)
    assert "engine worker --db" in shown and "--artifacts ROOT" in shown
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "shared"))
    shown = " ".join(c.value for c in open_app(postgres_url, monkeypatch, "launch").code)
    assert f"--artifacts {tmp_path / 'shared'}" in shown
    monkeypatch.delenv(ENV_VAR)
    sqlite = " ".join(c.value for c in open_app(tmp_path / "s.db", monkeypatch, "launch").code)
    assert "engine worker --db" in sqlite and "--artifacts" not in sqlite     # its folder is beside the file
