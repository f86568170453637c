"""Regime, spike and period detection on synthetic traces (real runs: tests/test_regimes.py).

The traces are made here from a few smooth laws with multiplicative noise, sampled the way the
trainer logs (a row every `log_every` steps, `epoch` = step / steps per epoch)."""
import json

import numpy as np
import pandas as pd
import pytest

from engine import analysis
from engine.analysis import analyze, classify, estimate_period, find_spikes

L0 = 4.0
STEPS_PER_EPOCH = 45          # digits at batch 32


def make_trace(epochs, log_every=10, seed=0, noise=0.15, **laws) -> pd.DataFrame:
    """A trace with one column per law (a function of the epoch), noisy, and step/epoch columns.
    Row 0 is step 0 with the untrained loss L0."""
    steps = np.arange(0, epochs * STEPS_PER_EPOCH + 1, log_every)
    epoch = steps / STEPS_PER_EPOCH
    rng = np.random.default_rng(seed)
    frame = {"step": steps, "epoch": epoch}
    for key, law in laws.items():
        values = np.asarray(law(epoch), dtype=float) * np.exp(rng.normal(0, noise, len(steps)))
        frame[key] = values
    out = pd.DataFrame(frame)
    out.loc[0, "train_loss"] = L0
    return out


def converging(epochs=30, **kw):
    """Loss and gradient norm fall as power laws (the convergence regime)."""
    return make_trace(epochs, train_loss=lambda t: 0.3 / (1 + t), train_acc=lambda t: np.full_like(t, 0.99),
                      eff_grad_norm=lambda t: 20 * (1 + t) ** -0.6, angular_update=lambda t: 0.02 * (1 + t) ** -0.6,
                      **kw)


def equilibrium(epochs=30, **kw):
    """Loss learns, then fluctuates around 0.8; norm-free quantities stationary."""
    return make_trace(epochs, train_loss=lambda t: 0.8 + 3.2 * np.exp(-t / 2), train_acc=lambda t: np.full_like(t, 0.75),
                      eff_grad_norm=lambda t: np.full_like(t, 12.0), angular_update=lambda t: np.full_like(t, 0.12),
                      **kw)


def test_power_law_decay_of_loss_and_gradient_norm_is_convergence():
    regime, ev = classify(converging(), 10)
    assert regime == "convergence", ev
    assert ev["train_loss_slope"] < -0.8 and ev["eff_grad_norm_slope"] < -0.4


def test_tiny_loss_is_convergence_even_when_flat():
    trace = make_trace(30, train_loss=lambda t: np.full_like(t, 1e-4), train_acc=lambda t: np.ones_like(t),
                       eff_grad_norm=lambda t: np.full_like(t, 0.1), noise=0.3)
    regime, ev = classify(trace, 10)
    assert regime == "convergence" and "untrained level" in ev["reason"]


def test_stationary_plateau_is_chaotic_equilibrium():
    regime, ev = classify(equilibrium(noise=0.25), 10)
    assert regime == "chaotic_equilibrium", ev
    assert ev["tail_train_loss"] == pytest.approx(0.8, rel=0.1)


@pytest.mark.parametrize("epochs", [24, 30, 37, 45, 60])
def test_sawtooth_equilibrium_is_not_read_as_a_fall(epochs):
    """Equilibria on small data relax slowly and jump back (period ~12 epochs here): wherever the run
    stops, the medians over the last three quarters see the same level, not one relaxation."""
    def saw(t):
        return 0.15 * np.exp(-np.log(2.5) * (t % 12) / 12)      # falls 2.5x, jumps back, every 12 epochs
    trace = make_trace(epochs, train_loss=saw, train_acc=lambda t: np.full_like(t, 0.97),
                       eff_grad_norm=lambda t: 40 * saw(t) ** 0.5, angular_update=lambda t: 0.4 * saw(t) ** 0.5)
    regime, ev = classify(trace, 10)
    assert regime == "chaotic_equilibrium", ev


def test_loss_falling_while_gradient_norm_rises_is_undetermined_with_a_remedy():
    trace = make_trace(30, train_loss=lambda t: 0.3 / (1 + t), train_acc=lambda t: np.full_like(t, 0.95),
                       eff_grad_norm=lambda t: 5 * (1 + t) ** 0.5, angular_update=lambda t: 0.05 * (1 + t) ** 0.5)
    regime, ev = classify(trace, 10)
    assert regime == "undetermined"
    assert "longer" in ev["reason"]


def test_never_learning_is_divergence():
    trace = make_trace(30, train_loss=lambda t: np.full_like(t, 1.2 * L0), train_acc=lambda t: np.full_like(t, 0.1),
                       eff_grad_norm=lambda t: np.full_like(t, 1e3))
    regime, ev = classify(trace, 10)
    assert regime == "divergence"
    assert "near chance" in ev["reason"]


def test_learning_but_noisy_is_not_divergence():
    trace = make_trace(30, train_loss=lambda t: np.full_like(t, 0.5 * L0), train_acc=lambda t: np.full_like(t, 0.6),
                       eff_grad_norm=lambda t: np.full_like(t, 30.0))
    assert classify(trace, 10)[0] == "chaotic_equilibrium"


def test_nonfinite_trace_is_divergence_and_too_short_is_undetermined():
    trace = equilibrium()
    trace.loc[12, "train_loss"] = np.nan
    regime, ev = classify(trace, 10)
    assert regime == "divergence" and "non-finite" in ev["reason"]
    assert classify(equilibrium().iloc[:4], 10)[0] == "undetermined"
    assert classify(pd.DataFrame(), 10)[0] == "undetermined"


@pytest.mark.parametrize("law", [converging, equilibrium])
def test_label_does_not_depend_on_the_log_frequency(law):
    labels = {every: classify(law(log_every=every), 10)[0] for every in (1, 5, 10, 45)}
    assert len(set(labels.values())) == 1, labels
    assert labels[10] != "undetermined"


def test_too_coarse_logging_is_undetermined_and_says_to_log_more_often():
    trace = converging(log_every=150)        # one point every 3.3 epochs: 9 points
    regime, ev = classify(trace, 10)
    assert regime == "undetermined" and "--log-every" in ev["reason"], ev


# ---- spikes and periodic behaviour -------------------------------------------------------------
def lrwd_trace(spike_epochs=(40, 70, 100, 130), epochs=150, norm_jump=0.3, log_every=5, seed=0):
    """An lrwd-style run: weight decay shrinks si_norm (so elr = lr / si_norm^2 grows) and the loss
    falls, until a spike at each of spike_epochs: the loss jumps ~100x for a few points and si_norm
    jumps by norm_jump (0: the spike has no mechanism), then the decay starts again."""
    steps = np.arange(0, epochs * STEPS_PER_EPOCH + 1, log_every)
    epoch = steps / STEPS_PER_EPOCH
    rng = np.random.default_rng(seed)
    norm = np.empty(len(steps))
    loss = 0.02 * np.exp(rng.normal(0, 0.1, len(steps)))
    rho, last = 8.0, 0.0
    for i, t in enumerate(epoch):
        for s in spike_epochs:
            if last < s <= t:
                rho *= 1 + norm_jump
                loss[i:i + 4] = [1.5, 2.0, 0.5, 0.1][:len(loss[i:i + 4])]
        rho *= np.exp(-0.01 * (t - last))
        last = t
        norm[i] = rho
    loss[0] = L0
    elr = 0.1 / norm ** 2
    egn = 5 * np.exp(rng.normal(0, 0.1, len(steps)))
    return pd.DataFrame({"step": steps, "epoch": epoch, "train_loss": loss, "train_acc": np.full(len(steps), 0.99),
                         "si_norm": norm, "elr": elr, "eff_grad_norm": egn, "angular_update": elr * egn})


def test_spikes_with_norm_jump_and_elr_drop_make_a_periodic_run():
    trace = lrwd_trace()
    result = analyze(trace, 10)
    spikes = result["spikes"]
    assert len(spikes) == 4
    spike_epochs = trace.set_index("step").loc[spikes, "epoch"].to_numpy()
    assert np.allclose(spike_epochs, [40, 70, 100, 130], atol=0.5)
    assert result["period"] == pytest.approx(30 * STEPS_PER_EPOCH, rel=0.02)
    assert result["regime"] == "periodic"
    ev = result["evidence"]
    assert ev["period_epochs"] == pytest.approx(30, rel=0.02) and ev["period_cv"] < 0.05
    assert all(s["norm_jump"] == pytest.approx(0.3, abs=0.02) and s["elr_drop"] > 0.35 for s in ev["spike_evidence"])
    assert ev["between_spikes"] in analysis.REGIMES and ev["excursions"] == []


def test_loss_spikes_without_a_norm_jump_are_excursions_not_spikes():
    result = analyze(lrwd_trace(norm_jump=0.0), 10)
    assert result["spikes"] == [] and result["period"] is None
    assert len(result["evidence"]["excursions"]) == 4
    assert result["regime"] != "periodic"


def test_small_norm_jumps_are_not_the_mechanism():
    result = analyze(lrwd_trace(norm_jump=0.03), 10)     # below NORM_JUMP
    assert result["spikes"] == [] and len(result["evidence"]["excursions"]) == 4


def test_irregular_spacing_is_periodic_with_its_spread_reported():
    """The mechanism recurs at uneven intervals (20, 70, 20 epochs), as real cycles do from seed to seed
    and between CPU kernel paths: still `periodic`, the spread is evidence, not a reason to abstain."""
    result = analyze(lrwd_trace(spike_epochs=(20, 40, 110, 130)), 10)
    ev = result["evidence"]
    assert len(result["spikes"]) == 4 and result["regime"] == "periodic", ev["reason"]
    assert ev["period_epochs"] == pytest.approx(20, rel=0.05)
    assert ev["period_range_epochs"] == pytest.approx([20, 70], rel=0.05)
    assert ev["period_cv"] == pytest.approx(np.std([20, 70, 20]) / np.mean([20, 70, 20]), rel=0.05)
    assert "20-70 epochs" in ev["reason"]


def test_spikes_that_stopped_are_not_periodic():
    """Last spike more than LATE_FACTOR times the longest interval before the end: the cycle stopped
    (an early transient, then another regime)."""
    stopped = analyze(lrwd_trace(spike_epochs=(20, 50, 80), epochs=250), 10)
    assert len(stopped["spikes"]) == 3 and stopped["regime"] != "periodic"
    assert 170 > analysis.LATE_FACTOR * 30
    going = analyze(lrwd_trace(spike_epochs=(20, 50, 80), epochs=80 + 0.9 * analysis.LATE_FACTOR * 30), 10)
    assert going["regime"] == "periodic", going["evidence"]["reason"]


def test_two_spikes_are_enough_while_the_cycle_goes_on():
    result = analyze(lrwd_trace(spike_epochs=(60, 100), epochs=120), 10)
    assert result["regime"] == "periodic" and result["evidence"]["period_cv"] is None


def test_an_aftershock_during_the_recovery_is_part_of_its_spike():
    trace = lrwd_trace(spike_epochs=(40, 70, 100, 130))
    i = int(np.searchsorted(trace["epoch"], 72.0))
    trace.loc[i:i + 1, "train_loss"] = [1.0, 0.3]          # the loss flares again 2 epochs later
    result = analyze(trace, 10)
    assert len(result["spikes"]) == 4
    assert [s["aftershocks"] for s in result["evidence"]["spike_evidence"]] == [0, 1, 0, 0]


def test_no_spikes_in_smooth_or_noisy_traces():
    assert find_spikes(converging(noise=0.3)) == ([], [])
    assert estimate_period([]) is None and estimate_period([100]) is None


def test_analyze_output_is_json_safe():
    trace = lrwd_trace()
    trace.loc[0, "train_loss"] = np.inf
    json.dumps(analyze(trace, 10), allow_nan=False)
    json.dumps(analyze(lrwd_trace(), 10), allow_nan=False)
