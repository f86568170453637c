"""Pure computations on metric frames for the pages: smoothing, sweep summaries, regime boundaries.

No Streamlit and no store here: DataFrames in, DataFrames (or plain values) out.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from engine import registry
from storage import downsample_extremes

SERIES = ["run_id", "key"]


def debiased_ema(values: np.ndarray, smoothing: float) -> np.ndarray:
    """Exponential moving average with Adam's bias correction: s_t = b*s_{t-1} + (1-b)*x_t, shown as
    s_t / (1 - b^t), so the first points are not dragged towards 0 (that is pandas' ewm with
    adjust=True). Non-finite points are skipped (they read NaN and leave the average as it was),
    so one inf does not erase the rest of a curve."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    clean = np.where(finite, values, np.nan)
    if smoothing <= 0:
        return clean
    average = pd.Series(clean).ewm(alpha=1 - smoothing, adjust=True, ignore_na=True).mean().to_numpy()
    return np.where(finite, average, np.nan)


def smooth_long(long: pd.DataFrame, smoothing: float) -> pd.DataFrame:
    """The long frame with `value` replaced by its debiased EMA, per (run_id, key) series."""
    smoothed = long.copy()
    if not smoothed.empty:
        smoothed["value"] = long.groupby(SERIES, sort=False)["value"].transform(
            lambda values: debiased_ema(values.to_numpy(), smoothing))
    return smoothed


def thin(long: pd.DataFrame, max_points: int | None) -> pd.DataFrame:
    """Each (run_id, key) series thinned for drawing, keeping its extremes (spikes must survive)."""
    return downsample_extremes(long, max_points, by=tuple(SERIES)).reset_index(drop=True)


def tail_mean(values: pd.Series, fraction: float = 0.25) -> float:
    """Mean of the last `fraction` of the finite points (at least one): the level a run settled at."""
    finite = values[np.isfinite(values.to_numpy(dtype=np.float64))]
    if finite.empty:
        return float("nan")
    return float(finite.iloc[-max(1, int(len(finite) * fraction)):].mean())


def with_x(long: pd.DataFrame, x: str) -> pd.DataFrame:
    """The long frame with an `x` column to draw against: step, epoch or wall_time, or a metric key
    (a phase diagram: each point pairs a metric with the x metric's value at the same run and step;
    steps where the x metric was not logged drop out)."""
    if x in ("step", "epoch", "wall_time"):
        return long.assign(x=long[x])
    xs = long.loc[long["key"] == x, ["run_id", "step", "value"]].rename(columns={"value": "x"})
    return long.merge(xs, on=["run_id", "step"], how="inner").sort_values([*SERIES, "step"], ignore_index=True)


def seed_groups(runs) -> dict[int, list[int]]:
    """Runs whose configs differ only in seed (and name or tags), keyed by their first run id."""
    groups: dict[str, list[int]] = {}
    for run in sorted(runs, key=lambda r: r.id):
        same = json.dumps({k: v for k, v in run.config.items() if k not in ("seed", "name", "tags")},
                          sort_keys=True, default=str)
        groups.setdefault(same, []).append(run.id)
    return {members[0]: members for members in groups.values()}


def group_mean(long: pd.DataFrame, groups: dict[int, list[int]], log_keys=()) -> pd.DataFrame:
    """Each group's mean curve with a ±1 std band (lo, hi) across its runs at each step, under the
    group's first run id. On log-scale keys mean and std are taken of log10(value) (a geometric
    mean and a band that stays positive). epoch and wall_time are averaged too."""
    parts = []
    for head, members in groups.items():
        part = long[long["run_id"].isin(members)]
        if part.empty:
            continue
        log = part["key"].isin(list(log_keys)).to_numpy()
        values = part["value"].to_numpy(dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            values = np.where(log, np.log10(np.where(values > 0, values, np.nan)), values)
        values = np.where(np.isfinite(values), values, np.nan)
        stats = (part.assign(v=values).groupby(["key", "step"], sort=False)
                 .agg(mean=("v", "mean"), std=("v", "std"), epoch=("epoch", "mean"),
                      wall_time=("wall_time", "mean")).reset_index())
        std = stats["std"].fillna(0.0)
        is_log = stats["key"].isin(list(log_keys)).to_numpy()
        unlog = lambda v: np.where(is_log, 10.0 ** v, v)  # noqa: E731
        parts.append(pd.DataFrame({"run_id": head, "key": stats["key"], "step": stats["step"],
                                   "epoch": stats["epoch"], "wall_time": stats["wall_time"],
                                   "value": unlog(stats["mean"]), "lo": unlog(stats["mean"] - std),
                                   "hi": unlog(stats["mean"] + std)}))
    if not parts:
        return long.iloc[0:0].assign(lo=[], hi=[])
    return pd.concat(parts, ignore_index=True).sort_values([*SERIES, "step"], ignore_index=True)


# ---- regime maps ---------------------------------------------------------------------------------
ORDERED = ("convergence", "chaotic_equilibrium", "divergence")   # along the rate axis


def per_rate(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per swept rate: runs (seeds) n, the majority regime and how many runs agree with it
    ("2/3"), the first run id, and mean and std over the runs of each tail metric."""
    rows = []
    for rate, runs in summary.groupby("rate", sort=True):
        counts = runs["regime"].value_counts()
        rows.append({"rate": rate, "n": len(runs), "regime": counts.index[0],
                     "agreement": f"{counts.iloc[0]}/{len(runs)}", "run_id": int(runs["run_id"].iloc[0]),
                     **{f"{key}_{stat}": getattr(runs[key], stat)() for key in registry.REGIME_MAP_KEYS for stat in ("mean", "std")}})
    columns = ["rate", "n", "regime", "agreement", "run_id", *(f"{k}_{s}" for k in registry.REGIME_MAP_KEYS for s in ("mean", "std"))]
    return pd.DataFrame(rows, columns=columns)


def regime_boundaries(rates: pd.Series, regimes: pd.Series) -> list[dict]:
    """Each boundary between consecutive regimes of ORDERED as an interval of rates: lo is the
    largest rate with every run at or below it on the lower side, hi the smallest with every run at
    or above it on the upper side; the estimate is their geometric mean. Seeds that disagree, or
    undetermined runs (left out), widen the interval. A side no run reaches has no boundary."""
    known = pd.DataFrame({"rate": rates, "regime": regimes})
    known = known[known["regime"].isin(ORDERED) & (known["rate"] > 0)]
    known["rank"] = known["regime"].map(ORDERED.index)
    spans = known.groupby("rate")["rank"].agg(["min", "max"]).sort_index()
    found = []
    for k in range(len(ORDERED) - 1):
        if not ((spans["min"] <= k).any() and (spans["max"] > k).any()):
            continue
        below = spans["max"] <= k
        above = spans["min"] > k
        lo = spans.index[below.cumprod().astype(bool)].max() if below.iloc[0] else None
        hi = spans.index[above[::-1].cumprod().astype(bool)[::-1]].min() if above.iloc[-1] else None
        lo, hi = (None if v is None or pd.isna(v) else float(v) for v in (lo, hi))
        between = (ORDERED[int(spans["max"][spans["max"] <= k].max())], ORDERED[int(spans["min"][spans["min"] > k].min())])
        boundary = {"between": between, "lo": lo, "hi": hi,
                    "estimate": math.sqrt(lo * hi) if lo is not None and hi is not None else None}
        if not any((b["lo"], b["hi"]) == (lo, hi) for b in found):  # no middle regime: one boundary, not two
            found.append(boundary)
    return found
