"""Schema versions. A fresh database is built from storage.schema at the current version; an older
one is upgraded here, one step at a time, inside a single transaction (all or nothing).

To add version N: change storage.schema to the new shape, then add
    def _to_vN(conn): conn.execute(text("ALTER TABLE runs ADD COLUMN ..."))
    MIGRATIONS[N] = _to_vN
Each function takes a database at version N-1 to version N (its key), and a test opens a database
written by version N-1 (tests/test_hardening.py keeps version 1 as the SQL SQLite wrote).

History: 1 the first schema; 2 runs.imported_at and runs.claim (imported runs are inert, claims are fenced);
3 runs.parent_id and runs.fork_epoch, the checkpoints and jobs tables (forks, kept checkpoints, analysis jobs);
4 the studies table, runs' and jobs' study_id and study_role (learning-rate studies);
5 jobs.started_at and jobs.attempts (a job whose process dies is retried a bounded number of times);
6 checkpoints recorded as artifact keys, not host paths (storage.artifacts), and runs.waiting_for.
"""

from collections.abc import Callable

from sqlalchemy import (Column, Float, ForeignKey, Index, Integer, MetaData, PrimaryKeyConstraint, String, Table,
                        Text, inspect, select, text, update)
from sqlalchemy.engine import Connection

from .errors import StoreError
from .schema import meta, metadata, studies

BASE_VERSION = 1


def _to_v2(conn: Connection) -> None:
    """runs.imported_at (runs from bundles are data: claims skip them) and runs.claim (a token per
    claim, which fences a process that lost its run). Existing runs were made here and hold no claim."""
    conn.execute(text("ALTER TABLE runs ADD COLUMN imported_at FLOAT"))
    conn.execute(text("ALTER TABLE runs ADD COLUMN claim VARCHAR(32)"))


def _v3_tables() -> tuple[Table, Table]:
    """The checkpoints and jobs tables as version 3 made them. Frozen here: storage.schema holds the
    current shape, and later versions add to these tables with their own steps (jobs gained study_id
    in version 4), so creating them from storage.schema would run those steps twice."""
    v3 = MetaData()
    Table("runs", v3, Column("id", Integer, primary_key=True))  # the target of the foreign keys only
    kept = Table(
        "checkpoints", v3,
        Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        Column("epoch", Integer, nullable=False),
        Column("step", Integer, nullable=False),
        Column("path", Text, nullable=False),
        Column("bytes", Integer, nullable=False),
        Column("created_at", Float, nullable=False),
        PrimaryKeyConstraint("run_id", "epoch", name="pk_checkpoints"),
    )
    analysis_jobs = Table(
        "jobs", v3,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("kind", String(16), nullable=False),
        Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        Column("other_run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE")),
        Column("spec", Text, nullable=False),
        Column("status", String(16), nullable=False),
        Column("result", Text),
        Column("error", Text),
        Column("worker_id", Text),
        Column("claim", String(32)),
        Column("heartbeat_at", Float),
        Column("created_at", Float, nullable=False),
        Column("finished_at", Float),
        Index("ix_jobs_status", "status"),
        Index("ix_jobs_run", "run_id"),
        sqlite_autoincrement=True,
    )
    return kept, analysis_jobs


def _to_v3(conn: Connection) -> None:
    """Forks (runs.parent_id, runs.fork_epoch), kept checkpoints and analysis jobs."""
    conn.execute(text("ALTER TABLE runs ADD COLUMN parent_id INTEGER REFERENCES runs(id) ON DELETE SET NULL"))
    conn.execute(text("ALTER TABLE runs ADD COLUMN fork_epoch INTEGER"))
    for table in _v3_tables():
        table.create(conn)


def _to_v4(conn: Connection) -> None:
    """Learning-rate studies: the studies table, and each run's and job's study and role (unique per
    study: an index, since SQLite cannot add a constraint to an existing table)."""
    studies.create(conn)
    for table in ("runs", "jobs"):
        conn.execute(text(f"ALTER TABLE {table} ADD COLUMN study_id INTEGER REFERENCES studies(id) ON DELETE SET NULL"))
        conn.execute(text(f"ALTER TABLE {table} ADD COLUMN study_role VARCHAR(128)"))
        conn.execute(text(f"CREATE UNIQUE INDEX uq_{table}_study_role ON {table} (study_id, study_role)"))


def _to_v5(conn: Connection) -> None:
    """Jobs record when their computation began and how many processes died computing them (a job whose
    process is killed is retried a bounded number of times, the jobs waiting behind it are not charged)."""
    conn.execute(text("ALTER TABLE jobs ADD COLUMN started_at FLOAT"))
    conn.execute(text("ALTER TABLE jobs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0"))


def legacy_key(path: str) -> str:
    """The artifact key of a checkpoint an older spherelab recorded by its absolute path. Every such file
    was written flat into the store's one checkpoint folder (<db>.checkpoints beside an SQLite file,
    ~/.spherelab/checkpoints for PostgreSQL), which is the artifact root now: its key is its name."""
    return path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def _to_v6(conn: Connection) -> None:
    """Checkpoints are artifacts recorded by key under the store's artifact root, so a store moved,
    restored elsewhere or shared between machines still finds them; runs.waiting_for marks an
    interrupted run whose recorded checkpoint is missing (no worker takes it until it is back)."""
    conn.execute(text("ALTER TABLE runs ADD COLUMN waiting_for TEXT"))
    for table, column, key_columns in (("runs", "checkpoint_path", ("id",)),
                                       ("checkpoints", "path", ("run_id", "epoch"))):
        names = ", ".join(key_columns)
        rows = conn.execute(text(f"SELECT {names}, {column} FROM {table} WHERE {column} IS NOT NULL")).all()
        for row in rows:
            old = row[-1]
            new = legacy_key(old)
            if new != old:
                where = " AND ".join(f"{name} = :{name}" for name in key_columns)
                conn.execute(text(f"UPDATE {table} SET {column} = :value WHERE {where}"),
                             {"value": new, **dict(zip(key_columns, row[:-1]))})


MIGRATIONS: dict[int, Callable[[Connection], None]] = {2: _to_v2, 3: _to_v3, 4: _to_v4, 5: _to_v5, 6: _to_v6}

# Any constant: serialises schema creation between PostgreSQL clients opening a fresh database together.
_PG_LOCK_KEY = 0x5350484C


def current_version() -> int:
    return max(MIGRATIONS, default=BASE_VERSION)


def schema_is_current(conn: Connection, where: str) -> bool:
    """True when the database already has this spherelab's schema, so opening it needs no write (a
    read-only store can be opened); False when it must be created or upgraded (ensure_schema)."""
    if meta.name not in set(inspect(conn).get_table_names()):
        return False
    found = read_version(conn, where)
    _refuse_newer(found)
    return found == current_version()


def _refuse_newer(found: int) -> None:
    if found > current_version():
        raise StoreError(f"database schema version {found} is newer than this spherelab ({current_version()}): "
                         "upgrade spherelab")


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
    _refuse_newer(found)
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
