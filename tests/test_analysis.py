"""Regime, spike and period detection on synthetic traces (real runs: tests/test_regimes.py)."""
import numpy as np
import pandas as pd
import pytest

from engine.analysis import analyze, classify, estimate_period, find_spikes

L0 = 4.0


def trace(loss, acc, steps=None, **extra) -> pd.DataFrame:
    steps = np.arange(len(loss)) * 10 if steps is None else steps
    return pd.DataFrame({"step": steps, "train_loss": loss, "train_acc": acc, **extra})


def noisy(values, rel, seed=0):
    rng = np.random.default_rng(seed)
    return values * np.exp(rng.normal(0, rel, len(values)))


def test_power_law_decay_is_convergence():
    steps = np.arange(200) * 10
    loss = noisy(L0 / (1 + steps / 20.0), 0.05)
    loss[0] = L0
    regime, ev = classify(trace(loss, np.full(200, 0.99), steps), 10)
    assert regime == "convergence"
    assert ev["loss_slope"] < -0.8


def test_tiny_loss_is_convergence_even_when_flat():
    loss = noisy(np.full(100, 1e-3), 0.3)
    loss[0] = L0
    assert classify(trace(loss, np.ones(100)), 10)[0] == "convergence"


def test_stationary_plateau_is_chaotic_equilibrium():
    steps = np.arange(300) * 10
    loss = noisy(0.8 + 3.2 * np.exp(-steps / 200.0), 0.25)   # learns, then fluctuates around 0.8
    loss[0] = L0
    acc = np.clip(noisy(np.full(300, 0.75), 0.05), 0, 1)
    regime, ev = classify(trace(loss, acc, steps), 10)
    assert regime == "chaotic_equilibrium", ev
    assert ev["tail_train_loss"] == pytest.approx(0.8, rel=0.1)


def test_never_learning_is_divergence():
    loss = noisy(np.full(100, 1.2 * L0), 0.1)
    loss[0] = L0
    acc = np.clip(noisy(np.full(100, 0.1), 0.2), 0, 1)
    regime, ev = classify(trace(loss, acc), 10)
    assert regime == "divergence"
    assert "near chance" in ev["reason"]


def test_learning_but_noisy_is_not_divergence():
    loss = noisy(np.full(100, 0.5 * L0), 0.1)
    loss[0] = L0
    acc = np.full(100, 0.6)
    assert classify(trace(loss, acc), 10)[0] == "chaotic_equilibrium"


def test_nonfinite_trace_is_divergence_and_too_short_is_undetermined():
    loss = np.full(20, 2.0)
    loss[0], loss[12] = L0, np.nan
    regime, ev = classify(trace(loss, np.full(20, 0.5)), 10)
    assert regime == "divergence" and "non-finite" in ev["reason"]
    assert classify(trace(np.full(4, 1.0), np.full(4, 0.5)), 10)[0] == "undetermined"
    assert classify(pd.DataFrame(), 10)[0] == "undetermined"


def periodic_trace(period=200, spikes_at=(190, 390, 590, 790), n=1000):
    steps = np.arange(0, n, 2)
    loss = noisy(np.full(len(steps), 0.01), 0.1)
    loss[0] = L0
    for s in spikes_at:
        i = s // 2
        loss[i:i + 3] = [0.5, 2.0, 0.3]      # a spike lasting a few log points, peak at s + 2
    return trace(loss, np.full(len(steps), 0.98), steps)


def test_spikes_and_period():
    spikes = find_spikes(periodic_trace())
    assert spikes == [192, 392, 592, 792]
    assert estimate_period(spikes) == 200
    result = analyze(periodic_trace(), 10)
    assert result["spikes"] == spikes and result["period"] == 200


def test_no_spikes_in_smooth_or_noisy_traces():
    steps = np.arange(500) * 2
    smooth = trace(noisy(L0 / (1 + steps / 10.0), 0.3), np.ones(500), steps)
    assert find_spikes(smooth) == []
    assert estimate_period([]) is None and estimate_period([100]) is None


def test_analyze_output_is_json_safe():
    import json
    loss = np.full(20, 2.0)
    loss[0] = np.inf
    out = analyze(trace(loss, np.full(20, 0.5)), 10)
    json.dumps(out, allow_nan=False)
