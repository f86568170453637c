"""Non-finite metric values: SQLite stores NaN as NULL, so the kind is kept in a `special` column."""

import math

import numpy as np

FINITE, NAN, POS_INF, NEG_INF = 0, 1, 2, 3


def encode(value) -> tuple[float | None, int]:
    """(value, special) for one metric value; None counts as NaN."""
    if value is None:
        return None, NAN
    value = float(value)
    if math.isfinite(value):
        return value, FINITE
    if math.isnan(value):
        return None, NAN
    return None, POS_INF if value > 0 else NEG_INF


def decode(values: np.ndarray, special: np.ndarray) -> np.ndarray:
    """Float64 values with NaN, +inf and -inf restored from the special codes."""
    out = np.asarray(values, dtype=np.float64).copy()
    special = np.asarray(special)
    out[special == NAN] = np.nan
    out[special == POS_INF] = np.inf
    out[special == NEG_INF] = -np.inf
    return out


def decode_one(value, special: int) -> float:
    return {NAN: math.nan, POS_INF: math.inf, NEG_INF: -math.inf}.get(special, value)
