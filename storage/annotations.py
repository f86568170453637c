"""What a user changes about saved runs from the dashboard: names, tags, notes, whole sweeps."""

import time

from sqlalchemy import delete, insert, select, update

from .errors import StoreError
from .jsontext import to_json
from .records import RunInfo
from .runs import clean_tags, remove_files, run_files
from .schema import LIVE_STATUSES, events, runs, sweeps

NAME_MAX = 200          # characters in a run or sweep name
NOTES_MAX = 20_000      # characters in a run's notes


def clean_name(name) -> str:
    if not isinstance(name, str) or not name.strip():
        raise StoreError("a name must be a non-empty string: e.g. 'baseline elr=1e-2'")
    if len(name.strip()) > NAME_MAX:
        raise StoreError(f"a name is at most {NAME_MAX} characters, got {len(name.strip())}")
    return name.strip()


class AnnotationsAPI:
    def rename_run(self, run_id, name: str) -> None:
        self.update_run(run_id, name=clean_name(name))

    def rename_sweep(self, sweep_id, name: str) -> None:
        name = clean_name(name)
        with self._write() as conn:
            row = self._require_sweep(conn, sweep_id)
            conn.execute(update(sweeps).where(sweeps.c.id == row.id).values(name=name))

    def set_tags(self, run_id, tags) -> None:
        """Replace the run's tags (add_tags adds to them)."""
        cleaned = clean_tags(tags)
        with self._write() as conn:
            row = self._require_run(conn, run_id)
            conn.execute(update(runs).where(runs.c.id == row.id).values(tags=to_json(cleaned, "tags")))

    # Notes are "note" events with payload {"notes": text} (engine notes carry "text"), dated at
    # step 0 so that a resume, which forgets the events after its checkpoint, never drops them;
    # bundles carry them like any event. The latest one is the run's notes.
    def set_notes(self, run_id, text: str) -> None:
        if not isinstance(text, str):
            raise StoreError(f"notes must be text, not {type(text).__name__}")
        if len(text) > NOTES_MAX:
            raise StoreError(f"notes are at most {NOTES_MAX:,} characters, got {len(text):,}")
        with self._write() as conn:
            row = self._require_run(conn, run_id)
            conn.execute(insert(events).values(run_id=row.id, step=0, kind="note",
                                               payload=to_json({"notes": text}, "notes"), created_at=time.time()))

    def notes(self, run_id) -> str:
        latest = [e for e in self.events(run_id, "note") if "notes" in e.payload]
        return str(latest[-1].payload["notes"]) if latest else ""

    def delete_sweep(self, sweep_id) -> list[RunInfo]:
        """Delete a sweep and its runs (metrics, events, commands, checkpoint files) in one transaction;
        returns the runs deleted. Refused while a worker holds one of them."""
        with self._write() as conn:
            row = self._require_sweep(conn, sweep_id)
            members = [RunInfo.from_row(r) for r in conn.execute(select(runs).where(runs.c.sweep_id == row.id))]
            live = [run.id for run in members if run.status in LIVE_STATUSES]
            if live:
                raise StoreError(f"sweep {row.id} has runs being trained ({', '.join(map(str, live))}): "
                                 "stop them first, then delete the sweep")
            files = run_files(conn, [run.id for run in members])
            artifacts = self.artifacts if files else None    # no root to remove them from: nothing deleted
            conn.execute(delete(runs).where(runs.c.sweep_id == row.id))
            conn.execute(delete(sweeps).where(sweeps.c.id == row.id))
        remove_files(artifacts, files)
        return members
