"""Plain records the API returns (no database objects leak out)."""

from dataclasses import dataclass

from .jsontext import from_json
from .schema import TERMINAL_STATUSES


@dataclass
class RunInfo:
    id: int
    uid: str
    name: str
    config: dict
    status: str
    regime: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    heartbeat_at: float | None
    device: str | None
    error: str | None
    tags: list[str]
    sweep_id: int | None
    worker_id: str | None
    step: int
    total_steps: int | None
    checkpoint_path: str | None        # the artifact key of its resume checkpoint (storage.artifacts)
    checkpoint_step: int | None
    imported_at: float | None = None   # set for runs imported from a bundle: data, never claimable
    claim: str | None = None           # token of the latest claim (see Store.hold)
    parent_id: int | None = None      # a fork: the run it branched from
    fork_epoch: int | None = None     # and the epoch of the kept checkpoint it started at
    study_id: int | None = None       # the learning-rate study it belongs to
    study_role: str | None = None     # and its role there (engine.study)
    waiting_for: str | None = None    # interrupted: the missing checkpoint it waits for (Store.resume_run)

    @property
    def progress(self) -> float:
        """Fraction of total_steps reached, in [0, 1]; 0 when the total is unknown."""
        if not self.total_steps:
            return 0.0
        return min(1.0, max(0.0, self.step / self.total_steps))

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @classmethod
    def from_row(cls, row) -> "RunInfo":
        m = row._mapping
        return cls(id=m["id"], uid=m["uid"], name=m["name"], config=from_json(m["config"]) or {},
                   status=m["status"], regime=m["regime"], created_at=m["created_at"],
                   started_at=m["started_at"], finished_at=m["finished_at"], heartbeat_at=m["heartbeat_at"],
                   device=m["device"], error=m["error"], tags=from_json(m["tags"]) or [],
                   sweep_id=m["sweep_id"], worker_id=m["worker_id"], step=m["step"],
                   total_steps=m["total_steps"], checkpoint_path=m["checkpoint_path"],
                   checkpoint_step=m["checkpoint_step"], imported_at=m["imported_at"], claim=m["claim"],
                   parent_id=m["parent_id"], fork_epoch=m["fork_epoch"], study_id=m["study_id"],
                   study_role=m["study_role"], waiting_for=m["waiting_for"])


@dataclass
class SweepInfo:
    id: int
    uid: str
    name: str
    spec: dict
    created_at: float
    run_ids: list[int]

    @classmethod
    def from_row(cls, row, run_ids: list[int]) -> "SweepInfo":
        m = row._mapping
        return cls(id=m["id"], uid=m["uid"], name=m["name"], spec=from_json(m["spec"]) or {},
                   created_at=m["created_at"], run_ids=run_ids)


@dataclass
class Event:
    id: int
    run_id: int
    step: int
    kind: str
    payload: dict
    created_at: float

    @classmethod
    def from_row(cls, row) -> "Event":
        m = row._mapping
        return cls(id=m["id"], run_id=m["run_id"], step=m["step"], kind=m["kind"],
                   payload=from_json(m["payload"]) or {}, created_at=m["created_at"])


@dataclass
class Command:
    id: int
    run_id: int
    kind: str
    payload: dict
    created_at: float

    @classmethod
    def from_row(cls, row) -> "Command":
        m = row._mapping
        return cls(id=m["id"], run_id=m["run_id"], kind=m["kind"],
                   payload=from_json(m["payload"]) or {}, created_at=m["created_at"])


@dataclass
class CheckpointInfo:
    """A kept checkpoint of a run (--keep-every)."""
    run_id: int
    epoch: int
    step: int
    path: str
    bytes: int
    created_at: float

    @classmethod
    def from_row(cls, row) -> "CheckpointInfo":
        m = row._mapping
        return cls(run_id=m["run_id"], epoch=m["epoch"], step=m["step"], path=m["path"], bytes=m["bytes"],
                   created_at=m["created_at"])


@dataclass
class JobInfo:
    """An analysis job: an SWA average of one run's checkpoints, or the geometry between two solutions."""
    id: int
    kind: str
    run_id: int
    other_run_id: int | None
    spec: dict
    status: str
    result: dict | None
    error: str | None
    worker_id: str | None
    claim: str | None
    heartbeat_at: float | None
    created_at: float
    finished_at: float | None
    study_id: int | None = None
    study_role: str | None = None
    started_at: float | None = None   # when its process began computing it (None while it waits)
    attempts: int = 0                 # processes that died computing it (storage.solutions.MAX_JOB_RETRIES)

    @classmethod
    def from_row(cls, row) -> "JobInfo":
        m = row._mapping
        return cls(id=m["id"], kind=m["kind"], run_id=m["run_id"], other_run_id=m["other_run_id"],
                   spec=from_json(m["spec"]) or {}, status=m["status"], result=from_json(m["result"]),
                   error=m["error"], worker_id=m["worker_id"], claim=m["claim"], heartbeat_at=m["heartbeat_at"],
                   created_at=m["created_at"], finished_at=m["finished_at"], study_id=m["study_id"],
                   study_role=m["study_role"], started_at=m["started_at"], attempts=m["attempts"])


@dataclass
class StudyInfo:
    """A learning-rate study (engine.study): what it is, its pre-training sweep, whether it has ended."""
    id: int
    uid: str
    name: str
    spec: dict
    status: str
    owner: str | None
    sweep_id: int | None
    created_at: float
    finished_at: float | None

    @classmethod
    def from_row(cls, row) -> "StudyInfo":
        m = row._mapping
        return cls(id=m["id"], uid=m["uid"], name=m["name"], spec=from_json(m["spec"]) or {}, status=m["status"],
                   owner=m["owner"], sweep_id=m["sweep_id"], created_at=m["created_at"],
                   finished_at=m["finished_at"])


# ---- solutions in words: the dashboard and the CLI name a job's ends the same way
def epochs_text(epochs) -> str:
    """A set of kept epochs in a few words: [12] -> "epoch 12", [6, 7, 8, 9, 10] -> "epochs 6–10",
    [4, 6, 8, 10, 12] -> "epochs 4–12 (every 2)", [3, 5, 9] -> "epochs 3, 5, 9"."""
    epochs = sorted(int(e) for e in epochs)
    if not epochs:
        return "no epochs"
    if len(epochs) == 1:
        return f"epoch {epochs[0]}"
    gaps = {b - a for a, b in zip(epochs, epochs[1:])}
    if len(gaps) == 1 and len(epochs) > 2:
        [gap] = gaps
        return f"epochs {epochs[0]}–{epochs[-1]}" + ("" if gap == 1 else f" (every {gap})")
    return f"epochs {', '.join(map(str, epochs))}"


def end_text(end: dict) -> str:
    """Which weights of its run a solution is, as a geometry job records it: {"epoch": 12} a kept
    checkpoint -> "at epoch 12"; {"epochs": [6, …, 10]} (a study's SWA end) -> "average of epochs 6–10"."""
    if end.get("epochs") is not None:
        return f"average of {epochs_text(end['epochs'])}"
    if end.get("epoch") is not None:
        return f"at epoch {end['epoch']}"
    return "(its last kept checkpoint)"


def solution_text(end: dict, name: str | None = None) -> str:
    """A solution in a few words, named by `name` (default "#RUN"): "#3 at epoch 12", or "#3, average of
    epochs 6–10" for an average; every end kind a geometry job can record."""
    name = name if name is not None else f"#{end.get('run', '?')}"
    where = end_text(end)
    return f"{name}, {where}" if where.startswith("average") else f"{name} {where}"
