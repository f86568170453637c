"""spherelab's storage: SQLAlchemy schema, migrations and the Store API shared by engine and dashboard."""

from .database import LOCK_WAIT_S, MAX_ID
from .downsample import downsample_extremes
from .errors import ClaimLost, RunNotFound, StoreBusy, StoreError, SweepNotFound
from .files import write_atomically
from .records import CheckpointInfo, Command, Event, JobInfo, RunInfo, StudyInfo, SweepInfo
from .runs import HEARTBEAT_EVERY_S, MIN_STALE_AFTER_S
from .schema import COMMAND_KINDS, EVENT_KINDS, LIVE_STATUSES, STATUSES, TERMINAL_STATUSES
from .store import Store
from .urls import default_db_url, resolve_db_url
from .writer import MetricWriter

__all__ = ["COMMAND_KINDS", "EVENT_KINDS", "HEARTBEAT_EVERY_S", "LIVE_STATUSES", "LOCK_WAIT_S", "MAX_ID",
           "MIN_STALE_AFTER_S", "STATUSES", "TERMINAL_STATUSES", "CheckpointInfo", "ClaimLost", "Command", "Event",
           "JobInfo", "MetricWriter", "RunInfo", "RunNotFound", "Store", "StoreBusy", "StoreError", "StudyInfo",
           "SweepInfo", "SweepNotFound", "default_db_url", "downsample_extremes", "resolve_db_url",
           "write_atomically"]
