"""The store shared by real processes (started with spawn, as the engine does): a trainer writing
while the dashboard reads, and workers racing for queued runs, on SQLite and on PostgreSQL."""

import math
import multiprocessing
import time

from storage import MIN_STALE_AFTER_S, Store

SPAWN = multiprocessing.get_context("spawn")
LIVE_STEPS = 2_000


def write_trace(url: str, run_id: int, steps: int) -> None:
    with Store(url) as store, store.metric_writer(run_id, flush_every_s=0.02) as writer:
        for step in range(steps):
            writer.log(step, step / 100, time.time(), {
                "train_loss": 1.0 / (step + 1),
                "elr": math.nan if step % 97 == 0 else 1e-3,
                "si_norm": math.inf if step % 89 == 0 else 12.0,
            })
            time.sleep(0.0005)  # a (very fast) training step


def test_live_reader_sees_a_growing_trace(tmp_path):
    url = str(tmp_path / "live.db")
    with Store(url) as store:
        run = store.create_run({}, name="live", status="running")
        writer = SPAWN.Process(target=write_trace, args=(url, run, LIVE_STEPS))
        writer.start()
        seen, reads_with_data, last_step = [], 0, None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            finished = not writer.is_alive()  # looked at before reading, so the last read sees everything
            chunk = store.read_metrics(run, since_step=last_step)
            if len(chunk):
                steps = chunk["step"].tolist()
                assert steps == list(range(len(seen), len(seen) + len(steps)))  # in order, no gaps
                assert chunk["train_loss"].notna().all() and chunk["si_norm"].notna().all()  # whole steps
                seen += steps
                last_step = steps[-1]
                reads_with_data += 1
            if finished:
                break
            time.sleep(0.01)
        writer.join(10)
        assert writer.exitcode == 0
        assert seen == list(range(LIVE_STEPS))
        assert reads_with_data >= 5  # the reader really watched it grow
        full = store.read_metrics(run)
        assert len(full) == LIVE_STEPS
        assert full["elr"].isna().sum() == len(range(0, LIVE_STEPS, 97))
        assert (full["si_norm"] == math.inf).sum() == len(range(0, LIVE_STEPS, 89))


def claim_everything(url: str, worker_id: str, barrier, results) -> None:
    """Phase 1: take queued runs until none is left. Then w0 marks them all interrupted, and
    phase 2: take interrupted runs until none is left."""
    try:
        with Store(url) as store:
            barrier.wait(timeout=60)
            queued = []
            while (run := store.claim_next_run(worker_id)) is not None:
                queued.append(run.id)
            barrier.wait(timeout=60)
            if worker_id == "w0":   # every claimer went silent long ago: all their runs are stale
                for run in store.list_runs(status="running"):
                    store.update_run(run.id, heartbeat_at=time.time() - 3600)
                store.requeue_stale(MIN_STALE_AFTER_S)
            barrier.wait(timeout=60)
            interrupted = []
            while (run := store.claim_interrupted(worker_id)) is not None:
                interrupted.append(run.id)
        results.put((worker_id, queued, interrupted, None))
    except Exception as exc:  # reported to the test, e.g. "database is locked"
        results.put((worker_id, [], [], repr(exc)))


def race_for_runs(url: str, workers: int = 4, runs: int = 4) -> None:
    with Store(url) as store:
        ids = store.create_runs([dict(config={"i": i}, name=f"run {i}") for i in range(runs)])
    barrier, results = SPAWN.Barrier(workers), SPAWN.Queue()
    processes = [SPAWN.Process(target=claim_everything, args=(url, f"w{i}", barrier, results))
                 for i in range(workers)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(10)
    assert [error for *_, error in outcomes if error] == []
    assert sorted(run for _, queued, _, _ in outcomes for run in queued) == ids  # each exactly once
    assert sorted(run for _, _, interrupted, _ in outcomes for run in interrupted) == ids
    with Store(url) as store:
        for worker_id, _, interrupted, _ in outcomes:
            for run in interrupted:
                info = store.get_run(run)
                assert (info.status, info.worker_id) == ("running", worker_id)


def test_workers_racing_on_sqlite_claim_each_run_once(tmp_path):
    race_for_runs(str(tmp_path / "race.db"))


def test_workers_racing_on_postgresql_claim_each_run_once(postgres_url):
    race_for_runs(postgres_url)

