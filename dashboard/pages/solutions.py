"""Solutions: the geometry between two solutions (README, *Branch, average, compare solutions*) — pick two runs and kept epochs, queue the
measurement for a worker, and see the angle, the loss and error along the straight path between
them, and the barriers. Follows a measurement until it is done."""
import streamlit as st

from dashboard import data, solutions, ui, views
from dashboard.plain import md
from engine.config import ConfigError
from storage import Store

LAST = "last"
DEFAULT_POINTS, MIN_POINTS, MAX_POINTS = 21, 2, 201


def epoch_choice(text: str) -> str:
    return text if text == LAST else str(int(text))


def pick_solution(store: Store, label: str, key: str, kept: dict[int, list[int]], labels: dict[int, str],
                  default: int) -> tuple[int, int | None]:
    """A run (among those with kept checkpoints) and one of its kept epochs or its last one."""
    st.markdown(f"**{label}**")
    ui.seed(key, default, int, allowed=list(kept))
    run_id = st.selectbox("Run", list(kept), format_func=labels.get, key=key)
    ui.publish(key, run_id)
    options = [LAST, *map(str, kept[run_id])]
    ui.seed(f"{key}e", LAST, epoch_choice, allowed=options)
    epoch = st.selectbox("Checkpoint", options, key=f"{key}e",
                         format_func=lambda o: f"last kept (epoch {kept[run_id][-1]})" if o == LAST else f"epoch {o}")
    ui.publish(f"{key}e", epoch, LAST)
    return run_id, None if epoch == LAST else int(epoch)


def measure_section(store: Store, kept: dict[int, list[int]]) -> int | None:
    """The two pickers and the button; the id of the job to show after a click (queued, or an
    identical one already there), else None."""
    runs = {r.id: r for r in store.list_runs(ids=list(kept))}
    labels = {run_id: data.run_label(runs[run_id]) for run_id in kept}
    ids = list(kept)   # newest first
    left, right, last = st.columns([5, 5, 3], gap="medium")
    with left:
        a = pick_solution(store, "Solution A", "a", kept, labels, ids[1] if len(ids) > 1 else ids[0])
    with right:
        b = pick_solution(store, "Solution B", "b", kept, labels, ids[0])
    with last:
        st.markdown("**Path**")
        ui.seed("points", DEFAULT_POINTS, int, lo=MIN_POINTS, hi=MAX_POINTS)
        points = st.number_input("Points on the path", min_value=MIN_POINTS, max_value=MAX_POINTS, key="points",
                                 help="α from 0 to 1 in equal steps; each point is one evaluation of the "
                                      "training and test sets")
        ui.publish("points", points, DEFAULT_POINTS)
        clicked = st.button("Measure the geometry", type="primary", key="measure", icon=":material/straighten:")
    if not clicked:
        return None
    ends = [solutions.resolve(store, *a), solutions.resolve(store, *b)]
    for job in store.list_jobs(kind="geometry"):
        if solutions.same_pair(job, *ends) and job.spec.get("points") == points and job.status != "failed":
            st.info(f"Already measured (or being measured) as geometry #{job.id}: shown below.")
            return job.id
    try:
        job_id = solutions.measure(store, a, b, points)
    except ConfigError as exc:
        st.error(f"Not queued: {md(exc)}")
        return None
    st.success(f"Queued geometry #{job_id}: {md(solutions.job_text(store.get_job(job_id)))}.")
    return job_id


def main(store: Store) -> None:
    kept = solutions.runs_with_kept(store)
    if not store.list_runs():
        ui.no_runs()
        return
    if not kept:
        st.info("No run has kept checkpoints yet. On the Launch page set “Keep checkpoints every” (epochs), or "
                "train with `python -m engine train --keep-every 2 …`; then branch it on its Run page and come "
                "back to compare the solutions.")
        st.page_link(ui.LAUNCH_PAGE, label="Go to Launch", icon=":material/rocket_launch:")
        return
    st.subheader("Measure two solutions")
    queued = measure_section(store, kept)
    if queued is not None:
        ui.choose("job", queued)
    jobs = store.list_jobs(kind="geometry")
    if not jobs:
        st.caption("No geometry measured yet: pick two solutions and measure them.")
        return
    st.subheader("Result")
    job_id = ui.pick("Measurement", {j.id: f"#{j.id}: {solutions.job_text(j)} ({j.status})" for j in jobs},
                     "job", "measurement")
    job = store.get_job(job_id)
    ui.follow(lambda s, j: views.geometry_result(s, j), store, [], job_id,
              job_ids=[job_id] if job.status in ui.JOB_PENDING else [])


ui.run_page("Solutions", main, "The geometry between two solutions: the angle between their weight vectors and the loss and "
            "error along the straight path from one to the other, with BatchNorm recomputed at every point; the "
            "barrier is how far the path rises above the straight line between its ends' values (README, *Branch, "
            "average, compare solutions*). A worker computes it; this page follows it.")
