"""Judge a run from its logged trace alone: regime, loss spikes, period.

Never reads the ELR or LR from the config: the same rules must hold for any model, width and data.
The rules (also in README):

- undetermined: fewer than MIN_POINTS finite train-loss points after step 0.
- divergence: the run never learns. The tail's train accuracy stays near chance (within a fifth of
  the way from chance to 1) and the tail's train loss has not fallen below UNTRAINED_FRACTION of
  the run's own untrained level (its step-0 loss); or the loss or norm went non-finite.
- convergence: the loss keeps falling towards 0. Either the tail loss is below TINY_FRACTION of
  the untrained level (nothing left to fluctuate), or over the last half of the run log(train_loss)
  against log(step) falls with slope <= CONVERGE_SLOPE and the fall is significant (t-statistic
  <= -MIN_T, so the fluctuations of an equilibrium are not mistaken for a trend).
- chaotic_equilibrium: the run learned, the tail loss sits above TINY_FRACTION of the untrained
  level, the fitted slope is flatter than CONVERGE_SLOPE and no fall is significant.
- undetermined otherwise (a steep but noisy fall, or a significant but slow one: run longer).

Spikes: train loss at least SPIKE_RATIO times the running median of the preceding points and at
least SPIKE_FLOOR of the untrained level; consecutive spiking points form one spike, dated at its
peak. Period: median spacing of the spikes (needs two or more).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

MIN_POINTS = 8
UNTRAINED_FRACTION = 0.8
TINY_FRACTION = 1e-2
CONVERGE_SLOPE = -0.3
MIN_T = 4.0
SPIKE_RATIO = 10.0
SPIKE_FLOOR = 0.02
SPIKE_WINDOW = 10

KEYS = ["train_loss", "train_acc", "eff_grad_norm", "si_norm"]   # what the rules read from a trace
REGIMES = ("convergence", "chaotic_equilibrium", "divergence", "undetermined")


def _loglog_fit(steps: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """Slope of log(value) against log(step) and its t-statistic (slope / standard error)."""
    ok = (steps > 0) & np.isfinite(values) & (values > 0)
    if ok.sum() < 4:
        return float("nan"), float("nan")
    x, y = np.log(steps[ok]), np.log(values[ok])
    if np.ptp(x) == 0:
        return float("nan"), float("nan")
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    se = math.sqrt(max(float(resid @ resid), 1e-300) / (len(x) - 2) / float(((x - x.mean()) ** 2).sum()))
    return float(slope), float(slope / se)


def _tail(frame: pd.DataFrame, fraction: float) -> pd.DataFrame:
    n = max(int(len(frame) * fraction), 3)
    return frame.iloc[-n:]


def classify(trace: pd.DataFrame, num_classes: int | None = None) -> tuple[str, dict]:
    """(regime, evidence) from a wide trace with at least step, train_loss, train_acc."""
    if "train_loss" not in trace or trace.empty:
        return "undetermined", {"reason": "no train_loss logged yet"}
    trace = trace.sort_values("step")
    for key in ("train_loss", "si_norm"):   # logged at every log point, so NaN is a value, not a gap
        values = trace[key].to_numpy(float) if key in trace else np.zeros(0)
        if not np.isfinite(values).all():
            first_bad = int(trace["step"].to_numpy()[~np.isfinite(values)][0])
            return "divergence", {"reason": f"{key} became non-finite at step {first_bad} (numerical blow-up)"}
    start = trace.iloc[0]
    untrained = float(start["train_loss"])
    rows = trace[trace["step"] > 0].dropna(subset=["train_loss"])
    if len(rows) < MIN_POINTS:
        return "undetermined", {"reason": f"only {len(rows)} log points after step 0 (need {MIN_POINTS})"}

    tail = _tail(rows, 0.25)
    half = _tail(rows, 0.5)
    chance = 1.0 / num_classes if num_classes else float(start.get("train_acc", 0.1))
    ev = {
        "untrained_loss": untrained,
        "tail_train_loss": float(tail["train_loss"].mean()),
        "tail_train_acc": float(tail["train_acc"].mean()) if "train_acc" in tail else float("nan"),
        "chance_acc": chance,
        "points": int(len(rows)),
    }
    ev["loss_slope"], ev["loss_slope_t"] = _loglog_fit(half["step"].to_numpy(float),
                                                       half["train_loss"].to_numpy(float))
    if "eff_grad_norm" in rows:
        ev["tail_eff_grad_norm"] = float(tail["eff_grad_norm"].mean())
        ev["eff_grad_norm_slope"], _ = _loglog_fit(half["step"].to_numpy(float),
                                                   half["eff_grad_norm"].to_numpy(float))

    near_chance = ev["tail_train_acc"] < chance + 0.2 * (1 - chance)
    not_below_untrained = ev["tail_train_loss"] >= UNTRAINED_FRACTION * untrained
    if near_chance and not_below_untrained:
        ev["reason"] = (f"tail train accuracy {ev['tail_train_acc']:.3f} near chance {chance:.3f} and tail loss "
                        f"{ev['tail_train_loss']:.3g} not below {UNTRAINED_FRACTION:g}x the untrained level "
                        f"{untrained:.3g}")
        return "divergence", ev
    if ev["tail_train_loss"] < TINY_FRACTION * untrained:
        ev["reason"] = f"tail loss {ev['tail_train_loss']:.2e} below {TINY_FRACTION:g}x the untrained level"
        return "convergence", ev
    slope, t = ev["loss_slope"], ev["loss_slope_t"]
    falling = slope <= CONVERGE_SLOPE and t <= -MIN_T
    if falling:
        ev["reason"] = (f"train loss still falling as a power law (log-log slope {slope:.2f}, t = {t:.1f}) "
                        f"at {ev['tail_train_loss']:.3g}")
        return "convergence", ev
    if slope > CONVERGE_SLOPE and not t <= -MIN_T:
        ev["reason"] = (f"train loss stationary at {ev['tail_train_loss']:.3g} "
                        f"({ev['tail_train_loss'] / untrained:.1%} of the untrained level, no significant trend: "
                        f"slope {slope:.2f}, t = {t:.1f})")
        return "chaotic_equilibrium", ev
    ev["reason"] = (f"train loss trend unclear (slope {slope:.2f}, t = {t:.1f}): "
                    "run longer to tell convergence from equilibrium")
    return "undetermined", ev


def find_spikes(trace: pd.DataFrame) -> list[int]:
    """Steps of loss spikes (peaks of runs of points far above the running median before them)."""
    if "train_loss" not in trace or len(trace) < SPIKE_WINDOW + 2:
        return []
    trace = trace.sort_values("step")
    loss = trace["train_loss"].to_numpy(float)
    steps = trace["step"].to_numpy()
    untrained = loss[0] if np.isfinite(loss[0]) else np.nanmax(loss[np.isfinite(loss)], initial=1.0)
    baseline = pd.Series(loss).rolling(SPIKE_WINDOW, min_periods=3).median().shift(1).to_numpy()
    spiking = (np.isfinite(loss) & np.isfinite(baseline) & (loss >= SPIKE_RATIO * baseline)
               & (loss >= SPIKE_FLOOR * untrained))
    spikes, i = [], 0
    while i < len(loss):
        if spiking[i]:
            # the spike lasts while the loss stays above the pre-spike baseline's threshold
            level, j = baseline[i], i
            while j + 1 < len(loss) and loss[j + 1] >= math.sqrt(SPIKE_RATIO) * level:
                j += 1
            peak = i + int(np.argmax(loss[i:j + 1]))
            spikes.append(int(steps[peak]))
            i = j + 1
        else:
            i += 1
    return spikes


def estimate_period(spikes: list[int]) -> int | None:
    if len(spikes) < 2:
        return None
    return int(np.median(np.diff(spikes)))


def analyze(trace: pd.DataFrame, num_classes: int | None = None) -> dict:
    regime, evidence = classify(trace, num_classes)
    spikes = find_spikes(trace)
    return {"regime": regime, "evidence": _clean(evidence), "spikes": spikes, "period": estimate_period(spikes)}


def _clean(d: dict) -> dict:
    """JSON-safe: non-finite floats become None."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def memory_trace(rows) -> pd.DataFrame:
    """Wide frame (step, epoch, wall_time, keys...) from MemoryRecorder rows."""
    return pd.DataFrame([{"step": s, "epoch": e, "wall_time": t, **v} for s, e, t, v in rows])


def analyze_stored(store, run_id: int, num_classes: int | None = None) -> dict:
    """analyze() on a stored run's trace (num_classes from its config when not given): the one way
    the worker, the CLI and the dashboard judge a stored run."""
    from .config import num_classes as classes_of
    if num_classes is None:
        num_classes = classes_of(store.get_run(run_id).config)
    return analyze(store.read_metrics(run_id, KEYS), num_classes)
