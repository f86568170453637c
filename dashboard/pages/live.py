"""Live: runs being trained, updated every second without reloading the page.

An overview table (status, regime, progress, time left; select rows to pause, resume or stop
them) and an overlay of every run per metric sit in fragments that rerun every REFRESH_S
seconds; the overlay reads only the steps logged since its last read (data.LiveTrace, kept in session
state). Per-run cards are collapsed expanders whose curves are only drawn while open.
"""
import time

import pandas as pd
import streamlit as st

from dashboard import charts, data, ui, views
from dashboard.plain import md
from engine import registry
from storage import RunInfo, Store

CHOICES = registry.keys_for()
ACTIONS = {"pause": ":material/pause:", "resume": ":material/play_arrow:", "stop": ":material/stop:"}
# The overview shows every row of a 16-run sweep (and a few more) without scrolling inside itself and
# fits one 1400x900 screen under the page's header; longer lists scroll inside the table.
ROW_PX, MAX_ROWS = 30, 20


def default_keys(runs: list[RunInfo]) -> list[str]:
    """The registry's panels for the modes on the page (sphere runs: norm-free quantities)."""
    modes = dict.fromkeys(r.config.get("mode", "sphere") for r in runs) or {"sphere": None}
    return list(dict.fromkeys(key for mode in modes for key in registry.default_panels(mode)))


def overview_table(runs: list[RunInfo], now: float, seen: dict | None = None) -> pd.DataFrame:
    rows = []
    for run in runs:
        left = data.remaining_s(run, now, seen)
        rows.append({"run": data.run_label(run), "status": run.status, "regime": ui.regime_label(run.regime),
                     "progress": run.progress, "step": f"{run.step:,} / {run.total_steps:,}" if run.total_steps else "",
                     "time left": _duration(left) if left is not None else "—"})
    return pd.DataFrame(rows, columns=["run", "status", "regime", "progress", "step", "time left"])


def overview_height(rows: int) -> int | str:
    """The table's height: all its rows up to MAX_ROWS (Streamlit's "auto" stops at ten), then scroll."""
    return "content" if rows <= MAX_ROWS else (MAX_ROWS + 1) * ROW_PX + 3


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def control(store: Store, runs: list[RunInfo], action: str) -> str:
    """Send pause / resume / stop to the runs it applies to (stop cancels a queued run); a summary."""
    done = []
    for run in runs:
        if run.status == "queued" and action == "stop":
            store.cancel(run.id)
        elif (action, run.status) in (("pause", "running"), ("resume", "paused"), ("stop", "running"),
                                      ("stop", "paused")):
            store.send_command(run.id, action)
        else:
            continue
        done.append(f"#{run.id}")
    return f"{action} sent to {', '.join(done)}" if done else f"none of the selected runs can {action}"


def overview(store: Store, run_ids: list[int]) -> None:
    runs = store.list_runs(ids=run_ids)
    runs.sort(key=lambda r: run_ids.index(r.id))
    # when this page first saw each run at a step: the pace since then leaves the start-up out
    table = overview_table(runs, time.time(), st.session_state.setdefault("pace_seen", {}))
    # the regime in its colour (the same as its badge and its curve labels)
    styled = table.style.map(lambda label: f"color: {charts.regime_color(label.replace(' ', '_'))}; font-weight: 600",
                             subset=["regime"])
    table = st.dataframe(styled, key="overview", on_select="rerun",
                         selection_mode="multi-row", hide_index=True, width="stretch",
                         height=overview_height(len(runs)), row_height=ROW_PX,
                         column_config={"progress": st.column_config.ProgressColumn("progress", format="percent"),
                                        # wide enough for "chaotic equilibrium", the longest label
                                        "regime": st.column_config.TextColumn("regime", width=150)})
    chosen = [runs[i] for i in table.selection.rows if i < len(runs)]
    buttons = st.columns([1, 1, 1, 4], vertical_alignment="center")
    for column, (action, icon) in zip(buttons, ACTIONS.items()):
        if column.button(action.capitalize(), key=f"all-{action}", icon=icon, disabled=not chosen):
            st.toast(md(control(store, chosen, action)), icon=":material/check:")
    buttons[3].caption("Select rows to pause, resume or stop them." if not chosen else f"{len(chosen)} selected.")


def overlay(store: Store, run_ids: list[int], keys: tuple[str, ...]) -> None:
    runs = store.list_runs(ids=run_ids)
    runs.sort(key=lambda r: run_ids.index(r.id))
    views.runs_overlay(store, runs, keys, key="live-overlay")


def live_curves(store: Store, run_id: int, keys: tuple[str, ...]) -> None:
    trace = views.traces(store, [store.get_run(run_id)], keys)[run_id]
    if trace.frame.empty:
        st.caption("Waiting for the first log point…")
        return
    fig = charts.run_curves(trace.frame, list(keys), run_id=run_id, spikes=trace.spikes,
                            rate_changes=trace.rate_changes)
    ui.chart(fig, key=f"live-{run_id}")
    if trace.spikes:
        st.caption(f"Loss spikes (red dashed) at steps {', '.join(map(str, trace.spikes))}")


def run_card(store: Store, run: RunInfo, keys: tuple[str, ...], expanded: bool) -> None:
    card = st.expander(f"{md(data.run_label(run))} · {run.status} · {ui.regime_label(run.regime)}",
                       expanded=expanded, key=f"card-{run.id}", on_change="rerun")
    with card:
        if not card.open:
            return
        st.page_link(ui.RUN_PAGE, label="Open run", icon=":material/open_in_new:", query_params={"run": str(run.id)})
        ui.run_controls(store, run)
        # only runs a worker may still train keep polling; an ended run's curves are final
        refresh = ui.REFRESH_S if not run.is_terminal else None
        st.fragment(ui.guarded(live_curves), run_every=refresh)(store, run.id, keys)


def watch_roster(store: Store, shown: list[tuple[int, str]]) -> None:
    """A whole-page rerun when a run starts, ends or pauses, so the list and its controls follow."""
    if [(r.id, r.status) for r in data.live_page_runs(store)] != shown:
        st.rerun(scope="app")


def main(store: Store) -> None:
    ui.worker_panel(store)
    runs = data.live_page_runs(store)
    st.fragment(ui.guarded(watch_roster), run_every=ui.REFRESH_S)(store, [(r.id, r.status) for r in runs])
    if not runs:
        if not store.list_runs():
            ui.no_runs()
        else:
            st.info("No run is training right now, and none ended in the last "
                    f"{data.ENDED_VISIBLE_S // 60} minutes. Queued runs start when a worker is free; "
                    "saved runs are on the Run and Compare pages.")
        return
    refresh = ui.REFRESH_S if any(not r.is_terminal for r in runs) else None
    ids = [r.id for r in runs]
    st.fragment(ui.guarded(overview), run_every=refresh)(store, ids)
    defaults = default_keys(runs)
    ui.seed("metric", defaults, ui.str_list, allowed=CHOICES)
    keys = tuple(st.multiselect("Metrics (one panel each, every run overlaid)", CHOICES, key="metric"))
    ui.publish("metric", list(keys), defaults)
    if keys:
        st.fragment(ui.guarded(overlay), run_every=refresh)(store, ids, keys)
    st.subheader("Runs one by one", anchor=False)
    for run in runs:
        run_card(store, run, keys or tuple(registry.default_panels(run.config.get("mode", "sphere"))),
                 expanded=len(runs) == 1)


ui.run_page("Live", main, f"Running runs refresh every {ui.REFRESH_S:g} s; runs that ended in the last "
            f"{data.ENDED_VISIBLE_S // 60} minutes stay with their final curves.")
