"""Packed sweeps (engine.packed): every member is its own run, with the single run's numbers.

mlp_si packs reproduce the single runs' trajectories bit for bit (shared and per-member batches,
sphere and lrwd with momentum in one pack, even at a chaotic ELR); only reported means (train/test
loss, cos_to_init) are summed in another order, ~1e-7 relative, hence rtol 1e-5. convnet_si packs
differ in the rounding of the conv weight gradients (grouped vs dense convolution backward, ~1e-6),
and these tiny conv nets on noise data amplify 1e-7 perturbations to 1e-3 within ten steps at ELR
1e-3 (measured on two single runs), so the conv test uses small rates, a short run and rtol 1e-4
(hessian_trace, a Hutchinson sum with cancellations, 1e-3).
"""
import io
import signal

import numpy as np
import pytest
import torch

from engine.config import ConfigError, RunConfig
from engine.packing import claim_pack, pack_key, packing_enabled
from engine.runtime import set_tf32, tf32_state
from engine.trainer import Trainer, train_traces
from storage import Store
from tests.helpers import Script, assert_bitwise_rows, assert_same_rows, single
from tests.processes import engine as run_engine, start_worker, wait_for

# device="cpu": the exactness claims are about CPU arithmetic (CUDA: see test_cuda_pack_matches_single_runs)
MLP = dict(width=16, depth=2, batch_size=32, probe_size=64, log_every=5, epochs=2, device="cpu")
CONV = dict(model="convnet_si", width=4, device="cpu", dataset="synthetic", synthetic_samples=128,
            synthetic_shape=(3, 32, 32), batch_size=32, probe_size=32, log_every=2, epochs=2, sharpness_every=4,
            lanczos_iters=8, trace_samples=1)


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


# ---- numbers ------------------------------------------------------------------------------------

def test_mlp_pack_matches_single_runs_sphere_and_lrwd_mixed_seeds():
    cfgs = [RunConfig(**MLP, elr=0.003, sharpness_every=20, trace_samples=2),
            RunConfig(**MLP, elr=0.3, seed=1, sharpness_every=20, trace_samples=2),     # chaotic ELR
            RunConfig(**MLP, mode="lrwd", lr=0.1, wd=0.01, momentum=0.9, sharpness_every=20, trace_samples=2),
            RunConfig(**MLP, mode="lrwd", lr=0.5, wd=1e-3, seed=1, sharpness_every=20, trace_samples=2)]
    pack = Trainer(cfgs)
    results = pack.run()
    assert [r.status for r in results] == ["finished"] * 4
    for cfg, member in zip(cfgs, pack.members):
        ref = single(cfg)
        assert member.step == ref.step == ref.total_steps
        assert_same_rows(ref.recorder.rows, member.recorder.rows)
        keys = member.recorder.rows[-1][3]
        for key in ("sharpness", "sharpness_threshold", "hessian_trace", "si_norm", "layer_norm/fc0",
                    "grad_norm", "eff_grad_norm", "angular_update", "elr", "test_acc", "cos_to_init"):
            assert key in keys
        # the trajectory itself is the same float32 vector, bit for bit
        assert torch.equal(member.w, ref.w)


def test_mlp_pack_member_equals_a_pack_of_one_bit_for_bit():
    """Shared batch (same seed) and own batches (other seeds), sphere and lrwd with momentum: every
    member's weights and every logged value equal its pack of one to the last bit — but the curvature.
    Its double backward and Lanczos' reorthogonalisation run through batched GEMMs (bmm) for K > 1 and
    plain ones for K = 1, which round differently (measured: 4e-6 on Hessian-vector entries of ~400),
    so sharpness agrees to 1e-5 and sharpness_threshold, which only reads the ELR, exactly."""
    cfgs = [RunConfig(**MLP, elr=e, sharpness_every=10) for e in (0.001, 0.01, 0.1)] + \
        [RunConfig(**MLP, mode="lrwd", lr=0.1, wd=0.01, momentum=0.9, seed=2, sharpness_every=10)]
    pack = Trainer(cfgs)
    assert len({id(m.stream) for m in pack.members}) == 2          # seed 0 shares one stream, seed 2 its own
    pack.run()
    for cfg, member in zip(cfgs, pack.members):
        ref = single(cfg)
        assert torch.equal(member.w, ref.w)
        curvature = {"sharpness"}
        assert_bitwise_rows(*([(s, e, t, {k: v for k, v in row.items() if k not in curvature})
                               for s, e, t, row in rows] for rows in (ref.recorder.rows, member.recorder.rows)))
        assert_same_rows(ref.recorder.rows, member.recorder.rows, rtol=1e-5)


class StopAfterOneStep:
    def poll(self, member):
        return "stop" if member.step >= 1 else None


def first_step(cfgs, **options):
    """The members' start points (probe loss, norms, test, sharpness, trace) and their first step."""
    trainer = Trainer(cfgs, controls=[StopAfterOneStep() for _ in cfgs], **options)
    trainer.run()
    return trainer.members


def test_conv_pack_members_match_their_packs_of_one():
    """Conv nets: a member of a pack against its pack of one, from the same start, for the start-point
    measurements and one step (grouped vs dense convolution backward: ~1e-6). Whole trajectories are not
    compared: max-pool backward routes each gradient to an argmax, and a 1e-8 difference in the weights
    flips near-ties, so these tiny nets on noise data move 1e-3 apart within two steps (measured for the
    lrwd member below). mlp_si has no such switch and is compared bit for bit over whole runs above."""
    conv = {**CONV, "log_every": 1, "sharpness_every": 1}
    resnet = dict(model="resnet18_si", width=2, device="cpu", dataset="synthetic", synthetic_samples=64,
                  synthetic_shape=(3, 32, 32), batch_size=16, probe_size=16, log_every=1, epochs=1,
                  sharpness_every=1, lanczos_iters=5, augment=True)
    for base in (conv, resnet):
        cfgs = [RunConfig(**base, elr=1e-4), RunConfig(**base, elr=2e-4, seed=1),
                RunConfig(**base, mode="lrwd", lr=1e-3, wd=1e-2, momentum=0.5)]
        for cfg, member in zip(cfgs, first_step(cfgs)):
            [alone] = first_step([cfg])
            assert [r[0] for r in member.recorder.rows] == [0, 1]
            assert_same_rows(alone.recorder.rows, member.recorder.rows, rtol=1e-4,
                             loose={"hessian_trace": 1e-3, "sharpness": 1e-3})
            torch.testing.assert_close(member.w, alone.w, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("model", ["mlp_si", "convnet_si"])
def test_cuda_pack_member_matches_its_pack_of_one(model):
    """On CUDA with TF32 off: a pack of K against packs of one, short runs. cuDNN may pick different
    algorithms for grouped and dense convolutions, hence rtol 1e-3 (hessian_trace, a Hutchinson sum with
    cancellations, 1e-2); mlp_si through cuBLAS batched vs plain GEMMs, the same tolerance."""
    saved = tf32_state()
    set_tf32(False)
    try:
        base = {**(CONV if model == "convnet_si" else MLP), "device": "cuda", "sharpness_every": 4,
                "trace_samples": 1}
        cfgs = [RunConfig(**base, elr=1e-4), RunConfig(**base, elr=2e-4, seed=1),
                RunConfig(**base, mode="lrwd", lr=1e-3, wd=1e-2, momentum=0.5)]
        pack = Trainer(cfgs)
        pack.run()
        for cfg, member in zip(cfgs, pack.members):
            assert_same_rows(single(cfg).recorder.rows, member.recorder.rows, rtol=1e-3,
                             loose={"hessian_trace": 1e-2})
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = \
            saved["matmul"], saved["conv"]


def test_channels_last_gives_the_same_numbers():
    cfgs = [RunConfig(**{**CONV, "epochs": 1, "sharpness_every": 0}, elr=1e-4, seed=s) for s in (0, 1)]
    plain, fast = Trainer(cfgs), Trainer(cfgs, channels_last=True)
    plain.run()
    fast.run()
    for a, b in zip(plain.members, fast.members):
        assert_same_rows(a.recorder.rows, b.recorder.rows, rtol=1e-4)


def test_probes_never_touch_running_statistics():
    every5 = {**MLP, "sharpness_every": 5}
    pack = Trainer([RunConfig(**every5, elr=0.01), RunConfig(**every5, elr=0.1, seed=3)])
    for _ in range(7):
        pack.train_step()
    before = [(m.clone(), v.clone()) for m, v in pack.STATS]
    w = pack.W.clone()
    pack.measure(["averages"], start=True)
    pack.measure(["sharpness", "test"])
    for (m0, v0), (m1, v1) in zip(before, pack.STATS):
        assert torch.equal(m0, m1) and torch.equal(v0, v1)
    assert torch.equal(w, pack.W)
    assert all(m.carried["sharpness"] is not None for m in pack.members)     # the warm start is kept per member


# ---- control ------------------------------------------------------------------------------------

def test_set_rate_changes_only_that_member():
    cfgs = [RunConfig(**MLP, elr=e) for e in (0.003, 0.01, 0.03)]
    holder = {}
    clock = lambda: holder["pack"].members[0].step        # noqa: E731
    change = Script(clock, {17: lambda m: m.set_rate(0.2)})
    pack = holder["pack"] = Trainer(cfgs, controls=[None, change, None])
    pack.run()
    for i in (0, 2):
        assert_same_rows(single(cfgs[i]).recorder.rows, pack.members[i].recorder.rows)
        assert pack.members[i].recorder.events == []

    class AtStep17:
        def poll(self, member):
            if member.step == 17 and member.base_rate != 0.2:
                member.set_rate(0.2)

    ref = single(cfgs[1], control=AtStep17())
    assert_same_rows(ref.recorder.rows, pack.members[1].recorder.rows)
    assert pack.members[1].recorder.events == ref.recorder.events == [(17, "elr_change", {"from": 0.01, "to": 0.2})]


def test_pause_resume_and_stop_one_member_leave_the_others_untouched():
    cfgs = [RunConfig(**MLP, elr=e) for e in (0.003, 0.01, 0.03)]
    holder = {}
    clock = lambda: holder["pack"].members[0].step        # noqa: E731
    seen = {}

    def frozen(member):
        seen.setdefault("paused_steps", set()).add(member.step)

    pause = Script(clock, {10: "pause", 18: frozen, 30: frozen, 40: "resume"})
    stop = Script(clock, {20: "stop"})
    pack = holder["pack"] = Trainer(cfgs, controls=[None, pause, stop])
    results = pack.run()
    assert [r.status for r in results] == ["finished", "finished", "stopped"]
    assert seen["paused_steps"] == {10}                     # parked: it did not step while paused
    assert_same_rows(single(cfgs[0]).recorder.rows, pack.members[0].recorder.rows)
    # the paused member fell 30 steps behind, read its own batches, and still is its single run
    assert_same_rows(single(cfgs[1]).recorder.rows, pack.members[1].recorder.rows)
    assert results[2].step == 20
    assert_same_rows(single(cfgs[2]).recorder.rows, pack.members[2].recorder.rows, upto=20)


def test_nonfinite_member_ends_alone():
    every10 = {**MLP, "log_every": 10}
    # lr*wd = 1e19: the weights overflow at step 2, then NaN flows through the shared forward and
    # backward for eight steps before the log point at step 10 ends the member
    cfgs = [RunConfig(**every10, elr=0.01), RunConfig(**every10, mode="lrwd", lr=1e19, wd=1.0),
            RunConfig(**every10, mode="lrwd", lr=0.1, wd=0.01, momentum=0.9)]
    pack = Trainer(cfgs)
    results = pack.run()
    assert [r.status for r in results] == ["finished", "nonfinite", "finished"]
    for cfg, member in zip(cfgs, pack.members):
        ref = single(cfg)
        assert ref.result.status == member.result.status and ref.result.step == member.result.step
        assert_same_rows(ref.recorder.rows, member.recorder.rows)
        assert member.recorder.events == ref.recorder.events
    assert torch.isnan(pack.members[1].w).all()
    assert torch.isfinite(pack.members[0].w).all() and torch.isfinite(pack.members[2].w).all()


def test_nonfinite_member_does_not_leak_through_grouped_convolutions():
    base = {**CONV, "epochs": 2, "log_every": 8, "sharpness_every": 0}
    cfgs = [RunConfig(**base, elr=1e-4), RunConfig(**base, mode="lrwd", lr=1e19, wd=1.0)]
    pack = Trainer(cfgs)
    assert [r.status for r in pack.run()] == ["finished", "nonfinite"]
    assert torch.isnan(pack.members[1].w).any()
    assert_same_rows(single(cfgs[0]).recorder.rows, pack.members[0].recorder.rows, rtol=1e-4)


# ---- checkpoints --------------------------------------------------------------------------------

def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_member_checkpoint_resumes_as_a_single_run_and_back():
    three = {**MLP, "epochs": 3, "sharpness_every": 30}
    cfgs = [RunConfig(**three, elr=0.01), RunConfig(**three, mode="lrwd", lr=0.1, wd=0.01, momentum=0.9, seed=2)]
    saved = {}

    def keep(member, kept):
        if member.epoch == 1:
            saved[id(member)] = _roundtrip(member.state_dict())

    pack = Trainer(cfgs, checkpoints=[keep, keep])
    pack.run()
    for cfg, member in zip(cfgs, pack.members):
        state = saved[id(member)]
        resumed = Trainer([cfg], states=[state])          # a pack member's checkpoint, alone
        resumed.run()
        tail = [r for r in member.recorder.rows if r[0] > state["step"]]
        assert_same_rows(tail, resumed.members[0].recorder.rows)
        assert torch.equal(resumed.members[0].w, member.w)

    # and a single run's checkpoint resumes inside a pack
    states = []
    for cfg in cfgs:
        Trainer([cfg], checkpoints=[lambda m, kept: states.append(_roundtrip(m.state_dict())) if m.epoch == 1 else None]
                ).run()
    repacked = Trainer(cfgs, states=states)
    repacked.run()
    for member, first in zip(repacked.members, pack.members):
        assert_same_rows([r for r in first.recorder.rows if r[0] > states[0]["step"]], member.recorder.rows)


# ---- grouping and policy ------------------------------------------------------------------------

def test_pack_key_and_policy(monkeypatch):
    a = RunConfig(elr=0.01)
    assert pack_key(a) == pack_key(RunConfig(mode="lrwd", lr=0.3, wd=0.01, momentum=0.9, seed=4, name="x"))
    for other in (RunConfig(elr=0.01, width=32), RunConfig(elr=0.01, epochs=5), RunConfig(elr=0.01, log_every=3),
                  RunConfig(elr=0.01, batch_size=64), RunConfig(elr=0.01, schedule="cosine")):
        assert pack_key(other) != pack_key(a)
    with pytest.raises(ConfigError, match="differ in width"):
        Trainer([a, RunConfig(elr=0.01, width=32)])
    cpu = RunConfig(device="cpu")
    conv = RunConfig(model="convnet_si", dataset="synthetic", synthetic_shape=(3, 32, 32), device="cpu")
    monkeypatch.delenv("SPHERELAB_PACK", raising=False)
    assert packing_enabled(cpu) and packing_enabled(cpu, "cuda")    # mlp packs measured faster on a CPU
    assert not packing_enabled(conv) and packing_enabled(conv, "cuda")   # conv packs measured slower
    monkeypatch.setenv("SPHERELAB_PACK", "force")
    assert packing_enabled(conv)
    monkeypatch.setenv("SPHERELAB_PACK", "0")
    assert not packing_enabled(cpu, "cuda")


def test_claim_pack_spreads_the_queue_over_free_slots(tmp_path, monkeypatch):
    monkeypatch.setenv("SPHERELAB_PACK", "1")
    store = Store(str(tmp_path / "claim.db"))
    ids = store.create_runs([{"config": RunConfig(elr=e).to_dict(), "name": f"r{e}"} for e in (1e-3, 1e-2, 0.1, 1.0)]
                            + [{"config": RunConfig(elr=0.1, width=8).to_dict(), "name": "other width"}])
    assert [r.id for r in claim_pack(store, "w1", worker_device="cpu", free_slots=2)] == ids[:2]   # 4 runs, 2 slots
    pack = claim_pack(store, "w1", worker_device="cpu", free_slots=1)
    assert [r.id for r in pack] == ids[2:4] and len({r.claim for r in pack}) == 2       # each its own claim
    assert store.get_run(ids[4]).status == "queued"                 # never packed with another width
    assert [r.id for r in claim_pack(store, "w1", worker_device="cpu")] == [ids[4]]
    assert claim_pack(store, "w1", worker_device="cpu") == []


def test_claim_pack_resumes_interrupted_packs_first_and_keeps_to_the_runs_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("SPHERELAB_PACK", "1")
    store = Store(str(tmp_path / "claim.db"))
    ids = store.create_runs([{"config": RunConfig(elr=e).to_dict(), "name": f"r{e}"} for e in (1e-3, 1e-2, 0.1, 1.0)])
    for run_id in ids[2:]:
        store.set_status(run_id, "interrupted")          # as requeue_stale leaves a dead process's runs
    resumed = claim_pack(store, "w1", worker_device="cpu")
    assert [r.id for r in resumed] == ids[2:]                       # interrupted first, and only with their kind
    assert [r.id for r in claim_pack(store, "cli", run_ids=[ids[1]], spread=False)] == [ids[1]]
    assert [r.id for r in claim_pack(store, "cli", spread=False)] == [ids[0]]
    monkeypatch.setenv("SPHERELAB_PACK", "0")
    more = store.create_runs([{"config": RunConfig(elr=e).to_dict(), "name": f"s{e}"} for e in (1e-3, 1e-2)])
    assert [r.id for r in claim_pack(store, "w1", worker_device="cpu")] == [more[0]]    # packing off: alone


# ---- the worker ---------------------------------------------------------------------------------

PACK = {"SPHERELAB_PACK": "1"}


def engine(*args, db):
    return run_engine(*args, db=db, env=PACK)


def submit(db, *args) -> list[int]:
    out = engine("submit", *args, "--device", "cpu", db=db)
    assert out.returncode == 0, out.stderr
    return [int(x) for x in out.stdout.split()]


def test_worker_packs_a_queued_sweep_and_every_member_is_its_single_run(tmp_path):
    db = str(tmp_path / "pack.db")
    ids = submit(db, "--elr", "0.003", "0.03", "0.3", "--epochs", "3", "--sharpness-every", "44", "--probe-size", "64")
    ids += submit(db, "--mode", "lrwd", "--lr", "0.1", "--wd", "0.01", "--momentum", "0.9", "--epochs", "3",
                  "--sharpness-every", "44", "--probe-size", "64")
    log = open(tmp_path / "worker.log", "w+")
    worker = start_worker(db, "--once", log=log, env=PACK)
    assert worker.wait(timeout=240) == 0
    log.seek(0)
    assert f"runs {', '.join(map(str, ids))}: started as one pack" in log.read()
    store = Store(db)
    for run_id in ids:
        info = store.get_run(run_id)
        assert info.status == "finished" and info.progress == 1.0 and info.regime is not None
        notes = [e.payload["text"] for e in store.events(run_id, ["note"])]
        assert any(text.startswith("packed with run(s)") for text in notes)
        stored = store.read_metrics(run_id)
        [expected] = train_traces([RunConfig.from_dict(info.config)])
        assert stored["step"].tolist() == expected["step"].tolist()
        for key in expected.columns:
            if key in ("wall_time",):
                continue
            np.testing.assert_allclose(stored[key], expected[key], rtol=1e-5, equal_nan=True, err_msg=key)
        assert "sharpness" in stored.columns and stored["sharpness"].notna().sum() >= 3
    store.close()


def test_worker_pack_commands_reach_one_member_and_resume_as_single_run(tmp_path):
    db = str(tmp_path / "cmd.db")
    a, b, c = submit(db, "--elr", "0.001", "0.002", "0.004", "--epochs", "2000", "--log-every", "5")
    store = Store(db)
    worker = start_worker(db, env=PACK)
    try:
        wait_for(lambda: all(store.get_run(i).status == "running" and (store.last_step(i) or 0) > 50
                             for i in (a, b, c)))
        assert store.get_run(a).worker_id == store.get_run(b).worker_id == store.get_run(c).worker_id

        store.send_command(b, "pause")
        wait_for(lambda: store.get_run(b).status == "paused")
        frozen, moving = store.get_run(b).step, store.get_run(a).step
        store.send_command(a, "set_elr", {"value": 0.02})
        change = wait_for(lambda: store.events(a, ["elr_change"]))
        assert change[0].payload == {"from": 0.001, "to": 0.02}
        wait_for(lambda: store.latest_metrics(a)["elr"][1] == pytest.approx(0.02, rel=1e-4))
        beat = store.get_run(b).heartbeat_at
        wait_for(lambda: store.get_run(b).heartbeat_at > beat + 1.0)          # parked, still heartbeating
        assert store.get_run(b).step == frozen                                # paused alone
        assert store.get_run(a).step > moving
        assert store.latest_metrics(c)["elr"][1] == pytest.approx(0.004, rel=1e-4)     # untouched

        assert engine("cancel", str(c), db=db).returncode == 0
        wait_for(lambda: store.get_run(c).status == "cancelled")
        store.send_command(b, "resume")
        wait_for(lambda: store.get_run(b).status == "running" and store.get_run(b).step > frozen)
        assert store.get_run(a).status == "running"
        wait_for(lambda: (store.get_run(a).checkpoint_step or 0) > change[0].step)
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
    assert store.get_run(a).status == store.get_run(b).status == "interrupted"

    # a packed member's checkpoint resumes as a single run (packing off)
    ckpt = store.get_run(a).checkpoint_step
    worker = start_worker(db, env={"SPHERELAB_PACK": "0"})
    try:
        wait_for(lambda: store.events(a, ["resume"]) and store.get_run(a).status == "running"
                 and (store.last_step(a) or 0) > ckpt + 10)
        assert store.events(a, ["resume"])[0].payload == {"from_step": ckpt}
        assert store.latest_metrics(a)["elr"][1] == pytest.approx(0.02, rel=1e-4)    # the changed rate was kept
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    store.close()


def test_an_interrupted_pack_resumes_as_one_pack_and_finishes(tmp_path):
    db = str(tmp_path / "repack.db")
    a, b = submit(db, "--elr", "0.001", "0.01", "--epochs", "40", "--checkpoint-every", "1")
    store = Store(db)
    worker = start_worker(db, env=PACK)
    try:
        wait_for(lambda: all((store.get_run(i).checkpoint_step or 0) > 0 for i in (a, b)))
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
    assert [store.get_run(i).status for i in (a, b)] == ["interrupted", "interrupted"]
    checkpoints = {i: store.get_run(i).checkpoint_step for i in (a, b)}

    worker = start_worker(db, env=PACK)
    try:
        wait_for(lambda: all(store.get_run(i).status == "finished" for i in (a, b)), timeout=240)
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
    for run, other in ((a, b), (b, a)):
        assert [e.payload for e in store.events(run, ["resume"])] == [{"from_step": checkpoints[run]}]
        packed = [e for e in store.events(run, ["note"]) if e.payload["text"].startswith("packed with")]
        assert len(packed) == 2 and all(f"run(s) {other} " in e.payload["text"] for e in packed)
        assert packed[1].step == checkpoints[run]                  # the second pack began at the resume
        steps = store.read_metrics(run, ["train_loss"])["step"].to_numpy()
        assert (np.diff(steps) > 0).all() and steps[-1] == store.get_run(run).total_steps
    store.close()
