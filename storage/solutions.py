"""Kept checkpoints of runs (--keep-every) and the analysis jobs computed on them (SWA averages, the
geometry between two solutions). The engine writes checkpoint files and job results; the dashboard
queues jobs and reads results. Checkpoint files are artifacts (storage.artifacts): the rows record
their keys under the store's artifact root, never a machine's paths.

A job is claimed atomically (a conditional UPDATE) with a fresh claim token; its process heartbeats
while it computes and writes its result once, complete, under that token. A job whose heartbeat went
stale (a killed worker) is queued again, never left half-written.
"""

import time
import uuid

from sqlalchemy import insert, or_, select, update

from .artifacts import GC_GRACE_S, HOW_TO_SET, Artifacts, check_key, root_for
from .errors import ClaimLost, StoreError
from .jsontext import to_json
from .records import CheckpointInfo, JobInfo, StudyInfo
from .runs import _new_run_row, _study_duplicate, new_uid
from .timings import seconds
from .schema import JOB_KINDS, checkpoints, jobs, runs, studies, sweeps, workers
from .upsert import upsert

# A job whose process dies while computing it (killed, out of memory) is computed again this many times,
# then fails with the cause; the jobs of the same process that were waiting their turn are not charged.
MAX_JOB_RETRIES = 2


class SolutionsAPI:
    # ---- artifacts and kept checkpoints
    @property
    def artifacts(self) -> Artifacts:
        """The store's artifact store (storage.artifacts); StoreError (how to set one) where it has none."""
        if self._artifacts is None:
            root = root_for(self.url, self._artifact_root)
            if root is None:
                raise StoreError(f"{self._where} has no artifact root for its checkpoints: {HOW_TO_SET}")
            self._artifacts = Artifacts(root)
        return self._artifacts

    def record_checkpoint(self, run_id, epoch: int, step: int, key: str, size: int) -> None:
        """Record a kept checkpoint (its artifact key; fenced like every write for a held run). An
        artifact it replaces (the same epoch kept again after a resume) is removed."""
        check_key(key)
        with self._write() as conn:
            run = self._run_for_write(conn, run_id)
            before = conn.execute(select(checkpoints.c.path).where(checkpoints.c.run_id == run.id,
                                                                    checkpoints.c.epoch == int(epoch))).scalar()
            upsert(conn, checkpoints, [dict(run_id=run.id, epoch=int(epoch), step=int(step), path=key,
                                            bytes=int(size), created_at=time.time())],
                   key=("run_id", "epoch"), replace=("step", "path", "bytes", "created_at"))
        if before and before != key:
            self.artifacts.delete(before)

    def collect_garbage(self, *, delete: bool = False, grace_s: float | None = None) -> list[tuple[str, int]]:
        """Artifacts under the root that no run references (its resume checkpoint or a kept one), older
        than grace_s (default GC_GRACE_S, $SPHERELAB_GC_GRACE_S): (key, bytes) pairs, removed with
        delete. The root should be this store's alone."""
        if grace_s is None:
            grace_s = seconds("SPHERELAB_GC_GRACE_S", GC_GRACE_S)
        artifacts = self.artifacts
        found = artifacts.keys()
        with self._read() as conn:
            used = set(conn.execute(select(runs.c.checkpoint_path).where(runs.c.checkpoint_path.is_not(None)))
                       .scalars())
            used |= set(conn.execute(select(runs.c.waiting_for).where(runs.c.waiting_for.is_not(None))).scalars())
            used |= set(conn.execute(select(checkpoints.c.path)).scalars())
        cutoff = time.time() - grace_s
        garbage = []
        for key, (modified, size) in sorted(found.items()):
            if key in used or modified > cutoff:
                continue
            garbage.append((key, size))
            if delete:
                artifacts.remove_path(key)
        return garbage

    def checkpoints(self, run_id) -> list[CheckpointInfo]:
        """A run's kept checkpoints, oldest first."""
        with self._read() as conn:
            run = self._require_run(conn, run_id)
            rows = conn.execute(select(checkpoints).where(checkpoints.c.run_id == run.id)
                                .order_by(checkpoints.c.epoch)).all()
        return [CheckpointInfo.from_row(row) for row in rows]

    # ---- jobs
    def create_job(self, kind: str, run_id, spec: dict, *, other_run_id=None, reserved_for: str | None = None,
                   study_id=None, study_role: str | None = None) -> int:
        """Queue a job; reserved_for: the one claimer that may take it (a CLI computing it itself). A job
        with a study role its study already has is not created again (its id is returned)."""
        if kind not in JOB_KINDS:
            raise StoreError(f"unknown job kind {kind!r}: use one of {', '.join(JOB_KINDS)}")
        with self._write() as conn:
            run = self._require_run(conn, run_id)
            other = self._require_run(conn, other_run_id).id if other_run_id is not None else None
            row = dict(kind=kind, run_id=run.id, other_run_id=other, spec=to_json(spec, "job spec"), status="queued",
                       worker_id=reserved_for, created_at=time.time(), study_id=study_id, study_role=study_role)
            existing = _study_duplicate(conn, jobs, row)
            return existing if existing is not None else conn.execute(insert(jobs).values(row)).inserted_primary_key[0]

    def get_job(self, job_id) -> JobInfo:
        with self._read() as conn:
            return JobInfo.from_row(self._require_job(conn, job_id))

    def list_jobs(self, *, run_id=None, kind=None, status=None, study_id=None) -> list[JobInfo]:
        """Jobs newest first; run_id matches either run of a geometry."""
        query = select(jobs)
        if study_id is not None:
            query = query.where(jobs.c.study_id == int(study_id))
        if run_id is not None:
            query = query.where(or_(jobs.c.run_id == run_id, jobs.c.other_run_id == run_id))
        if kind is not None:
            query = query.where(jobs.c.kind == kind)
        if status is not None:
            query = query.where(jobs.c.status.in_([status] if isinstance(status, str) else list(status)))
        with self._read() as conn:
            rows = conn.execute(query.order_by(jobs.c.id.desc())).all()
        return [JobInfo.from_row(row) for row in rows]

    def claim_job(self, worker_id: str, *, job_ids=None) -> JobInfo | None:
        """Atomically take the oldest queued job (optionally among job_ids); None if there is none."""
        candidates = select(jobs.c.id).where(jobs.c.status == "queued",
                                             or_(jobs.c.worker_id.is_(None), jobs.c.worker_id == worker_id))
        if job_ids is not None:
            candidates = candidates.where(jobs.c.id.in_(list(job_ids)))
        candidates = candidates.order_by(jobs.c.id).limit(1)
        while True:
            with self._write() as conn:
                job_id = conn.execute(candidates).scalar()
                if job_id is None:
                    return None
                won = conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.status == "queued").values(
                    status="running", worker_id=worker_id, claim=uuid.uuid4().hex,
                    heartbeat_at=time.time())).rowcount == 1
                if won:
                    return JobInfo.from_row(self._require_job(conn, job_id))

    def job_heartbeat(self, job_id, *, claim: str) -> None:
        self._held_job_update(job_id, claim, heartbeat_at=time.time())

    def start_job(self, job_id, *, claim: str) -> None:
        """Its process begins computing the job (the others of its batch wait their turn): if the process
        dies now, this job is the one charged an attempt (job_process_died)."""
        self._held_job_update(job_id, claim, started_at=time.time(), heartbeat_at=time.time())

    def job_process_died(self, job_id, cause: str, *, claim: str | None = None) -> str:
        """The process holding the job died (killed, a crash) without ending it: a job it had not begun
        goes back to the queue as it was; the one it was computing is retried, up to MAX_JOB_RETRIES
        times, then fails with `cause`. claim: the holder's claim (None: whoever holds it, for the stale
        check). Returns the job's new status; ClaimLost if the job is no longer held so."""
        with self._write() as conn:
            return self._job_died(conn, self._require_job(conn, job_id), cause, claim)

    def _job_died(self, conn, row, cause: str, claim: str | None) -> str:
        held = update(jobs).where(jobs.c.id == row.id, jobs.c.status == "running", jobs.c.claim == row.claim)
        if row.status != "running" or (claim is not None and row.claim != claim):
            raise ClaimLost(f"job {row.id} is no longer held by this process (it was requeued or taken over)")
        attempts = row.attempts + (row.started_at is not None)
        if attempts > MAX_JOB_RETRIES:
            values = dict(status="failed", error=f"{cause} (tried {attempts} times)", finished_at=time.time())
        else:
            values = dict(status="queued", worker_id=None, claim=None, heartbeat_at=None)
        conn.execute(held.values(attempts=attempts, started_at=None, **values))
        return values["status"]

    def retry_job(self, job_id, *, reserved_for: str | None = None) -> None:
        """A failed job goes back to the queue with a fresh count of attempts (a study taken up again
        retries what failed); reserved_for as in create_job."""
        with self._write() as conn:
            row = self._require_job(conn, job_id)
            if row.status != "failed":
                raise StoreError(f"job {row.id} is {row.status}: only a failed job can be retried")
            conn.execute(update(jobs).where(jobs.c.id == row.id, jobs.c.status == "failed").values(
                status="queued", error=None, result=None, finished_at=None, worker_id=reserved_for, claim=None,
                heartbeat_at=None, started_at=None, attempts=0))

    def finish_job(self, job_id, result: dict, *, claim: str) -> None:
        """Store a job's complete result (once, under its claim)."""
        self._held_job_update(job_id, claim, status="finished", result=to_json(result, "job result"),
                              finished_at=time.time())

    def fail_job(self, job_id, error: str, *, claim: str) -> None:
        self._held_job_update(job_id, claim, status="failed", error=str(error), finished_at=time.time())

    def requeue_job(self, job_id, *, claim: str) -> None:
        """A job its holder gives back unfinished (a worker stopping): queued again, to be computed whole
        (no attempt is charged: nothing went wrong with the job)."""
        self._held_job_update(job_id, claim, status="queued", worker_id=None, claim=None, heartbeat_at=None,
                              started_at=None)

    def requeue_stale_jobs(self, stale_after_s: float) -> list[int]:
        """Running jobs whose heartbeat is older than stale_after_s, held by a worker that is not alive
        either (a live worker accounts for its own job processes), are handled as job_process_died: back
        to the queue, or failed once the one being computed has used its retries. Their ids."""
        cutoff = time.time() - stale_after_s
        live_workers = select(workers.c.id).where(workers.c.heartbeat_at >= cutoff)
        stale = ((jobs.c.status == "running") & (jobs.c.heartbeat_at < cutoff)
                 & or_(jobs.c.worker_id.is_(None), jobs.c.worker_id.not_in(live_workers)))
        with self._write() as conn:
            rows = conn.execute(select(jobs).where(stale).order_by(jobs.c.id)).all()
            for row in rows:
                self._job_died(conn, row, "its process stopped heartbeating (its worker was killed?)", None)
        return [row.id for row in rows]

    def _held_job_update(self, job_id, claim: str, **values) -> None:
        """A write by the process holding the job under `claim`: ClaimLost (nothing written) once the job
        was requeued, taken over, or deleted (with its run)."""
        with self._write() as conn:
            held = update(jobs).where(jobs.c.id == int(job_id), jobs.c.claim == claim, jobs.c.status == "running")
            if conn.execute(held.values(**values)).rowcount != 1:
                if conn.execute(select(jobs.c.id).where(jobs.c.id == int(job_id))).first() is None:
                    raise ClaimLost(f"job {job_id} was deleted (with its run) while this process worked on it: "
                                    "stop, there is nothing left to write to")
                raise ClaimLost(f"job {job_id} is no longer held by this process (it was requeued or taken over)")

    def _require_job(self, conn, job_id):
        row = conn.execute(select(jobs).where(jobs.c.id == int(job_id))).first()
        if row is None:
            raise StoreError(f"no job with id {job_id} in {self._where}: list a run's jobs with "
                             "`python -m engine checkpoints RUN`")
        return row


class StudiesAPI:
    """Learning-rate studies (engine.study): a study, its pre-training sweep and its runs in one transaction."""

    def create_study(self, name: str, spec: dict, items: list[dict], *, owner: str | None = None) -> int:
        """A new study, its pre-training sweep and the sweep's runs (items as for create_runs, each with a
        study_role), all or nothing; returns the study id. owner: the claimer advancing it (a CLI
        process), else any worker advances it."""
        now = time.time()
        rows = [_new_run_row(item, now) for item in items]
        with self._write() as conn:
            sweep_id = conn.execute(insert(sweeps).values(uid=new_uid(), name=str(name),
                                                          spec=to_json({"study": name, **spec}, "sweep spec"),
                                                          created_at=now)).inserted_primary_key[0]
            study_id = conn.execute(insert(studies).values(uid=new_uid(), name=str(name), spec=to_json(spec, "study spec"),
                                                           status="running", owner=owner, sweep_id=sweep_id,
                                                           created_at=now)).inserted_primary_key[0]
            for row in rows:
                row.update(sweep_id=sweep_id, study_id=study_id)
                conn.execute(insert(runs).values(row))
        return study_id

    def get_study(self, study_id) -> StudyInfo:
        with self._read() as conn:
            return StudyInfo.from_row(self._require_study(conn, study_id))

    def list_studies(self, *, status=None) -> list[StudyInfo]:
        """Newest first."""
        query = select(studies)
        if status is not None:
            query = query.where(studies.c.status == status)
        with self._read() as conn:
            rows = conn.execute(query.order_by(studies.c.id.desc())).all()
        return [StudyInfo.from_row(row) for row in rows]

    def set_study_status(self, study_id, status: str, *, owner=...) -> None:
        """running | finished | failed (it ended with runs or jobs it needed failed: `study --resume`
        retries them) | cancelled; owner (when given) passes the study to another claimer, or to the
        workers (None)."""
        if status not in ("running", "finished", "failed", "cancelled"):
            raise StoreError(f"unknown study status {status!r}: use running, finished, failed or cancelled")
        values = {"status": status, "finished_at": time.time() if status != "running" else None}
        if owner is not ...:
            values["owner"] = owner
        with self._write() as conn:
            row = self._require_study(conn, study_id)
            conn.execute(update(studies).where(studies.c.id == row.id).values(values))

    def hand_over_study(self, study_id, owner: str | None) -> None:
        """Give a study (and its queued runs and jobs) to another owner: a CLI process resuming it, or
        None, the workers. Its interrupted runs are anyone's to resume already."""
        with self._write() as conn:
            row = self._require_study(conn, study_id)
            conn.execute(update(studies).where(studies.c.id == row.id).values(owner=owner, status="running",
                                                                            finished_at=None))
            conn.execute(update(runs).where(runs.c.study_id == row.id, runs.c.status == "queued")
                         .values(worker_id=owner))
            conn.execute(update(jobs).where(jobs.c.study_id == row.id, jobs.c.status == "queued")
                         .values(worker_id=owner))

    def retry_study(self, study_id) -> tuple[int, int]:
        """Give a study's failed and cancelled runs and its failed jobs another go: a run with a
        checkpoint becomes interrupted (resumed from it), one without is queued afresh; a job is queued.
        Non-finite runs are outcomes (divergence), not failures, and stay. Returns (runs, jobs) retried."""
        with self._write() as conn:
            row = self._require_study(conn, study_id)
            mine = (runs.c.study_id == row.id) & runs.c.status.in_(["failed", "cancelled"])
            cleared = dict(error=None, finished_at=None, claim=None, worker_id=None)
            resumable = conn.execute(update(runs).where(mine, runs.c.checkpoint_path.is_not(None))
                                     .values(status="interrupted", **cleared)).rowcount
            fresh = conn.execute(update(runs).where(mine).values(status="queued", step=0, **cleared)).rowcount
            retried_jobs = conn.execute(update(jobs).where(jobs.c.study_id == row.id, jobs.c.status == "failed")
                                        .values(status="queued", error=None, result=None, finished_at=None,
                                                claim=None, worker_id=None, heartbeat_at=None, started_at=None,
                                                attempts=0)).rowcount   # a fresh count, as retry_job
        return resumable + fresh, retried_jobs

    def _require_study(self, conn, study_id):
        try:
            number = int(study_id)
        except (TypeError, ValueError):
            number = None
        row = None if number is None else conn.execute(select(studies).where(studies.c.id == number)).first()
        if row is None:
            raise StoreError(f"no study with id {study_id} in {self._where}: list studies with `python -m engine report`")
        return row
