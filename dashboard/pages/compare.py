"""Compare: overlay saved runs picked by name, tag, sweep or config; smoothing, log axes, exports."""
import streamlit as st

from dashboard import charts, data, ui
from storage import RunInfo, Store

MAX_POINTS = 2000   # per run and metric: thinned keeping extremes, so spikes survive
X_CHOICES = ["step", "epoch", "wall_time"]


@st.cache_data(max_entries=16, show_spinner="Reading the runs…")
def read_frames(_store: Store, url: str, versions: tuple, keys: tuple, smoothing: float):
    """Cached per database, run versions (id, status, step) and choices: switching the x axis or a log
    scale redraws without reading again, while a run that moved on is read afresh."""
    return data.compare_frames(_store, [run_id for run_id, _, _ in versions], list(keys), max_points=MAX_POINTS,
                               smoothing=smoothing)


def pick_runs(store: Store) -> list[RunInfo]:
    everything = store.list_runs()
    name, tag, sweep, config = st.columns(4)
    name_part = name.text_input("Name contains", key="name")
    tags = data.all_tags(everything)
    chosen_tag = tag.selectbox("Tag", ["(any)", *tags], key="tag")
    sweeps = {s.id: f"#{s.id} {s.name}" for s in store.list_sweeps()}
    chosen_sweep = sweep.selectbox("Sweep", [None, *sweeps], format_func=lambda s: "(any)" if s is None else sweeps[s],
                                   key="sweep")
    config_text = config.text_input("Config filter", key="config", placeholder="mode=lrwd, wd=0.001")
    try:
        wanted = data.parse_config_filter(config_text)
    except ValueError as exc:
        st.error(str(exc))
        wanted = {}
    candidates = data.find_runs(store, name=name_part, tag=None if chosen_tag == "(any)" else chosen_tag,
                                sweep_id=chosen_sweep, config_filter=wanted)
    # runs already chosen stay choosable while the filters change
    chosen_ids = st.session_state.get("runs") or []
    by_id = {r.id: r for r in everything}
    options = list(dict.fromkeys([*[i for i in chosen_ids if i in by_id], *(r.id for r in candidates)]))
    ui.seed("runs", [r.id for r in candidates[:3]], ui.int_list, allowed=options)
    if st.button(f"Select all {len(candidates)} matching", key="select_all", disabled=not candidates):
        st.session_state["runs"] = [r.id for r in candidates]
    run_ids = st.multiselect("Runs", options, format_func=lambda i: data.run_label(by_id[i]), key="runs")
    ui.publish("runs", run_ids)
    return [by_id[i] for i in run_ids]


def main(store: Store) -> None:
    if not store.list_runs():
        ui.no_runs()
        return
    runs = pick_runs(store)
    if not runs:
        st.info("Pick runs to compare: filter by name, tag, sweep or config (e.g. `mode=lrwd`), then choose.")
        return
    available = data.metric_keys(store, [r.id for r in runs])
    if not available:
        st.info("These runs have not logged anything yet.")
        return
    ui.seed("metric", ["train_loss"] if "train_loss" in available else available[:1], ui.str_list, allowed=available)
    ui.seed("x", "step", allowed=X_CHOICES)
    ui.seed("smooth", 0.0, float)
    ui.seed("log", [], ui.str_list, allowed=["x", "y"])
    keys_col, x_col, log_col, smooth_col = st.columns([3, 1, 1, 2])
    keys = keys_col.multiselect("Metrics", available, key="metric")
    x = x_col.radio("x axis", X_CHOICES, key="x", horizontal=False)
    logs = log_col.pills("Log axes", ["x", "y"], selection_mode="multi", key="log")
    smoothing = smooth_col.slider("Smoothing (debiased EMA)", 0.0, 0.99, step=0.01, key="smooth",
                                  help="EMA with Adam-style bias correction, on all points; the raw curve "
                                       "is drawn faintly behind.")
    for key, value, default in (("metric", keys, ["train_loss"]), ("x", x, "step"), ("log", logs, []),
                                ("smooth", smoothing, 0.0)):
        ui.publish(key, value, default)
    if not keys:
        return
    raw, smoothed = read_frames(store, store.url, tuple((r.id, r.status, r.step) for r in runs), tuple(keys),
                                smoothing)
    fig = charts.overlay(raw, smoothed, keys, {r.id: data.run_label(r) for r in runs}, x=x,
                         log_x="x" in logs, log_y="y" in logs)
    st.plotly_chart(fig, key="compare", config={"displaylogo": False})

    ui.downloads("Data as CSV (all points)", lambda: data.compare_csv(store, runs, keys), "spherelab-compare", fig)
    if len(runs) > 1:
        st.markdown("**Config differences**")
        diff = data.config_diff(runs)
        if diff.empty:
            st.caption("The configs are identical: the runs differ only in when they ran.")
        else:
            st.dataframe(diff.reset_index(), hide_index=True, width="stretch")


ui.run_page("Compare", main)
