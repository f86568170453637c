"""The Store: the one API the engine and the dashboard use to reach the database."""

from .annotations import AnnotationsAPI
from .bundle import BundleAPI
from .control import ControlAPI
from .database import Database
from .metrics import MetricsAPI
from .runs import RunsAPI
from .solutions import SolutionsAPI, StudiesAPI


class Store(RunsAPI, AnnotationsAPI, SolutionsAPI, StudiesAPI, MetricsAPI, ControlAPI, BundleAPI, Database):
    """Open (creating or migrating as needed) the database at `url`: a SQLAlchemy URL or a plain
    path; None means $SPHERELAB_DB, else ~/.spherelab/spherelab.db. Failures raise StoreError.

    One Store per process (open a new one after spawn); it may be shared by threads.
    Every call waits out a lock held elsewhere up to lock_wait_s (then StoreBusy), and any database
    error is one line of StoreError. Writes made for a run this Store claimed, or holds (hold), are
    fenced: ClaimLost once the run was deleted, ended or claimed by someone else.
    Sweeps and runs: storage.runs. Metrics: storage.metrics. Events, commands and workers:
    storage.control. Bundles: storage.bundle. Kept checkpoints, analysis jobs and studies: storage.solutions. Names, tags, notes, deleting a sweep: storage.annotations.
    """
