"""Regime map: a sweep's runs against their ELR (or LR), coloured by regime, with the boundaries.
Selecting a point opens that run."""
import streamlit as st

from dashboard import charts, data, series, ui
from storage import TERMINAL_STATUSES, Store


def open_run(run_id: int) -> None:
    st.switch_page(ui.RUN_PAGE, query_params={"run": str(run_id)})


def main(store: Store) -> None:
    sweeps = store.list_sweeps()
    if not sweeps:
        ui.no_runs("sweeps")
        st.caption("A sweep is a grid of runs, e.g. the preset “ELR sweep on digits” or a custom run with the "
                   "sweep builder on.")
        return
    labels = {s.id: f"#{s.id} {s.name} ({len(s.run_ids)} runs)" for s in sweeps}
    ui.seed("sweep", sweeps[0].id, int, allowed=list(labels))
    sweep_id = st.selectbox("Sweep", list(labels), format_func=labels.get, key="sweep")
    ui.publish("sweep", sweep_id)
    summary = data.sweep_summary(store, sweep_id)
    if summary.empty:
        st.info("This sweep has no runs left (they were deleted).")
        return
    rate_key = summary["rate_key"].iloc[0]
    boundaries = series.regime_boundaries(summary["rate"], summary["regime"])
    counts = summary["regime"].value_counts()
    cols = st.columns(5)
    for col, regime in zip(cols, series.REGIMES):
        col.metric(regime.replace("_", " "), int(counts.get(regime, 0)))
    cols[4].metric("boundaries", ", ".join(f"{b:.2g}" for b in boundaries) or "none yet")
    unfinished = (~summary["status"].isin(TERMINAL_STATUSES)).sum()
    if unfinished:
        st.caption(f"{unfinished} run(s) still queued or training: their points move as they learn.")

    fig = charts.regime_map(summary, boundaries, rate_key)
    event = st.plotly_chart(fig, key="regime_map", on_select="rerun", selection_mode="points",
                            config={"displaylogo": False})
    chosen = ui.selected_run(event)
    if chosen is not None:
        open_run(chosen)
    st.caption(f"Points: tail means (last quarter of each run's log points). Dashed lines: estimated boundaries, "
               f"the geometric mean of adjacent {rate_key} values whose regimes differ. Click a point to open its run.")

    pick, open_col = st.columns([4, 1], vertical_alignment="bottom")
    names = dict(zip(summary["run_id"], summary["name"]))
    run_id = pick.selectbox("Open a run of this sweep", list(names), format_func=lambda i: f"#{i} {names[i]}",
                            key="open_run")
    if open_col.button("Open", key="open_button", icon=":material/open_in_new:"):
        open_run(int(run_id))
    st.dataframe(summary.drop(columns=["rate_key"]).rename(columns={"rate": rate_key}), hide_index=True,
                 width="stretch")


ui.run_page("Regime map", main, "Which regime each run of a sweep landed in, judged from its logged trace alone.")
