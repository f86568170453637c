"""Pure computations on metric frames for the pages: smoothing, sweep summaries, regime boundaries.

No Streamlit and no store here: DataFrames in, DataFrames (or plain values) out.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from engine.analysis import REGIMES
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


def regime_boundaries(rates: pd.Series, regimes: pd.Series) -> list[float]:
    """Geometric means between adjacent rates whose regimes differ. Each rate takes the regime most
    of its runs (seeds) have; undetermined runs carry no evidence and are left out."""
    known = pd.DataFrame({"rate": rates, "regime": regimes})
    known = known[known["regime"].isin(REGIMES[:3]) & (known["rate"] > 0)]
    if known.empty:
        return []
    per_rate = known.groupby("rate")["regime"].agg(lambda r: r.value_counts().index[0]).sort_index()
    pairs = zip(per_rate.index[:-1], per_rate.index[1:], per_rate.to_numpy()[:-1], per_rate.to_numpy()[1:])
    return [math.sqrt(lo * hi) for lo, hi, left, right in pairs if left != right]
