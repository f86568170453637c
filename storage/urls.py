"""Where the store lives: an explicit URL or path, else $SPHERELAB_DB, else ~/.spherelab/spherelab.db."""

import os

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from .errors import StoreError

ENV_VAR = "SPHERELAB_DB"
DEFAULT_PATH = "~/.spherelab/spherelab.db"

# psycopg (v3) is the PostgreSQL driver spherelab installs; SQLAlchemy's bare default is psycopg2.
_BARE_POSTGRES = ("postgresql://", "postgres://")


def default_db_url() -> str:
    """$SPHERELAB_DB (a URL or a plain path) if set, else the SQLite file ~/.spherelab/spherelab.db.

    Nothing is created here: the directory appears when a Store first opens the file.
    """
    from_env = os.environ.get(ENV_VAR, "").strip()
    return resolve_db_url(from_env or DEFAULT_PATH)


def resolve_db_url(url_or_path=None) -> str:
    """A URL stays as it is, a plain path becomes sqlite:///abs/path, None means default_db_url().

    An empty path is refused rather than taken for the default (it is a mistake, e.g. an unset shell
    variable, and would silently write to the home store), and so is in-memory SQLite: its runs
    would vanish with the process, unseen by any worker or dashboard."""
    if url_or_path is None:
        return default_db_url()
    text = str(url_or_path).strip()
    if not text:
        raise StoreError("the database path is empty: pass a file path or a URL, or none at all for "
                         f"${ENV_VAR}, else {DEFAULT_PATH}")
    url = _as_url(text)
    if _in_memory(url):
        raise StoreError(f"{url} is an in-memory SQLite database: its runs would be lost when this process "
                         "exits and no worker or dashboard could see them; pass a file path instead")
    return url


def display_url(url: str) -> str:
    """The URL with any password masked, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def sqlite_file(url: str):
    """The database file of an SQLite URL (a pathlib.Path), None for other databases and in-memory SQLite.
    Files that belong to a store (checkpoints, the worker log) live beside it."""
    from pathlib import Path
    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:" \
            or database.startswith("file:"):
        return None
    return Path(database)


def _in_memory(url: str) -> bool:
    try:
        parsed = make_url(url)
    except ArgumentError:
        return False
    database = parsed.database or ""
    return parsed.get_backend_name() == "sqlite" and (
        database in ("", ":memory:") or database.startswith("file::memory:")
        or parsed.query.get("mode") == "memory")


def _as_url(text: str) -> str:
    if "://" not in text:
        return "sqlite:///" + os.path.abspath(os.path.expanduser(text))
    for bare in _BARE_POSTGRES:
        if text.startswith(bare):
            return "postgresql+psycopg://" + text[len(bare):]
    try:
        make_url(text)
    except ArgumentError as exc:
        raise StoreError(f"{text!r} is not a database URL ({exc}): pass a path or e.g. postgresql://user@host/db") from None
    return text
