"""Periodic behaviour: loss spikes, norm jumps and ELR drops of one run on aligned axes, the period,
the cycle picture (elr against eff_grad_norm), and the sharpness of several runs against each one's
2/ELR stability line. Follows its runs while they train."""
import streamlit as st

from dashboard import data, ui, views
from storage import RunInfo, Store


def default_sharpness(runs: list[RunInfo]) -> list[int]:
    """The newest run that measured sharpness, with the others of its sweep."""
    newest = runs[0]
    if newest.sweep_id is None:
        return [newest.id]
    return sorted(r.id for r in runs if r.sweep_id == newest.sweep_id)


def main(store: Store) -> None:
    runs = store.list_runs()
    if not runs:
        ui.no_runs()
        return
    # lrwd runs first: periodic behaviour needs weight decay
    ordered = sorted(runs, key=lambda r: r.config.get("mode") != "lrwd")
    run_id = ui.pick("Run", {r.id: data.run_label(r) for r in ordered}, "run", "run")
    run = store.get_run(run_id)
    if run.config.get("mode") != "lrwd":
        st.caption("This run is on the sphere (fixed ELR): periodic behaviour comes from weight decay, "
                   "so look at an lrwd run — the preset “Periodic behaviour” makes one.")
    ui.follow(views.periodic_part, store, [run.id], run.id)

    st.subheader("Sharpness against 2/ELR", anchor=False)
    measured = data.sharpness_runs(runs)
    if not measured:
        st.info("No run measures sharpness. Launch with “Sharpness every” above 0, "
                "or queue the preset “Sharpness vs 2/ELR”.")
        return
    labels = {r.id: data.run_label(r) for r in measured}
    default = default_sharpness(measured)
    ui.seed("sharp", default, ui.int_list, allowed=list(labels))
    chosen = st.multiselect("Runs measuring sharpness", list(labels), format_func=labels.get, key="sharp")
    ui.publish("sharp", chosen, default)
    if chosen:
        ui.follow(views.sharpness_part, store, chosen, chosen)


ui.run_page("Periodic behaviour", main)
