"""Branching, averaging and comparing solutions from the dashboard (README: *Branch, average,
compare solutions*), Streamlit-free: the
forms' words for the engine's messages, a run's branches and jobs, and the Teach demo's steps.

Everything is queued through engine.submission (torch-free, validated, nothing written on bad
input); a worker trains the branches and computes averages and geometries in its job processes.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.config import ConfigError, RunConfig
from engine.submission import kept_epochs, queue_average, queue_fork, queue_geometry
from storage import JobInfo, RunInfo, RunNotFound, Store
from storage.records import epochs_text, solution_text

from . import launch
from .data import rate_of

# The forms' label for each flag or placeholder the engine's messages name.
FIELDS = {**launch.FIELDS, "--at": "Branch at epoch", "--epochs": "Epochs after the branch", "--elr": "New ELR",
          "--lr": "New LR", "--last": "Average the last", "--points": "Points on the path",
          "--keep-every": "Keep checkpoints every"}
PENDING = ("queued", "running")
MAX_LINEAGE = 100    # ancestors followed back from a run (a chain of forks of forks)


def form_words(exc: Exception) -> str:
    """A ConfigError's one line with the CLI's flags replaced by the forms' field names."""
    text = str(exc).replace("RUN@EPOCH", "“Epoch”")
    return launch.form_message(text, FIELDS)


def branch(store: Store, run: RunInfo, *, at: int, rate: float, epochs: int) -> int:
    """Queue a child of `run` from its kept checkpoint at epoch `at` with a new ELR (sphere) or LR
    (lrwd), training `epochs` epochs of its own; its id. ConfigError in the form's words."""
    rate_key, _ = rate_of(run.config)
    try:
        return queue_fork(store, run.id, at=at, changes={rate_key: float(rate)}, epochs=int(epochs))
    except ConfigError as exc:
        raise ConfigError(form_words(exc)) from None


def average(store: Store, run_id: int, last: int) -> int:
    """Queue the SWA average of the run's last `last` kept checkpoints; the job id."""
    try:
        return queue_average(store, run_id, last=int(last))
    except ConfigError as exc:
        raise ConfigError(form_words(exc)) from None


def measure(store: Store, a: tuple[int, int | None], b: tuple[int, int | None], points: int = 21) -> int:
    """Queue the geometry between two solutions, each (run id, kept epoch or None for its last kept
    one); the job id."""
    ends = [f"{run}@{epoch}" if epoch is not None else str(run) for run, epoch in (a, b)]
    try:
        return queue_geometry(store, *ends, points=int(points))
    except ConfigError as exc:
        raise ConfigError(form_words(exc)) from None


# ---- a run's family and jobs -----------------------------------------------------------------------
def children(store: Store, run_id: int, runs: list[RunInfo] | None = None) -> list[RunInfo]:
    """The runs branched from this one, oldest first."""
    return sorted((r for r in (runs if runs is not None else store.list_runs()) if r.parent_id == run_id),
                  key=lambda r: r.id)


def fork_step(store: Store, run: RunInfo) -> int | None:
    """The step a fork starts at: its parent's kept checkpoint at the fork epoch (where its own trace
    begins); None for a run that is not a fork, or whose parent is gone."""
    if run.parent_id is None or run.fork_epoch is None:
        return None
    try:
        kept = {c.epoch: c.step for c in store.checkpoints(run.parent_id)}
    except RunNotFound:
        return None
    return kept.get(run.fork_epoch)


def lineage(store: Store, run: RunInfo) -> list[tuple[int, int]]:
    """(ancestor id, the step its descendant branched at), nearest first: the parent's trace up to the
    run's fork step, the grandparent's up to the parent's, and so on. Stops at a deleted ancestor."""
    chain, seen = [], {run.id}
    while run.parent_id is not None and run.parent_id not in seen and len(chain) < MAX_LINEAGE:
        step = fork_step(store, run)
        try:
            parent = store.get_run(run.parent_id)
        except RunNotFound:
            break
        if step is None:
            break
        chain.append((parent.id, step))
        seen.add(parent.id)
        run = parent
    return chain


def family_jobs(store: Store, run: RunInfo, branches: list[RunInfo]) -> list[JobInfo]:
    """The run's averages and geometries, and the geometries of its branches (newest first)."""
    jobs = {j.id: j for j in store.list_jobs(run_id=run.id)}
    for child in branches:
        jobs.update({j.id: j for j in store.list_jobs(run_id=child.id, kind="geometry")})
    return sorted(jobs.values(), key=lambda j: -j.id)


def job_text(job: JobInfo) -> str:
    """What a job computes, in a few words."""
    if job.kind == "average":
        return f"average of {epochs_text(job.spec.get('epochs', []))}"
    return f"{solution_text(job.spec.get('a', {}))} ↔ {solution_text(job.spec.get('b', {}))}"


def resolve(store: Store, run_id: int, epoch: int | None) -> dict:
    """A solution as a geometry job records it: its run and the kept epoch (None: the last kept one)."""
    kept = kept_epochs(store, run_id)
    return {"run": run_id, "epoch": epoch if epoch is not None else (kept[-1] if kept else None)}


def same_pair(job: JobInfo, a: dict, b: dict) -> bool:
    """Whether a geometry job measures these two solutions (in either order)."""
    ends = (job.spec.get("a"), job.spec.get("b"))
    return ends in ((a, b), (b, a))


def runs_with_kept(store: Store) -> dict[int, list[int]]:
    """Run id -> its kept epochs, for the runs that kept any (newest run first)."""
    kept = {run.id: kept_epochs(store, run.id) for run in store.list_runs()}
    return {run_id: epochs for run_id, epochs in kept.items() if epochs}


# ---- the Teach demo --------------------------------------------------------------------------------
# A chaotic-equilibrium digits run that keeps a checkpoint every 2 epochs; at epoch 8 two branches at
# smaller ELRs; the average of its last five checkpoints; the geometry between the branches' ends.
DEMO_PARENT = RunConfig(model="mlp_si", dataset="digits", mode="sphere", elr=0.02, epochs=12, keep_every=2,
                        log_every=10, name="branch demo: ELR 0.02", tags=("demo",))
DEMO_AT, DEMO_FORK_ELRS, DEMO_FORK_EPOCHS = 8, (0.002, 0.0005), 4
DEMO_LAST, DEMO_POINTS = 5, 11


@dataclass
class DemoState:
    parent: RunInfo
    forks: list[RunInfo]
    average: JobInfo | None
    geometry: JobInfo | None

    @property
    def done(self) -> bool:
        jobs = [self.average, self.geometry]
        return self.geometry is not None and all(j is not None and j.status not in PENDING for j in jobs)

    @property
    def stage(self) -> str:
        """What the demo is doing now, in one line."""
        if not self.parent.is_terminal:
            return f"Step 1 of 3: training the parent, ELR {self.parent.config.get('elr')} ({self.parent.progress:.0%})."
        if self.parent.status != "finished":
            return f"The parent run {self.parent.status}: the demo stops here."
        if not self.forks or not all(f.is_terminal for f in self.forks) or \
                (self.average is not None and self.average.status in PENDING):
            return "Step 2 of 3: training the two branches and averaging the parent's last checkpoints."
        if self.geometry is None or self.geometry.status in PENDING:
            return "Step 3 of 3: measuring the angle and the path between the two branches."
        return "Done: the two branches, the average and the geometry between the branches are below."


def start_demo(store: Store) -> int:
    """Queue the demo's parent run; the page that shows the demo queues the next steps (advance)."""
    [run_id] = store.create_runs([{"config": DEMO_PARENT.to_dict(), "name": DEMO_PARENT.name,
                                   "tags": list(DEMO_PARENT.tags)}])
    return run_id


def advance_demo(store: Store, parent_id: int) -> DemoState:
    """The demo's state, read from the store, after queueing whatever step is due: the two branches
    and the average once the parent has finished, the geometry once both branches have. Calling it
    again queues nothing twice."""
    parent = store.get_run(parent_id)
    forks = children(store, parent_id)
    averages = store.list_jobs(run_id=parent_id, kind="average")
    if parent.status == "finished" and not forks:
        for elr in DEMO_FORK_ELRS:
            queue_fork(store, parent_id, at=DEMO_AT, changes={"elr": elr}, epochs=DEMO_FORK_EPOCHS,
                       tags=("demo",))
        forks = children(store, parent_id)
    if parent.status == "finished" and not averages:
        queue_average(store, parent_id, last=DEMO_LAST)
        averages = store.list_jobs(run_id=parent_id, kind="average")
    geometry = None
    if len(forks) >= 2:
        a, b = forks[0], forks[1]
        geometries = [j for j in store.list_jobs(run_id=a.id, kind="geometry") if {j.run_id, j.other_run_id} == {a.id, b.id}]
        if not geometries and a.status == b.status == "finished":
            queue_geometry(store, str(a.id), str(b.id), points=DEMO_POINTS)
            geometries = [j for j in store.list_jobs(run_id=a.id, kind="geometry")
                          if {j.run_id, j.other_run_id} == {a.id, b.id}]
        geometry = geometries[0] if geometries else None
    return DemoState(parent, forks[:2], averages[-1] if averages else None, geometry)
