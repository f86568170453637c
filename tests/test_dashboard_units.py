"""The dashboard's pure parts: smoothing, boundaries, config differences, incremental live reads,
the launch form, and the chart builders (figures checked as data, no browser)."""
import math

import numpy as np
import pandas as pd
import pytest

from engine.submission import queue_runs
from dashboard import charts, data, launch, series, ui
from engine.config import ConfigError
from storage import Store


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "units.db") as opened:
        yield opened


def long_frame(run_id, key, values):
    steps = np.arange(len(values)) * 10
    return pd.DataFrame({"run_id": run_id, "key": key, "step": steps, "epoch": steps / 100.0,
                         "wall_time": steps / 10.0, "value": np.asarray(values, dtype=float)})


# ---- smoothing -----------------------------------------------------------------------------------
def test_debiased_ema_starts_at_the_first_value_and_keeps_a_constant():
    assert series.debiased_ema(np.array([5.0, 5.0, 5.0]), 0.9) == pytest.approx([5.0, 5.0, 5.0])
    smoothed = series.debiased_ema(np.array([2.0, 4.0]), 0.5)
    # s1 = 0.5*2 = 1, /(1-0.5) = 2;  s2 = 0.5*1 + 0.5*4 = 2.5, /(1-0.25) = 3.333
    assert smoothed == pytest.approx([2.0, 10 / 3])


def test_debiased_ema_skips_non_finite_points():
    smoothed = series.debiased_ema(np.array([1.0, math.inf, np.nan, 1.0]), 0.9)
    assert smoothed[0] == pytest.approx(1.0) and smoothed[3] == pytest.approx(1.0)
    assert np.isnan(smoothed[1]) and np.isnan(smoothed[2])


def test_smoothing_runs_per_series_on_full_data():
    long = pd.concat([long_frame(1, "train_loss", [1.0] * 50), long_frame(2, "train_loss", [3.0] * 50)])
    smoothed = series.smooth_long(long, 0.95)
    assert smoothed.loc[smoothed["run_id"] == 1, "value"].to_numpy() == pytest.approx(np.ones(50))
    assert smoothed.loc[smoothed["run_id"] == 2, "value"].to_numpy() == pytest.approx(np.full(50, 3.0))


def test_thinning_keeps_a_spike():
    values = np.ones(10_000)
    values[4321] = 1e3
    thinned = series.thin(long_frame(1, "train_loss", values), 200)
    assert len(thinned) <= 200 and thinned["value"].max() == 1e3


# ---- sweep summaries -----------------------------------------------------------------------------
def test_boundaries_are_geometric_means_between_differing_neighbours():
    rates = pd.Series([1e-3, 1e-2, 1e-1, 1.0])
    regimes = pd.Series(["convergence", "chaotic_equilibrium", "chaotic_equilibrium", "divergence"])
    assert series.regime_boundaries(rates, regimes) == pytest.approx([math.sqrt(1e-5), math.sqrt(0.1)])


def test_boundaries_use_the_majority_over_seeds_and_ignore_undetermined():
    rates = pd.Series([1e-3, 1e-3, 1e-3, 1e-2, 1e-1])
    regimes = pd.Series(["convergence", "convergence", "chaotic_equilibrium", "undetermined", "divergence"])
    assert series.regime_boundaries(rates, regimes) == pytest.approx([math.sqrt(1e-4)])


def test_tail_mean_uses_the_last_quarter_of_finite_points():
    assert series.tail_mean(pd.Series([9.0, 9.0, 9.0, 1.0, np.nan])) == pytest.approx(1.0)
    assert math.isnan(series.tail_mean(pd.Series([np.nan])))


# ---- runs and configs ----------------------------------------------------------------------------
def test_config_diff_keeps_only_keys_that_differ(store):
    ids = store.create_runs([{"config": {"mode": "sphere", "elr": 0.01, "seed": 0}, "name": "a"},
                             {"config": {"mode": "sphere", "elr": 0.1, "seed": 0}, "name": "b"}])
    diff = data.config_diff(store.list_runs(ids=ids))
    assert list(diff.index) == ["elr"]
    assert set(diff.loc["elr"]) == {"0.01", "0.1"}


def test_config_filter_parses_and_matches_numbers_by_value():
    wanted = data.parse_config_filter("mode=lrwd, lr=1e-1")
    assert wanted == {"mode": "lrwd", "lr": "1e-1"}
    assert data.config_matches({"mode": "lrwd", "lr": 0.1}, wanted)
    assert not data.config_matches({"mode": "sphere", "lr": 0.1}, wanted)
    with pytest.raises(ValueError, match="not key=value"):
        data.parse_config_filter("mode lrwd")


def test_rate_of_names_the_rate_the_user_sets():
    assert data.rate_of({"mode": "sphere", "elr": 0.02}) == ("elr", 0.02)
    assert data.rate_of({"mode": "lrwd", "lr": None}) == ("lr", 0.1)


def test_live_trace_reads_only_new_steps(store):
    run_id = store.create_run({"mode": "sphere"}, name="live")
    store.log_metrics(run_id, [(s, s / 10, s / 100, {"train_loss": 1.0 / (s + 1)}) for s in range(0, 50, 10)])
    trace = data.LiveTrace(run_id, ("train_loss",)).refresh(store)
    assert trace.last_step == 40 and len(trace.frame) == 5
    store.log_metrics(run_id, [(50, 0.5, 0.5, {"train_loss": 0.01})])
    store.add_event(run_id, 50, "spike", {})
    trace.refresh(store)
    assert list(trace.frame["step"]) == [0, 10, 20, 30, 40, 50]
    assert trace.spikes == [50]


def test_live_trace_starts_over_after_a_resume(store):
    run_id = store.create_run({"mode": "sphere"}, name="resumed")
    store.log_metrics(run_id, [(s, 0, 0, {"train_loss": 1.0}) for s in (0, 10, 20)])
    trace = data.LiveTrace(run_id, ("train_loss",)).refresh(store)
    store.truncate_after(run_id, 10)
    store.add_event(run_id, 10, "resume", {"from_step": 10})
    store.log_metrics(run_id, [(20, 0, 0, {"train_loss": 0.5})])
    trace.refresh(store)
    assert list(trace.frame["step"]) == [0, 10, 20] and trace.frame["train_loss"].iloc[-1] == 0.5


def test_selected_point_names_its_run():
    event = {"selection": {"points": [{"x": 0.01, "y": 1.0, "customdata": 7}], "point_indices": [0]}}
    assert ui.selected_run(event) == 7
    assert ui.selected_run({"selection": {"points": []}}) is None


# ---- launch form ---------------------------------------------------------------------------------
def test_launch_form_builds_a_log_sweep_over_seeds():
    form = launch.LaunchForm(mode="lrwd", rate=0.1, wd=1e-3, sweep_rate=True, rate_start=1e-3, rate_stop=1e-1,
                             rate_points=3, seeds=2, epochs=1)
    configs, swept = launch.configs_of(form)
    assert swept == {"lr": [0.001, 0.01, 0.1], "seed": [0, 1]}
    assert sorted((c.lr, c.seed) for c in configs) == [(0.001, 0), (0.001, 1), (0.01, 0), (0.01, 1), (0.1, 0), (0.1, 1)]
    assert all(c.wd == 1e-3 and c.mode == "lrwd" for c in configs)


def test_launch_form_rejects_bad_input_in_one_line():
    with pytest.raises(ConfigError, match="needs 3x32x32 images"):
        launch.configs_of(launch.LaunchForm(model="convnet_si", dataset="digits"))


def test_queue_checks_a_missing_cifar_folder_before_writing(store, tmp_path):
    form = launch.LaunchForm(dataset="cifar10", data_dir=str(tmp_path / "nowhere"))
    configs, swept = launch.configs_of(form)
    with pytest.raises(ConfigError, match="nowhere"):
        queue_runs(store, configs, swept)
    assert store.list_runs() == []


def test_queue_makes_a_sweep_for_several_configs(store):
    configs, swept = launch.configs_of(launch.LaunchForm(sweep_rate=True, rate_start=1e-3, rate_stop=1e-1,
                                                         rate_points=3, epochs=1))
    ids = queue_runs(store, configs, swept)
    sweep = store.get_sweep(store.get_run(ids[0]).sweep_id)
    assert sweep.run_ids == sorted(ids) and sweep.spec["swept"] == {"elr": [0.001, 0.01, 0.1]}


# ---- charts --------------------------------------------------------------------------------------
def test_run_colour_is_stable_and_differs_for_neighbours():
    assert charts.run_color(7) == charts.run_color(7)
    assert len({charts.run_color(i) for i in range(1, 11)}) == 10


def test_overlay_draws_raw_faintly_behind_the_smoothed_curve_on_true_log_axes():
    raw = pd.concat([long_frame(1, "train_loss", np.linspace(3, 0.01, 100)),
                     long_frame(2, "train_loss", np.linspace(3, 0.5, 100))])
    smoothed = series.smooth_long(raw, 0.9)
    fig = charts.overlay(raw, smoothed, ["train_loss"], {1: "#1 a", 2: "#2 b"}, x="epoch", log_x=False, log_y=True)
    faint = [t for t in fig.data if t.opacity == 0.25]
    assert len(faint) == 2 and len(fig.data) == 4
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis.title.text == "train_loss"
    assert fig.layout.xaxis.title.text == "epoch"
    assert {t.line.color for t in fig.data if t.name == "#1 a"} == {charts.run_color(1)}


def test_non_finite_values_become_gaps():
    frame = pd.DataFrame({"step": [0, 10, 20], "train_loss": [1.0, math.inf, 0.5]})
    fig = charts.run_curves(frame, ["train_loss"], run_id=1, spikes=[10])
    assert np.isnan(fig.data[0].y[1]) and fig.layout.yaxis.type == "log"
    assert len(fig.layout.shapes) == 1  # the spike


def test_regime_map_puts_the_rate_on_a_log_axis_with_boundaries():
    summary = pd.DataFrame({"run_id": [1, 2], "name": ["a", "b"], "rate": [1e-3, 1e-1],
                            "regime": ["convergence", "divergence"], "train_loss": [0.01, 2.3],
                            "test_acc": [0.9, 0.1], "eff_grad_norm": [1.0, 100.0]})
    fig = charts.regime_map(summary, [1e-2], "elr")
    assert fig.layout.xaxis.type == "log" and fig.layout.xaxis3.title.text == "elr"
    assert {shape.x0 for shape in fig.layout.shapes} == {1e-2}
    assert sorted(int(v) for t in fig.data if t.yaxis == "y" for v in t.customdata) == [1, 2]


def test_log_axis_labels_stay_readable():
    assert charts.log_axis([1e-4, 1.0]) == {"type": "log", "dtick": 1}
    assert charts.log_axis([0.1, 3.0]) == {"type": "log", "dtick": "D2"}
    assert charts.log_axis([0.3, 0.5]) == {"type": "log"}


def test_a_constant_series_is_drawn_flat_not_as_float_noise():
    assert charts.scale([7.989888, 7.989889, 7.98989], log=False)["range"] == pytest.approx([7.909991, 8.069788], rel=1e-6)
    log_range = charts.scale([0.01, 0.0100000001], log=True)["range"]
    assert log_range[0] < -2 < log_range[1]
    assert "range" not in charts.scale([1.0, 2.0], log=False)


def test_figure_export_makes_real_files_in_every_offered_format():
    import plotly.graph_objects as go
    from dashboard.export import figure_bytes, figure_formats
    fig = go.Figure(go.Scatter(x=[1, 10, 100], y=[3.0, 1.0, 0.1]))
    magic = {"png": b"\x89PNG", "svg": b"<svg", "html": b"<html"}
    for fmt in figure_formats():
        data = figure_bytes(fig, fmt)
        assert data.lstrip()[:len(magic[fmt.extension])].lower() == magic[fmt.extension].lower(), fmt
