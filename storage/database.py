"""Opening a database: URL checks, SQLite file handling (WAL, busy timeout, foreign keys, no
half-created files on failure), schema creation/migration, and the transaction helpers."""

import operator
import os
from pathlib import Path

from sqlalchemy import create_engine, event, select
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.pool import StaticPool

from .errors import RunNotFound, StoreError, SweepNotFound
from .migrations import ensure_schema, read_version
from .schema import runs, sweeps
from .urls import display_url, resolve_db_url, sqlite_file

BUSY_TIMEOUT_MS = 30_000
# Execution option marking read-only connections: on SQLite they BEGIN DEFERRED (never wait for the
# write lock) while writes BEGIN IMMEDIATE (take it up front, so a read-then-write transaction can
# never hit "database is locked" halfway through).
READ_ONLY = "spherelab_read_only"
_SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


class Database:
    """Connection handling shared by every part of the Store."""

    def __init__(self, url: str | None = None):
        self.url = resolve_db_url(url)
        self._where = display_url(self.url)
        self._engine = open_engine(self.url, self._where)
        self._reader = self._engine.execution_options(**{READ_ONLY: True})

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._where!r})"

    @property
    def schema_version(self) -> int:
        with self._read() as conn:
            return read_version(conn, self._where)

    def _write(self):
        """A transaction that commits on success: `with self._write() as conn:`."""
        return self._engine.begin()

    def _read(self):
        """A connection for reads; whatever it began is rolled back on exit."""
        return self._reader.connect()

    def _require_run(self, conn, run_id):
        """The runs row, or RunNotFound."""
        number = as_id(run_id)
        row = None if number is None else conn.execute(select(runs).where(runs.c.id == number)).first()
        if row is None:
            raise self._run_not_found(run_id)
        return row

    def _require_sweep(self, conn, sweep_id):
        number = as_id(sweep_id)
        row = None if number is None else conn.execute(select(sweeps).where(sweeps.c.id == number)).first()
        if row is None:
            raise SweepNotFound(f"no sweep with id {sweep_id} in {self._where}: list runs with `python -m engine runs`")
        return row

    def _run_not_found(self, run_id) -> RunNotFound:
        return RunNotFound(f"no run with id {run_id} in {self._where}: list runs with `python -m engine runs`")


def as_id(value) -> int | None:
    """Ids are integers (numpy ones too); a digit string from a CLI argument counts as well."""
    if isinstance(value, str):
        return int(value) if value.strip().isdigit() else None
    try:
        return operator.index(value)
    except TypeError:
        return None


def open_engine(url: str, where: str) -> Engine:
    """An Engine on a database whose schema is current; StoreError (one line) if that cannot be had."""
    parsed = make_url(url)  # resolve_db_url has already checked it
    path = sqlite_file(url)
    existed = path is None or path.exists()
    created_dirs = _prepare_sqlite_path(path) if path is not None else []
    engine = None
    try:
        engine = _create_engine(parsed)
        with engine.begin() as conn:
            ensure_schema(conn, where)
    except BaseException as exc:
        if engine is not None:
            engine.dispose()
        if not existed:
            _remove_sqlite_files(path, created_dirs)
        if isinstance(exc, (ArgumentError, NoSuchModuleError, ImportError)):
            raise StoreError(f"cannot use the database URL {where} ({exc}): install its driver or fix the URL") from None
        if isinstance(exc, (DBAPIError, OSError)) or type(exc).__module__.startswith("sqlite3"):
            raise StoreError(_open_failure(exc, where, path)) from None
        raise
    return engine


def _create_engine(parsed: URL) -> Engine:
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, pool_pre_ping=True)
    if parsed.database in (None, "", ":memory:"):
        # one in-memory database per process: every checkout must be the same connection
        engine = create_engine(parsed, poolclass=StaticPool, connect_args={"check_same_thread": False})
    else:
        engine = create_engine(parsed)

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # BEGIN is ours (below), not the driver's
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")  # readers (dashboard) never block the writer (trainer)
        cursor.execute("PRAGMA synchronous = NORMAL")  # safe with WAL; skips an fsync per commit
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")

    return engine


def _prepare_sqlite_path(path: Path) -> list[Path]:
    """Create missing parent directories (e.g. ~/.spherelab); return those created, outermost first."""
    fix = "pass a writable path with --db or set SPHERELAB_DB"
    if path.is_dir():
        raise StoreError(f"{path} is a directory, not a database file: {fix}")
    missing = []
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    if not parent.is_dir():
        raise StoreError(f"cannot create the database {path}: {parent} is not a directory: {fix}")
    if not path.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise StoreError(f"cannot create the database {path}: {parent} is not writable: {fix}")
    created = []
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except OSError as exc:
            _remove_sqlite_files(None, created)
            raise StoreError(f"cannot create the database {path} ({exc.strerror}: {directory}): {fix}") from None
        created.append(directory)
    return created


def _remove_sqlite_files(path: Path | None, created_dirs: list[Path]) -> None:
    if path is not None:
        for suffix in ("", *_SQLITE_SIDE_FILES):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    for directory in reversed(created_dirs):
        try:
            directory.rmdir()
        except OSError:
            pass  # something else put files there meanwhile: leave it


def _open_failure(exc: BaseException, where: str, path: Path | None) -> str:
    reason = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or ["unknown error"])[0]
    if path is None:
        return f"cannot open {where} ({reason}): check the URL, the credentials and that the server is running"
    if "not a database" in reason or "malformed" in reason:
        return (f"{path} is not a spherelab database ({reason}): "
                "point --db or SPHERELAB_DB at another file, or move this one away")
    return f"cannot open the database {path} ({reason}): pass a writable path with --db or set SPHERELAB_DB"
