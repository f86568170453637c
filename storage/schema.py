"""The tables (SQLAlchemy Core). This is the CURRENT schema: a fresh database is created from it,
older databases reach it through storage.migrations."""

from sqlalchemy import (Column, Float, ForeignKey, Index, Integer, MetaData, PrimaryKeyConstraint,
                        SmallInteger, String, Table, Text, UniqueConstraint)

STATUSES = ("queued", "running", "paused", "finished", "failed", "cancelled", "interrupted", "nonfinite")
TERMINAL_STATUSES = ("finished", "failed", "cancelled", "nonfinite")
LIVE_STATUSES = ("running", "paused")  # a worker process holds the run
EVENT_KINDS = ("elr_change", "lr_change", "spike", "regime", "note", "nonfinite", "status", "resume")
COMMAND_KINDS = ("pause", "resume", "stop", "set_elr", "set_lr")
JOB_KINDS = ("average", "geometry")
JOB_STATUSES = ("queued", "running", "finished", "failed")

metadata = MetaData()

meta = Table(
    "meta", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

# sqlite_autoincrement: ids of deleted rows are never handed out again (links to run 7 stay unambiguous).
sweeps = Table(
    "sweeps", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("uid", String(32), nullable=False, unique=True),
    Column("name", Text, nullable=False),
    Column("spec", Text, nullable=False),  # JSON
    Column("created_at", Float, nullable=False),
    sqlite_autoincrement=True,
)

# version 4: a learning-rate study (engine.study): its spec, its pre-training sweep, whose process owns it
studies = Table(
    "studies", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("uid", String(32), nullable=False, unique=True),
    Column("name", Text, nullable=False),
    Column("spec", Text, nullable=False),                      # JSON
    Column("status", String(16), nullable=False),              # running | finished | cancelled
    Column("owner", Text),                                     # the claimer advancing it (a CLI), else workers
    Column("sweep_id", Integer, ForeignKey("sweeps.id", ondelete="SET NULL")),
    Column("created_at", Float, nullable=False),
    Column("finished_at", Float),
    sqlite_autoincrement=True,
)

runs = Table(
    "runs", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("uid", String(32), nullable=False, unique=True),
    Column("name", Text, nullable=False),
    Column("config", Text, nullable=False),  # JSON
    Column("status", String(16), nullable=False),  # validated in Python: a CHECK would need a migration per new status
    Column("regime", String(32)),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("heartbeat_at", Float),
    Column("device", Text),
    Column("error", Text),
    Column("tags", Text, nullable=False, server_default="[]"),  # JSON list of str
    Column("sweep_id", Integer, ForeignKey("sweeps.id", ondelete="SET NULL")),
    Column("worker_id", Text),
    Column("step", Integer, nullable=False, server_default="0"),
    Column("total_steps", Integer),
    Column("checkpoint_path", Text),
    Column("checkpoint_step", Integer),
    # version 2: a run that came from a bundle is data, never trained here: claims skip it
    Column("imported_at", Float),
    # version 2: a fresh token per claim, so a process that lost its claim can tell (storage.runs)
    Column("claim", String(32)),
    # version 3: a fork records the run it branched from and the epoch of the checkpoint it started at
    Column("parent_id", Integer, ForeignKey("runs.id", ondelete="SET NULL")),
    Column("fork_epoch", Integer),
    # version 4: the study a run belongs to and its role there (unique in the study: engine.study)
    Column("study_id", Integer, ForeignKey("studies.id", ondelete="SET NULL")),
    Column("study_role", String(128)),
    # version 6: checkpoint_path and checkpoints.path hold artifact keys (storage.artifacts), no host paths;
    # an interrupted run whose recorded checkpoint is missing names it here, and no claim takes it
    # until `resume` finds it back
    Column("waiting_for", Text),
    UniqueConstraint("study_id", "study_role", name="uq_runs_study_role"),
    Index("ix_runs_status", "status"),
    Index("ix_runs_sweep", "sweep_id"),
    sqlite_autoincrement=True,
)

# special: 0 finite, 1 nan, 2 +inf, 3 -inf (see storage.nonfinite); value is NULL unless finite.
metrics = Table(
    "metrics", metadata,
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("key", String(128), nullable=False),
    Column("step", Integer, nullable=False),
    Column("epoch", Float, nullable=False),
    Column("wall_time", Float, nullable=False),
    Column("value", Float),
    Column("special", SmallInteger, nullable=False, server_default="0"),
    PrimaryKeyConstraint("run_id", "key", "step", name="pk_metrics"),
    Index("ix_metrics_run_step", "run_id", "step"),  # live reads: step > S across all keys
    sqlite_with_rowid=False,  # the primary key is the storage order: one B-tree instead of two
)

events = Table(
    "events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("step", Integer, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("payload", Text, nullable=False, server_default="{}"),  # JSON
    Column("created_at", Float, nullable=False),
    Index("ix_events_run_step", "run_id", "step"),
)

commands = Table(
    "commands", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("payload", Text, nullable=False, server_default="{}"),  # JSON
    Column("created_at", Float, nullable=False),
    Column("consumed_at", Float),
    Index("ix_commands_pending", "run_id", "consumed_at"),
)

# version 3: checkpoints kept with --keep-every (forks and averages start from them)
checkpoints = Table(
    "checkpoints", metadata,
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("epoch", Integer, nullable=False),
    Column("step", Integer, nullable=False),
    Column("path", Text, nullable=False),
    Column("bytes", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    PrimaryKeyConstraint("run_id", "epoch", name="pk_checkpoints"),
)

# version 3: analysis jobs on kept checkpoints (an SWA average, the geometry between two solutions)
jobs = Table(
    "jobs", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("other_run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE")),   # a geometry's second run
    Column("spec", Text, nullable=False),          # JSON: what to compute
    Column("status", String(16), nullable=False),  # queued | running | finished | failed
    Column("result", Text),                        # JSON, written once, complete
    Column("error", Text),
    Column("worker_id", Text),
    Column("claim", String(32)),                   # a fresh token per claim: a process that lost its job can tell
    Column("heartbeat_at", Float),
    Column("created_at", Float, nullable=False),
    Column("finished_at", Float),
    # version 4: the study a job belongs to and its role there
    Column("study_id", Integer, ForeignKey("studies.id", ondelete="SET NULL")),
    Column("study_role", String(128)),
    # version 5: when the process holding it began computing it (null while it waits its turn), and how
    # many processes died computing it (storage.solutions: a job is retried a bounded number of times)
    Column("started_at", Float),
    Column("attempts", Integer, nullable=False, server_default="0"),
    UniqueConstraint("study_id", "study_role", name="uq_jobs_study_role"),
    Index("ix_jobs_status", "status"),
    Index("ix_jobs_run", "run_id"),
    sqlite_autoincrement=True,
)

workers = Table(
    "workers", metadata,
    Column("id", String(128), primary_key=True),
    Column("host", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("device", Text, nullable=False),
    Column("max_parallel", Integer, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("heartbeat_at", Float, nullable=False),
)
