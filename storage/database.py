"""Opening a database: URL checks, SQLite file handling (WAL, busy timeout, foreign keys, no
half-created files on failure), schema creation/migration, and the transaction helpers.

The transaction helpers are the one place that meets locks and database errors:
- every transaction takes its lock when it begins (SQLite: BEGIN IMMEDIATE for writes, a first read
  for reads), before anything has been done, so waiting for a lock held elsewhere and trying again is
  always safe: a lock is waited for with backoff up to `lock_wait_s`, then StoreBusy (one line);
- any other database error becomes one line of StoreError naming the database (read-only, damaged...);
- writes a process makes for a run it claimed are fenced (Database.hold): ClaimLost once it lost the run.
"""

import operator
import os
import time
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, event, select
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

from .errors import ClaimLost, RunNotFound, StoreBusy, StoreError, SweepNotFound
from .migrations import current_version, ensure_schema, read_version, schema_is_current
from .schema import LIVE_STATUSES, runs, sweeps
from .timings import seconds
from .urls import display_url, resolve_db_url, sqlite_file

# SQLite's own wait for a lock within one attempt (its busy handler polls); SPHERELAB_BUSY_TIMEOUT_S
# shortens it for tests that hold a lock past it.
BUSY_TIMEOUT_MS = int(1000 * seconds("SPHERELAB_BUSY_TIMEOUT_S", 30.0))
# How long one store call waits, over all its attempts, for a lock another process holds (a long
# import, a backup, an open sqlite3 shell) before it gives up with StoreBusy. Long enough that a
# worker rides out any ordinary contention; finite, so a stuck lock becomes a message, not a hang.
LOCK_WAIT_S = seconds("SPHERELAB_LOCK_WAIT_S", 120.0)
RETRY_FIRST_S, RETRY_MAX_S = 0.05, 2.0  # backoff between attempts: from 50 ms, doubling, at most 2 s
MAX_ID = 2**63 - 1  # ids are SQLite/PostgreSQL 64-bit integers; anything larger names no row
# Execution option marking read-only connections: on SQLite they BEGIN DEFERRED (never wait for the
# write lock) while writes BEGIN IMMEDIATE (take it up front, so a read-then-write transaction can
# never hit "database is locked" halfway through).
READ_ONLY = "spherelab_read_only"
_SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY = 5, 6, 8
# PostgreSQL's transient failures: serialization_failure, deadlock_detected, lock_not_available.
_PG_TRANSIENT = ("40001", "40P01", "55P03")


class DatabaseError(StoreError):
    """A database error met in a transaction, as one line (the driver's exception is its __cause__)."""


class ReadOnlyStore(DatabaseError):
    """A write refused because the store is read-only (a read-only file, mount or URL, a read-only
    PostgreSQL transaction): waiting does not help, so a worker stops on it."""


class Database:
    """Connection handling shared by every part of the Store.

    busy_timeout_s and lock_wait_s default to BUSY_TIMEOUT_MS and LOCK_WAIT_S (tests lower them).
    artifacts: the root of its checkpoint files (storage.artifacts.root_for: else $SPHERELAB_ARTIFACTS,
    else beside an SQLite file).
    """

    def __init__(self, url: str | None = None, *, busy_timeout_s: float | None = None,
                 lock_wait_s: float | None = None, artifacts: str | None = None):
        self.url = resolve_db_url(url)
        self._artifact_root = artifacts    # storage.artifacts: the root given, else the environment's or default
        self._artifacts = None
        self._where = display_url(self.url)
        self.lock_wait_s = LOCK_WAIT_S if lock_wait_s is None else float(lock_wait_s)
        busy_ms = BUSY_TIMEOUT_MS if busy_timeout_s is None else int(busy_timeout_s * 1000)
        self._holds: dict[int, str] = {}   # run id -> claim token this process acts for (hold())
        self._engine = open_engine(self.url, self._where, min(busy_ms, int(self.lock_wait_s * 1000)),
                                   self.lock_wait_s)
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

    # ---- transactions
    def _write(self):
        """A transaction that commits on success: `with self._write() as conn:`."""
        return transaction(self._engine, self._where, self.lock_wait_s, write=True)

    def _read(self):
        """A connection for reads; whatever it began is rolled back on exit."""
        return transaction(self._reader, self._where, self.lock_wait_s, write=False)

    # ---- claims: fencing the writes of the process that trains a run
    def hold(self, run_id, claim: str) -> None:
        """This process acts for the claim `claim` (RunInfo.claim) on the run: from now on every write
        this Store makes for it (heartbeat, metrics, events, status and other fields, commands taken,
        truncation) first checks, in the same transaction, that the run still exists and is running or
        paused under that claim, and otherwise raises ClaimLost and writes nothing. A Store that claims
        a run (claim_next_run, claim_interrupted) holds it at once; a process the claimer starts calls
        hold() with the token it was given. The hold ends when this Store gives the run a status that
        is not live (finished, interrupted...) or on release(); never on ClaimLost, so nothing more is
        written for a run once it is lost."""
        number = as_id(run_id)
        if number is None or not isinstance(claim, str) or not claim:
            raise StoreError(f"cannot hold run {run_id!r} with claim {claim!r}: pass a run id and its RunInfo.claim")
        self._holds[number] = claim

    def release(self, run_id) -> None:
        """Stop fencing writes for the run (see hold)."""
        self._holds.pop(as_id(run_id), None)

    def _run_for_write(self, conn, run_id):
        """The runs row a write on behalf of the run is about to change: RunNotFound if there is none;
        for a run this Store holds, the row locked until commit, or ClaimLost if the hold was lost."""
        number = as_id(run_id)
        claim = self._holds.get(number)
        if claim is None:
            return self._require_run(conn, run_id)
        # FOR NO KEY UPDATE on PostgreSQL (a claim waits for this transaction); SQLite writers are
        # serialised by BEGIN IMMEDIATE already, and the clause is left out there.
        row = conn.execute(select(runs).where(runs.c.id == number).with_for_update(key_share=True)).first()
        if row is None:
            raise ClaimLost(f"run {number} was deleted while this process worked on it: stop, there is "
                            "nothing left to write to")
        if row.claim != claim:
            raise ClaimLost(f"run {number} was claimed again (by {row.worker_id}) after this process's claim: "
                            "stop, the other claimer trains it now")
        if row.status not in LIVE_STATUSES:
            raise ClaimLost(f"run {number} is {row.status} now (a user or a worker ended it, e.g. a stale "
                            "heartbeat): stop, and write nothing more for it")
        return row

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
    """Ids are integers 1..MAX_ID (numpy ones too); a digit string from a CLI argument counts as well.
    Anything else, e.g. a number beyond the database's integer range, is None (names no row)."""
    if isinstance(value, str):
        number = int(value) if value.strip().isdigit() and len(value.strip()) <= 19 else None
    else:
        try:
            number = operator.index(value)
        except TypeError:
            return None
    return number if number is not None and 1 <= number <= MAX_ID else None


# ---- transactions: locks, retries and errors in one place ------------------------------------------

@contextmanager
def transaction(engine: Engine, where: str, lock_wait_s: float, *, write: bool):
    """A connection in a transaction whose lock is already held (see begin); commits on success when
    `write`, otherwise rolls back. Database errors leave as one-line StoreErrors."""
    conn = begin(engine, where, lock_wait_s, write=write)
    try:
        yield conn
        if write:
            conn.commit()
    except DBAPIError as exc:
        raise database_error(exc, where) from exc
    finally:
        conn.close()  # rolls back whatever was not committed


def begin(engine: Engine, where: str, lock_wait_s: float, *, write: bool):
    """Connect and begin a transaction holding its lock: a write lock (SQLite BEGIN IMMEDIATE) or, on
    SQLite, a read snapshot (a first read). Nothing has been done yet when a lock is refused, so a
    transient failure (locked, busy, deadlock, serialisation) is retried with backoff until
    lock_wait_s has passed, then StoreBusy."""
    started = time.monotonic()
    delay = RETRY_FIRST_S
    while True:
        conn = None
        try:
            conn = engine.connect()
            conn.begin()
            if not write and engine.dialect.name == "sqlite":
                conn.exec_driver_sql("SELECT 1 FROM sqlite_master LIMIT 1")
            return conn
        except DBAPIError as exc:
            if conn is not None:
                conn.close()
            waited = time.monotonic() - started
            if not is_transient(exc):
                raise database_error(exc, where) from exc
            if waited + delay > lock_wait_s:
                raise StoreBusy(f"{where} stayed locked for {waited:.0f} s ({_reason(exc)}): another process "
                                "holds its lock (a long import, a backup, an open sqlite3 shell?); nothing was "
                                "written, try again when it is done") from exc
        time.sleep(delay)
        delay = min(2 * delay, RETRY_MAX_S)


def is_transient(exc: DBAPIError) -> bool:
    """A lock or serialisation failure: the same transaction may succeed if tried again."""
    code = _sqlite_code(exc)
    if code is not None:
        return code in (_SQLITE_BUSY, _SQLITE_LOCKED)
    return getattr(getattr(exc, "orig", None), "sqlstate", None) in _PG_TRANSIENT


def _sqlite_code(exc: DBAPIError) -> int | None:
    """SQLite's primary result code (SQLITE_BUSY...) of a driver error, None for other databases."""
    code = getattr(getattr(exc, "orig", None), "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def database_error(exc: DBAPIError, where: str, path: Path | None = None) -> StoreError:
    """One line for a database error met in a transaction (or, with path, on opening the file)."""
    reason = _reason(exc)
    if is_transient(exc):
        return StoreBusy(f"{where} was busy ({reason}): nothing of this call was written; try again")
    if _sqlite_code(exc) == _SQLITE_READONLY or getattr(getattr(exc, "orig", None), "sqlstate", None) == "25006":
        return ReadOnlyStore(f"{where} is read-only ({reason}): it can be listed and read but not changed; "
                             "copy it to a writable place, or fix its permissions, to change it")
    if "not a database" in reason or "malformed" in reason:
        return DatabaseError(f"{path or where} is not a spherelab database ({reason}): "
                             "point --db or SPHERELAB_DB at another file, or move this one away")
    if path is not None:
        return DatabaseError(f"cannot open the database {path} ({reason}): pass a writable path with --db "
                             "or set SPHERELAB_DB")
    return DatabaseError(f"database error on {where} ({reason}): nothing of this call was written")


def _reason(exc: BaseException) -> str:
    return (str(getattr(exc, "orig", None) or exc).strip().splitlines() or ["unknown error"])[0]


# ---- opening ---------------------------------------------------------------------------------------

def open_engine(url: str, where: str, busy_timeout_ms: int = BUSY_TIMEOUT_MS,
                lock_wait_s: float = LOCK_WAIT_S) -> Engine:
    """An Engine on a database whose schema is current; StoreError (one line) if that cannot be had.
    A database already at the current schema is opened without writing (so a read-only one opens).
    A WAL database in a read-only place (a read-only mount, a folder it cannot write) cannot be opened
    the usual way (readers need its -shm file): it is opened read-only and immutable instead."""
    try:
        return _open_engine(url, where, busy_timeout_ms, lock_wait_s)
    except StoreError:
        path = sqlite_file(url)
        if path is None or not path.is_file() or not _read_only_place(path) or _has_wal(path):
            raise
    return _open_engine(_immutable_url(path), where, busy_timeout_ms, lock_wait_s)


def _read_only_place(path: Path) -> bool:
    try:
        return bool(os.statvfs(path.parent).f_flag & os.ST_RDONLY) or not os.access(path.parent, os.W_OK)
    except OSError:
        return False


def _has_wal(path: Path) -> bool:
    """A -wal file with content: transactions not yet in the main file, which an immutable open would miss."""
    wal = Path(f"{path}-wal")
    return wal.exists() and wal.stat().st_size > 0


def _immutable_url(path: Path) -> str:
    from urllib.parse import quote
    return f"sqlite:///file:{quote(str(path.resolve()))}?mode=ro&immutable=1&uri=true"


def _open_engine(url: str, where: str, busy_timeout_ms: int, lock_wait_s: float) -> Engine:
    parsed = make_url(url)  # resolve_db_url has already checked it
    path = sqlite_file(url)
    existed = path is None or path.exists()
    created_dirs = _prepare_sqlite_path(path) if path is not None else []
    engine = None
    try:
        engine = _create_engine(parsed, busy_timeout_ms)
        with transaction(engine.execution_options(**{READ_ONLY: True}), where, lock_wait_s, write=False) as conn:
            current = schema_is_current(conn, where)
        if not current:
            with transaction(engine, where, lock_wait_s, write=True) as conn:
                ensure_schema(conn, where)
    except BaseException as exc:
        if engine is not None:
            engine.dispose()
        if not existed:
            _remove_sqlite_files(path, created_dirs)
        if isinstance(exc, (ArgumentError, NoSuchModuleError, ImportError)):
            raise StoreError(f"cannot use the database URL {where} ({exc}): install its driver or fix the URL") from None
        if isinstance(exc, StoreError) and isinstance(exc.__cause__, DBAPIError) and (
                isinstance(exc, (DatabaseError, StoreBusy)) or _sqlite_code(exc.__cause__) == _SQLITE_READONLY):
            raise _open_failure(exc.__cause__, where, path, existed) from None
        if isinstance(exc, (DBAPIError, OSError)) or type(exc).__module__.startswith("sqlite3"):
            raise _open_failure(exc, where, path, existed) from None
        raise
    return engine


def _create_engine(parsed: URL, busy_timeout_ms: int) -> Engine:
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, pool_pre_ping=True)
    engine = create_engine(parsed)   # in-memory SQLite is refused by resolve_db_url: runs would vanish

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # BEGIN is ours (below), not the driver's
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        try:
            cursor.execute("PRAGMA journal_mode = WAL")  # readers (dashboard) never block the writer (trainer)
        except Exception as exc:  # sqlite3.OperationalError: a read-only store keeps its journal mode
            if (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF != _SQLITE_READONLY:
                raise
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


def _open_failure(exc: BaseException, where: str, path: Path | None, existed: bool) -> StoreError:
    if isinstance(exc, DBAPIError):
        if is_transient(exc):
            return StoreBusy(f"cannot open {where} ({_reason(exc)}): another process holds its lock; try again")
        if existed and _sqlite_code(exc) == _SQLITE_READONLY:
            return StoreError(f"{where} is read-only and needs its schema upgraded to version {current_version()} "
                              "first: open it once with write access")
    if path is None:
        return StoreError(f"cannot open {where} ({_reason(exc)}): check the URL, the credentials and that the "
                          "server is running")
    if isinstance(exc, DBAPIError):
        return database_error(exc, where, path)
    return StoreError(f"cannot open the database {path} ({_reason(exc)}): pass a writable path with --db or "
                      "set SPHERELAB_DB")
