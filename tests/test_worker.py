"""The worker with real processes and a real SQLite file: claims, commands, kill -9 and resume."""
import multiprocessing
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from engine.config import RunConfig
from engine.trainer import train_traces
from engine.worker import Worker
from storage import MIN_STALE_AFTER_S, Store
from tests.processes import engine, start_worker, wait_for

def reference_trace(config: dict):
    """The same run trained in-process without interruption."""
    torch.set_num_threads(1)
    return train_traces([RunConfig.from_dict(config)])[0]


def submit(db, *args) -> list[int]:
    out = engine("submit", *args, db=db)
    assert out.returncode == 0, out.stderr
    return [int(x) for x in out.stdout.split()]


def test_submit_twice_then_worker_runs_both_to_finished(tmp_path):
    db = str(tmp_path / "q.db")
    a = submit(db, "--elr", "0.001", "--epochs", "3")
    b = submit(db, "--elr", "0.05", "--epochs", "3")
    worker = start_worker(db, "--once", "--max-parallel", "2")
    assert worker.wait(timeout=180) == 0
    store = Store(db)
    for run_id in a + b:
        info = store.get_run(run_id)
        assert info.status == "finished" and info.progress == 1.0
        frame = store.read_metrics(run_id, ["train_loss"])
        assert frame["step"].is_monotonic_increasing and frame["step"].is_unique
    assert store.live_workers() == []          # the worker deregistered on exit


def test_two_workers_four_runs_each_claimed_once_no_rows_lost(tmp_path):
    db = str(tmp_path / "race.db")
    ids = submit(db, "--elr", "0.001", "0.003", "0.01", "0.03", "--epochs", "2")
    logs = [open(tmp_path / f"w{i}.log", "w+") for i in range(2)]
    # the claim race of single runs (packing would let the first worker take the whole sweep)
    workers = [start_worker(db, "--once", "--max-parallel", "1", log=logs[i], env={"SPHERELAB_PACK": "0"})
               for i in range(2)]
    for w in workers:
        assert w.wait(timeout=240) == 0
    store = Store(db)
    claimed_by = {}
    for run_id in ids:
        info = store.get_run(run_id)
        assert info.status == "finished"
        claimed_by[run_id] = info.worker_id
        running = [e for e in store.events(run_id, ["status"]) if e.payload.get("status") == "running"]
        assert len(running) == 1, running                   # taken exactly once
        stored = store.read_metrics(run_id)
        expected = reference_trace(info.config)
        assert len(stored) == len(expected)                  # no lost or duplicated log points
        assert stored["step"].tolist() == expected["step"].tolist()
        np.testing.assert_allclose(stored["train_loss"], expected["train_loss"], rtol=1e-6)
    for log in logs:
        log.seek(0)
        assert "database is locked" not in log.read()
    assert len(set(claimed_by.values())) == 2               # both workers did work


def test_kill_9_mid_run_then_resume_gives_one_exact_trajectory(tmp_path):
    db = str(tmp_path / "kill.db")
    [run_id] = submit(db, "--elr", "0.01", "--epochs", "40", "--log-every", "4")
    store = Store(db)
    worker = start_worker(db, "--stale-after", str(MIN_STALE_AFTER_S))
    try:
        # the first resume checkpoint (epoch 1; later ones come at most every runner.CHECKPOINT_MIN_S)
        ckpt = wait_for(lambda: store.get_run(run_id).checkpoint_step)
        wait_for(lambda: store.last_step(run_id) and store.last_step(run_id) > ckpt + 8)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    killed_at = store.last_step(run_id)
    assert store.get_run(run_id).status == "running"      # nobody had time to mark it yet
    rows_before = store.read_metrics(run_id, ["train_loss"])
    assert len(rows_before) > 0 and rows_before["step"].max() > ckpt   # rows up to the last flush survived
    # the heartbeat is stale by the next worker's start
    wait_for(lambda: time.time() - store.get_run(run_id).heartbeat_at > MIN_STALE_AFTER_S, timeout=30)
    assert store.last_step(run_id) == killed_at           # the child died with its worker

    worker = start_worker(db, "--once", "--stale-after", str(MIN_STALE_AFTER_S))
    assert worker.wait(timeout=240) == 0
    info = store.get_run(run_id)
    assert info.status == "finished"
    statuses = [e.payload.get("status") for e in store.events(run_id, ["status"])]
    assert statuses == ["running", "interrupted", "running", "finished"], statuses
    resume = store.events(run_id, ["resume"])
    assert len(resume) == 1 and resume[0].step <= killed_at
    stored = store.read_metrics(run_id)
    assert stored["step"].is_monotonic_increasing and stored["step"].is_unique
    expected = reference_trace(info.config)
    assert stored["step"].tolist() == expected["step"].tolist()
    for key in ("train_loss", "si_norm", "angular_update", "test_acc"):
        np.testing.assert_allclose(stored[key], expected[key], rtol=1e-5, equal_nan=True, err_msg=key)


def test_commands_pause_resume_set_elr_stop(tmp_path):
    db = str(tmp_path / "cmd.db")
    [run_id] = submit(db, "--elr", "0.001", "--epochs", "2000", "--log-every", "5")
    store = Store(db)
    worker = start_worker(db)
    try:
        wait_for(lambda: store.get_run(run_id).status == "running" and (store.last_step(run_id) or 0) > 20)
        store.send_command(run_id, "set_elr", {"value": 0.02})
        change = wait_for(lambda: store.events(run_id, ["elr_change"]))
        assert change[0].payload == {"from": 0.001, "to": 0.02}
        wait_for(lambda: (store.latest_metrics(run_id)["elr"][1]) == pytest.approx(0.02, rel=1e-4))

        store.send_command(run_id, "pause")
        wait_for(lambda: store.get_run(run_id).status == "paused")
        paused = store.get_run(run_id)
        wait_for(lambda: store.get_run(run_id).heartbeat_at > paused.heartbeat_at + 1.0)   # alive while paused
        assert store.get_run(run_id).step == paused.step
        store.send_command(run_id, "resume")
        wait_for(lambda: store.get_run(run_id).status == "running" and store.get_run(run_id).step > paused.step)

        assert engine("cancel", str(run_id), db=db).returncode == 0
        wait_for(lambda: store.get_run(run_id).status == "cancelled")
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    assert store.get_run(run_id).finished_at is not None


def test_worker_sigterm_marks_running_run_interrupted(tmp_path):
    db = str(tmp_path / "term.db")
    [run_id] = submit(db, "--elr", "0.001", "--epochs", "2000")
    store = Store(db)
    log = tmp_path / "worker.log"
    with open(log, "w") as sink:
        worker = start_worker(db, log=sink)
        wait_for(lambda: (store.last_step(run_id) or 0) > 10)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
    assert store.get_run(run_id).status == "interrupted"
    assert "killed" not in log.read_text()       # the run stopped at its next step; nobody had to kill it


def _deaf_to_sigterm(ready) -> None:
    """A run process stuck where it never reaches its next step (a long kernel, a hung read)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ready.set()
    time.sleep(600)


def test_shutdown_kills_a_child_deaf_to_sigterm_and_marks_its_run_interrupted(tmp_path):
    store = Store(tmp_path / "deaf.db")
    run_id = store.create_run(RunConfig(epochs=1).to_dict(), name="stuck")
    assert store.claim_next_run("w").id == run_id
    store.set_status(run_id, "running")
    worker = Worker(str(tmp_path / "deaf.db"))
    worker.shutdown_grace_s = 1.0
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(target=_deaf_to_sigterm, args=(ready,))
    child.start()
    assert ready.wait(timeout=60)
    worker.children[run_id] = child
    worker._shutdown(store)
    assert child.exitcode == -signal.SIGKILL         # SIGTERM was ignored; the worker did not wait forever
    assert store.get_run(run_id).status == "interrupted"
    assert not worker.children


def test_child_killed_alone_marks_its_run_failed(tmp_path):
    db = str(tmp_path / "oom.db")
    [run_id] = submit(db, "--elr", "0.001", "--epochs", "2000")
    store = Store(db)
    worker = start_worker(db)
    try:
        wait_for(lambda: (store.last_step(run_id) or 0) > 10)
        children = subprocess.run(["pgrep", "-P", str(worker.pid), "-f", "spawn"], capture_output=True, text=True)
        pids = [int(p) for p in children.stdout.split()]
        assert pids, "no run process found"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)        # what the OOM killer does
        info = wait_for(lambda: store.get_run(run_id).status == "failed" and store.get_run(run_id))
        assert info.error == "its process was killed by SIGKILL (the out-of-memory killer, or kill -9)"
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
