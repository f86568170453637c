"""Compare: overlay saved runs picked by name, tag, sweep or config; smoothing, log axes, exports."""
import streamlit as st

from dashboard import charts, data, series, solutions, ui
from dashboard.plain import md
from engine import registry
from storage import RunInfo, Store

MAX_POINTS = 2000   # per run and metric: thinned keeping extremes, so spikes survive
X_CHOICES = ["step", "epoch", "wall_time"]
SMOOTH_MAX = 0.99   # the EMA factor: 1 would never move


@st.cache_data(max_entries=16, show_spinner="Reading the runs…")
def read_frames(_store: Store, url: str, versions: tuple, keys: tuple, x: str, smoothing: float, groups: tuple,
                log_keys: tuple, lineage: tuple = ()):
    """Cached per database, run versions (id, status, step) and choices: a redraw that changes
    nothing here reads nothing again, while a run that moved on is read afresh. lineage: each fork's
    ancestors (an ancestor's trace is read only up to where its descendant branched: it cannot change)."""
    return data.compare_frames(_store, [run_id for run_id, _, _ in versions], list(keys), x=x, max_points=MAX_POINTS,
                               smoothing=smoothing, groups=dict(groups) or None, log_keys=log_keys,
                               lineage={run_id: list(chain) for run_id, chain in lineage} or None)


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
        st.error(md(exc))
        wanted = {}
    candidates = data.find_runs(store, name=name_part, tag=None if chosen_tag == "(any)" else chosen_tag,
                                sweep_id=chosen_sweep, config_filter=wanted)
    # runs already chosen stay choosable while the filters change
    chosen_ids = st.session_state.get("runs") or []
    by_id = {r.id: r for r in everything}
    options = list(dict.fromkeys([*[i for i in chosen_ids if i in by_id], *(r.id for r in candidates)]))
    ui.seed("runs", [r.id for r in candidates[:3]], ui.int_list, allowed=options, noun="run")
    if st.button(f"Select all {len(candidates)} matching", key="select_all", disabled=not candidates):
        st.session_state["runs"] = [r.id for r in candidates]
    run_ids = st.multiselect("Runs", options, format_func=lambda i: data.run_label(by_id[i]), key="runs")
    ui.publish("runs", run_ids)
    return [by_id[i] for i in run_ids]


PHASES = {"phase": ("Phase: train_loss vs eff_grad_norm", "train_loss", "eff_grad_norm"),
          "cycle": ("Cycle: elr vs eff_grad_norm", "elr", "eff_grad_norm")}


def show_phase(name: str) -> None:
    """One click to the papers' pictures: log-log, start point marked."""
    _, y, x = PHASES[name]
    st.session_state.update(metric=[y], x=x, log=log_defaults([y], x))


def log_defaults(keys: list[str], x: str) -> list[str]:
    """The registry's scale per panel (train_loss log, test_acc linear), and for a metric x axis."""
    return (["x"] if x not in X_CHOICES and registry.is_log(x) else []) + [k for k in keys if registry.is_log(k)]


def main(store: Store) -> None:
    if not store.list_runs():
        ui.no_runs()
        return
    runs = pick_runs(store)
    if not runs:
        st.info("Pick runs to compare: filter by name, tag, sweep or config (e.g. mode=lrwd), then choose.")
        return
    available = data.metric_keys(store, [r.id for r in runs])
    if not available:
        st.info("These runs have not logged anything yet. This page shows them once they log.")
        ui.follow(lambda s, ids: st.rerun(scope="app") if data.metric_keys(s, ids) else None, store,
                  [r.id for r in runs], [r.id for r in runs])
        return
    x_choices = X_CHOICES + available
    ui.seed("metric", ["train_loss"] if "train_loss" in available else available[:1], ui.str_list, allowed=available)
    ui.seed("x", "step", allowed=x_choices)
    ui.seed("smooth", 0.0, ui.finite, lo=0.0, hi=SMOOTH_MAX)
    ui.seed("seeds", False, ui.flag)
    keys_col, x_col, smooth_col, seeds_col = st.columns([3, 1.2, 1.6, 1.6], vertical_alignment="bottom")
    keys = keys_col.multiselect("Metrics (one panel each)", available, key="metric")
    x = x_col.selectbox("x axis", x_choices, key="x", help="step, epoch, wall time, or any metric: a phase "
                        "diagram (each panel's metric against it, start point marked)")
    smoothing = smooth_col.slider("Smoothing (debiased EMA)", 0.0, SMOOTH_MAX, step=0.01, key="smooth",
                                  help="EMA with Adam-style bias correction, on all points; the raw curve "
                                       "is drawn faintly behind.")
    group = seeds_col.toggle("Mean ± std over seeds", key="seeds",
                             help="Runs whose configs differ only in seed become one curve with a ±1 std band.")
    log_options = ["x", *keys]
    ui.seed("log", log_defaults(keys, x), ui.str_list, allowed=log_options)
    logs = st.pills("Log scale", log_options, selection_mode="multi", key="log",
                    format_func=lambda o: "x axis" if o == "x" else o)
    phase_cols = st.columns([2, 2, 3])
    for col, (name, (label, _, _)) in zip(phase_cols, PHASES.items()):
        col.button(label, key=f"show-{name}", on_click=show_phase, args=(name,), icon=":material/timeline:")
    ancestors = False
    if any(r.parent_id is not None for r in runs):
        ui.seed("ancestors", False, ui.flag)
        ancestors = phase_cols[2].toggle(
            "With ancestors", key="ancestors", disabled=group,
            help="Each branched run continues its parent's curve (dotted, in the branched run's colour) from the "
                 "start up to where it branched (a diamond): one curve per branch. Not with seed means.")
    for key, value, default in (("metric", keys, ["train_loss"]), ("x", x, "step"), ("smooth", smoothing, 0.0),
                                ("log", logs, log_defaults(keys, x)), ("seeds", "1" if group else None, None),
                                ("ancestors", "1" if ancestors else None, None)):
        ui.publish(key, value, default)
    if not keys:
        return
    groups = series.seed_groups(runs) if group else {}
    ui.follow(draw, store, [r.id for r in runs], [r.id for r in runs], keys, x, smoothing, groups, logs,
              ancestors and not group)

    if len(runs) > 1:
        st.markdown("**Config differences**")
        diff = data.config_diff(runs)
        if diff.empty:
            st.caption("The configs are identical: the runs differ only in when they ran.")
        else:
            st.dataframe(diff.reset_index(), hide_index=True, width="stretch")


def draw(store: Store, run_ids: list[int], keys: list[str], x: str, smoothing: float, groups: dict, logs: list[str],
         ancestors: bool = False):
    runs = store.list_runs(ids=run_ids)
    log_keys = tuple(k for k in keys if k in logs)
    lineage = tuple((r.id, tuple(solutions.lineage(store, r))) for r in runs if ancestors and r.parent_id)
    front, faint = read_frames(store, store.url, tuple((r.id, r.status, r.step) for r in runs), tuple(keys), x,
                               smoothing, tuple((head, tuple(m)) for head, m in groups.items()), log_keys,
                               tuple((run_id, chain) for run_id, chain in lineage if chain))
    by_id = {r.id: r for r in runs}
    if groups:
        names = {head: data.group_label([by_id[i] for i in m if i in by_id]) for head, m in groups.items() if head in by_id}
    else:
        names = {r.id: data.run_label(r) for r in sorted(runs, key=lambda r: r.id)}
    # a phase diagram reads better near square than as a 280 px strip
    forks = {r.id: f"{data.run_label(r)} branched from #{r.parent_id} at epoch {r.fork_epoch}"
             for r in runs if r.parent_id is not None}
    fig = charts.overlay(front, keys, names, x=x, log_x="x" in logs, log_keys=set(log_keys), faint=faint,
                         row_height=280 if x in X_CHOICES else 480, forks=forks)
    ui.chart(fig, key="compare")
    if lineage:
        st.caption("Dotted: each branched run's ancestors up to where it branched (a diamond), in its colour.")
    ui.downloads("Data as CSV (all points)", lambda: data.compare_csv(store, runs, keys), "spherelab-compare", fig)


ui.run_page("Compare", main)
