"""Kept checkpoints, forks, SWA averages and the geometry between solutions (SPEC §10), against math
and real runs."""
import io
import os
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.config import RunConfig
from engine.solutions import Evaluator, angle, average, barrier, checkpoint_weights, path
from engine.trainer import Trainer
from storage import HEARTBEAT_EVERY_S, MIN_STALE_AFTER_S, Store, StoreError
from tests.helpers import assert_bitwise_rows
from tests.processes import STALE_CHECK_S, engine as run_engine, start_worker, wait_for

SMALL = dict(width=16, depth=2, epochs=6, log_every=5, device="cpu")


def kept_states(cfg: RunConfig) -> tuple:
    """Train cfg alone, keeping a serialised checkpoint at every epoch end: (member, {epoch: state})."""
    states = {}

    def keep(member, keep):
        buffer = io.BytesIO()
        torch.save(member.state_dict(), buffer)
        buffer.seek(0)
        states[int(member.epoch)] = torch.load(buffer, weights_only=True)

    torch.set_num_threads(1)
    trainer = Trainer([cfg], checkpoints=[keep])
    trainer.run()
    return trainer.members[0], states


# ---- forks ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["sphere", "lrwd"])
def test_a_fork_that_changes_nothing_is_the_parents_continuation_bit_for_bit(mode):
    rates = dict(elr=0.02) if mode == "sphere" else dict(mode="lrwd", lr=0.1, wd=0.01, momentum=0.9)
    cfg = RunConfig(**SMALL, **rates, sharpness_every=20)
    parent, states = kept_states(cfg)
    child = Trainer([cfg], states=[states[3]], forks=[True])
    child.run()
    fork_step = states[3]["step"]
    rows = child.members[0].recorder.rows
    assert rows[0][0] == fork_step                     # numbering goes on from the parent's
    assert torch.equal(child.members[0].w, parent.w)
    # the first point is measured where the fork starts; from there on, the parent's own trace
    assert_bitwise_rows([r for r in parent.recorder.rows if r[0] > fork_step], rows[1:])


def test_a_fork_starts_its_schedule_and_its_rate_where_it_branches():
    cfg = RunConfig(**SMALL, elr=0.02)
    _, states = kept_states(cfg)
    child_cfg = cfg.replace(elr=0.001, schedule="cosine", epochs=3 + 4)
    child = Trainer([child_cfg], states=[states[3]], forks=[True])
    child.run()
    m = child.members[0]
    steps, elr = m.recorder.series("elr")
    assert steps[0] == states[3]["step"] and elr[0] == pytest.approx(0.001, rel=1e-5)   # cosine from the fork
    assert elr[-1] == pytest.approx(0.0, abs=1e-9)
    assert m.rho0 == pytest.approx(states[3]["update"]["rho0"])                          # the parent's sphere


def test_a_fork_at_a_smaller_elr_of_a_chaotic_run_reaches_a_lower_train_loss():
    cfg = RunConfig(width=64, depth=3, elr=0.02, epochs=20, log_every=10, device="cpu")   # chaotic equilibrium
    parent, states = kept_states(cfg)
    child = Trainer([cfg.replace(elr=0.002)], states=[states[10]], forks=[True])
    child.run()
    tail = lambda rows: np.mean([v["train_loss"] for s, _, _, v in rows if s > states[15]["step"]])  # noqa: E731
    assert tail(child.members[0].recorder.rows) < 0.5 * tail(parent.recorder.rows)


def test_a_fork_to_lrwd_and_back_keeps_its_radius_and_drops_a_foreign_momentum():
    cfg = RunConfig(**SMALL, mode="lrwd", lr=0.1, wd=0.01, momentum=0.9)
    _, states = kept_states(cfg)
    to_sphere = Trainer([cfg.replace(mode="sphere", lr=None, wd=0.0, momentum=0.0, elr=0.01)],
                        states=[states[2]], forks=[True])
    m = to_sphere.members[0]
    assert m.rho0 == pytest.approx(float(checkpoint_weights(states[2], to_sphere.layer_names).norm()), rel=1e-6)
    assert m.buf is None
    other = Trainer([cfg.replace(momentum=0.5)], states=[states[2]], forks=[True]).members[0]
    assert torch.count_nonzero(other.buf) == 0            # a buffer built with momentum 0.9 is not carried over


# ---- evaluation, averages, paths ------------------------------------------------------------------

def test_recomputed_bn_statistics_are_the_training_sets_batch_statistics():
    cfg = RunConfig(width=8, depth=2, batch_size=64, device="cpu")
    _, states = kept_states(cfg.replace(epochs=1))
    ev = Evaluator(cfg)
    w = checkpoint_weights(states[1], ev.layer_names)
    [(mean1, var1), (mean2, var2)] = ev.recompute_bn(w[None])
    w1 = w[:64 * 8].view(8, 64)
    w2 = w[64 * 8:].view(8, 8)
    means, variances = [[], []], [[], []]
    for x, _ in ev._train_batches():
        h = x @ w1.T
        means[0].append(h.mean(0))
        variances[0].append(h.var(0, unbiased=True))
        h = F.relu((h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5)) @ w2.T
        means[1].append(h.mean(0))
        variances[1].append(h.var(0, unbiased=True))
    torch.testing.assert_close(mean1, torch.stack(means[0]).mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(var1, torch.stack(variances[0]).mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mean2, torch.stack(means[1]).mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(var2, torch.stack(variances[1]).mean(0), rtol=1e-4, atol=1e-5)


def test_averages_equal_their_checkpoints_and_the_hand_made_mean():
    cfg = RunConfig(**SMALL, elr=0.02)
    _, states = kept_states(cfg)
    ev = Evaluator(cfg)
    a, b = (checkpoint_weights(states[e], ev.layer_names) for e in (4, 6))
    [alone] = ev.evaluate(a[None])
    [copies] = ev.evaluate(average([a, a, a])[None])
    assert copies == pytest.approx(alone, rel=1e-6)
    [mean] = ev.evaluate(((a + b) / 2)[None])
    [swa] = ev.evaluate(average([a, b])[None])
    assert swa == mean
    assert swa != alone


def test_the_geometry_of_a_solution_with_itself_is_zero_and_a_paths_ends_are_the_solutions():
    cfg = RunConfig(**SMALL, elr=0.02)
    _, states = kept_states(cfg)
    ev = Evaluator(cfg)
    a, b = (checkpoint_weights(states[e], ev.layer_names) for e in (3, 6))
    assert angle(a, a) == 0.0 and angle(a, 3 * a) < 1e-7
    alphas, W = path(a, a, 5)
    rows = ev.evaluate(W)
    assert all(r == pytest.approx(rows[0], rel=1e-6) for r in rows)
    alphas, W = path(a, b, 7)
    ends = ev.evaluate(torch.stack([a, b]))
    rows = ev.evaluate(W)
    assert rows[0] == pytest.approx(ends[0], rel=1e-6) and rows[-1] == pytest.approx(ends[1], rel=1e-6)
    assert 0 < angle(a, b) < np.pi


def test_barrier_formula():
    alphas = [i / 4 for i in range(5)]
    assert barrier([1.0, 0.8, 0.7, 0.8, 1.0], alphas) == 0.0          # convex: never above the chord
    assert barrier([1.0, 1.5, 2.5, 1.5, 0.0], alphas) == pytest.approx(2.0)   # the bump over the line 1 -> 0
    assert barrier([0.0, 0.0, 0.3, 0.0, 0.2], alphas) == pytest.approx(0.2)


# ---- the CLI, the store and the worker ------------------------------------------------------------

def engine(*args, db, check=True):
    return run_engine(*args, db=db, check=check)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A digits run with kept checkpoints every 2 epochs, and a run of another width."""
    db = str(tmp_path_factory.mktemp("solutions") / "s.db")
    run = int(engine("train", "--elr", "0.02", "--epochs", "10", "--keep-every", "2", db=db).stdout.split()[-1])
    other = int(engine("train", "--elr", "0.02", "--epochs", "2", "--width", "32", db=db).stdout.split()[-1])
    return db, run, other


def test_kept_checkpoints_are_listed_and_go_with_delete(tmp_path):
    import json
    db = str(tmp_path / "kept.db")
    run = int(engine("train", "--elr", "0.02", "--epochs", "5", "--keep-every", "2", db=db).stdout.split()[-1])
    listed = json.loads(engine("checkpoints", str(run), "--json", db=db).stdout)
    assert [c["epoch"] for c in listed] == [2, 4, 5]                  # every 2 epochs, and the last one
    assert [c["step"] for c in listed] == [88, 176, 220] and all(c["bytes"] > 1000 for c in listed)
    store = Store(db)
    paths = [store.artifacts.path(c.path) for c in store.checkpoints(run)]
    assert all(c.path.startswith(f"runs/{run}/epoch-") for c in store.checkpoints(run))    # keys, no host paths
    assert all(os.path.exists(p) for p in paths)
    assert store.get_run(run).checkpoint_path is None       # a finished run drops its resume checkpoint
    engine("delete", str(run), db=db)
    assert not any(os.path.exists(p) for p in paths)
    assert store.artifacts.keys() == {}


def test_a_failed_checkpoint_write_leaves_the_previous_files_and_records_nothing(tmp_path, monkeypatch):
    from engine import runner
    store = Store(str(tmp_path / "atomic.db"))
    cfg = RunConfig(**SMALL, elr=0.01, keep_every=1)
    [run] = store.create_runs([{"config": cfg.to_dict(), "name": "atomic"}])
    trainer = Trainer([cfg])
    m = trainer.members[0]
    m.attach(run_id=run, recorder=runner.StoreRecorder(store, run))
    trainer.measure([])
    for _ in range(m.steps_per_epoch):
        trainer.train_step()
    runner.save_checkpoint(store, m, keep=True)
    before = {p: open(p, "rb").read() for p in [store.artifacts.path(store.get_run(run).checkpoint_path),
                                                 store.artifacts.path(store.checkpoints(run)[0].path)]}

    def torn(obj, f):
        open(f, "wb").write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(runner.torch, "save", torn)
    for _ in range(m.steps_per_epoch):
        trainer.train_step()
    with pytest.raises(StoreError, match="disk full"):
        runner.save_checkpoint(store, m, keep=True)
    assert {p: open(p, "rb").read() for p in before} == before
    assert [c.epoch for c in store.checkpoints(run)] == [1] and store.get_run(run).checkpoint_step == m.steps_per_epoch


def test_branch_twice_average_and_measure_the_geometry_from_the_cli(trained):
    import json
    db, run, _ = trained
    a = int(engine("fork", str(run), "--at", "6", "--elr", "0.002", "--epochs", "4", db=db).stdout.split()[-1])
    b = int(engine("fork", str(run), "--at", "6", "--elr", "0.0005", "--epochs", "4", db=db).stdout.split()[-1])
    store = Store(db)
    runs = {r["id"]: r for r in json.loads(engine("runs", "--json", db=db).stdout)}
    assert runs[a]["parent"] == runs[b]["parent"] == run and runs[a]["fork_epoch"] == 6
    child = store.read_metrics(a, ["train_loss", "elr"])
    assert child["step"].iloc[0] == 264 and child["step"].iloc[-1] == 440           # the parent's numbering
    assert child["elr"].iloc[-1] == pytest.approx(0.002, rel=1e-5)
    swa = json.loads(engine("average", str(run), "--last", "3", "--json", db=db).stdout)
    assert swa["run"] == run and swa["epochs"] == [6, 8, 10]
    assert 0 <= swa["train_acc"] <= 1 and swa["test_loss"] > 0
    [job] = store.list_jobs(run_id=run, kind="average")
    assert job.status == "finished" and job.result == swa                   # stored with the run
    geo = json.loads(engine("geometry", str(a), str(b), "--points", "5", "--json", db=db).stdout)
    assert geo["a"] == {"run": a, "epoch": 10} and len(geo["alphas"]) == 5
    assert 0 < geo["angle"] < 1.6 and set(geo["barrier"]) == {"train_loss", "train_err", "test_loss", "test_err"}
    assert all(v >= 0 for v in geo["barrier"].values())


@pytest.mark.parametrize("args,message", [
    (["fork", "999"], "no run with id 999"),
    (["fork", "{run}", "--at", "3"], "kept no checkpoint at epoch 3"),
    (["fork", "{other}"], "no kept checkpoint"),
    (["fork", "{run}", "--mode", "lrwd"], "--mode lrwd needs --lr"),
    (["fork", "{run}", "--wd", "0.1", "--epochs", "2"], "--wd 0.1 is meaningless with --mode sphere"),
    (["fork", "{run}", "--at", "10"], "give the fork's own --epochs N"),
    (["average", "{run}", "--last", "9"], "--last 9 but run"),
    (["average", "{run}", "--at", "2", "5"], "kept no checkpoint at epoch 5"),
    (["geometry", "{run}", "{other}"], "no kept checkpoint"),
    (["geometry", "{run}@2", "x@1"], "bad solution"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(trained, args, message):
    db, run, other = trained
    store = Store(db)
    before = (len(store.list_runs()), len(store.list_jobs()))
    out = engine(*[a.format(run=run, other=other) for a in args], db=db, check=False)
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and message in out.stderr, out.stderr
    assert (len(store.list_runs()), len(store.list_jobs())) == before


def test_geometry_between_different_architectures_is_refused(trained, tmp_path):
    db, run, other = trained
    wide = int(engine("train", "--elr", "0.02", "--epochs", "2", "--width", "32", "--keep-every", "1",
                      db=db).stdout.split()[-1])
    out = engine("geometry", f"{run}@2", f"{wide}@2", db=db, check=False)
    assert out.returncode == 2 and "differ in width" in out.stderr


def test_a_fork_of_a_run_still_training_without_a_kept_checkpoint_is_refused(tmp_path):
    db = str(tmp_path / "live.db")
    store = Store(db)
    [run] = store.create_runs([{"config": RunConfig(epochs=3).to_dict(), "name": "live"}])
    store.claim_next_run("w")
    out = engine("fork", str(run), db=db, check=False)
    assert out.returncode == 2 and "is running" in out.stderr and "no kept checkpoint" in out.stderr
    assert len(store.list_runs()) == 1


def test_the_worker_computes_queued_jobs_and_requeues_one_whose_worker_died(trained):
    db, run, _ = trained
    store = Store(db)
    first = int(engine("average", str(run), "--at", "8", "10", "--submit", db=db).stdout.split()[-1])
    second = int(engine("geometry", f"{run}@8", f"{run}@10", "--points", "3", "--submit", db=db).stdout.split()[-1])
    claimed = store.claim_job("a-worker-that-died", job_ids=[second])      # held, then no heartbeat
    assert claimed.status == "running"
    wait_for(lambda: time.time() - store.get_job(second).heartbeat_at > 3)   # older than --stale-after 3
    worker = start_worker(db, "--once", "--stale-after", "3")
    try:
        assert worker.wait(timeout=240) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
    done = {j.id: j for j in store.list_jobs(run_id=run)}
    assert done[first].status == "finished" and done[first].result["epochs"] == [8, 10]
    assert done[second].status == "finished" and done[second].worker_id != "a-worker-that-died"
    assert done[second].result["barrier"] and len(done[second].result["alphas"]) == 3


def test_one_job_process_computes_a_batch_and_keeps_its_waiting_jobs_held(trained, tmp_path):
    """Queued jobs go to a process in batches (engine.worker.JOBS_PER_PROCESS), not one process each;
    the ones waiting their turn heartbeat, so a stale check at the shortest --stale-after never takes
    them back. The test is that other worker: once the batch's process is up, it checks for stale jobs
    every STALE_CHECK_S until the batch is done, and at least one check comes while a job that waits
    has been claimed for longer than the staleness floor (events, not a margin on the batch's time).
    The worker heartbeats every 0.5 s here, so the floor is 1.5 s and jobs of 61 points (about 2 s
    each) make a batch whose waiting jobs outlast it."""
    db, run, _ = trained
    store = Store(db)
    heartbeat = 0.5
    floor = MIN_STALE_AFTER_S / HEARTBEAT_EVERY_S * heartbeat      # the product's floor: 3 heartbeats
    ids = [int(engine("geometry", f"{run}@{a}", f"{run}@{b}", "--points", "61", "--submit", db=db).stdout.split()[-1])
           for a, b in [(2, 4), (2, 6), (2, 8), (4, 6), (4, 8), (6, 8)]]
    log = tmp_path / "worker.log"
    with open(log, "w") as sink:
        worker = start_worker(db, "--once", "--max-parallel", "1", log=sink,     # its own stale limit: 30 s
                              env={"SPHERELAB_HEARTBEAT_S": str(heartbeat)})
        try:
            claimed = wait_for(lambda: all(store.get_job(i).status == "running" for i in ids)
                               and {i: store.get_job(i).heartbeat_at for i in ids})
            # the batch's process is up: every job it holds has heartbeated since its claim (or ended)
            wait_for(lambda: all(j.status != "running" or j.heartbeat_at > claimed[j.id]
                                 for j in map(store.get_job, ids)))
            telling, deadline = 0, time.monotonic() + 600
            while worker.poll() is None and time.monotonic() < deadline:
                now = time.time()
                waiting = [j.id for j in map(store.get_job, ids) if j.status == "running"]
                assert store.requeue_stale_jobs(floor) == [], waiting
                telling += any(now - claimed[i] > floor for i in waiting[1:])
                time.sleep(STALE_CHECK_S)
            assert worker.wait(timeout=300) == 0
        finally:
            if worker.poll() is None:
                worker.kill()
    text = log.read_text()
    jobs = {j.id: j for j in store.list_jobs(run_id=run)}
    assert all(jobs[i].status == "finished" for i in ids), text
    started = [line for line in text.splitlines() if "started in process" in line and line.startswith("job")]
    assert len(started) == 1 and all(str(i) in started[0] for i in ids), text
    assert "queued again" not in text
    assert telling > 0, "the batch ended before a waiting job was older than the staleness floor"


def test_a_bundle_with_checkpoints_lets_a_colleague_branch_from_the_run(trained, tmp_path):
    import json
    db, run, _ = trained
    bundle = str(tmp_path / "run.zip")
    engine("bundle", str(run), "--out", bundle, "--with-checkpoints", db=db)
    plain = str(tmp_path / "plain.zip")
    engine("bundle", str(run), "--out", plain, db=db)
    theirs = str(tmp_path / "colleague.db")
    [imported] = [int(x) for x in engine("import", bundle, db=theirs).stdout.split()]
    kept = json.loads(engine("checkpoints", str(imported), "--json", db=theirs).stdout)
    assert [c["epoch"] for c in kept] == [2, 4, 6, 8, 10]
    child = int(engine("fork", str(imported), "--at", "8", "--elr", "0.002", "--epochs", "2", db=theirs)
                .stdout.split()[-1])
    store = Store(theirs)
    assert store.get_run(child).status == "finished" and store.get_run(child).parent_id == imported
    # the colleague's checkpoints are the very bytes of the original run's
    mine = {c.epoch: open(Store(db).artifacts.path(c.path), "rb").read() for c in Store(db).checkpoints(run)}
    assert {c.epoch: open(store.artifacts.path(c.path), "rb").read() for c in store.checkpoints(imported)} == mine
    assert store.read_metrics(child, ["train_loss"])["step"].iloc[0] == 352
    other = str(tmp_path / "other.db")
    [bare] = [int(x) for x in engine("import", plain, db=other).stdout.split()]
    assert json.loads(engine("checkpoints", str(bare), "--json", db=other).stdout) == []
