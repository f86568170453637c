"""Managing saved runs and sweeps from the dashboard: rename, tags, notes, downloads, delete.

Deleting asks twice (a second button confirms) and is offered only for runs no worker holds; the
store refuses the rest with a one-line reason, shown as it is.
"""
from __future__ import annotations

import streamlit as st

from storage import LIVE_STATUSES, RunInfo, Store, StoreError, SweepInfo

from . import data
from .plain import md

FLASH = "_flash"   # a message shown once on the next run of the page (after a deletion)


def flash() -> None:
    message = st.session_state.pop(FLASH, None)
    if message:
        st.success(md(message), icon=":material/check:")


def _save(action, done: str) -> None:
    try:
        action()
    except StoreError as exc:
        st.error(md(exc))
        return
    st.toast(md(done), icon=":material/check:")


def run_section(store: Store, run: RunInfo) -> None:
    """Rename, tags, notes, bundle and delete one run."""
    name_col, tags_col = st.columns(2, vertical_alignment="bottom")
    name = name_col.text_input("Name", value=run.name, key=f"m-name-{run.id}", max_chars=200)
    if name_col.button("Rename", key=f"m-rename-{run.id}", disabled=name.strip() == run.name):
        _save(lambda: store.rename_run(run.id, name), f"renamed to {name.strip()}")
    known = data.all_tags(store.list_runs())
    tags = tags_col.multiselect("Tags", sorted(set(known) | set(run.tags)), default=run.tags,
                                key=f"m-tags-{run.id}", accept_new_options=True, placeholder="type to add a tag")
    if tags_col.button("Save tags", key=f"m-save-tags-{run.id}", disabled=tags == run.tags):
        _save(lambda: store.set_tags(run.id, tags), "tags saved")
    notes = st.text_area("Notes", value=store.notes(run.id), key=f"m-notes-{run.id}", height=100,
                         placeholder="What this run was for, what you saw in it…")
    if st.button("Save notes", key=f"m-save-notes-{run.id}"):
        _save(lambda: store.set_notes(run.id, notes), "notes saved")
    bundle, delete = st.columns(2, vertical_alignment="bottom")
    bundle.download_button("Bundle (.zip, for `python -m engine import`)",
                           lambda: data.bundle_bytes(store, [run.id]), file_name=f"spherelab-run-{run.id}.zip",
                           mime="application/zip", icon=":material/archive:", on_click="ignore", key=f"m-bundle-{run.id}")
    with delete:
        children = store.unfinished_children(run.id)
        with_children = bool(children) and st.checkbox(
            "and cancel its branches", key=f"m-delete-children-{run.id}",
            help=f"Branches that have not ended ({', '.join(f'#{c.id} {c.status}' for c in children)}) start from "
                 "this run's kept checkpoints: deleting it cancels them, or it is refused.")
        _delete(f"run #{run.id}", run.status in LIVE_STATUSES, f"m-delete-{run.id}",
                lambda: store.delete(run.id, with_children=with_children), "run")


def sweep_section(store: Store, sweep: SweepInfo) -> None:
    """Rename, CSV, bundle and delete a whole sweep."""
    name_col, csv_col, bundle_col = st.columns([2, 1, 1], vertical_alignment="bottom")
    name = name_col.text_input("Sweep name", value=sweep.name, key=f"m-sweep-name-{sweep.id}", max_chars=200)
    if name_col.button("Rename sweep", key=f"m-sweep-rename-{sweep.id}", disabled=name.strip() == sweep.name):
        _save(lambda: store.rename_sweep(sweep.id, name), f"sweep renamed to {name.strip()}")
    runs = store.list_runs(sweep_id=sweep.id)
    csv_col.download_button("All its metrics as CSV", lambda: data.compare_csv(store, runs),
                            file_name=f"spherelab-sweep-{sweep.id}.csv", mime="text/csv",
                            icon=":material/download:", on_click="ignore", key=f"m-sweep-csv-{sweep.id}")
    bundle_col.download_button("Bundle (.zip)", lambda: data.bundle_bytes(store, [], sweep_id=sweep.id),
                               file_name=f"spherelab-sweep-{sweep.id}.zip", mime="application/zip",
                               icon=":material/archive:", on_click="ignore", key=f"m-sweep-bundle-{sweep.id}")
    _delete(f"sweep #{sweep.id} and its {len(runs)} run(s)", any(r.status in LIVE_STATUSES for r in runs),
            f"m-sweep-delete-{sweep.id}", lambda: data.delete_sweep(store, sweep.id), "sweep")


def _delete(what: str, live: bool, key: str, action, param: str) -> None:
    """A Delete button, then a confirmation; refused while a worker trains it."""
    if live:
        st.caption(f"Delete: {what} is being trained. Stop it first (Live page), then delete it.")
        return
    if not st.session_state.get(key):
        if st.button(f"Delete {what}…", key=key + "-ask", icon=":material/delete:"):
            st.session_state[key] = True
            st.rerun()
        return
    st.warning(f"Delete {what} for good? Its metrics, events and checkpoint go too.", icon=":material/warning:")
    yes, no = st.columns(2)
    if no.button("Keep it", key=key + "-no"):
        st.session_state[key] = False
        st.rerun()
    if yes.button("Delete", key=key + "-yes", type="primary", icon=":material/delete_forever:"):
        st.session_state[key] = False
        try:
            action()
        except StoreError as exc:
            st.error(md(exc))
            return
        st.session_state[FLASH] = f"Deleted {what}."
        st.query_params.pop(param, None)
        st.rerun()
