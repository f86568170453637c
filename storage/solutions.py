"""Kept checkpoints of runs (--keep-every) and the analysis jobs computed on them (SWA averages, the
geometry between two solutions). The engine writes checkpoint files and job results; the dashboard
queues jobs and reads results. Checkpoint files live beside an SQLite database (so a copied folder
keeps them), else under ~/.spherelab/checkpoints.

A job is claimed atomically (a conditional UPDATE) with a fresh claim token; its process heartbeats
while it computes and writes its result once, complete, under that token. A job whose heartbeat went
stale (a killed worker) is queued again, never left half-written.
"""

import os
import time
import uuid
from pathlib import Path

from sqlalchemy import insert, or_, select, update

from .errors import ClaimLost, StoreError
from .jsontext import to_json
from .records import CheckpointInfo, JobInfo, StudyInfo
from .runs import _new_run_row, _study_duplicate, new_uid
from .schema import JOB_KINDS, checkpoints, jobs, runs, studies, sweeps
from .upsert import upsert
from .urls import sqlite_file


class SolutionsAPI:
    # ---- kept checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        db = sqlite_file(self.url)
        if db is not None:
            return db.parent / (db.name + ".checkpoints")
        return Path(os.path.expanduser("~/.spherelab/checkpoints"))

    def record_checkpoint(self, run_id, epoch: int, step: int, path: str, size: int) -> None:
        """Record a kept checkpoint file (fenced like every write for a held run). A file it replaces
        (the same epoch kept again after a resume) is removed."""
        with self._write() as conn:
            run = self._run_for_write(conn, run_id)
            before = conn.execute(select(checkpoints.c.path).where(checkpoints.c.run_id == run.id,
                                                                    checkpoints.c.epoch == int(epoch))).scalar()
            upsert(conn, checkpoints, [dict(run_id=run.id, epoch=int(epoch), step=int(step), path=str(path),
                                            bytes=int(size), created_at=time.time())],
                   key=("run_id", "epoch"), replace=("step", "path", "bytes", "created_at"))
        if before and before != str(path):
            Path(before).unlink(missing_ok=True)

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

    def finish_job(self, job_id, result: dict, *, claim: str) -> None:
        """Store a job's complete result (once, under its claim)."""
        self._held_job_update(job_id, claim, status="finished", result=to_json(result, "job result"),
                              finished_at=time.time())

    def fail_job(self, job_id, error: str, *, claim: str) -> None:
        self._held_job_update(job_id, claim, status="failed", error=str(error), finished_at=time.time())

    def requeue_job(self, job_id, *, claim: str) -> None:
        """A job its holder gives back unfinished (a worker stopping): queued again, to be computed whole."""
        self._held_job_update(job_id, claim, status="queued", worker_id=None, claim=None, heartbeat_at=None)

    def requeue_stale_jobs(self, stale_after_s: float, *, except_worker: str | None = None) -> list[int]:
        """Running jobs whose heartbeat is older than stale_after_s go back to the queue; their ids.
        `except_worker` skips the caller's own jobs, as requeue_stale does its runs: it watches their
        process directly, and one still starting up (importing torch) has not heartbeaten yet."""
        stale = (jobs.c.status == "running") & (jobs.c.heartbeat_at < time.time() - stale_after_s)
        if except_worker is not None:
            stale = stale & or_(jobs.c.worker_id.is_(None), jobs.c.worker_id != except_worker)
        with self._write() as conn:
            ids = list(conn.execute(select(jobs.c.id).where(stale)).scalars())
            if ids:
                conn.execute(update(jobs).where(jobs.c.id.in_(ids), stale).values(
                    status="queued", worker_id=None, claim=None, heartbeat_at=None))
        return ids

    def _held_job_update(self, job_id, claim: str, **values) -> None:
        with self._write() as conn:
            self._require_job(conn, job_id)
            held = update(jobs).where(jobs.c.id == int(job_id), jobs.c.claim == claim, jobs.c.status == "running")
            if conn.execute(held.values(**values)).rowcount != 1:
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
                                                claim=None, worker_id=None, heartbeat_at=None)).rowcount
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
