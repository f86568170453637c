"""The `ticks` toy of the large-LR paper (README, "Models and data", "The learning-rate study"): data where *which features a network uses*
can be measured. Numpy only, seeded by the data seed.

32 inputs = 16 independent two-dimensional features; binary labels (balanced). Feature k lives in
[-2, 2]^2 on inputs (2k, 2k+1): class 0 fills the V-shaped band |x0| - 2 < x1 < |x0|, class 1 the
region outside it, with a margin of 0.1*sqrt(2) on both sides of each edge (the edges have slope
+-1, so that is a vertical gap of 0.2; points are drawn uniformly and kept by rejection). A point is
made *uninformative* in feature k by putting that feature on an edge of the band instead (x0 uniform,
x1 = |x0| or |x0| - 2, chosen at random). Training and test data have all 16 features informative;
probe set k (1,000 points) has only feature k informative, the other 15 on the edges: the accuracy
on it says how much the network relies on feature k.
"""
from __future__ import annotations

import numpy as np

FEATURES = 16
GAP = 0.2                      # vertical gap = 0.1*sqrt(2) perpendicular to a slope-1 edge
TRAIN, TEST, PROBE = 512, 2000, 1000


def _informative(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """One feature's (x0, x1) for each label, uniform over its class region with the margin."""
    out = np.empty((len(labels), 2))
    todo = np.arange(len(labels))
    while len(todo):
        xy = rng.uniform(-2.0, 2.0, size=(len(todo), 2))
        top, bottom = np.abs(xy[:, 0]), np.abs(xy[:, 0]) - 2.0
        inside = (xy[:, 1] < top - GAP) & (xy[:, 1] > bottom + GAP)
        outside = (xy[:, 1] > top + GAP) | (xy[:, 1] < bottom - GAP)
        ok = np.where(labels[todo] == 0, inside, outside)
        out[todo[ok]] = xy[ok]
        todo = todo[~ok]
    return out


def _on_edge(rng: np.random.Generator, n: int) -> np.ndarray:
    x0 = rng.uniform(-2.0, 2.0, size=n)
    return np.stack([x0, np.abs(x0) - 2.0 * rng.integers(0, 2, size=n)], 1)


def _labels(rng: np.random.Generator, n: int) -> np.ndarray:
    """Balanced binary labels in a random order."""
    return rng.permutation(np.arange(n) % 2)


def sample(rng: np.random.Generator, n: int, informative: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """n points (float32 [n, 32]) and labels; only the features in `informative` (default: all) carry
    the label, the others lie on an edge."""
    labels = _labels(rng, n)
    keep = set(range(FEATURES) if informative is None else informative)
    x = np.concatenate([_informative(rng, labels) if k in keep else _on_edge(rng, n) for k in range(FEATURES)], 1)
    return x.astype(np.float32), labels.astype(np.int64)


def make(data_seed: int, train: int = TRAIN, test: int = TEST, probe: int = PROBE):
    """(x_train, y_train, x_test, y_test, x_probe [16, probe, 32], y_probe [16, probe]) for a data seed."""
    rng = np.random.default_rng([20251, data_seed])
    x_train, y_train = sample(rng, train)
    x_test, y_test = sample(rng, test)
    probes = [sample(rng, probe, informative=[k]) for k in range(FEATURES)]
    return (x_train, y_train, x_test, y_test, np.stack([p[0] for p in probes]), np.stack([p[1] for p in probes]))


def make_validation(data_seed: int, size: int = TEST):
    """(x_val, y_val): a validation draw for a data seed, as large as the test set, from its own seed
    stream (the training, test and probe data of make() are unchanged by it)."""
    return sample(np.random.default_rng([20251, data_seed, 1]), size)


def band_label(x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
    """The class a point of one feature belongs to (0 inside the band), ignoring the margin."""
    return np.where((x1 < np.abs(x0)) & (x1 > np.abs(x0) - 2.0), 0, 1)
