"""Live: runs being trained, updated every second without reloading the page.

Each run's curves sit in a fragment that reruns on its own every REFRESH_S seconds and reads only
the steps logged since its last read (data.LiveTrace, kept in session state). The controls sit
outside the fragments so a refresh never disturbs a value being typed.
"""
import streamlit as st

from dashboard import charts, data, ui
from engine import registry
from storage import RunInfo, Store

REFRESH_S = 1.0
DEFAULT_KEYS = registry.default_panels("lrwd")
CHOICES = registry.keys_for()


def roster(store: Store) -> list[tuple[int, str]]:
    return [(r.id, r.status) for r in data.live_page_runs(store)]


def watch_roster(store: Store, shown: list[tuple[int, str]]) -> None:
    """A whole-page rerun when a run starts, ends or pauses, so the list and its controls follow."""
    if roster(store) != shown:
        st.rerun(scope="app")


def live_curves(store: Store, run_id: int, keys: tuple[str, ...]) -> None:
    traces = st.session_state.setdefault("live_traces", {})
    trace = traces.get(run_id)
    if trace is None or trace.keys != keys:
        trace = traces[run_id] = data.LiveTrace(run_id, keys)
    trace.refresh(store)
    run = store.get_run(run_id)
    status, regime, progress = st.columns([1, 1, 3], vertical_alignment="center")
    status.markdown(f"**{run.status}**")
    with regime:
        ui.regime_badge(run.regime)
    step = max(run.step, trace.last_step)
    total = run.total_steps
    progress.progress(min(1.0, step / total) if total else 0.0,
                      text=f"step {step:,} / {total:,}" if total else f"step {step:,}")
    if trace.frame.empty:
        st.caption("Waiting for the first log point…")
        return
    fig = charts.run_curves(trace.frame, list(keys), run_id=run_id, spikes=trace.spikes,
                            rate_changes=trace.rate_changes)
    st.plotly_chart(fig, key=f"live-{run_id}", config={"displaylogo": False})
    if trace.spikes:
        st.caption(f"Loss spikes (red dashed) at steps {', '.join(map(str, trace.spikes))}")


def run_card(store: Store, run: RunInfo, keys: tuple[str, ...]) -> None:
    with st.container(border=True):
        title, link = st.columns([4, 1], vertical_alignment="center")
        title.subheader(data.run_label(run), anchor=False)
        link.page_link(ui.RUN_PAGE, label="Open run", icon=":material/open_in_new:",
                       query_params={"run": str(run.id)})
        ui.run_controls(store, run)
        # only runs a worker holds keep polling; an ended run's curves are final
        refresh = REFRESH_S if not run.is_terminal else None
        st.fragment(ui.guarded(live_curves), run_every=refresh)(store, run.id, keys)


def main(store: Store) -> None:
    ui.worker_panel(store)
    ui.seed("metric", DEFAULT_KEYS, ui.str_list, allowed=CHOICES)
    keys = tuple(st.multiselect("Metrics", CHOICES, key="metric"))
    ui.publish("metric", list(keys), DEFAULT_KEYS)
    runs = data.live_page_runs(store)
    st.fragment(ui.guarded(watch_roster), run_every=REFRESH_S)(store, [(r.id, r.status) for r in runs])
    if not runs:
        if not store.list_runs():
            ui.no_runs()
        else:
            st.info("No run is training right now, and none ended in the last "
                    f"{data.ENDED_VISIBLE_S // 60} minutes. Queued runs start when a worker is free; "
                    "saved runs are on the Run and Compare pages.")
        return
    if not keys:
        st.info("Pick at least one metric to draw.")
        return
    for run in runs:
        run_card(store, run, keys)


ui.run_page("Live", main, f"Running runs refresh every {REFRESH_S:g} s; runs that ended in the last "
            f"{data.ENDED_VISIBLE_S // 60} minutes stay with their final curves.")
