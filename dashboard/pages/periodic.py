"""Periodic behaviour: loss spikes, norm jumps and ELR drops of one run on aligned axes, the period,
and the sharpness against its 2/ELR stability line."""
import streamlit as st

from dashboard import charts, data, ui
from engine.analysis import analyze_stored
from storage import Store

KEYS = ["train_loss", "train_acc", "si_norm", "elr", "sharpness", "sharpness_threshold"]
MAX_POINTS = 3000


def main(store: Store) -> None:
    runs = store.list_runs()
    if not runs:
        ui.no_runs()
        return
    # lrwd runs first: periodic behaviour needs weight decay
    runs.sort(key=lambda r: r.config.get("mode") != "lrwd")
    labels = {r.id: data.run_label(r) for r in runs}
    ui.seed("run", runs[0].id, int, allowed=list(labels))
    run_id = st.selectbox("Run", list(labels), format_func=labels.get, key="run")
    ui.publish("run", run_id)
    run = store.get_run(run_id)
    if run.config.get("mode") != "lrwd":
        st.caption("This run is on the sphere (fixed ELR): periodic behaviour comes from weight decay, "
                   "so look at an lrwd run — the preset “Periodic behaviour” makes one.")
    # spikes and period from the full trace; the chart gets a thinned copy that keeps the extremes
    result = analyze_stored(store, run.id)
    frame = store.read_metrics(run.id, KEYS, max_points=MAX_POINTS)
    if frame.empty:
        st.info("Nothing logged yet for this run.")
        return
    spikes, period = result["spikes"], result["period"]
    cols = st.columns(3)
    cols[0].metric("loss spikes", len(spikes))
    cols[1].metric("period", f"{period} steps" if period else "—",
                   help="Median spacing of the spikes; needs two or more.")
    steps_per_epoch = _steps_per_epoch(frame)
    cols[2].metric("period in epochs", f"{period / steps_per_epoch:.1f}" if period and steps_per_epoch else "—")
    st.plotly_chart(charts.periodic(frame, spikes, period), key="periodic", config={"displaylogo": False})
    st.caption("Weight decay shrinks si_norm, so elr = lr / si_norm² grows until a step is too large: the loss "
               "spikes, the gradients blow the norm up, the elr drops, and a new period starts.")

    st.subheader("Sharpness against 2/ELR", anchor=False)
    if frame["sharpness"].notna().any():
        st.plotly_chart(charts.sharpness(frame), key="sharpness", config={"displaylogo": False})
        st.caption("sharpness is λmax·ρ² (top Hessian eigenvalue at unit norm); sharpness_threshold is "
                   "2(1+μ)/elr, the largest curvature a gradient step of that size is stable on.")
    else:
        st.info("This run did not measure sharpness. Launch with “Sharpness every” above 0, "
                "or queue the preset “Sharpness vs 2/ELR”.")


def _steps_per_epoch(frame) -> float | None:
    last = frame.iloc[-1]
    return float(last["step"] / last["epoch"]) if last["epoch"] > 0 else None


ui.run_page("Periodic behaviour", main)
