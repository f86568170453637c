"""The training loop's contracts: schedules, live rate changes, checkpoints, log points."""
import io
import math

import pytest
import torch

from engine.analysis import memory_trace
from engine.config import RunConfig
from engine.optim import schedule_factor
from engine.trainer import Trainer

FAST = dict(width=16, depth=2, epochs=3, log_every=7)


def test_schedules():
    assert schedule_factor("constant", 50, 100) == 1.0
    assert schedule_factor("cosine", 0, 100) == 1.0
    assert schedule_factor("cosine", 50, 100) == pytest.approx(0.5)
    assert schedule_factor("cosine", 100, 100) == pytest.approx(0.0, abs=1e-12)
    assert [schedule_factor("step", s, 100) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])


def test_cosine_schedule_reaches_the_logged_lr():
    t = Trainer(RunConfig(schedule="cosine", elr=0.02, **FAST))
    t.run()
    steps, elr = t.recorder.series("elr")
    assert elr[0] == pytest.approx(0.02, rel=1e-5)
    for s, e in zip(steps, elr):
        assert e == pytest.approx(0.02 * schedule_factor("cosine", s, t.total_steps), rel=1e-4, abs=1e-12)


def test_set_rate_between_steps_changes_the_next_step_and_is_recorded():
    t = Trainer(RunConfig(elr=0.01, **FAST))

    class ChangeAt:
        def poll(self, trainer):
            if trainer.step == 20:
                trainer.set_rate(0.05)

    t.control = ChangeAt()
    t.run()
    assert t.recorder.events == [(20, "elr_change", {"from": 0.01, "to": 0.05})]
    steps, elr = t.recorder.series("elr")
    assert all(e == pytest.approx(0.01, rel=1e-4) for s, e in zip(steps, elr) if s < 20)
    assert all(e == pytest.approx(0.05, rel=1e-4) for s, e in zip(steps, elr) if s > 20)
    with pytest.raises(ValueError):
        t.set_rate(float("nan"))


def test_checkpoint_round_trip_continues_the_same_trajectory():
    cfg = RunConfig(mode="lrwd", lr=0.1, wd=0.01, momentum=0.9, sharpness_every=14, **FAST)
    whole = Trainer(cfg)
    whole.run()

    first = Trainer(cfg)
    blob = io.BytesIO()

    def save(trainer):   # serialised at once, as the worker does: state_dict() shares live storage
        if trainer.step == trainer.steps_per_epoch and not blob.getvalue():
            torch.save(trainer.state_dict(), blob)

    first.checkpoint = save
    first.run()
    blob.seek(0)
    saved = torch.load(blob, weights_only=True)
    resumed = Trainer(cfg)
    resumed.load_state_dict(saved)
    resumed.run()
    a = memory_trace(whole.recorder.rows)
    b = memory_trace(resumed.recorder.rows)
    b = b[b.step > saved["step"]].reset_index(drop=True)
    a = a[a.step > saved["step"]].reset_index(drop=True)
    for key in ("train_loss", "si_norm", "grad_norm", "test_acc", "sharpness", "cos_to_init"):
        assert b[key].tolist() == pytest.approx(a[key].tolist(), rel=1e-5, nan_ok=True), key


def test_log_points_at_step_zero_every_n_steps_and_the_last_step():
    t = Trainer(RunConfig(**FAST))
    t.run()
    steps = [s for s, _, _, _ in t.recorder.rows]
    assert steps[0] == 0 and steps[-1] == t.total_steps
    assert all(s % 7 == 0 for s in steps[1:-1])
    test_steps, _ = t.recorder.series("test_acc")
    assert test_steps[0] == 0 and test_steps[-1] == t.total_steps and len(test_steps) == 4
    epochs = [e for _, e, _, _ in t.recorder.rows]
    assert epochs[-1] == pytest.approx(3.0)


def test_nonfinite_ends_the_run_with_an_event():
    t = Trainer(RunConfig(mode="lrwd", lr=1e30, **FAST))
    result = t.run()
    assert result.status == "nonfinite"
    assert t.recorder.events[-1][1] == "nonfinite"
    assert not math.isfinite(t.recorder.rows[-1][3]["si_norm"])
    assert result.step < t.total_steps


@pytest.mark.parametrize("model,width", [("convnet_si", 4), ("resnet18_si", 2)])
def test_conv_nets_train_with_every_metric(model, width):
    cfg = RunConfig(model=model, width=width, dataset="synthetic", synthetic_samples=256,
                    synthetic_shape=(3, 32, 32), batch_size=64, epochs=1, log_every=2, augment=True,
                    sharpness_every=2, probe_size=128, trace_samples=2, lanczos_iters=5)
    t = Trainer(cfg)
    assert t.run().status == "finished"
    last = t.recorder.rows[-1][3]
    expected = {"train_loss", "train_acc", "test_loss", "test_acc", "si_norm", "lr", "elr", "grad_norm",
                "eff_grad_norm", "angular_update", "cos_to_init", "sharpness", "sharpness_threshold",
                "hessian_trace"}
    assert expected <= set(last)
    assert all(math.isfinite(v) for v in last.values())
    layer_keys = [k for k in last if k.startswith("layer_norm/")]
    assert len(layer_keys) == len(t.group.params)
    assert math.sqrt(sum(last[k] ** 2 for k in layer_keys)) == pytest.approx(last["si_norm"], rel=1e-5)
    assert last["si_norm"] == pytest.approx(t.update.rho0, rel=1e-5)     # sphere mode
