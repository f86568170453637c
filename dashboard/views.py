"""Page pieces more than one page draws (Teach shows the demos' runs with the same views the
Live, Regime map and Periodic pages use): each takes the store and ids and draws with Streamlit."""
import streamlit as st

from engine import registry
from engine.analysis import analyze_stored
from storage import RunInfo, Store, TERMINAL_STATUSES

from . import charts, data, series, ui

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
                         log_keys={k for k in keys if registry.is_log(k)},
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
    fig = charts.overlay(front, ["elr"], {run.id: data.run_label(run)}, x="eff_grad_norm", log_x=True,
                         log_keys={"elr"}, row_height=560)
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
    cols[2].metric("period", f"{period} steps" if period else "—", help="Median spacing of the spikes; needs two or more.")
    steps_per_epoch = _steps_per_epoch(frame)
    cols[3].metric("period in epochs", f"{period / steps_per_epoch:.1f}" if period and steps_per_epoch else "—")
    left, right = st.columns([3, 2])
    with left:
        ui.chart(charts.periodic(frame, spikes, period), key="periodic")
        st.caption("Weight decay shrinks si_norm, so elr = lr / si_norm² grows until a step is too large: the loss "
                   "spikes, the gradients blow the norm up, the elr drops, and a new period starts.")
    with right:
        cycle(store, run)


def sharpness_part(store: Store, run_ids: list[int]) -> None:
    runs = store.list_runs(ids=run_ids)
    long = store.read_metrics_many(run_ids, ["sharpness", "sharpness_threshold"])
    if long.empty:
        st.info("No sharpness measured yet: the runs are queued or have just started. This page follows them.")
        return
    ui.chart(charts.sharpness(long, {r.id: data.run_label(r) for r in sorted(runs, key=lambda r: r.id)}),
             key="sharpness")
    st.caption("sharpness is λmax·ρ² (top Hessian eigenvalue at unit norm); each dashed line, in its run's colour, "
               "is that run's 2(1+μ)/elr, the largest curvature a gradient step of that size is stable on.")


def _steps_per_epoch(frame) -> float | None:
    last = frame.iloc[-1]
    return float(last["step"] / last["epoch"]) if last["epoch"] > 0 else None


