"""Run: one run in full — status, regime and why, controls, curves with spikes, config, events,
notes, and managing it (rename, tags, notes, bundle, delete). Follows the run while it trains."""
import pandas as pd
import streamlit as st

from dashboard import charts, data, manage, ui
from dashboard.plain import md
from engine import registry
from storage import RunInfo, Store

MAX_POINTS = 2000


def header(store: Store, run: RunInfo, analysis: dict) -> None:
    status, regime, progress, steps = st.columns(4)
    status.metric("status", run.status)
    with regime:
        st.caption("regime (from the logged trace)")
        ui.regime_badge(analysis["regime"])
    progress.metric("progress", f"{run.progress:.0%}")
    steps.metric("step", f"{run.step:,} / {run.total_steps:,}" if run.total_steps else f"{run.step:,}")
    st.caption(md(analysis["evidence"].get("reason", "")))
    if run.error:
        st.error(f"This run failed: {md(run.error.splitlines()[0])}")
        with st.expander("Full error"):
            st.code(run.error, language=None)


def live_part(store: Store, run_id: int, keys: list[str]) -> None:
    """What changes while the run trains: header, controls, curves."""
    run = store.get_run(run_id)
    analysis = data.run_analysis(store, run)
    header(store, run, analysis)
    ui.run_controls(store, run)
    if not keys:
        if store.metric_keys(run.id):
            st.rerun(scope="app")  # its first points arrived: the whole page draws them, with its pickers
        st.info("Nothing logged yet: the run is queued or has just started. This page follows it.")
        return
    frame = store.read_metrics(run.id, keys, max_points=MAX_POINTS)
    changes = [(e.step, e.payload.get("to")) for e in store.events(run.id, ["elr_change", "lr_change"])]
    fig = charts.run_curves(frame, keys, run_id=run.id, spikes=analysis["spikes"], rate_changes=changes)
    ui.chart(fig, key="run-curves")
    if analysis["spikes"]:
        period = f"; period ≈ {analysis['period']} steps" if analysis["period"] else ""
        st.caption(f"Loss spikes (red dashed) at steps {', '.join(map(str, analysis['spikes']))}{period}.")
    ui.downloads("Trace as CSV", lambda: store.read_metrics(run.id).to_csv(index=False, na_rep="nan"),
                 f"run-{run.id}", fig)


def details(store: Store, run: RunInfo) -> None:
    config, events = st.columns(2)
    with config:
        st.markdown("**Config**")
        st.dataframe(pd.DataFrame({"value": [data.as_text(v) for v in run.config.values()]},
                                  index=list(run.config)), width="stretch", height=420)
    with events:
        st.markdown("**Events**")
        rows = [{"step": e.step, "kind": e.kind, "details": data.as_text(e.payload)} for e in store.events(run.id)]
        st.dataframe(pd.DataFrame(rows, columns=["step", "kind", "details"]), hide_index=True, width="stretch",
                     height=420)


def main(store: Store) -> None:
    manage.flash()
    runs = store.list_runs()
    if not runs:
        ui.no_runs()
        return
    run_id = ui.pick("Run", {r.id: data.run_label(r) for r in runs}, "run", "run")
    run = store.get_run(run_id)
    notes = store.notes(run.id)
    if notes:
        st.text(notes)
    links = st.columns(3)
    links[0].page_link(ui.COMPARE_PAGE, label="Compare with others", icon=":material/stacked_line_chart:",
                       query_params={"runs": str(run.id)})
    links[1].page_link(ui.PERIODIC_PAGE, label="Periodic view", icon=":material/waves:",
                       query_params={"run": str(run.id)})
    if run.sweep_id:
        links[2].page_link(ui.REGIME_PAGE, label=f"Regime map of sweep #{run.sweep_id}",
                           icon=":material/scatter_plot:", query_params={"sweep": str(run.sweep_id)})
    available = data.metric_keys(store, [run.id])
    defaults = [k for k in registry.default_panels(run.config.get("mode", "sphere")) if k in available]
    defaults = defaults or available[:1]
    ui.seed("metric", defaults, ui.str_list, allowed=available)
    keys = st.multiselect("Metrics", available, key="metric") if available else []
    ui.publish("metric", keys, defaults)
    ui.follow(live_part, store, [run.id], run.id, keys)
    with st.expander("Manage this run: rename, tags, notes, bundle, delete", icon=":material/edit:"):
        manage.run_section(store, run)
    details(store, run)


ui.run_page("Run", main)
