"""Schema versions. A fresh database is built from storage.schema at the current version; an older
one is upgraded here, one step at a time, inside a single transaction (all or nothing).

To add version 2: change storage.schema to the new shape, then add
    def _to_v2(conn): conn.execute(text("ALTER TABLE runs ADD COLUMN ..."))
    MIGRATIONS[2] = _to_v2
Each function takes a database at version N-1 to version N (its key).
"""

from collections.abc import Callable

from sqlalchemy import inspect, select, text, update
from sqlalchemy.engine import Connection

from .errors import StoreError
from .schema import checkpoints, jobs, meta, metadata

BASE_VERSION = 1


def _to_v3(conn: Connection) -> None:
    """Forks (runs.parent_id, runs.fork_epoch), kept checkpoints and analysis jobs."""
    conn.execute(text("ALTER TABLE runs ADD COLUMN parent_id INTEGER REFERENCES runs(id) ON DELETE SET NULL"))
    conn.execute(text("ALTER TABLE runs ADD COLUMN fork_epoch INTEGER"))
    checkpoints.create(conn)
    jobs.create(conn)


MIGRATIONS: dict[int, Callable[[Connection], None]] = {3: _to_v3}

# Any constant: serialises schema creation between PostgreSQL clients opening a fresh database together.
_PG_LOCK_KEY = 0x5350484C


def current_version() -> int:
    return max(MIGRATIONS, default=BASE_VERSION)


def ensure_schema(conn: Connection, where: str) -> int:
    """Create or upgrade the schema on `conn` (inside the caller's transaction); return the version."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
    target = current_version()
    existing = set(inspect(conn).get_table_names())
    if meta.name not in existing:
        ours = sorted(existing & set(metadata.tables))
        if ours:
            raise StoreError(f"{where} has spherelab tables ({', '.join(ours)}) but no schema version: "
                             "it was not made by spherelab; use another database")
        metadata.create_all(conn)
        conn.execute(meta.insert().values(key="schema_version", value=str(target)))
        return target

    found = read_version(conn, where)
    if found > target:
        raise StoreError(f"database schema version {found} is newer than this spherelab ({target}): upgrade spherelab")
    for version in range(found + 1, target + 1):
        try:
            MIGRATIONS[version](conn)
        except Exception as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise StoreError(f"upgrading {where} to schema version {version} failed ({reason}): nothing was "
                             "changed; keep using the older spherelab and report this") from exc
    if found != target:
        conn.execute(update(meta).where(meta.c.key == "schema_version").values(value=str(target)))
    return target


def read_version(conn: Connection, where: str) -> int:
    value = conn.execute(select(meta.c.value).where(meta.c.key == "schema_version")).scalar()
    try:
        return int(value)
    except (TypeError, ValueError):
        raise StoreError(f"{where} has no valid schema version ({value!r}): it is damaged; "
                         "restore it from a copy or use another database") from None
