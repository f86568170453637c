"""Judge a run from its logged trace alone: regime, loss spikes, period.

Never reads the ELR or LR from the config: the same rules must hold for any model, width, data and
log frequency. Time is measured in epochs (the trace's `epoch` column; steps where it is missing).
The rules (README "What the analysis recognises" states them with the same numbers):

Regime of the run (`classify`):
- divergence: the loss or the SI norm went non-finite; or the run never learned: the tail's (last
  quarter's) train accuracy stays within NEAR_CHANCE of the way from chance to 1 and its train loss
  has not fallen below UNTRAINED_FRACTION of the run's own untrained level (its first logged loss).
- Trends: the last 1 - TREND_START of the run's time is cut into TREND_BINS equal spans; a line
  through the medians of log(value) in each span against log(time) gives the log-log slope of
  train_loss, eff_grad_norm and angular_update (medians, so a spike or two does not move it).
- convergence: the loss keeps falling (slope <= FALL_SLOPE) and eff_grad_norm falls with it (slope
  <= FALLS_WITH); or the tail loss is below TINY_FRACTION of the untrained level.
- chaotic_equilibrium: the loss does not keep falling (slope > FALL_SLOPE) and the norm-free
  quantities (eff_grad_norm, angular_update) show no trend (|slope| < FLAT_SLOPE).
- undetermined: too few log points (fewer than MIN_POINTS after step 0, or fewer than
  MIN_BIN_POINTS in a span), or the loss and the norm-free quantities disagree; evidence.reason
  says what would settle it.

Spikes (`find_spikes`): a loss excursion is a run of points at least SPIKE_RATIO times the running
median of the SPIKE_WINDOW points before it and at least SPIKE_FLOOR of the untrained level, dated
at its peak. It is a spike of the periodic mechanism when, from its first point to MECHANISM_EPOCHS
after its peak, si_norm rises at least NORM_JUMP above its lowest value and elr falls at least
ELR_DROP below its highest value over the LEAD_EPOCHS before the excursion. An excursion that starts within MECHANISM_EPOCHS
of a spike's peak is part of that spike (an aftershock). Other excursions are
evidence.excursions. period: the median spacing of the spikes, in steps.

periodic (`analyze`): at least two spikes (the mechanism recurs) and the last one at most LATE_FACTOR
times the longest interval between spikes before the end of the trace (the cycle is still going); not
for a diverged run. The spacing is measured, not required to be regular: the period is the median
interval and its spread (coefficient of variation, shortest and longest interval) is evidence. The
spacing of real cycles varies by up to ~40% from seed to seed and between CPU kernel paths (the float
rounding decides when an instability takes off), so regularity is no test of the mechanism. The
regime between spikes: the trend rules on the last complete cycle, timed from its spike.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

# ---- regime thresholds ----------------------------------------------------------------------------
MIN_POINTS = 8            # log points after step 0 before anything but undetermined is said
TREND_START = 0.25        # trends are read over the last three quarters of the run's time: the first
                          # quarter is the initial transient; a shorter window (the last half) reads
                          # one slow relaxation of an equilibrium's sawtooth as a fall (calibration)
TREND_BINS = 6            # spans of that window; a trend is a line through their medians
MIN_BIN_POINTS = 2        # log points a span needs for its median to count
NEAR_CHANCE = 0.2         # "near chance": accuracy within a fifth of the way from chance to 1
UNTRAINED_FRACTION = 0.8  # a diverged run's loss stays above 80% of its untrained level
TINY_FRACTION = 1e-4      # tail loss below 0.01% of the untrained level: converged, whatever its trend
                          # (near float precision a loss stops falling for numerical reasons);
                          # equilibria sit far above (digits: >= 0.2%, the papers' CIFAR: >= 3%)
FALL_SLOPE = -0.35        # the loss keeps falling: log-log slope <= -0.35 (down >= 32% over the
                          # window's x3 in time). Calibration (BENCHMARKS.md): converging digits
                          # runs fall with slopes <= -0.4 there; equilibria drift by > -0.35 (all
                          # but two still relaxing into their equilibrium)
FALLS_WITH = -0.1         # in convergence eff_grad_norm falls with the loss (slope <= -0.1): flat or
                          # rising contradicts it (converging digits runs: <= -0.2)
FLAT_SLOPE = 0.3          # an equilibrium's norm-free quantities show no trend: |slope| < 0.3
                          # (equilibria on digits: -0.3 to +0.2, their sawtooth included)

# ---- spike thresholds -----------------------------------------------------------------------------
SPIKE_RATIO = 10.0        # an excursion is an order of magnitude above the loss just before it
SPIKE_FLOOR = 0.02        # and at least 2% of the untrained loss (not a wiggle of a converged run)
SPIKE_WINDOW = 10         # log points in the running median an excursion is measured against
MECHANISM_EPOCHS = 5.0    # the norm jump and ELR drop must follow within this many epochs
LEAD_EPOCHS = 1.0         # the instability starts before the loss crosses SPIKE_RATIO: the norm is
                          # measured against its lowest value (elr its highest) over the epoch before
NORM_JUMP = 0.05          # si_norm up by at least 5% (gradients blow the norm up)
ELR_DROP = 0.05           # elr down by at least 5% (5% norm jump alone gives ~9% at fixed lr)
LATE_FACTOR = 2.0         # no spike for longer than twice the longest interval: the cycle has stopped
                          # (the preset's intervals vary up to ~2x within one run)

KEYS = ["train_loss", "train_acc", "eff_grad_norm", "angular_update", "si_norm", "elr"]
NORM_FREE = ("eff_grad_norm", "angular_update")
REGIMES = ("convergence", "chaotic_equilibrium", "divergence", "periodic", "undetermined")


# ---- regime ---------------------------------------------------------------------------------------
def _time(frame: pd.DataFrame) -> np.ndarray:
    """Epochs when logged (any log frequency reads the same), else steps."""
    if "epoch" in frame and np.isfinite(frame["epoch"].to_numpy(float)).all():
        return frame["epoch"].to_numpy(float)
    return frame["step"].to_numpy(float)


def trend_slopes(time: np.ndarray, frame: pd.DataFrame, keys, origin: float = 0.0) -> dict:
    """Log-log slope of each key over the trend window, the last 1 - TREND_START of the time since
    origin: the window is cut into TREND_BINS equal spans, and a line is fitted through the median
    of log(value) in each span against the log of the median time since origin there. Medians, so
    a spike or two in the window does not move it. A key reads None where a span has fewer than
    MIN_BIN_POINTS positive finite values."""
    rel = time - origin
    start, end = TREND_START * rel[-1], rel[-1]
    inside = rel > start
    span = np.minimum(((rel[inside] - start) / (end - start) * TREND_BINS).astype(int), TREND_BINS - 1)
    out = {}
    for key in keys:
        if key not in frame:
            continue
        values = frame[key].to_numpy(float)[inside]
        xs, ys = [], []
        for b in range(TREND_BINS):
            ok = (span == b) & np.isfinite(values) & (values > 0)
            if ok.sum() < MIN_BIN_POINTS:
                break
            xs.append(math.log(float(np.median(rel[inside][ok]))))
            ys.append(float(np.median(np.log(values[ok]))))
        out[key] = float(np.polyfit(xs, ys, 1)[0]) if len(xs) == TREND_BINS else None
    return out


def judge_trends(slopes: dict, tail_loss: float, untrained: float) -> tuple[str, str]:
    """(regime, reason) from the trend slopes: the loss decides, the norm-free quantities must agree."""
    loss = slopes.get("train_loss")
    if tail_loss < TINY_FRACTION * untrained:
        return "convergence", (f"tail loss {tail_loss:.2e} below {TINY_FRACTION:g}x the untrained level "
                               f"{untrained:.3g}")
    if loss is None:
        return "undetermined", ("too few log points to read a trend: log more often (--log-every) "
                                "or run ~2x longer")
    free = {k: slopes[k] for k in NORM_FREE if slopes.get(k) is not None}
    shown = ", ".join(f"{k} {v:+.2f}" for k, v in {"train_loss": loss, **free}.items())
    egn = free.get("eff_grad_norm")
    if loss <= FALL_SLOPE:
        if egn is None or egn <= FALLS_WITH:
            what = "loss and effective gradient norm keep" if egn is not None else "loss keeps"
            return "convergence", f"{what} falling (log-log slopes {shown})"
        return "undetermined", (f"loss still falling but the effective gradient norm is not (log-log slopes "
                                f"{shown}): run ~2x longer to see whether the loss settles")
    if all(abs(v) < FLAT_SLOPE for v in free.values()):
        what = "norm-free quantities stationary" if free else "no norm-free quantity logged"
        return "chaotic_equilibrium", (f"loss settles at {tail_loss:.3g} ({tail_loss / untrained:.1%} of the "
                                       f"untrained level), {what} (log-log slopes {shown})")
    return "undetermined", (f"loss not falling but norm-free quantities still moving (log-log slopes {shown}): "
                            "run ~2x longer to see whether they settle")


def classify(trace: pd.DataFrame, num_classes: int | None = None) -> tuple[str, dict]:
    """(regime, evidence) of the run's tail from a wide trace with step, train_loss, train_acc;
    periodic behaviour is judged on top of this by analyze()."""
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
    rows = trace[trace["step"] > 0]
    if len(rows) < MIN_POINTS:
        return "undetermined", {"reason": f"only {len(rows)} log points after step 0 (need {MIN_POINTS}): "
                                          "wait for more, or log more often (--log-every)"}
    time = _time(rows)
    tail = rows[time > 0.75 * time[-1]] if (time > 0.75 * time[-1]).sum() else rows.iloc[-1:]
    chance = 1.0 / num_classes if num_classes else float(start.get("train_acc", 0.1))
    ev = {
        "untrained_loss": untrained,
        "tail_train_loss": float(tail["train_loss"].mean()),
        "tail_train_acc": float(tail["train_acc"].mean()) if "train_acc" in tail else float("nan"),
        "chance_acc": chance,
        "points": int(len(rows)),
    }
    for key in NORM_FREE:
        if key in tail:
            ev[f"tail_{key}"] = float(tail[key].mean())

    near_chance = ev["tail_train_acc"] < chance + NEAR_CHANCE * (1 - chance)
    if near_chance and ev["tail_train_loss"] >= UNTRAINED_FRACTION * untrained:
        ev["reason"] = (f"tail train accuracy {ev['tail_train_acc']:.3f} near chance {chance:.3f} and tail loss "
                        f"{ev['tail_train_loss']:.3g} not below {UNTRAINED_FRACTION:g}x the untrained level "
                        f"{untrained:.3g}")
        return "divergence", ev
    slopes = trend_slopes(time, rows, ("train_loss", *NORM_FREE))
    ev.update({f"{key}_slope": value for key, value in slopes.items()})
    regime, ev["reason"] = judge_trends(slopes, float(tail["train_loss"].median()), untrained)
    return regime, ev


# ---- spikes and periods ---------------------------------------------------------------------------
def loss_excursions(trace: pd.DataFrame) -> list[tuple[int, int]]:
    """(first, peak) row positions of loss excursions: runs of points at least SPIKE_RATIO times the
    running median of the SPIKE_WINDOW points before them (and at least SPIKE_FLOOR of the first
    loss); an excursion lasts while the loss stays above sqrt(SPIKE_RATIO) times that median."""
    loss = trace["train_loss"].to_numpy(float)
    if len(loss) < SPIKE_WINDOW + 2:
        return []
    untrained = loss[0] if np.isfinite(loss[0]) else np.nanmax(loss[np.isfinite(loss)], initial=1.0)
    baseline = pd.Series(loss).rolling(SPIKE_WINDOW, min_periods=3).median().shift(1).to_numpy()
    spiking = (np.isfinite(loss) & np.isfinite(baseline) & (loss >= SPIKE_RATIO * baseline)
               & (loss >= SPIKE_FLOOR * untrained))
    found, i = [], 0
    while i < len(loss):
        if spiking[i]:
            level, j = baseline[i], i
            while j + 1 < len(loss) and loss[j + 1] >= math.sqrt(SPIKE_RATIO) * level:
                j += 1
            found.append((i, i + int(np.argmax(loss[i:j + 1]))))
            i = j + 1
        else:
            i += 1
    return found


def find_spikes(trace: pd.DataFrame) -> tuple[list[dict], list[dict]]:
    """(spikes, excursions): loss excursions with the mechanism's norm jump and ELR drop within
    MECHANISM_EPOCHS after their peak, and the others. Each is a JSON-safe dict with step, epoch,
    loss, loss_before, norm_jump and elr_drop (relative; None where not logged)."""
    if "train_loss" not in trace or trace.empty:
        return [], []
    trace = trace.sort_values("step").reset_index(drop=True)
    steps = trace["step"].to_numpy()
    epoch = trace["epoch"].to_numpy(float) if "epoch" in trace else None
    loss = trace["train_loss"].to_numpy(float)
    columns = {key: trace[key].to_numpy(float) for key in ("si_norm", "elr") if key in trace}
    spikes, excursions = [], []
    for first, peak in loss_excursions(trace):
        if spikes and epoch is not None and epoch[first] <= spikes[-1]["epoch"] + MECHANISM_EPOCHS:
            spikes[-1]["aftershocks"] += 1   # the recovery of the last spike, not a new instability
            continue
        before = max(first - 1, 0)
        item = {"step": int(steps[peak]), "epoch": None if epoch is None else float(epoch[peak]),
                "loss": float(loss[peak]), "loss_before": float(loss[before]), "norm_jump": None, "elr_drop": None,
                "aftershocks": 0}
        if epoch is not None:
            index = np.arange(len(epoch))
            lead = (index < first) & (epoch >= epoch[first] - LEAD_EPOCHS)
            lead = lead if lead.any() else index == before
            after = (index >= first) & (epoch <= epoch[peak] + MECHANISM_EPOCHS)
            item["norm_jump"] = _relative_change(columns.get("si_norm"), lead, after, np.nanmin, np.nanmax)
            drop = _relative_change(columns.get("elr"), lead, after, np.nanmax, np.nanmin)
            item["elr_drop"] = None if drop is None else -drop
        mechanism = (item["norm_jump"] is not None and item["norm_jump"] >= NORM_JUMP
                     and item["elr_drop"] is not None and item["elr_drop"] >= ELR_DROP)
        (spikes if mechanism else excursions).append(item)
    return spikes, excursions


def _relative_change(values: np.ndarray | None, lead: np.ndarray, after: np.ndarray, base, pick) -> float | None:
    """pick(values after) / base(values in the lead) - 1; None where not logged or not finite."""
    if values is None or not after.any():
        return None
    ref, moved = base(values[lead]), pick(values[after])
    if not (np.isfinite(ref) and ref > 0 and np.isfinite(moved)):
        return None
    return float(moved / ref - 1)


def estimate_period(spike_steps: list[int]) -> int | None:
    if len(spike_steps) < 2:
        return None
    return int(np.median(np.diff(spike_steps)))


def judge_periodic(trace: pd.DataFrame, spikes: list[dict]) -> dict | None:
    """Evidence of periodic behaviour (None when fewer than two spikes, or the cycle has stopped)."""
    if len(spikes) < 2 or any(s["epoch"] is None for s in spikes):
        return None
    times = np.array([s["epoch"] for s in spikes])
    intervals = np.diff(times)
    period = float(np.median(intervals))
    cv = float(intervals.std() / intervals.mean()) if len(intervals) >= 2 else None
    since_last = float(trace["epoch"].max() - times[-1])
    if since_last > LATE_FACTOR * float(intervals.max()):
        return None
    # the last complete cycle, timed from its spike, judged by the tail rules
    cycle = trace[(trace["epoch"] >= times[-2]) & (trace["epoch"] < times[-1])]
    untrained = float(trace.sort_values("step")["train_loss"].iloc[0])
    rel = cycle["epoch"].to_numpy(float)
    between, why = "undetermined", "too few log points in a cycle"
    if len(cycle) >= MIN_POINTS:
        slopes = trend_slopes(rel, cycle, ("train_loss", *NORM_FREE), origin=times[-2])
        tail_loss = float(cycle["train_loss"].iloc[-max(len(cycle) // 4, 1):].median())
        between, why = judge_trends(slopes, tail_loss, untrained)
    return {"period_epochs": period, "period_cv": cv,
            "period_range_epochs": [float(intervals.min()), float(intervals.max())],
            "epochs_since_last_spike": since_last, "between_spikes": between, "between_spikes_reason": why}


def analyze(trace: pd.DataFrame, num_classes: int | None = None) -> dict:
    regime, evidence = classify(trace, num_classes)
    spikes, excursions = find_spikes(trace)
    steps = [s["step"] for s in spikes]
    evidence["spike_evidence"] = spikes
    evidence["excursions"] = excursions
    periodic = judge_periodic(trace.sort_values("step"), spikes) if regime != "divergence" else None
    if periodic:
        evidence.update(periodic, tail_regime=regime, tail_reason=evidence.get("reason", ""))
        low, high = periodic["period_range_epochs"]
        cv = ("" if periodic["period_cv"] is None else
              f" (spacing {low:.3g}-{high:.3g} epochs, varies by {periodic['period_cv']:.0%})")
        evidence["reason"] = (f"{len(spikes)} loss spikes, each with a si_norm jump and an ELR drop, every "
                              f"~{periodic['period_epochs']:.3g} epochs{cv}; between spikes: "
                              f"{periodic['between_spikes']}")
        regime = "periodic"
    return {"regime": regime, "evidence": _clean(evidence), "spikes": steps, "period": estimate_period(steps)}


def _clean(value):
    """JSON-safe: non-finite floats become None, numpy scalars plain numbers, recursively."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


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
