"""The training loop's contracts: schedules, live rate changes, checkpoints, log points, quantities."""
import io
import math

import pytest
import torch

from engine import registry
from engine.config import RunConfig
from engine.optim import schedule_factor
from engine.quantities import QUANTITIES, Quantity, check_quantities
from engine.trainer import Trainer
from tests.helpers import Script, assert_same_rows, single

FAST = dict(width=16, depth=2, epochs=3, log_every=7)


def test_schedules():
    assert schedule_factor("constant", 50, 100) == 1.0
    assert schedule_factor("cosine", 0, 100) == 1.0
    assert schedule_factor("cosine", 50, 100) == pytest.approx(0.5)
    assert schedule_factor("cosine", 100, 100) == pytest.approx(0.0, abs=1e-12)
    assert [schedule_factor("step", s, 100) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])


def test_cosine_schedule_reaches_the_logged_lr():
    m = single(RunConfig(schedule="cosine", elr=0.02, **FAST))
    steps, elr = m.recorder.series("elr")
    assert elr[0] == pytest.approx(0.02, rel=1e-5)
    for s, e in zip(steps, elr):
        assert e == pytest.approx(0.02 * schedule_factor("cosine", s, m.total_steps), rel=1e-4, abs=1e-12)


def test_set_rate_between_steps_changes_the_next_step_and_is_recorded():
    holder = {}
    change = Script(lambda: holder["trainer"].members[0].step, {20: lambda member: member.set_rate(0.05)})
    trainer = holder["trainer"] = Trainer([RunConfig(elr=0.01, **FAST)], controls=[change])
    trainer.run()
    m = trainer.members[0]
    assert m.recorder.events == [(20, "elr_change", {"from": 0.01, "to": 0.05})]
    steps, elr = m.recorder.series("elr")
    assert all(e == pytest.approx(0.01, rel=1e-4) for s, e in zip(steps, elr) if s < 20)
    assert all(e == pytest.approx(0.05, rel=1e-4) for s, e in zip(steps, elr) if s > 20)
    with pytest.raises(ValueError):
        m.set_rate(float("nan"))


def _roundtrip(state: dict) -> dict:
    """Serialised at once, as the worker does: a state dict shares live storage."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_checkpoint_round_trip_continues_the_same_trajectory():
    cfg = RunConfig(mode="lrwd", lr=0.1, wd=0.01, momentum=0.9, sharpness_every=14, trace_samples=1, **FAST)
    whole = single(cfg)
    saved = {}

    def save(member, kept):
        if member.epoch == 1:
            saved["state"] = _roundtrip(member.state_dict())

    Trainer([cfg], checkpoints=[save]).run()
    resumed = Trainer([cfg], states=[saved["state"]])
    resumed.run()
    step = saved["state"]["step"]
    tail = [r for r in whole.recorder.rows if r[0] > step]
    assert_same_rows(tail, resumed.members[0].recorder.rows)
    assert torch.equal(resumed.members[0].w, whole.w)
    assert "sharpness" in tail[-1][3] and "hessian_trace" in tail[-1][3]


def test_log_points_at_step_zero_every_n_steps_and_the_last_step():
    m = single(RunConfig(**FAST))
    steps = [s for s, _, _, _ in m.recorder.rows]
    assert steps[0] == 0 and steps[-1] == m.total_steps
    assert all(s % 7 == 0 for s in steps[1:-1])
    test_steps, _ = m.recorder.series("test_acc")
    assert test_steps[0] == 0 and test_steps[-1] == m.total_steps and len(test_steps) == 4
    epochs = [e for _, e, _, _ in m.recorder.rows]
    assert epochs[-1] == pytest.approx(3.0)


def test_nonfinite_ends_the_run_with_an_event():
    m = single(RunConfig(mode="lrwd", lr=1e30, **FAST))
    assert m.result.status == "nonfinite"
    assert m.recorder.events[-1][1] == "nonfinite"
    assert not math.isfinite(m.recorder.rows[-1][3]["si_norm"])
    assert m.result.step < m.total_steps


def test_pause_parks_a_run_alone_and_resume_continues_the_same_trajectory():
    cfg = RunConfig(elr=0.01, **FAST)
    polls = {"n": 0}

    class PauseForAWhile:
        """Pauses at step 10, answers 25 polls while parked (heartbeats would go on), then resumes."""
        def poll(self, member):
            if member.step == 10 and member.state == "active" and polls["n"] == 0:
                polls["n"] = 1
                return "pause"
            if member.state == "parked":
                polls["n"] += 1
                assert member.step == 10
                return "resume" if polls["n"] > 25 else None
            return None

    trainer = Trainer([cfg], controls=[PauseForAWhile()])
    trainer.run()
    assert polls["n"] == 26
    assert_same_rows(single(cfg).recorder.rows, trainer.members[0].recorder.rows)


@pytest.mark.parametrize("model,width", [("convnet_si", 4), ("resnet18_si", 2)])
def test_conv_nets_train_with_every_metric(model, width):
    cfg = RunConfig(model=model, width=width, dataset="synthetic", synthetic_samples=256,
                    synthetic_shape=(3, 32, 32), batch_size=64, epochs=1, log_every=2, augment=True,
                    sharpness_every=2, probe_size=128, trace_samples=2, lanczos_iters=5)
    m = single(cfg)
    assert m.result.status == "finished"
    last = m.recorder.rows[-1][3]
    expected = {"train_loss", "train_acc", "test_loss", "test_acc", "si_norm", "lr", "elr", "grad_norm",
                "eff_grad_norm", "angular_update", "cos_to_init", "sharpness", "sharpness_threshold",
                "hessian_trace"}
    assert expected <= set(last)
    assert all(math.isfinite(v) for v in last.values())
    layer_keys = [k for k in last if k.startswith("layer_norm/")]
    assert len(layer_keys) == len(m.trainer.layer_names)
    assert math.sqrt(sum(last[k] ** 2 for k in layer_keys)) == pytest.approx(last["si_norm"], rel=1e-5)
    assert last["si_norm"] == pytest.approx(m.rho0, rel=1e-5)     # sphere mode


def test_every_logged_key_is_in_the_registry():
    digits = single(RunConfig(mode="lrwd", lr=0.1, wd=0.01, sharpness_every=7, trace_samples=1, **FAST))
    ticks = single(RunConfig(dataset="ticks", norm="layer", width=8, depth=2, batch_size=16, epochs=1,
                             log_every=16, validation=True))           # val_loss, val_acc: only with a split
    logged = {k for m in (digits, ticks) for _, _, _, values in m.recorder.rows for k in values}
    assert {f"feature_acc/{k}" for k in range(16)} <= logged
    assert all(registry.is_known(k) for k in logged), [k for k in logged if not registry.is_known(k)]
    declared = {k for q in QUANTITIES for k in q.keys}
    assert {registry.spec(k).key for k in logged} == declared


def test_quantity_order_and_registry_are_checked():
    class Thirsty(Quantity):
        name, keys, requires = "thirsty", ("sharpness",), ("test_loss",)

    class Unknown(Quantity):
        name, keys = "unknown", ("made_up_key",)

    with pytest.raises(RuntimeError, match="needs"):
        check_quantities([Thirsty()])
    with pytest.raises(RuntimeError, match="registry"):
        check_quantities([Unknown()])
    check_quantities(QUANTITIES)


class BatchLoss(Quantity):
    """A per-step quantity declared here, outside engine/: the mini-batch loss summed under a name of its
    own, and a count of the steps it saw."""
    name, keys, sums = "batch_loss", ("batch_loss", "steps_seen"), ("batch_loss", "one")

    def per_step(self, step):
        return {"batch_loss": step.loss.detach(), "one": torch.ones_like(step.rho)}

    def measure(self, point):
        if point.start:
            return
        for values, means in zip(point.values, point.step_means()):
            if means is not None:
                values.update(batch_loss=means["batch_loss"], steps_seen=means["one"])


def test_a_per_step_quantity_sums_by_name_and_leaves_every_other_value_bit_for_bit(monkeypatch):
    for key in BatchLoss.keys:
        monkeypatch.setitem(registry._BY_KEY, key, registry.Metric(key, key, "a test's", False, "loss"))
    cfgs = [RunConfig(elr=0.01, **FAST), RunConfig(elr=0.05, seed=3, **FAST)]
    torch.set_num_threads(1)
    plain = Trainer(cfgs)
    plain.run()
    # listed first: its sums take the first columns, and StepAverages' move along; nothing is by position
    extra = Trainer(cfgs, quantities=(BatchLoss(), *QUANTITIES))
    assert extra.sum_names[:2] == ["batch_loss", "one"] and plain.sum_names == list(QUANTITIES[0].sums)
    extra.run()
    for a, b in zip(plain.members, extra.members):
        assert [r[0] for r in a.recorder.rows] == [r[0] for r in b.recorder.rows]
        for (step, _, _, want), (_, _, _, have) in zip(a.recorder.rows, b.recorder.rows):
            assert {k: have[k] for k in want} == want, step                    # exactly, NaN-free here
            if step:
                assert have["batch_loss"] == have["train_loss"] and have["steps_seen"] == 1.0
            else:
                assert "batch_loss" not in have                                 # nothing summed at the start


def test_per_step_quantities_are_checked():
    class Scheduled(BatchLoss):
        def every(self, cfg, steps_per_epoch):
            return 5

    class Twin(BatchLoss):
        name, keys, sums = "twin", ("train_acc",), ("train_loss",)

    with pytest.raises(RuntimeError, match="every log point"):
        check_quantities([Scheduled()])
    with pytest.raises(RuntimeError, match="sums' names"):
        check_quantities([*QUANTITIES, Twin()])
