"""Issue 12, the defects that live in the worker and the run processes (items 1, 2, 3, 7, 8), with real
workers, real run processes and real SQLite files. Each test says what main did before and what it does
now."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import runner, worker
from engine.config import RunConfig
from storage import ClaimLost, Store, StoreBusy, StoreError
from tests.processes import start_worker, wait_for
from tests.test_hardening import engine, hold_lock

LONG = ("--elr", "0.001", "--epochs", "2000", "--log-every", "5")


def submit(db, *args) -> list[int]:
    out = engine("submit", *args, "--db", db)
    assert out.returncode == 0, out.stderr
    return [int(x) for x in out.stdout.split()]


def freeze(pid: int, db: str) -> None:
    """SIGSTOP pid at a moment it holds no write lock on the SQLite store db. Frozen inside a write it
    would block every other writer until it thawed (a worker's heartbeat included), which is not what
    these tests are about: it is thawed and frozen again until the store takes a write."""
    import sqlite3
    for _ in range(100):
        os.kill(pid, signal.SIGSTOP)
        probe = sqlite3.connect(db, timeout=0.5)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.rollback()
            return
        except sqlite3.OperationalError:
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.05)
        finally:
            probe.close()
    raise AssertionError(f"process {pid} held the store's write lock at every try")


def run_processes(worker_pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(worker_pid), "-f", "spawn"], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


def stop(proc, timeout=60):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _Boom:
    """Runs a command when unpickled: what a malicious checkpoint does."""
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def write_damaged_checkpoint(path, content) -> None:
    """content "malicious": a checkpoint whose unpickling would run code; else these bytes."""
    if content == "malicious":
        torch.save({"model": _Boom()}, path)
    else:
        path.write_bytes(content)


def test_deleting_a_running_run_leaves_the_worker_training_the_queue(tmp_path):
    """Item 1. Before: `delete` of a running run exited 0, its process hit "no run with id", the worker
    itself exited and the queued runs stayed queued with no worker. Now: the run process finds its run
    gone (ClaimLost), stops writing, and the worker goes on with the queue."""
    db = str(tmp_path / "delete.db")
    [doomed] = submit(db, *LONG)
    [next_run] = submit(db, "--elr", "0.01", "--epochs", "2")
    log = open(tmp_path / "worker.log", "w+")
    proc = start_worker(db, log=log)
    store = Store(db)
    try:
        wait_for(lambda: (store.last_step(doomed) or 0) > 20)
        assert engine("delete", str(doomed), "--db", db).returncode == 0
        wait_for(lambda: store.get_run(next_run).status == "finished", timeout=180)
        assert proc.poll() is None                              # the worker is still there
    finally:
        stop(proc)
    log.seek(0)
    text = log.read()
    assert "Traceback" not in text, text[-3000:]
    assert [r.id for r in store.list_runs()] == [next_run]
    assert not [key for key in store.artifacts.keys() if key.startswith(f"runs/{doomed}/")]


def test_a_run_process_that_lost_its_claim_stops_and_the_run_is_trained_once(tmp_path):
    """Item 2. Before: a run whose process was frozen past --stale-after got a second process while the
    first one, thawed, kept training and writing into the same run (both wrote run-N.pt.tmp; a spurious
    failure). Now: the thawed process's first write raises ClaimLost, it writes nothing more, and the
    stored trace is one trajectory finished once by the successor."""
    db = str(tmp_path / "twice.db")
    [run_id] = submit(db, "--elr", "0.001", "--epochs", "40", "--log-every", "5")
    store = Store(db)
    first = start_worker(db, "--stale-after", "3")
    second = None
    try:
        wait_for(lambda: (store.get_run(run_id).checkpoint_step or 0) > 0)
        [child] = run_processes(first.pid)
        freeze(child, db)                            # frozen: no heartbeat, no progress
        freeze(first.pid, db)                        # and its worker, so nobody answers for it
        second = start_worker(db, "--stale-after", "3")
        wait_for(lambda: store.get_run(run_id).claim and store.events(run_id, ["resume"]), timeout=120)
        os.kill(first.pid, signal.SIGCONT)
        os.kill(child, signal.SIGCONT)               # thawed: it must notice it lost the run
        wait_for(lambda: store.get_run(run_id).status == "finished", timeout=300)
        wait_for(lambda: child not in run_processes(first.pid), timeout=60)
    finally:
        for proc in (first, second):
            if proc is not None:
                stop(proc)
    statuses = [e.payload["status"] for e in store.events(run_id, ["status"])]
    assert "failed" not in statuses and statuses.count("finished") == 1, statuses
    steps = store.read_metrics(run_id, ["train_loss"])["step"].to_numpy()
    assert (np.diff(steps) > 0).all() and steps[-1] == store.get_run(run_id).total_steps
    assert store.get_run(run_id).error is None


def test_a_lock_held_past_the_old_busy_timeout_does_not_end_the_worker_or_the_run(tmp_path):
    """Item 3. Before: a database lock held over 30 s raised an unhandled OperationalError around the
    worker's heartbeat: the run ended `failed` and nothing trained afterwards. Now every store call
    waits it out (retries with backoff up to storage.LOCK_WAIT_S) and training goes on. The worker's busy
    timeout is shortened to 1 s here (SPHERELAB_BUSY_TIMEOUT_S) so a 3 s lock outlasts it as 35 s did 30 s."""
    db = str(tmp_path / "lock.db")
    [run_id] = submit(db, "--elr", "0.001", "--epochs", "30", "--log-every", "5")
    [after] = submit(db, "--elr", "0.01", "--epochs", "2")
    store = Store(db)
    proc = start_worker(db, env={"SPHERELAB_BUSY_TIMEOUT_S": "1"})
    try:
        wait_for(lambda: (store.last_step(run_id) or 0) > 10)
        holder = hold_lock(store.url, 3)
        assert holder.wait(timeout=120) == 0
        wait_for(lambda: store.get_run(after).status == "finished", timeout=300)
        assert proc.poll() is None
    finally:
        stop(proc)
    assert store.get_run(run_id).status == "finished" and store.get_run(run_id).error is None


def test_a_store_locked_past_its_patience_leaves_runs_interrupted_never_failed(monkeypatch):
    """Item 3, the far end: when even the wait runs out (StoreBusy), the run is resumable, not failed:
    its process records `interrupted`, or, if the store still refuses, exits with EX_TEMPFAIL and the
    worker records `interrupted` for it."""
    class Locked:
        def set_status(self, *args, **kwargs):
            raise StoreBusy("the database stayed locked for 120 s")

    assert runner._end_run(Locked(), 1, "interrupted") == "unrecorded"
    assert worker._exit_cause(runner.EX_TEMPFAIL)[0] == "interrupted"

    class Lost:
        def set_status(self, *args, **kwargs):
            raise ClaimLost("run 1 was deleted")

    assert runner._end_run(Lost(), 1, "finished") == "lost"


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", "malicious"])
def test_a_damaged_or_refused_checkpoint_fails_its_run_naming_the_file(tmp_path, content):
    """Item 7. Before: a corrupt, truncated or refused (malicious) checkpoint ended the run `failed` with
    "(out of memory?)", the real cause only in the worker's log. Now the run's error names the file and
    what is wrong with it."""
    db = str(tmp_path / "damaged.db")
    store = Store(db)
    [run_id] = store.create_runs([{"config": RunConfig(epochs=2).to_dict(), "name": "damaged"}])
    key = f"runs/{run_id}/resume-damaged.pt"
    path = Path(store.artifacts.path(key))
    path.parent.mkdir(parents=True)
    write_damaged_checkpoint(path, content)
    info = store.claim_next_run("w")
    store.update_run(run_id, checkpoint_path=key, checkpoint_step=44)
    store.set_status(run_id, "interrupted")
    store.release(run_id)
    proc = start_worker(db, "--once")
    assert proc.wait(timeout=180) == 0
    failed = store.get_run(run_id)
    assert failed.status == "failed" and failed.error.startswith(f"run {run_id}'s checkpoint {key} under {store.artifacts.root} cannot be loaded")
    assert "out of memory" not in failed.error and "\n" not in failed.error
    assert info.claim


def test_an_lrwd_rate_beyond_float32_ends_nonfinite_not_failed(tmp_path):
    """Item 7. Before: on the single-run path an LR above float32's range ended the run `failed` (an
    overflow converting it), the packed path `nonfinite`. Now there is one path: `nonfinite`."""
    db = str(tmp_path / "huge.db")
    out = engine("train", "--mode", "lrwd", "--lr", "1e39", "--epochs", "1", "--db", db)
    assert out.returncode == 0, out.stderr
    run = Store(db).get_run(int(out.stdout.split()[-1]))
    assert run.status == "nonfinite" and run.error is None


def test_train_and_sweep_never_share_their_runs_with_a_live_worker(tmp_path):
    """Item 8. Before: with a worker on the same store, it claimed runs `train`/`sweep` had just created,
    so `train` could exit 0 without printing its run id. Now the CLI's runs are reserved for it."""
    db = str(tmp_path / "race.db")
    Store(db).close()
    proc = start_worker(db, env={"SPHERELAB_PACK": "0"})
    try:
        out = engine("sweep", "--elr", "0.001", "0.003", "0.01", "--epochs", "2", "--db", db,
                     env={"SPHERELAB_PACK": "0"})
        assert out.returncode == 0, out.stderr
        ids = [int(x) for x in out.stdout.split()]
        assert len(ids) == 3
        single = engine("train", "--elr", "0.02", "--epochs", "1", "--db", db)
        assert single.returncode == 0 and int(single.stdout.split()[-1]) > max(ids)
    finally:
        stop(proc)
    store = Store(db)
    for run in store.list_runs():
        assert run.status == "finished" and run.worker_id.startswith("cli-"), (run.id, run.worker_id)
    assert store.live_workers() == []


def test_a_cli_that_stops_early_cancels_what_it_never_started(tmp_path):
    """Item 8, the other side: runs reserved for a CLI that stops (Ctrl-C, an error) do not wait forever."""
    db = str(tmp_path / "early.db")
    proc = subprocess.Popen([sys.executable, "-m", "engine", "sweep", "--elr", "0.001", "0.01", "--epochs", "500",
                             "--db", db], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "SPHERELAB_PACK": "0"})
    store = wait_for(lambda: os.path.exists(db) and Store(db))
    wait_for(lambda: len(store.list_runs()) == 2 and any(r.status == "running" for r in store.list_runs()))
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    statuses = sorted(r.status for r in store.list_runs())
    assert statuses == ["cancelled", "interrupted"], statuses
    assert [r.error for r in store.list_runs(status="cancelled")] == \
        ["the command that created it stopped before training it"]


# ------------------------------------------------------------------------------------------ issue 17

# One sharpness measurement with hundreds of Lanczos iterations: a step that lasts far longer than
# --stale-after 3 (about 14 s on a 2-core machine at width 256; the width 1024 took 32 s).
SLOW_STEP = ("--width", "256", "--depth", "4", "--epochs", "1", "--sharpness-every", "1000",
             "--lanczos-iters", "300", "--lanczos-tol", "1e-12", "--log-every", "20")


def statuses_of(store, run_id) -> list[str]:
    return [e.payload["status"] for e in store.events(run_id, ["status"])]


def test_a_step_longer_than_stale_after_is_not_taken_for_a_dead_process(tmp_path):
    """Issue 17 item 2. Before: heartbeats were sent only between steps, so during one long sharpness
    measurement a watching worker (--stale-after 3) marked the run stale and trained it itself (two
    workers stole it from each other forever). Now a thread heartbeats while the step computes: the run
    trains once, in the process that started it."""
    db = str(tmp_path / "slow.db")
    Store(db).close()
    watcher = start_worker(db, "--stale-after", "3")
    store = Store(db)
    oldest = 0.0
    try:
        trainer = subprocess.Popen([sys.executable, "-m", "engine", "train", *SLOW_STEP, "--db", db],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while trainer.poll() is None:
            running = store.list_runs(status="running")
            if running and running[0].heartbeat_at:
                oldest = max(oldest, time.time() - running[0].heartbeat_at)
            time.sleep(0.2)
        out, err = trainer.communicate()
        assert trainer.returncode == 0, err[-3000:]
    finally:
        stop(watcher)
    run_id = int(out.split()[-1])
    run = store.get_run(run_id)
    assert run.status == "finished" and run.worker_id.startswith("cli-")
    assert statuses_of(store, run_id) == ["running", "finished"]
    assert store.read_metrics(run_id, ["sharpness"])["sharpness"].notna().any()   # the long step did happen
    assert oldest < 3.0, oldest


def test_a_live_worker_keeps_its_run_even_when_its_process_is_silent(tmp_path):
    """Issue 17 item 2, the second half. Before: any worker marked a run stale from the run's own
    heartbeat alone, even while the worker holding it was alive and watching its process. Now the
    runs of a live worker (its own heartbeat fresh) are never handed to another: that worker accounts
    for its processes."""
    db = str(tmp_path / "silent.db")
    [run_id] = submit(db, "--elr", "0.001", "--epochs", "60", "--log-every", "5")
    store = Store(db)
    owner = start_worker(db)
    child = None
    try:
        wait_for(lambda: (store.last_step(run_id) or 0) > 10)
        [child] = run_processes(owner.pid)
        freeze(child, db)                            # silent: no heartbeat, no progress; its worker lives on
        wait_for(lambda: time.time() - store.get_run(run_id).heartbeat_at > 4.0, timeout=60)
        other = start_worker(db, "--once", "--stale-after", "3")   # its first look is a stale check
        assert other.wait(timeout=120) == 0
        assert store.get_run(run_id).status == "running"
        os.kill(child, signal.SIGCONT)
        child = None
        wait_for(lambda: store.get_run(run_id).status == "finished", timeout=300)
    finally:
        if child is not None:
            os.kill(child, signal.SIGCONT)
        stop(owner)
    assert statuses_of(store, run_id) == ["running", "finished"]


def kept_run(db, epochs=6) -> int:
    """A finished run keeping a checkpoint at every epoch, trained here by the CLI."""
    out = engine("train", "--elr", "0.01", "--epochs", str(epochs), "--keep-every", "1", "--log-every", "20",
                 "--db", db)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


def queue_geometries(db, run_id, pairs, points=101) -> list[int]:
    ids = []
    for a, b in pairs:
        out = engine("geometry", f"{run_id}@{a}", f"{run_id}@{b}", "--points", str(points), "--submit", "--db", db)
        assert out.returncode == 0, out.stderr
        ids.append(int(out.stdout.split()[-1]))
    return ids


def job_processes(worker_pid: int) -> list[int]:
    return run_processes(worker_pid)


def test_kill_9_of_a_job_process_requeues_its_batch_and_retries_the_job_it_computed(tmp_path):
    """Issue 17 item 3. Before: kill -9 of one job process failed its whole batch for good (7 geometry
    jobs `failed`, 6 of which had never started). Now the jobs waiting their turn go back to the queue as
    they were, the one being computed is retried (at most MAX_JOB_RETRIES times), and all end finished."""
    db = str(tmp_path / "jobs.db")
    run_id = kept_run(db)
    job_ids = queue_geometries(db, run_id, [(1, e) for e in range(2, 7)] + [(2, 6), (3, 6)])
    store = Store(db)
    log = open(tmp_path / "worker.log", "w+")
    proc = start_worker(db, "--max-parallel", "1", log=log)
    try:
        computing = wait_for(lambda: [j for j in store.list_jobs(status="running") if j.started_at], timeout=180)
        assert len(store.list_jobs(status="running")) == len(job_ids)      # one process took the whole batch
        [pid] = job_processes(proc.pid)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: all(store.get_job(j).status in ("finished", "failed") for j in job_ids), timeout=300)
    finally:
        stop(proc)
    jobs = [store.get_job(j) for j in job_ids]
    assert [j.status for j in jobs] == ["finished"] * len(jobs), [(j.id, j.status, j.error) for j in jobs]
    charged = [j.id for j in jobs if j.attempts]
    assert len(charged) == 1 and charged[0] >= computing[0].id, (charged, computing[0].id)
    assert store.get_job(charged[0]).attempts == 1


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_a_job_whose_process_keeps_dying_fails_with_its_cause_after_two_retries(tmp_path, request, dialect):
    """Issue 17 item 3, the bound: the job being computed is charged each time its process dies and fails
    with the cause at the third death; a job waiting its turn is never charged; retry_job queues a failed
    job again with a fresh count (what a study taken up again uses)."""
    from storage.solutions import MAX_JOB_RETRIES
    url = str(tmp_path / "bound.db") if dialect == "sqlite" else request.getfixturevalue("postgres_url")
    store = Store(url)
    run_id = store.create_run(RunConfig(epochs=1).to_dict(), name="r")
    computed = store.create_job("average", run_id, {"epochs": [1]})
    waiting = store.create_job("average", run_id, {"epochs": [1]})
    cause = "its process was killed by SIGKILL (the out-of-memory killer, or kill -9)"
    for death in range(1, MAX_JOB_RETRIES + 2):
        first, second = store.claim_job("w"), store.claim_job("w")
        assert {first.id, second.id} == {computed, waiting}
        store.start_job(computed, claim=store.get_job(computed).claim)
        status = store.job_process_died(computed, cause, claim=store.get_job(computed).claim)
        assert store.job_process_died(waiting, cause, claim=store.get_job(waiting).claim) == "queued"
        assert status == ("queued" if death <= MAX_JOB_RETRIES else "failed"), (death, status)
        if status == "queued":
            assert store.get_job(computed).claim is None and store.get_job(computed).worker_id is None
    failed = store.get_job(computed)
    assert failed.error == f"{cause} (tried {MAX_JOB_RETRIES + 1} times)" and failed.attempts == MAX_JOB_RETRIES + 1
    assert store.get_job(waiting).attempts == 0 and store.get_job(waiting).status == "queued"
    with pytest.raises(ClaimLost):
        store.job_process_died(computed, cause, claim="someone else's")
    store.retry_job(computed)
    again = store.get_job(computed)
    assert (again.status, again.attempts, again.error) == ("queued", 0, None)


def test_deleting_a_run_while_a_job_on_it_computes_stops_that_job_only(tmp_path):
    """Issue 17 item 4. Before: deleting a run while a job on it computed crashed the job process
    (`StoreError: no job with id ...` uncaught) and failed an unrelated job of the same batch. Now the
    vanished job is a clean stop of that job alone: the process goes on with its batch."""
    db = str(tmp_path / "vanish.db")
    doomed, other = kept_run(db), kept_run(db, epochs=2)
    [doomed_job] = queue_geometries(db, doomed, [(1, 6)], points=201)
    [other_job] = queue_geometries(db, other, [(1, 2)], points=11)
    store = Store(db)
    log = open(tmp_path / "worker.log", "w+")
    proc = start_worker(db, "--max-parallel", "1", log=log)
    try:
        wait_for(lambda: store.get_job(doomed_job).started_at, timeout=180)
        assert store.get_job(other_job).status == "running"           # the same batch, waiting its turn
        assert engine("delete", str(doomed), "--db", db).returncode == 0
        wait_for(lambda: store.get_job(other_job).status != "running", timeout=300)
        exited = wait_for(lambda: "process exited" in open(log.name).read() and open(log.name).read())
    finally:
        stop(proc)
    job = store.get_job(other_job)
    assert job.status == "finished" and job.attempts == 0, (job.status, job.error)
    assert "Traceback" not in exited and "process exited (0)" in exited, exited[-3000:]
    assert store.list_jobs(run_id=doomed) == []


def test_deleting_the_parent_of_a_queued_fork_asks_for_with_children(tmp_path):
    """Issue 17 item 5, the CLI. Before: `delete` of a run with a queued fork exited 0, and the fork,
    its parent link set to NULL, trained from scratch and reported `finished`. Now the delete is one line
    asking for --with-children (nothing deleted); with it the fork is cancelled along with the parent."""
    db = str(tmp_path / "fork.db")
    parent = kept_run(db, epochs=3)
    child = int(engine("fork", str(parent), "--at", "2", "--elr", "0.002", "--submit", "--db", db).stdout.split()[-1])
    out = engine("delete", str(parent), "--db", db)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "--with-children" in out.stderr and f"{child} (queued)" in out.stderr
    store = Store(db)
    assert store.get_run(parent).status == "finished" and store.get_run(child).status == "queued"
    assert engine("delete", str(parent), "--with-children", "--db", db).returncode == 0
    assert [r.id for r in store.list_runs()] == [child] and store.get_run(child).status == "cancelled"


def test_a_fork_whose_parent_was_deleted_fails_instead_of_training_from_scratch(tmp_path):
    """Issue 17 item 5, the worker. Before: a queued fork whose parent went with its sweep (the link set
    to NULL) was started as a fresh run and ended `finished`. Now it fails with the 'whose kept
    checkpoint is gone' message."""
    db = str(tmp_path / "orphan.db")
    out = engine("sweep", "--elr", "0.01", "0.02", "--epochs", "2", "--keep-every", "1", "--log-every", "20",
                 "--db", db)
    assert out.returncode == 0, out.stderr
    parent = int(out.stdout.split()[-1])
    child = int(engine("fork", str(parent), "--at", "1", "--submit", "--db", db).stdout.split()[-1])
    store = Store(db)
    store.delete_sweep(store.get_run(parent).sweep_id)
    assert store.get_run(child).parent_id is None and store.get_run(child).fork_epoch == 1
    assert start_worker(db, "--once").wait(timeout=180) == 0
    run = store.get_run(child)
    assert run.status == "failed", run.status
    assert run.error == f"run {child} branches from a run that was deleted, at epoch 1, whose kept checkpoint is gone"
    assert store.read_metrics(child).empty


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_delete_with_children_cancels_the_unfinished_branches_only(tmp_path, request, dialect):
    """Issue 17 item 5, the store API the CLI and the dashboard share: queued, interrupted and running
    branches are listed and cancelled (a running one through a stop command); ended branches stay."""
    url = str(tmp_path / "tree.db") if dialect == "sqlite" else request.getfixturevalue("postgres_url")
    store = Store(url)
    parent = store.create_run({}, name="parent", status="finished")
    kids = store.create_runs([{"config": {}, "name": f"k{i}", "parent_id": parent, "fork_epoch": 1}
                              for i in range(4)])
    store.set_status(kids[1], "interrupted")
    assert store.claim_next_run("w", run_ids=[kids[2]]).id == kids[2]
    store.release(kids[2])
    store.set_status(kids[3], "finished")
    assert [c.id for c in store.unfinished_children(parent)] == kids[:3]
    with pytest.raises(StoreError, match="--with-children"):
        store.delete(parent)
    assert store.get_run(parent).status == "finished"
    store.delete(parent, with_children=True)
    assert [store.get_run(k).status for k in kids] == ["cancelled", "cancelled", "running", "finished"]
    assert [c.kind for c in store.take_commands(kids[2])] == ["stop"]


def test_a_finished_run_drops_its_resume_checkpoint_and_keeps_its_kept_ones(tmp_path):
    """Issue 17 item 13. Before: every finished run kept its resume checkpoint (200 tiny runs: 24 MB of
    files nothing would ever read). Now `finished` drops it; kept checkpoints stay, for forks."""
    db = str(tmp_path / "tidy.db")
    out = engine("sweep", "--elr", "0.001", "0.01", "--epochs", "2", "--log-every", "20", "--db", db)
    assert out.returncode == 0, out.stderr
    plain = [int(x) for x in out.stdout.split()]
    kept = kept_run(db, epochs=2)
    store = Store(db)
    for run_id in [*plain, kept]:
        run = store.get_run(run_id)
        assert run.status == "finished" and run.checkpoint_path is None and run.checkpoint_step is None
    files = sorted(store.artifacts.keys())
    assert files == sorted(c.path for c in store.checkpoints(kept)) and len(files) == 2, files
    child = engine("fork", str(kept), "--at", "1", "--epochs", "1", "--db", db)   # what kept ones are for
    assert child.returncode == 0 and store.get_run(int(child.stdout.split()[-1])).status == "finished"


@pytest.mark.parametrize("content", [b"PK\x03\x04 truncated", "malicious"])
def test_an_average_of_a_damaged_checkpoint_names_the_file_without_torchs_advice(tmp_path, content):
    """Issue 17 item 13, the second half. Before: an average or geometry over a damaged or refused
    checkpoint failed with torch's whole message, including its advice to re-run with
    weights_only=False (which would run the file's code) and a traceback. Now: one line naming the file."""
    db = str(tmp_path / "bad.db")
    run_id = kept_run(db, epochs=2)
    key = Store(db).checkpoints(run_id)[0].path
    path = Path(Store(db).artifacts.path(key))
    path.unlink()
    write_damaged_checkpoint(path, content)
    out = engine("average", str(run_id), "--at", "1", "--db", db)
    assert out.returncode == 1
    job = Store(db).list_jobs(run_id=run_id)[0]
    assert job.status == "failed" and "\n" not in job.error, job.error
    assert job.error.startswith(f"run {run_id}'s kept checkpoint at epoch 1 {key} under {Store(db).artifacts.root} "
                                "cannot be loaded"), job.error
    assert "weights_only" not in job.error and "Re-running" not in job.error


def _free_port() -> int:
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _serving(port: int) -> bool:
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_to_the_app_stops_the_worker_and_the_dashboard_too(tmp_path, signum):
    """Issue 17 item 11. Before: `kill -TERM` of `spherelab app` ended the app process alone; its worker
    and its dashboard went on running and serving. Now SIGTERM, SIGHUP and SIGINT (Ctrl-C) stop all three."""
    db, port = str(tmp_path / "app.db"), _free_port()
    app = subprocess.Popen([sys.executable, "-m", "engine", "app", "--db", db], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env={**os.environ, "SPHERELAB_PORT": str(port)})
    try:
        store = wait_for(lambda: os.path.exists(db) and Store(db), timeout=120)
        [worker] = wait_for(lambda: store.live_workers(), timeout=120)
        wait_for(lambda: _serving(port), timeout=180)
        children = [int(p) for p in subprocess.run(["pgrep", "-P", str(app.pid)], capture_output=True,
                                                   text=True).stdout.split()]
        assert worker["pid"] in children and len(children) == 2, (children, worker["pid"])
        app.send_signal(signum)
        app.wait(timeout=90)
        wait_for(lambda: not any(_alive(pid) for pid in children), timeout=60)
        assert not _serving(port)
        assert store.live_workers() == []                 # the worker stopped in order and deregistered
    finally:
        if app.poll() is None:
            app.kill()


def test_a_full_disk_at_a_checkpoint_ends_the_run_interrupted_not_failed(tmp_path):
    """Issue 17 item 7. Before: a checkpoint write on a full disk (torch raises `RuntimeError ...
    unexpected pos`, not OSError) ended the run `failed` with a traceback. Now it ends `interrupted`
    with 'disk full at <path>: free space and resume'. The store lives on a 3 MB file system (a private
    tmpfs, gone with the command) where the run's 4 MB checkpoint does not fit."""
    if shutil.which("unshare") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("the full-disk test must run in CI but unshare (util-linux) is missing")
        pytest.skip("needs unshare for a small private file system")
    folder = tmp_path / "small"
    folder.mkdir()
    db = folder / "s.db"
    show = ("import json, sys; from storage import Store; r = Store(sys.argv[1]).get_run(1); "
            "print(json.dumps([r.status, r.error, r.checkpoint_path]))")
    script = (f'mount -t tmpfs -o size=3m tmpfs "{folder}" && "$0" -m engine train --width 1024 --depth 2 '
              f'--epochs 2 --log-every 20 --db "{db}"; echo "exit $?"; exec "$0" -c "$1" "{db}"')
    out = subprocess.run(["unshare", "-m", "sh", "-c", script, sys.executable, show], capture_output=True,
                         text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    if "mount:" in out.stderr and os.environ.get("CI", "").lower() != "true":
        pytest.skip(f"no private tmpfs here: {out.stderr.strip()[:200]}")
    lines = out.stdout.splitlines()
    status, error, checkpoint = json.loads(lines[-1])
    assert (status, lines[-2]) == ("interrupted", "exit 0"), (lines, out.stderr[-3000:])
    assert error.startswith(f"disk full at {folder}/s.db.checkpoints/runs/1/resume-") and \
        error.endswith(".pt: free space and resume"), error
    assert checkpoint is None and "Traceback" not in out.stderr, out.stderr[-3000:]


def test_the_dashboard_deletes_a_parent_only_with_its_branches_cancelled(tmp_path, monkeypatch):
    """Issue 17 item 5, the dashboard: the Run page's delete is refused for a run with a queued branch
    (the store's one line shown), and with "and cancel its branches" ticked it deletes and cancels."""
    from tests.test_dashboard import open_app
    db = tmp_path / "dash.db"
    store = Store(db)
    parent = store.create_run({}, name="parent", status="finished")
    [child] = store.create_runs([{"config": {}, "name": "branch", "parent_id": parent, "fork_epoch": 1}])
    at = open_app(db, monkeypatch, "run", run=parent)
    at.button(key=f"m-delete-{parent}-ask").click().run()
    at.button(key=f"m-delete-{parent}-yes").click().run()
    assert not at.exception and any("--with-children" in e.value.replace("\\", "") for e in at.error), [e.value for e in at.error]
    assert store.get_run(parent).status == "finished" and store.get_run(child).status == "queued"
    at.checkbox(key=f"m-delete-children-{parent}").check().run()
    at.button(key=f"m-delete-{parent}-ask").click().run()
    at.button(key=f"m-delete-{parent}-yes").click().run()
    assert not at.exception and [r.id for r in store.list_runs()] == [child]
    assert store.get_run(child).status == "cancelled"
