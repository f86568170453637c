"""Page pieces more than one page draws (Teach shows the demos' runs with the same views the
Live, Regime map and Periodic pages use): each takes the store and ids and draws with Streamlit."""
import math

import pandas as pd
import streamlit as st

from engine import registry
from engine.analysis import analyze_stored
from engine.study import BASIN_BARRIER, BASIN_LOSS_BARRIER
from storage import RunInfo, RunNotFound, Store, TERMINAL_STATUSES

from . import charts, data, series, solutions, ui
from .plain import md

MAX_POINTS = 3000
PERIODIC_KEYS = ["train_loss", "train_acc", "si_norm", "elr", "eff_grad_norm"]


def open_run(run_id: int) -> None:
    st.switch_page(ui.RUN_PAGE, query_params={"run": str(run_id)})


def boundary_text(boundary: dict) -> str:
    lo, hi, estimate = (None if v is None else charts.tick_text(float(f"{v:.2g}"))
                        for v in (boundary["lo"], boundary["hi"], boundary["estimate"]))
    if estimate is None:
        return f"unclear (below {hi})" if hi else f"unclear (above {lo})"
    return f"≈ {estimate} ({lo}–{hi})"


def sweep_map(store: Store, sweep_id: int, compact: bool = False) -> None:
    """The map itself: counts, boundaries, chart, table. Teach draws it too (compact)."""
    summary = data.sweep_summary(store, sweep_id)
    if summary.empty:
        st.info("This sweep has no runs left (they were deleted).")
        return
    rate_key = summary["rate_key"].iloc[0]
    rates = series.per_rate(summary)
    boundaries = series.regime_boundaries(summary["rate"], summary["regime"])
    counts = summary["regime"].value_counts()
    shown = [r for r in ui.REGIME_BADGES if counts.get(r, 0)] + [r for r in counts.index if r not in ui.REGIME_BADGES]
    cols = st.columns(max(4, len(shown)))
    for col, regime in zip(cols, shown):
        col.metric(ui.regime_label(regime), int(counts.get(regime, 0)))
    st.markdown("**Boundaries** (interval of rates where the label changes; seeds that disagree and undetermined "
                "runs widen it): " + ("; ".join(f"{ui.regime_label(b['between'][0])} → {ui.regime_label(b['between'][1])} "
                                              f"{boundary_text(b)}" for b in boundaries) or "none yet"))
    unfinished = int((~summary["status"].isin(TERMINAL_STATUSES)).sum())
    if unfinished:
        st.caption(f"{unfinished} run(s) still queued or training: their points move as they learn.")
    if int(rates["n"].max()) > 1:
        st.caption("Several seeds per rate: big markers are the mean over seeds (bars ±1 std) in the majority "
                   "regime's colour; small markers are the seeds; hover a point for how many agree.")
    fig = charts.regime_map(rates, summary, boundaries, rate_key)
    if compact:
        ui.chart(fig, key="regime_map_inline")
        return
    event = ui.chart(fig, key="regime_map", on_select="rerun", selection_mode="points")
    chosen = ui.selected_run(event)
    if chosen is not None:
        open_run(chosen)
    st.caption(f"Points: tail means (last quarter of each run's log points). Shaded: where each boundary lies "
               f"between the {rate_key} values run; dashed: its estimate. Click a point to open its run.")
    st.dataframe(summary.drop(columns=["rate_key"]).rename(columns={"rate": rate_key}), hide_index=True,
                 width="stretch")


# ---- live overlays ------------------------------------------------------------------------------
def traces(store: Store, runs: list[RunInfo], keys: tuple[str, ...]) -> dict[int, data.LiveTrace]:
    """Each run's LiveTrace for these keys, kept in session state and extended by an incremental read."""
    held = st.session_state.setdefault("live_traces", {})
    for run in runs:
        held.setdefault((run.id, keys), data.LiveTrace(run.id, keys)).refresh(store)
    return {run.id: held[(run.id, keys)] for run in runs}


def runs_overlay(store: Store, runs: list[RunInfo], keys, *, cols: int = 2, row_height: int = 260,
                 key: str = "overlay") -> None:
    """Every run's curves, one panel per metric, read incrementally; each curve ends in its regime."""
    held = traces(store, runs, tuple(keys))
    front = data.overlay_frame(held, keys)
    if front.empty:
        st.caption("Waiting for the first log points…")
        return
    fig = charts.overlay(front.assign(x=front["step"]), list(keys), {r.id: data.run_label(r) for r in runs},
                         log_keys=registry.log_keys(keys),
                         regimes={r.id: r.regime for r in runs if r.regime}, row_height=row_height, cols=cols)
    ui.chart(fig, key=key)


# ---- periodic behaviour and sharpness -----------------------------------------------------------
def cycle(store: Store, run: RunInfo) -> None:
    """The periodic paper's picture: elr against eff_grad_norm, log-log; a period is a loop."""
    long = store.read_metrics_many([run.id], ["elr", "eff_grad_norm"])
    front = series.thin(series.with_x(long, "eff_grad_norm"), MAX_POINTS)
    front = front[front["key"] == "elr"]
    if front.empty:
        st.caption("The cycle picture needs elr and eff_grad_norm logged.")
        return
    fig = charts.overlay(front, ["elr"], {run.id: data.run_label(run)}, x="eff_grad_norm",
                         log_x=registry.is_log("eff_grad_norm"), log_keys=registry.log_keys(["elr"]), row_height=560)
    ui.chart(fig, key="cycle")
    st.caption("Cycle picture: between spikes the ELR climbs while the effective gradient norm shrinks; "
               "a spike throws the run back down (a loop per period).")


def periodic_part(store: Store, run_id: int) -> None:
    run = store.get_run(run_id)
    # spikes and period from the full trace; the chart gets a thinned copy that keeps the extremes
    result = analyze_stored(store, run.id, data.num_classes(run.config))
    frame = store.read_metrics(run.id, PERIODIC_KEYS, max_points=MAX_POINTS)
    if frame.empty:
        st.info("Nothing logged yet for this run: it is queued or has just started. This page follows it.")
        return
    spikes, period = result["spikes"], result["period"]
    cols = st.columns(4)
    with cols[0]:
        st.caption("regime")
        ui.regime_badge(result["regime"])
    cols[1].metric("loss spikes", len(spikes))
    cv = result["evidence"].get("period_cv")
    cols[2].metric("period", f"{period} steps" if period else "—",
                   delta=f"spacing ± {cv:.0%}" if period and cv is not None else None, delta_color="off",
                   delta_arrow="off",
                   help="Median spacing of the spikes; needs two or more. Below it: how much the spacing varies "
                        "(std / mean).")
    steps_per_epoch = _steps_per_epoch(frame)
    cols[3].metric("period in epochs", f"{period / steps_per_epoch:.1f}" if period and steps_per_epoch else "—")
    left, right = st.columns([3, 2])
    with left:
        ui.chart(charts.periodic(frame, spikes, period), key="periodic")
        found = data.periodic_text(result)
        if found:
            st.markdown(f"**Periodic:** {md(found)}")
        st.caption("Weight decay shrinks si_norm, so elr = lr / si_norm² grows until a step is too large: the loss "
                   "spikes, the gradients blow the norm up, the elr drops, and a new period starts. A loss spike "
                   "counts (red dashed) only with its si_norm jump and elr drop.")
    with right:
        cycle(store, run)


def sharpness_part(store: Store, run_ids: list[int]) -> None:
    runs = store.list_runs(ids=run_ids)
    long = store.read_metrics_many(run_ids, ["sharpness", "sharpness_threshold"])
    if long.empty:
        st.info("No sharpness measured yet: the runs are queued or have just started. This page follows them.")
        return
    labels = {r.id: data.run_label(r) for r in sorted(runs, key=lambda r: r.id)}
    ui.chart(charts.sharpness(long, labels), key="sharpness")
    st.caption("sharpness is λmax·ρ² (top Hessian eigenvalue at unit norm); each dashed line, in its run's colour, "
               "is that run's 2(1+μ)/elr, the largest curvature a gradient step of that size is stable on.")
    readings = data.sharpness_readings(long)
    if readings:
        st.markdown("\n".join(f"- {md(labels[run_id])}: {readings[run_id].text()}"
                              for run_id in labels if run_id in readings))


def _steps_per_epoch(frame) -> float | None:
    last = frame.iloc[-1]
    return float(last["step"] / last["epoch"]) if last["epoch"] > 0 else None




# ---- solutions: branches, averages and geometries ----------------------------------------------------------
FAMILY_KEYS = ["train_loss", "test_acc"]


def family_overlay(store: Store, runs: list[RunInfo], key: str) -> None:
    """A run and its branches on one chart: each branch starts where it left its parent (a diamond)."""
    front, _ = data.compare_frames(store, [r.id for r in runs], FAMILY_KEYS, max_points=MAX_POINTS)
    if front.empty:
        st.caption("Waiting for the first log points…")
        return
    forks = {r.id: f"{data.run_label(r)} branched from #{r.parent_id} at epoch {r.fork_epoch}"
             for r in runs if r.parent_id is not None}
    fig = charts.overlay(front, FAMILY_KEYS, {r.id: data.run_label(r) for r in runs}, log_keys=registry.log_keys(FAMILY_KEYS),
                         cols=2, row_height=340, forks=forks)
    ui.chart(fig, key=key)


def last_value(store: Store, run_id: int, key: str) -> float | None:
    frame = store.read_metrics(run_id, [key])
    values = frame[key].dropna() if key in frame else []
    return float(values.iloc[-1]) if len(values) else None


def averages_table(store: Store, run: RunInfo, jobs) -> None:
    """The run's SWA averages: which epochs, status, and the four numbers of each; and the run's own
    last test accuracy to compare them with."""
    rows = []
    for job in jobs:
        result = job.result or {}
        status = job.status
        if job.status == "failed" and job.error:
            status = f"failed: {job.error.splitlines()[0]}"
        values = {key: result.get(key) for key in ("train_loss", "train_acc", "test_loss", "test_acc")}
        for key in ("train_acc", "test_acc"):   # percentages, as every page writes accuracies
            values[key] = None if values[key] is None else 100 * values[key]
        rows.append({"job": job.id, "epochs averaged": solutions.epochs_text(job.spec.get("epochs", [])),
                     "status": status, **values})
    st.dataframe(rows, hide_index=True, width="stretch",
                 column_config={key: st.column_config.NumberColumn(format=data.ACC_COLUMN if key.endswith("_acc")
                                                                   else "%.4f")
                                for key in ("train_loss", "train_acc", "test_loss", "test_acc")})
    own = last_value(store, run.id, "test_acc")
    if own is not None:
        st.caption(f"For comparison: this run's own last test_acc is {data.acc_text(own)}. The average's weights are the mean "
                   "of those checkpoints' weights (not projected back to the sphere), with BatchNorm statistics "
                   "recomputed on the training set.")


def geometry_line(job) -> str:
    """One line about a geometry job: its pair and, when finished, the angle and test error barrier."""
    what = f"Geometry #{job.id}: {solutions.job_text(job)}"
    if job.status == "finished" and job.result:
        return (f"{what} — angle {job.result['angle']:.3g} rad, test_err barrier "
                f"{charts.barrier_text('test_err', job.result['barrier']['test_err'])}")
    return f"{what} ({job.status})"


def geometry_result(store: Store, job_id: int) -> None:
    """A geometry job as the Solutions page and Teach show it: while queued or computed, what it
    waits for; when finished, the angle, the four barriers and the path's curves."""
    job = store.get_job(job_id)
    if job.status in ("queued", "running"):
        doing = "waiting for a worker" if job.status == "queued" else "being computed by a worker"
        st.info(f"Geometry #{job.id} ({md(solutions.job_text(job))}) is {doing}; this page shows it when it "
                f"is done.", icon=":material/hourglass_top:")
        if job.status == "queued":
            ui.worker_panel(store)
        return
    if job.status == "failed":
        st.error(f"Geometry #{job.id} failed: {md((job.error or 'no reason recorded').splitlines()[0])}")
        return
    result = job.result
    labels = [_solution_label(store, result[end]) for end in ("a", "b")]
    cols = st.columns(5)
    angle = float(result["angle"])
    cols[0].metric(f"angle A–B ({math.degrees(angle):.1f}°)", f"{angle:.3g} rad",
                   help="arccos of the cosine between the two weight vectors (SI weights)")
    for col, key in zip(cols[1:], ("train_loss", "test_loss", "train_err", "test_err")):
        col.metric(f"{registry.label(key)} barrier", charts.barrier_text(key, float(result["barrier"][key])),
                   help="The most the path rises above the straight line between its ends' values.")
    fig = charts.geometry(result, *labels)
    ui.chart(fig, key=f"geometry-{job.id}")
    st.caption("Dashed: the straight line between the two ends' values. Where a curve rises above it the most, a "
               "bar and an arrow give the barrier. Barriers near 0 and a small angle: A and B lie in one basin; "
               "a large barrier: a ridge separates them. Every point of the path is projected to the sphere and "
               "has its BatchNorm statistics recomputed on the training set.")
    ui.downloads("Path as CSV", lambda: _path_csv(result), f"spherelab-geometry-{job.id}", fig)


def _solution_label(store: Store, end: dict) -> str:
    try:
        run = store.get_run(end["run"])
    except RunNotFound:
        return f"{solutions.solution_text(end)} (deleted)"
    return solutions.solution_text(end, data.run_label(run))


def _path_csv(result: dict) -> str:
    keys = ("train_loss", "test_loss", "train_err", "test_err")
    return pd.DataFrame({"alpha": result["alphas"], **{k: result[k] for k in keys}}).to_csv(index=False)


# ---- learning-rate studies ------------------------------------------------------------------------------
def study_result(store: Store, study_id: int, key: str = "study") -> None:
    """A study as the Study page and Teach show it: progress, the summary in words, test accuracy
    against the PLR, the geometry, the per-feature accuracies and the tables; `key` keeps chart ids
    apart when two pages' views could meet in one session."""
    from . import study, study_charts   # noqa: PLC0415  (kept out of the pages that never show a study)
    prog, rep = study.state(store, study_id)
    st.progress(prog.fraction, text=prog.text())
    st.markdown(md(study.summary(rep, prog)))
    gains = study_charts.gains(rep)
    left, right = st.columns([3, 2]) if gains is not None else (st.container(), None)
    with left:
        st.markdown("**Test accuracy against the PLR**")
        ui.chart(study_charts.accuracy(rep), key=f"{key}-accuracy")
    if right is not None:
        with right:
            st.markdown("**Paired gain: best 2A − best converged, per (data seed, seed)**")
            ui.chart(gains, key=f"{key}-gains")
    st.caption("Each point: the mean over runs (seeds × data seeds), bars ±1 std. Background: the regime most "
               "of a PLR's pre-training runs fell in (green convergence, orange chaotic equilibrium, red divergence; "
               "2A/2B written in chaotic bands when every pair's own geometry agrees). Dashed lines: the estimated "
               "boundaries (1 | 2 is the convergence threshold), dotted: 2A | 2B. The star: the best model, chosen "
               "on validation accuracy. Right: one point per pair, the test accuracy of its best 2A model minus "
               "that of its best model from a PLR where its own run converged (both chosen on validation), and "
               "their mean with a bootstrap 95% interval: a win only when the whole interval is above 0.")
    if study_charts.geometry_pairs(rep):
        st.markdown("**Angle and barriers between each PLR's solutions**")
        ui.chart(study_charts.geometry(rep), key=f"{key}-geometry")
        st.caption("A barrier near 0 (and a small angle): the two solutions lie in one basin. A chaotic run is 2A "
                   f"when each of its barriers is at most {BASIN_BARRIER:.0%} validation error and "
                   f"{BASIN_LOSS_BARRIER:g} train loss (limits measured on this toy, a rule of thumb); a PLR's "
                   "sub-regime is shown only when all its pairs agree.")
    else:
        st.caption("Angle and barriers appear when the first geometries are measured (after a PLR's fine-tuning "
                   "and average are done).")
    heat = study_charts.features(rep)
    if heat is not None:
        st.markdown(f"**Per-feature test accuracy** (ticks: each of the {study_charts.feature_count(rep)} features "
                    "alone informative)")
        ui.chart(heat, key=f"{key}-features")
        st.caption("Each cell: accuracy on a probe set where only that feature is informative (mean over runs). "
                   "Bright: the model relies on that feature; dark (50%) is chance; the scale tops out at the "
                   "largest accuracy seen. Compare a few bright cells with many dim ones, row by row.")
    elif rep["spec"].get("base", {}).get("dataset") == "ticks":
        st.caption("Per-feature accuracies appear when the first models finish.")
    st.markdown("**The report**: test accuracy of each model, mean ± std (runs); * a PLR added by refinement")
    st.dataframe(study.table(rep), hide_index=True, width="stretch")
    if rep.get("pairs"):
        with st.expander(f"Paired comparison: {len(rep['pairs'])} (data seed, seed) pair(s)"):
            st.dataframe(study.gains_table(rep), hide_index=True, width="stretch")
    if rep.get("failures"):
        st.warning(md("Failed pieces (`python -m engine study --resume ID` retries them): "
                      + "; ".join(rep["failures"])))
    geometry = study.geometry_table(rep)
    if not geometry.empty:
        with st.expander(f"Geometry: {len(geometry)} measurement(s), mean ± std over runs"):
            st.dataframe(geometry, hide_index=True, width="stretch")
