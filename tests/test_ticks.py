"""The `ticks` toy data (SPEC §5) checked against its definition."""
import numpy as np
import pytest

from engine import ticks


@pytest.fixture(scope="module")
def data():
    return ticks.make(data_seed=3)


def test_sizes_balance_and_seeding(data):
    x_train, y_train, x_test, y_test, x_probe, y_probe = data
    assert x_train.shape == (512, 32) and x_test.shape == (2000, 32) and x_probe.shape == (16, 1000, 32)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int64
    assert y_train.sum() == 256 and y_test.sum() == 1000 and (y_probe.sum(1) == 500).all()     # balanced
    again = ticks.make(data_seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(data, again))
    other = ticks.make(data_seed=4)
    assert not np.array_equal(data[0], other[0])


def test_every_feature_of_train_and_test_points_says_the_label_with_its_margin(data):
    for x, y in (data[0], data[1]), (data[2], data[3]):
        assert np.abs(x).max() <= 2.0
        for k in range(ticks.FEATURES):
            x0, x1 = x[:, 2 * k], x[:, 2 * k + 1]
            assert np.array_equal(ticks.band_label(x0, x1), y)
            gap = np.minimum(np.abs(x1 - np.abs(x0)), np.abs(x1 - (np.abs(x0) - 2)))
            assert gap.min() >= ticks.GAP - 1e-6           # 0.1*sqrt(2) from both edges, perpendicularly


def test_a_probe_set_carries_the_label_in_its_feature_only(data):
    x_probe, y_probe = data[4], data[5]
    for k in range(ticks.FEATURES):
        x, y = x_probe[k], y_probe[k]
        assert np.array_equal(ticks.band_label(x[:, 2 * k], x[:, 2 * k + 1]), y)
        for j in range(ticks.FEATURES):
            if j == k:
                continue
            x0, x1 = x[:, 2 * j], x[:, 2 * j + 1]
            on_edge = np.isclose(x1, np.abs(x0), atol=1e-6) | np.isclose(x1, np.abs(x0) - 2, atol=1e-6)
            assert on_edge.all()                            # uninformative: on an edge of the band
            # and the edge carries nothing: both edges are as common in either class (500 points a
            # class: the difference of two such frequencies has a standard deviation of 0.032; 240
            # pairs are checked, so the bound is 5 of those)
            upper = np.isclose(x1, np.abs(x0), atol=1e-6)
            assert abs(upper[y == 0].mean() - upper[y == 1].mean()) < 0.16
