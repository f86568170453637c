"""Regime map: a sweep's runs against their ELR (or LR), coloured by regime, with the boundaries as
intervals. With several seeds per rate: mean ± std over seeds and how many seeds agree on the label.
Follows the sweep while its runs train; selecting a point opens that run."""
import streamlit as st

from dashboard import data, manage, ui, views
from dashboard.plain import md
from storage import Store


def main(store: Store) -> None:
    manage.flash()
    sweeps = store.list_sweeps()
    if not sweeps:
        ui.no_runs("sweeps")
        st.caption("A sweep is a grid of runs, e.g. the preset “ELR sweep on digits” or a custom run with the "
                   "sweep builder on.")
        return
    sweep_id = ui.pick("Sweep", {s.id: f"#{s.id} {s.name} ({len(s.run_ids)} runs)" for s in sweeps}, "sweep", "sweep")
    sweep = store.get_sweep(sweep_id)
    ui.follow(views.sweep_map, store, sweep.run_ids, sweep_id)
    names = {r.id: data.run_label(r) for r in store.list_runs(sweep_id=sweep_id)}
    if names:
        pick, open_col = st.columns([4, 1], vertical_alignment="bottom")
        run_id = pick.selectbox("Open a run of this sweep", list(names), format_func=names.get, key="open_run")
        if open_col.button("Open", key="open_button", icon=":material/open_in_new:"):
            views.open_run(int(run_id))
    with st.expander(f"Manage sweep {md(sweep.name)}: rename, CSV, bundle, delete", icon=":material/edit:"):
        manage.sweep_section(store, sweep)


ui.run_page("Regime map", main, "Which regime each run of a sweep landed in, judged from its logged trace alone.")
