"""Downsampling for charts that keeps extremes: a loss spike must never vanish from a plot."""

import numpy as np
import pandas as pd


def downsample_extremes(df: pd.DataFrame, max_points: int | None, *, by=("key",), step="step",
                        value="value") -> pd.DataFrame:
    """Thin each series (rows sharing the `by` columns; long format) to about max_points points.

    A series is split into max_points // 4 equal-width step buckets; each bucket keeps its first,
    last, smallest and largest point (one row each, so at most 4 per bucket). Non-finite values are
    always kept; series already short enough are kept whole. Rows keep their order and index.
    """
    if max_points is None or df.empty:
        return df
    series = df.groupby(list(by), sort=False).ngroup().to_numpy() if by else np.zeros(len(df), dtype=np.int64)
    steps = df[step].to_numpy(dtype=np.float64)
    values = df[value].to_numpy(dtype=np.float64)
    order = None if _is_sorted(series, steps) else np.lexsort((steps, series))
    if order is None:
        return df[_keep_mask(series, steps, values, int(max_points))]
    keep = np.empty(len(df), dtype=bool)
    keep[order] = _keep_mask(series[order], steps[order], values[order], int(max_points))
    return df[keep]


def _keep_mask(series: np.ndarray, steps: np.ndarray, values: np.ndarray, max_points: int) -> np.ndarray:
    """The rows to keep, for arrays sorted by (series, step)."""
    n = len(steps)
    buckets = max(1, max_points // 4)
    starts = _block_starts(series)
    lengths = np.diff(np.append(starts, n))
    first_step = np.repeat(steps[starts], lengths)
    span = np.repeat(steps[starts + lengths - 1], lengths) - first_step + 1
    bucket = np.minimum(((steps - first_step) * buckets // span).astype(np.int64), buckets - 1)
    bucket_starts = _block_starts(np.repeat(np.arange(len(starts)), lengths) * buckets + bucket)
    bucket_of_row = np.repeat(np.arange(len(bucket_starts)), np.diff(np.append(bucket_starts, n)))

    finite = np.isfinite(values)
    keep = ~finite | np.repeat(lengths <= max_points, lengths)
    keep[bucket_starts] = True                        # first point of each bucket
    keep[np.append(bucket_starts[1:], n) - 1] = True  # last point of each bucket
    for reduce, neutral in ((np.minimum, np.inf), (np.maximum, -np.inf)):
        candidates = np.where(finite, values, neutral)
        extreme = reduce.reduceat(candidates, bucket_starts)[bucket_of_row]
        hits = np.flatnonzero(finite & (candidates == extreme))
        _, first_hit = np.unique(bucket_of_row[hits], return_index=True)  # one row per bucket, even on ties
        keep[hits[first_hit]] = True
    return keep


def _block_starts(labels: np.ndarray) -> np.ndarray:
    """Indices where a label array (equal labels contiguous) starts a new block."""
    return np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])


def _is_sorted(series: np.ndarray, steps: np.ndarray) -> bool:
    # ngroup numbers series by first appearance, so contiguous series give non-decreasing numbers
    new_series = np.diff(series)
    return bool(np.all(new_series >= 0) and np.all((np.diff(steps) >= 0) | (new_series != 0)))
