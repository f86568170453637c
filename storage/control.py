"""Events (what happened in a run), commands (what the dashboard asks a worker to do), workers."""

import math
import time

from sqlalchemy import delete, insert, select, update

from .database import as_id
from .errors import StoreError
from .jsontext import to_json
from .records import Command, Event
from .schema import COMMAND_KINDS, EVENT_KINDS, LIVE_STATUSES, TERMINAL_STATUSES, commands, events, runs, workers
from .upsert import upsert

RATE_COMMANDS = ("set_elr", "set_lr")  # payload {"value": new rate > 0}


class ControlAPI:
    # ---- events
    def add_event(self, run_id, step: int, kind: str, payload: dict | None = None) -> int:
        if kind not in EVENT_KINDS:
            raise StoreError(f"unknown event kind {kind!r}: use one of {', '.join(EVENT_KINDS)}")
        with self._write() as conn:
            run = self._run_for_write(conn, run_id)
            return conn.execute(insert(events).values(
                run_id=run.id, step=int(step), kind=kind, payload=to_json(payload or {}, "event payload"),
                created_at=time.time())).inserted_primary_key[0]

    def events(self, run_id, kinds=None) -> list[Event]:
        """A run's events ordered by step (then by when they were added)."""
        with self._read() as conn:
            run = self._require_run(conn, run_id)
            query = select(events).where(events.c.run_id == run.id)
            if kinds is not None:
                query = query.where(events.c.kind.in_([kinds] if isinstance(kinds, str) else list(kinds)))
            rows = conn.execute(query.order_by(events.c.step, events.c.id)).all()
        return [Event.from_row(row) for row in rows]

    # ---- commands
    def send_command(self, run_id, kind: str, payload: dict | None = None) -> int:
        """Queue a command for the run's worker. set_elr / set_lr need payload {"value": rate > 0}."""
        payload = payload or {}
        if kind not in COMMAND_KINDS:
            raise StoreError(f"unknown command {kind!r}: use one of {', '.join(COMMAND_KINDS)}")
        if kind in RATE_COMMANDS and not _positive_number(payload.get("value")):
            raise StoreError(f"{kind} needs payload {{'value': x}} with x a positive number, got {payload!r}")
        with self._write() as conn:
            run = self._require_run(conn, run_id)
            if run.status in TERMINAL_STATUSES:
                raise StoreError(f"run {run.id} is already {run.status}: commands only reach runs that have not ended")
            return conn.execute(insert(commands).values(
                run_id=run.id, kind=kind, payload=to_json(payload, "command payload"),
                created_at=time.time())).inserted_primary_key[0]

    def take_commands(self, run_id) -> list[Command]:
        """Unconsumed commands, oldest first, marked consumed: each is returned exactly once. ClaimLost
        for a run this Store holds that was taken from it (it must not take its successor's commands)."""
        with self._read() as conn:
            self._require_run(conn, run_id)
        taken, lost = self.take_commands_for([run_id])
        for error in lost.values():
            raise error
        return taken.get(as_id(run_id), [])

    def take_commands_for(self, run_ids) -> tuple[dict[int, list[Command]], dict[int, StoreError]]:
        """take_commands for several runs (a pack's members) at once: ({run id: commands}, {run id lost to
        this process: why}). One read when nothing is pending, the common case."""
        ids = [as_id(run_id) for run_id in run_ids]
        pending = (select(commands).where(commands.c.consumed_at.is_(None), commands.c.run_id.in_(ids))
                   .order_by(commands.c.id))
        with self._read() as conn:   # nothing pending needs no write lock
            waiting = {row.run_id for row in conn.execute(pending).all()}
        taken: dict[int, list[Command]] = {}
        lost: dict[int, StoreError] = {}
        if not waiting:
            return taken, lost
        with self._write() as conn:
            for run_id in sorted(waiting):
                try:
                    self._run_for_write(conn, run_id)
                except StoreError as exc:   # ClaimLost or RunNotFound
                    lost[run_id] = exc
                    continue
                for row in conn.execute(pending.where(commands.c.run_id == run_id)).all():
                    claim = update(commands).where(commands.c.id == row.id, commands.c.consumed_at.is_(None))
                    if conn.execute(claim.values(consumed_at=time.time())).rowcount == 1:
                        taken.setdefault(run_id, []).append(Command.from_row(row))
        return taken, lost

    # ---- workers
    def worker_heartbeat(self, worker_id: str, *, host: str, pid: int, device: str, max_parallel: int) -> None:
        """Register a worker or refresh its heartbeat (started_at is kept from the first call)."""
        now = time.time()
        row = dict(id=worker_id, host=host, pid=int(pid), device=device, max_parallel=int(max_parallel),
                   started_at=now, heartbeat_at=now)
        with self._write() as conn:
            upsert(conn, workers, [row], key=("id",), replace=("host", "pid", "device", "max_parallel", "heartbeat_at"))

    def live_workers(self, max_age_s: float = 15.0) -> list[dict]:
        """Workers seen within max_age_s: id, host, pid, device, max_parallel, started_at, heartbeat_at,
        and run_ids (the runs they hold: running or paused)."""
        with self._read() as conn:
            rows = conn.execute(select(workers).where(workers.c.heartbeat_at >= time.time() - max_age_s)
                                .order_by(workers.c.id)).all()
            held = conn.execute(select(runs.c.worker_id, runs.c.id)
                                .where(runs.c.status.in_(LIVE_STATUSES),
                                       runs.c.worker_id.in_([row.id for row in rows]))
                                .order_by(runs.c.id)).all()
        return [{**row._asdict(), "run_ids": [run_id for worker_id, run_id in held if worker_id == row.id]}
                for row in rows]

    def remove_worker(self, worker_id: str) -> None:
        with self._write() as conn:
            conn.execute(delete(workers).where(workers.c.id == worker_id))


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
