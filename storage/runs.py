"""Sweeps and runs: creating, listing, status changes, and the atomic claims workers make."""

import json
import time
import uuid

from sqlalchemy import delete, func, insert, or_, select, update

from .database import as_id
from .artifacts import check_key
from .errors import StoreError
from .jsontext import to_json
from .records import RunInfo, SweepInfo
from .timings import seconds
from .schema import (LIVE_STATUSES, STATUSES, TERMINAL_STATUSES, checkpoints, commands, events, metrics, runs,
                     sweeps, workers)

# A run process heartbeats this often (engine.runner uses it). requeue_stale never calls a run stale
# before it has missed MIN_STALE_AFTER_S of heartbeats: one late heartbeat (a slow step, a flush)
# happens, three in a row mean the process is gone or stuck. Below that floor a live run would be
# taken for dead and trained twice. (Claims are fenced besides, see Store.hold.) Tests shorten the
# heartbeat with SPHERELAB_HEARTBEAT_S; the floor follows it.
HEARTBEAT_EVERY_S = seconds("SPHERELAB_HEARTBEAT_S", 1.0)
MIN_STALE_AFTER_S = 3 * HEARTBEAT_EVERY_S

RUN_FIELDS = ("config", "name", "tags", "sweep_id", "status", "total_steps", "parent_id", "fork_epoch", "reserved_for",
              "study_id", "study_role")
UPDATABLE_FIELDS = ("status", "regime", "device", "error", "step", "total_steps", "started_at", "finished_at",
                    "checkpoint_path", "checkpoint_step", "worker_id", "heartbeat_at", "name", "waiting_for")


def new_uid() -> str:
    return uuid.uuid4().hex


def check_status(status) -> None:
    if status not in STATUSES:
        raise StoreError(f"unknown run status {status!r}: use one of {', '.join(STATUSES)}")


def clean_tags(tags) -> list[str]:
    """Stripped, non-empty, first occurrence kept; a lone string is one tag, not its letters."""
    if isinstance(tags, str):
        tags = [tags]
    cleaned = []
    for tag in tags:
        if not isinstance(tag, str) or not tag.strip():
            raise StoreError(f"tag {tag!r} is not a non-empty string: tags are words like 'baseline'")
        if tag.strip() not in cleaned:
            cleaned.append(tag.strip())
    return cleaned


def status_fields(status: str, previous: str | None, started_at: float | None, now: float) -> dict:
    """Columns that change with entering `status`: start time, heartbeat, finish time."""
    fields = {"status": status}
    if status == "running":
        fields["heartbeat_at"] = now  # a fresh run must not look stale to requeue_stale
        if started_at is None:
            fields["started_at"] = now
    if status in TERMINAL_STATUSES and previous not in TERMINAL_STATUSES:
        fields["finished_at"] = now
    return fields


class RunsAPI:
    # ---- sweeps
    def create_sweep(self, name: str, spec: dict) -> int:
        if not isinstance(spec, dict):
            raise StoreError(f"a sweep spec must be a dict, not {type(spec).__name__}")
        row = dict(uid=new_uid(), name=str(name), spec=to_json(spec, "sweep spec"), created_at=time.time())
        with self._write() as conn:
            return conn.execute(insert(sweeps).values(row)).inserted_primary_key[0]

    def get_sweep(self, sweep_id) -> SweepInfo:
        with self._read() as conn:
            row = self._require_sweep(conn, sweep_id)
            run_ids = conn.execute(select(runs.c.id).where(runs.c.sweep_id == row.id).order_by(runs.c.id))
            return SweepInfo.from_row(row, list(run_ids.scalars()))

    def list_sweeps(self) -> list[SweepInfo]:
        """Newest first."""
        with self._read() as conn:
            rows = conn.execute(select(sweeps).order_by(sweeps.c.created_at.desc(), sweeps.c.id.desc())).all()
            members = conn.execute(select(runs.c.sweep_id, runs.c.id)
                                   .where(runs.c.sweep_id.is_not(None)).order_by(runs.c.id)).all()
        by_sweep: dict[int, list[int]] = {}
        for sweep_id, run_id in members:
            by_sweep.setdefault(sweep_id, []).append(run_id)
        return [SweepInfo.from_row(row, by_sweep.get(row.id, [])) for row in rows]

    # ---- runs
    def create_run(self, config: dict, *, name: str, tags=(), sweep_id=None, status="queued",
                   total_steps=None) -> int:
        return self.create_runs([dict(config=config, name=name, tags=tags, sweep_id=sweep_id,
                                      status=status, total_steps=total_steps)])[0]

    def create_runs(self, items: list[dict]) -> list[int]:
        """Create many runs in one transaction: all of them exist afterwards, or none. A run with a
        study role that its study already has is not created again: its existing id is returned
        (engine.study advances studies idempotently, from any number of processes)."""
        now = time.time()
        rows = [_new_run_row(item, now) for item in items]
        with self._write() as conn:
            sweep_ids = {given: self._require_sweep(conn, given).id for given in {row["sweep_id"] for row in rows}
                         if given is not None}
            ids = []
            for row in rows:
                row["sweep_id"] = sweep_ids.get(row["sweep_id"])
                existing = _study_duplicate(conn, runs, row)
                ids.append(existing if existing is not None else
                           conn.execute(insert(runs).values(row)).inserted_primary_key[0])
            return ids

    def create_sweep_runs(self, name: str, spec: dict, items: list[dict]) -> tuple[int, list[int]]:
        """A new sweep and its runs in one transaction: (sweep id, run ids), or nothing at all."""
        if not isinstance(spec, dict):
            raise StoreError(f"a sweep spec must be a dict, not {type(spec).__name__}")
        now = time.time()
        rows = [_new_run_row({**item, "sweep_id": None}, now) for item in items]
        sweep = dict(uid=new_uid(), name=str(name), spec=to_json(spec, "sweep spec"), created_at=now)
        with self._write() as conn:
            sweep_id = conn.execute(insert(sweeps).values(sweep)).inserted_primary_key[0]
            for row in rows:
                row["sweep_id"] = sweep_id
            return sweep_id, [conn.execute(insert(runs).values(row)).inserted_primary_key[0] for row in rows]

    def get_run(self, run_id) -> RunInfo:
        with self._read() as conn:
            return RunInfo.from_row(self._require_run(conn, run_id))

    def list_runs(self, *, status=None, sweep_id=None, tag=None, name_contains=None, ids=None,
                  study_id=None) -> list[RunInfo]:
        """Runs matching every filter given, newest first. `status` is one status or a list."""
        query = select(runs)
        if study_id is not None:
            query = query.where(runs.c.study_id == as_id(study_id))
        if status is not None:
            wanted = [status] if isinstance(status, str) else list(status)
            for one in wanted:
                check_status(one)
            query = query.where(runs.c.status.in_(wanted))
        if sweep_id is not None:
            if as_id(sweep_id) is None:
                return []
            query = query.where(runs.c.sweep_id == as_id(sweep_id))
        if ids is not None:
            query = query.where(runs.c.id.in_([as_id(i) for i in ids if as_id(i) is not None]))
        if name_contains:
            query = query.where(func.lower(runs.c.name).contains(name_contains.lower(), autoescape=True))
        if tag is not None:
            # tags are a JSON list in TEXT: narrow in SQL, then match exactly below
            query = query.where(runs.c.tags.contains(json.dumps(tag), autoescape=True))
        with self._read() as conn:
            rows = conn.execute(query.order_by(runs.c.created_at.desc(), runs.c.id.desc())).all()
        found = [RunInfo.from_row(row) for row in rows]
        return [run for run in found if tag in run.tags] if tag is not None else found

    def update_run(self, run_id, **fields) -> None:
        """Set some of UPDATABLE_FIELDS. A status change also sets its timestamps and records a
        'status' event (fields given explicitly win over the automatic ones)."""
        unknown = sorted(set(fields) - set(UPDATABLE_FIELDS))
        if unknown:
            raise StoreError(f"cannot update run field(s) {', '.join(unknown)}: "
                             f"allowed are {', '.join(UPDATABLE_FIELDS)}")
        if "status" in fields:
            check_status(fields["status"])
        for field in ("checkpoint_path", "waiting_for"):     # artifact keys, never a machine's paths
            if fields.get(field) is not None:
                check_key(fields[field])
        with self._write() as conn:
            row = self._run_for_write(conn, run_id)
            values = dict(fields)
            if "status" in fields:
                values = {**status_fields(fields["status"], row.status, row.started_at, time.time()), **fields}
            if values:
                conn.execute(update(runs).where(runs.c.id == row.id).values(values))
            if "status" in fields and fields["status"] != row.status:
                step = values.get("step", row.step)
                self._status_event(conn, row.id, step, fields["status"], values.get("error"))
        if fields.get("status") not in (None, *LIVE_STATUSES):
            self.release(run_id)   # this process ended the run: its hold ends with it

    def set_status(self, run_id, status: str, *, error: str | None = None) -> None:
        fields = {"status": status} if error is None else {"status": status, "error": error}
        self.update_run(run_id, **fields)

    def heartbeat(self, run_id, step: int) -> None:
        """The run's process is alive and has reached `step` (requeue_stale looks at this). Raises
        ClaimLost for a run this Store holds (see hold) that was taken from it."""
        for error in self.heartbeats({run_id: step}).values():
            raise error

    def heartbeats(self, steps: dict, *, held_only: bool = False) -> dict[int, StoreError]:
        """heartbeat for several runs (a pack's members) in one transaction; returns those lost to this
        process (run id -> the ClaimLost or RunNotFound saying why), whose heartbeats were not written.
        held_only (a heartbeat thread): skip runs this Store no longer holds (it just ended them), so a
        late beat never lands on a run someone else claimed since."""
        lost: dict[int, StoreError] = {}
        now = time.time()
        with self._write() as conn:
            for run_id, step in steps.items():
                if held_only and as_id(run_id) not in self._holds:
                    continue
                try:
                    row = self._run_for_write(conn, run_id)
                except StoreError as exc:   # ClaimLost or RunNotFound: not this process's any more
                    lost[run_id] = exc
                    continue
                conn.execute(update(runs).where(runs.c.id == row.id).values(heartbeat_at=now, step=int(step)))
        return lost

    # ---- workers taking runs
    def claim_next_run(self, worker_id: str, *, run_ids=None) -> RunInfo | None:
        """Atomically take the oldest queued run (optionally among run_ids) for this worker; None if none.
        Safe between processes and between PostgreSQL clients: two workers never get the same run.
        Imported runs are never taken. The claim is recorded (worker_id, a fresh RunInfo.claim token)
        and this Store holds the run (see hold); give the token to the process that trains it."""
        return self._claim(worker_id, "queued", run_ids)

    def claim_interrupted(self, worker_id: str, *, run_ids=None) -> RunInfo | None:
        """Same as claim_next_run, for an interrupted run to resume from its checkpoint."""
        return self._claim(worker_id, "interrupted", run_ids)

    def _claim(self, worker_id: str, from_status: str, run_ids) -> RunInfo | None:
        candidates = select(runs.c.id).where(runs.c.status == from_status, runs.c.imported_at.is_(None),
                                             runs.c.waiting_for.is_(None))   # its checkpoint is missing: resume_run
        # a run tracked from a user's own loop (spherelab.track, worker id "track:...") has nothing a worker
        # could resume: it stays interrupted
        candidates = candidates.where(or_(runs.c.worker_id.is_(None), runs.c.worker_id.not_like("track:%")))
        if from_status == "queued":   # a queued run reserved for a claimer (a CLI's own runs) is its alone
            candidates = candidates.where(or_(runs.c.worker_id.is_(None), runs.c.worker_id == worker_id))
        if run_ids is not None:
            candidates = candidates.where(runs.c.id.in_([as_id(i) for i in run_ids if as_id(i) is not None]))
        candidates = candidates.order_by(runs.c.id).limit(1)
        while True:
            with self._write() as conn:
                run_id = conn.execute(candidates).scalar()
                if run_id is None:
                    return None
                now, token = time.time(), new_uid()
                # The status condition makes the UPDATE the arbiter: whoever changes the row first wins,
                # a concurrent claimer updates nothing and tries the next candidate.
                won = conn.execute(
                    update(runs).where(runs.c.id == run_id, runs.c.status == from_status)
                    # an interruption's reason (a lost node, a locked store) is history now: its status
                    # event keeps it, and the run trains again
                    .values(status="running", worker_id=worker_id, claim=token, heartbeat_at=now, error=None,
                            started_at=func.coalesce(runs.c.started_at, now))).rowcount == 1
                if won:
                    row = self._require_run(conn, run_id)
                    self._status_event(conn, run_id, row.step, "running")
            if won:
                self.hold(run_id, token)
                return RunInfo.from_row(row)

    def resume_run(self, run_id) -> RunInfo:
        """Let workers take up again an interrupted run that waits for its missing checkpoint (RunInfo.
        waiting_for), or a failed run that has a checkpoint (one that was damaged and has been replaced):
        the artifact is looked for first, and while it is still missing nothing changes (ArtifactMissing,
        one line naming the key and the root). Returns the run as it is now."""
        with self._read() as conn:
            row = self._require_run(conn, run_id)
        needs = row.waiting_for or row.checkpoint_path
        if row.imported_at is not None:
            raise StoreError(f"run {row.id} was imported from a bundle: it cannot resume here (fork it instead)")
        if row.status not in ("interrupted", "failed") or (row.status == "failed" and not needs):
            raise StoreError(f"run {row.id} is {row.status}: only an interrupted run, or a failed one with a "
                             "checkpoint, can be resumed")
        if needs and not self.artifacts.exists(needs):
            raise self.artifacts.missing(needs, f"run {row.id}'s checkpoint")
        with self._write() as conn:
            conn.execute(update(runs).where(runs.c.id == row.id, runs.c.status == row.status)
                         .values(status="interrupted", waiting_for=None, error=None, finished_at=None))
            if row.status != "interrupted":
                self._status_event(conn, row.id, row.step, "interrupted")
            return RunInfo.from_row(self._require_run(conn, row.id))

    def cancel_reserved(self, worker_id: str, reason: str) -> list[int]:
        """Queued runs reserved for worker_id that it never claimed (its process is ending) become
        'cancelled' with `reason`; returns their ids."""
        mine = (runs.c.status == "queued") & (runs.c.worker_id == worker_id)
        with self._write() as conn:
            ids = list(conn.execute(select(runs.c.id).where(mine).order_by(runs.c.id)).scalars())
            for run_id in ids:
                conn.execute(update(runs).where(runs.c.id == run_id)
                             .values(**status_fields("cancelled", "queued", None, time.time()), error=reason))
                self._status_event(conn, run_id, 0, "cancelled", reason)
        return ids

    def requeue_stale(self, stale_after_s: float, *, except_worker: str | None = None) -> list[int]:
        """Runs held by a worker (running/paused) whose heartbeat is older than stale_after_s, or
        missing, become 'interrupted' so claim_interrupted can resume them; returns their ids.
        stale_after_s must be at least MIN_STALE_AFTER_S (three heartbeats). The process that held
        such a run gets ClaimLost at its next write (see hold), so it never trains beside its successor.
        `except_worker` skips the caller's own runs: it watches its children directly, and a child
        that is still starting up has not had the chance to heartbeat yet."""
        if not stale_after_s >= MIN_STALE_AFTER_S:   # also refuses nan
            raise StoreError(f"stale_after_s={stale_after_s} is below {MIN_STALE_AFTER_S:g} s (three heartbeats of "
                             f"{HEARTBEAT_EVERY_S:g} s): a live run would be taken for stale and trained twice")
        cutoff = time.time() - stale_after_s
        # A run whose worker is alive (its own heartbeat fresh) is that worker's to account for: it watches
        # its run processes and records the end of one that dies. Handing such a run to another worker
        # would have two live processes take turns at it.
        live_workers = select(workers.c.id).where(workers.c.heartbeat_at >= cutoff)
        stale = (runs.c.status.in_(LIVE_STATUSES) & runs.c.imported_at.is_(None)
                 & or_(runs.c.heartbeat_at.is_(None), runs.c.heartbeat_at < cutoff)
                 & or_(runs.c.worker_id.is_(None), runs.c.worker_id.not_in(live_workers)))
        if except_worker is not None:
            stale = stale & or_(runs.c.worker_id.is_(None), runs.c.worker_id != except_worker)
        interrupted = []
        with self._write() as conn:
            for run_id, step in conn.execute(select(runs.c.id, runs.c.step).where(stale).order_by(runs.c.id)).all():
                if conn.execute(update(runs).where(runs.c.id == run_id, stale)
                                .values(status="interrupted")).rowcount == 1:
                    self._status_event(conn, run_id, step, "interrupted")
                    interrupted.append(run_id)
        return interrupted

    # ---- managing runs
    def cancel(self, run_id) -> None:
        """Queued, paused or interrupted runs become 'cancelled' at once; a running run gets a 'stop'
        command and its worker ends it as cancelled. A paused run also gets 'stop', to wake its worker."""
        with self._write() as conn:
            row = self._require_run(conn, run_id)
            if row.status in TERMINAL_STATUSES:
                raise StoreError(f"run {row.id} is already {row.status}: only queued, running, paused "
                                 "or interrupted runs can be cancelled")
            self._cancel_row(conn, row)

    def _cancel_row(self, conn, row) -> None:
        if row.status in LIVE_STATUSES:
            stop = dict(run_id=row.id, kind="stop", payload="{}", created_at=time.time())
            conn.execute(insert(commands).values(stop))
        if row.status != "running":
            values = status_fields("cancelled", row.status, row.started_at, time.time())
            conn.execute(update(runs).where(runs.c.id == row.id).values(values))
            self._status_event(conn, row.id, row.step, "cancelled")

    def unfinished_children(self, run_id) -> list[RunInfo]:
        """The run's forks that have not ended (queued, running, paused, interrupted): they may still need
        its kept checkpoints to start from, so deleting the run asks about them (delete)."""
        with self._read() as conn:
            row = self._require_run(conn, run_id)
            return [RunInfo.from_row(r) for r in conn.execute(_unfinished_children(row.id)).all()]

    def delete(self, run_id, *, with_children: bool = False) -> None:
        """Delete a run with its metrics, events, commands, jobs and checkpoint files. Its forks that
        have ended stay, no longer linked to it; forks that have not ended (unfinished_children) would
        lose their starting point, so the delete is refused unless with_children, which cancels them."""
        with self._write() as conn:
            row = self._require_run(conn, run_id)
            children = conn.execute(_unfinished_children(row.id)).all()
            if children and not with_children:
                listed = ", ".join(f"{c.id} ({c.status})" for c in children)
                raise StoreError(f"run {row.id} has branches that have not ended (run {listed}): they start from "
                                 "its kept checkpoints; delete it with --with-children (on the dashboard: "
                                 "'and cancel its branches') to cancel them too, or wait until they end")
            for child in children:
                self._cancel_row(conn, child)
            files = run_files(conn, [row.id])
            artifacts = self.artifacts if files else None    # no root to remove them from: nothing deleted
            conn.execute(delete(runs).where(runs.c.id == row.id))
        remove_files(artifacts, files)

    def add_tags(self, run_id, tags: list[str]) -> None:
        new = clean_tags(tags)
        with self._write() as conn:
            row = self._require_run(conn, run_id)
            merged = RunInfo.from_row(row).tags
            merged += [tag for tag in new if tag not in merged]
            conn.execute(update(runs).where(runs.c.id == row.id).values(tags=to_json(merged, "tags")))

    def truncate_after(self, run_id, step: int) -> None:
        """Forget metrics and events after `step` (resuming from a checkpoint there), so the stored
        trace is exactly one trajectory. Status events stay: they are the history of the process
        (claimed, interrupted, resumed), not of the trajectory. The run's step is lowered to `step`."""
        with self._write() as conn:
            row = self._run_for_write(conn, run_id)
            conn.execute(delete(metrics).where(metrics.c.run_id == row.id, metrics.c.step > step))
            conn.execute(delete(events).where(events.c.run_id == row.id, events.c.step > step,
                                              events.c.kind != "status"))
            conn.execute(update(runs).where(runs.c.id == row.id, runs.c.step > step).values(step=step))

    def _status_event(self, conn, run_id: int, step: int, status: str, error: str | None = None) -> None:
        payload = {"status": status} if error is None else {"status": status, "error": error}
        conn.execute(insert(events).values(run_id=run_id, step=step, kind="status",
                                           payload=to_json(payload, "event payload"), created_at=time.time()))


def _study_duplicate(conn, table, row: dict) -> int | None:
    """The id of the row of `table` with the same study and role, if there is one. Writers are
    serialised (BEGIN IMMEDIATE on SQLite; on PostgreSQL the unique index refuses a concurrent twin, and
    the caller's next advance finds it), so one role is created once."""
    if row.get("study_id") is None or row.get("study_role") is None:
        return None
    return conn.execute(select(table.c.id).where(table.c.study_id == row["study_id"],
                                                 table.c.study_role == row["study_role"])).scalar()


def _unfinished_children(run_id: int):
    return (select(runs).where(runs.c.parent_id == run_id, runs.c.status.not_in(TERMINAL_STATUSES))
            .order_by(runs.c.id))


def run_files(conn, run_ids: list[int]) -> list[str]:
    """The artifact keys of runs' checkpoints (latest and kept), read before the runs' rows go."""
    latest = conn.execute(select(runs.c.checkpoint_path).where(runs.c.id.in_(run_ids))).scalars()
    kept = conn.execute(select(checkpoints.c.path).where(checkpoints.c.run_id.in_(run_ids))).scalars()
    return [path for path in (*latest, *kept) if path]


def remove_files(artifacts, keys: list[str]) -> None:
    """After the rows are gone (a failed delete leaves the files a run still points at); a file that
    cannot be removed now is left for `engine gc`."""
    for key in keys:
        try:
            artifacts.delete(key)
        except StoreError:
            pass


def _new_run_row(item: dict, now: float) -> dict:
    unknown = sorted(set(item) - set(RUN_FIELDS))
    if unknown:
        raise StoreError(f"unknown run field(s) {', '.join(unknown)}: allowed are {', '.join(RUN_FIELDS)}")
    config, name = item.get("config"), item.get("name")
    if not isinstance(config, dict):
        raise StoreError(f"a run config must be a dict, not {type(config).__name__}")
    if not isinstance(name, str) or not name.strip():
        raise StoreError("a run needs a name: pass name='...'")
    status = item.get("status", "queued")
    check_status(status)
    total_steps = item.get("total_steps")
    if total_steps is not None and as_id(total_steps) is None:
        raise StoreError(f"total_steps must be a whole number, not {total_steps!r}")
    row = dict(uid=new_uid(), name=name.strip(), config=to_json(config, "run config"), created_at=now,
               tags=to_json(clean_tags(item.get("tags", ())), "tags"), step=0,
               sweep_id=item.get("sweep_id"),  # checked and normalised by create_runs
               total_steps=None if total_steps is None else int(total_steps),
               parent_id=as_id(item.get("parent_id")), fork_epoch=item.get("fork_epoch"),
               # a queued run reserved for one claimer (claim_next_run by that worker id only)
               worker_id=item.get("reserved_for"), study_id=as_id(item.get("study_id")),
               study_role=item.get("study_role"))
    row.update(status_fields(status, None, None, now))
    return row

