"""Run: one run in full — status, regime and why, controls, curves with spikes and kept checkpoints,
branching and averaging, its branches and jobs, config, events, notes, and managing it (rename, tags,
notes, bundle, delete). Follows the run, its branches and its jobs while they move."""
import pandas as pd
import streamlit as st

from dashboard import charts, data, manage, solutions, ui, views
from dashboard.plain import md
from engine import registry
from engine.config import ConfigError
from storage import RunInfo, RunNotFound, Store

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
    kept = [(c.step, c.epoch) for c in store.checkpoints(run.id)]
    fig = charts.run_curves(frame, keys, run_id=run.id, spikes=analysis["spikes"], rate_changes=changes, kept=kept)
    ui.chart(fig, key="run-curves")
    if analysis["spikes"]:
        period = f"; period ≈ {analysis['period']} steps" if analysis["period"] else ""
        st.caption(f"Loss spikes (red dashed) at steps {', '.join(map(str, analysis['spikes']))}{period}.")
    if kept:
        st.caption(f"Diamonds: the {len(kept)} kept checkpoint(s), epochs {', '.join(str(e) for _, e in kept)}: "
                   "branch or average from them below.")
    ui.downloads("Trace as CSV", lambda: store.read_metrics(run.id).to_csv(index=False, na_rep="nan"),
                 f"run-{run.id}", fig)
    layers = registry.members(store.metric_keys(run.id), "layer_elr/<layer>")
    if layers:
        heat = charts.layer_heatmap(store.read_metrics(run.id, layers, max_points=MAX_POINTS), run_id=run.id)
        ui.chart(heat, key="run-layer-heatmap")
        st.caption("Each layer's effective learning rate lr / ‖w_l‖² against step: a row per SI layer, "
                   "the colour on a log scale.")


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


# ---- branches, averages, geometries ----------------------------------------------------------------
def family(store: Store, run: RunInfo) -> None:
    """Where a fork comes from, with links to its parent and to Compare drawing it as one curve."""
    if run.parent_id is None:
        return
    try:
        parent = store.get_run(run.parent_id)
    except RunNotFound:
        st.caption(f"Branched from run #{run.parent_id} at epoch {run.fork_epoch}; that run was deleted.")
        return
    left, right = st.columns(2)
    left.page_link(ui.RUN_PAGE, label=md(f"Branched from {data.run_label(parent)} at epoch {run.fork_epoch}"),
                   icon=":material/call_split:", query_params={"run": str(parent.id)})
    right.page_link(ui.COMPARE_PAGE, label="Compare: this run continuing its parent", icon=":material/timeline:",
                    query_params={"runs": str(run.id), "ancestors": "1"})


def branch_form(store: Store, run: RunInfo, kept: list[int]) -> None:
    """Branch from here: a kept epoch, a new ELR (sphere) or LR (lrwd), the child's own epochs."""
    rate_key, rate = data.rate_of(run.config)
    label = "New ELR" if rate_key == "elr" else "New LR"
    st.markdown("**Branch from here**")
    st.caption(f"A child run starts from a kept checkpoint with another {rate_key.upper()} (the rest of the "
               "config, the batch order and the sphere stay the parent's); its steps go on from the parent's.")
    at_col, rate_col, epochs_col = st.columns(3)
    at = at_col.selectbox("Branch at epoch", kept, index=len(kept) - 1, key=f"b-at-{run.id}")
    new_rate = rate_col.number_input(label, min_value=0.0, value=float(f"{rate / 10:.3g}"), format="%.3g",
                                     key=f"b-rate-{run.id}", help=f"this run's {rate_key}: {rate:.3g}")
    # default: the parent's remaining epochs after its last kept one, else as many as it trained itself
    total = int(run.config.get("epochs", 10))
    remaining = total - kept[-1]
    epochs = epochs_col.number_input("Epochs after the branch", min_value=0, max_value=100_000,
                                     value=remaining if remaining > 0 else max(1, total - (run.fork_epoch or 0)),
                                     key=f"b-epochs-{run.id}")
    if st.button("Branch: queue the child run", key=f"b-go-{run.id}", icon=":material/call_split:", type="primary"):
        try:
            child = solutions.branch(store, run, at=int(at), rate=new_rate, epochs=int(epochs))
        except ConfigError as exc:
            st.error(f"Not queued: {md(exc)}")
            return
        st.success(f"Queued run #{child}: branched at epoch {at} with {rate_key} {new_rate:.3g} for {epochs} epoch(s).")
        st.page_link(ui.RUN_PAGE, label=f"Open run #{child}", icon=":material/insights:",
                     query_params={"run": str(child)})


def average_form(store: Store, run: RunInfo, kept: list[int]) -> None:
    """Average the last K kept checkpoints (SWA), computed by a worker."""
    st.markdown("**Average the last K checkpoints (SWA)**")
    st.caption("The mean of their weights, BatchNorm statistics recomputed on the training set, then evaluated; "
               "a worker computes it.")
    k_col, go_col = st.columns([2, 3], vertical_alignment="bottom")
    k = k_col.number_input("Average the last", min_value=1, max_value=len(kept), value=min(5, len(kept)),
                           key=f"a-k-{run.id}", help=f"kept epochs: {', '.join(map(str, kept))}")
    chosen = kept[-int(k):]
    if go_col.button(f"Average epochs {chosen[0]}–{chosen[-1]}" if len(chosen) > 1 else f"Average epoch {chosen[0]}",
                     key=f"a-go-{run.id}", icon=":material/functions:"):
        try:
            job = solutions.average(store, run.id, int(k))
        except ConfigError as exc:
            st.error(f"Not queued: {md(exc)}")
            return
        st.success(f"Queued average #{job} of epochs {', '.join(map(str, chosen))}; its result appears below.")


def branch_and_average(store: Store, run: RunInfo) -> None:
    kept = [c.epoch for c in store.checkpoints(run.id)]
    if not kept:
        keep_every = int(run.config.get("keep_every") or 0)
        if keep_every and not run.is_terminal:
            st.caption(f"Branch and average: this run keeps a checkpoint every {keep_every} epoch(s); the forms "
                       "appear here once it has kept its first.")
        else:
            st.caption("Branch and average: this run kept no checkpoints. Train with “Keep checkpoints every” "
                       "(Launch page) to branch a run from an epoch, average its checkpoints and compare solutions.")
        return
    left, right = st.columns([3, 2], gap="large")
    with left:
        branch_form(store, run, kept)
    with right:
        average_form(store, run, kept)


def family_and_jobs(store: Store, run_id: int) -> None:
    """The run's branches and its averages and geometries, with their status (followed while they move)."""
    run = store.get_run(run_id)
    branches = solutions.children(store, run.id)
    jobs = solutions.family_jobs(store, run, branches)
    averages = [j for j in jobs if j.kind == "average" and j.run_id == run.id]
    geometries = [j for j in jobs if j.kind == "geometry"]
    if branches:
        st.markdown(f"**Branches of this run** ({len(branches)})")
        for child in branches:
            rate_key, rate = data.rate_of(child.config)
            state = child.status if child.is_terminal else f"{child.status} ({child.progress:.0%})"
            accuracy = views.last_value(store, child.id, "test_acc")
            reached = f", last test_acc {data.acc_text(accuracy)}" if accuracy is not None else ""
            st.page_link(ui.RUN_PAGE, label=md(f"{data.run_label(child)}: from epoch {child.fork_epoch}, "
                                               f"{rate_key} {rate:.3g}, {state}{reached}"),
                         icon=":material/call_split:", query_params={"run": str(child.id)})
        links = st.columns(2)
        links[0].page_link(ui.COMPARE_PAGE, label="Compare the branches, each continuing this run",
                           icon=":material/stacked_line_chart:",
                           query_params={"runs": ",".join(str(c.id) for c in branches), "ancestors": "1"})
        if len(branches) >= 2:
            links[1].page_link(ui.SOLUTIONS_PAGE, label="Geometry between the last two branches",
                               icon=":material/straighten:",
                               query_params={"a": str(branches[-2].id), "b": str(branches[-1].id)})
    if averages:
        st.markdown("**Averages (SWA)**")
        views.averages_table(store, run, averages)
    if geometries:
        st.markdown("**Geometries with this run or its branches**")
        for job in geometries:
            st.page_link(ui.SOLUTIONS_PAGE, label=md(views.geometry_line(job)), icon=":material/straighten:",
                         query_params={"job": str(job.id)})


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
    family(store, run)
    available = data.metric_keys(store, [run.id])
    defaults = [k for k in registry.default_panels(run.config.get("mode", "sphere")) if k in available]
    defaults = defaults or available[:1]
    ui.seed("metric", defaults, ui.str_list, allowed=available)
    keys = st.multiselect("Metrics", available, key="metric") if available else []
    ui.publish("metric", keys, defaults)
    ui.follow(live_part, store, [run.id], run.id, keys)
    branch_and_average(store, run)
    branches = solutions.children(store, run.id)
    pending = [j.id for j in solutions.family_jobs(store, run, branches) if j.status in ui.JOB_PENDING]
    ui.follow(family_and_jobs, store, [c.id for c in branches], run.id, job_ids=pending)
    with st.expander("Manage this run: rename, tags, notes, bundle, delete", icon=":material/edit:"):
        manage.run_section(store, run)
    details(store, run)


ui.run_page("Run", main)
