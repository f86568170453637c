"""Artifacts: the files a store's runs leave besides their rows (a run's resume checkpoint, its kept
checkpoints, the checkpoints a bundle brings), stored by KEY under one root that every machine using
the store reaches. The database records keys (`runs/12/resume-<claim>.pt`, `runs/12/epoch-30-<claim>.pt`),
never a host's paths, so a store works from any machine, and after its folder is moved or restored
elsewhere.

The root: `--artifacts` / $SPHERELAB_ARTIFACTS (a folder, or any fsspec URL: file:///..., s3://bucket/prefix
through s3fs, with the usual AWS_* variables, AWS_ENDPOINT_URL for a non-AWS server), else, for an SQLite
store, the folder `<db file>.checkpoints` beside it (a copied or moved folder takes its checkpoints along).
A PostgreSQL store has no folder of its own: it needs a root, and says so when it first needs one.

Writes appear whole or not at all: a local file is written aside and renamed; a remote object is put
in one request (S3 makes it visible only once complete). The writer's claim is in the key it writes
(the engine's naming), so a process that lost its run never overwrites its successor's files.
"""

from __future__ import annotations

import io
import os
import re
import time
from pathlib import Path
from typing import BinaryIO, Callable

from .errors import StoreError
from .files import write_atomically

ENV_VAR = "SPHERELAB_ARTIFACTS"
DEFAULT_SUFFIX = ".checkpoints"       # beside an SQLite file: <db>.checkpoints (the folder earlier versions used)
# Files younger than this are never collected by gc: a checkpoint is written before the row that
# records it, so a brand-new file is unreferenced for a moment.
GC_GRACE_S = 3600.0
_KEY = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")
HOW_TO_SET = (f"set {ENV_VAR} or pass --artifacts: a folder or URL (e.g. s3://bucket/spherelab) that every "
              "machine using this store reaches")


class ArtifactMissing(StoreError):
    """A recorded artifact cannot be found under the root: a moved, unmounted or lost file. Never a
    reason to start a run afresh: the run waits for it (storage.runs.resume_run)."""


class ArtifactDamaged(StoreError):
    """An artifact exists but cannot be read back as what it should be."""


def root_for(url: str, explicit: str | None = None) -> str | None:
    """The artifact root of the store at `url`: `explicit`, else $SPHERELAB_ARTIFACTS, else the
    `.checkpoints` folder beside an SQLite file; None where there is none (PostgreSQL)."""
    from .urls import sqlite_file
    for given in (explicit, os.environ.get(ENV_VAR)):
        if given is not None and str(given).strip():
            return str(given).strip()
    db = sqlite_file(url)
    if db is None:      # an SQLite URI filename (sqlite:///file:PATH?mode=ro&uri=true): its file
        from sqlalchemy.engine import make_url
        try:
            parsed = make_url(url)
        except Exception:
            parsed = None
        database = (parsed.database or "") if parsed is not None and parsed.get_backend_name() == "sqlite" else ""
        if database.startswith("file:") and not database.startswith("file::memory:"):
            from urllib.parse import unquote
            db = Path(unquote(database[len("file:"):].split("?", 1)[0]))
    if db is not None:
        return str(db.parent / (db.name + DEFAULT_SUFFIX))
    return None


def check_key_ok(key) -> bool:
    return isinstance(key, str) and bool(_KEY.fullmatch(key)) and not any(p in (".", "..") for p in key.split("/"))


def check_key(key: str) -> str:
    """A key is a relative path of plain names (letters, digits, . _ -), never absolute, never `..`."""
    if not check_key_ok(key):
        raise StoreError(f"{key!r} is not an artifact key: keys are relative paths like runs/12/epoch-3.pt "
                         "(a store from an older spherelab is converted when it is opened)")
    return key


class Artifacts:
    """The artifact store under one root (see the module docstring)."""

    def __init__(self, root: str):
        import fsspec
        from fsspec.implementations.local import LocalFileSystem
        self.root = str(root)
        try:
            self.fs, base = fsspec.core.url_to_fs(os.path.expanduser(self.root), skip_instance_cache=True)
        except (ImportError, ValueError) as exc:
            raise StoreError(f"artifact root {self.root!r} cannot be used ({exc}): {HOW_TO_SET}") from None
        self.local = isinstance(self.fs, LocalFileSystem)
        self.base = str(Path(base).resolve()) if self.local else base.rstrip("/")

    def __repr__(self) -> str:
        return f"Artifacts({self.root!r})"

    def path(self, key: str) -> str:
        """The file or object of a key (a local path for a local root)."""
        return f"{self.base}/{check_key(key)}"

    def describe(self, key: str) -> str:
        return f"{key} under {self.root}"

    # ---- writing
    def write(self, key: str, write: Callable, *, what: str = "the artifact") -> int:
        """Store the bytes write(target) produces under `key`, whole or not at all; returns their size.
        target: a temporary file path (a local root: written aside, then renamed) or a binary buffer
        (a remote root: put in one request). torch.save takes either."""
        target = self.path(key)
        if self.local:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            write_atomically(target, write, what=what,
                             fix=f"check that the artifact root {self.root} is writable and has space")
            return os.path.getsize(target)
        buffer = io.BytesIO()
        write(buffer)
        data = buffer.getvalue()
        self._remote(lambda: self.fs.pipe_file(target, data), key, f"write {what}")
        return len(data)

    def put(self, key: str, source: BinaryIO, *, limit: int, what: str = "the artifact") -> int:
        """Copy a stream under `key` (whole or not at all), refusing more than `limit` bytes (ValueError)."""
        def copy(target) -> None:
            sink = open(target, "wb") if isinstance(target, (str, Path)) else target
            try:
                copied = 0
                while chunk := source.read(1 << 20):
                    copied += len(chunk)
                    if copied > limit:
                        raise ValueError(f"{what} is larger than the {limit:,} bytes its manifest says")
                    sink.write(chunk)
            finally:
                if sink is not target:
                    sink.close()
        return self.write(key, copy, what=what)

    def link(self, source: str, key: str, *, what: str = "the artifact") -> int:
        """`key` holding the same bytes as `source` (a hard link on a local root, else a server-side copy)."""
        if self.local:
            import shutil

            def link(tmp) -> None:
                try:
                    os.link(self.path(source), tmp)
                except OSError:            # a file system without hard links
                    shutil.copyfile(self.path(source), tmp)
            return self.write(key, link, what=what)
        self._remote(lambda: self.fs.copy(self.path(source), self.path(key)), key, f"write {what}")
        return self.size(key)

    # ---- reading
    def exists(self, key: str) -> bool:
        if self.local:
            return os.path.isfile(self.path(key))
        self.fs.invalidate_cache()
        return bool(self._remote(lambda: self.fs.isfile(self.path(key)), key, "look for"))

    def size(self, key: str) -> int:
        if self.local:
            return os.path.getsize(self.path(key))
        self.fs.invalidate_cache()
        return int(self._remote(lambda: self.fs.size(self.path(key)), key, "read"))

    def source(self, key: str, what: str = "the artifact"):
        """Something torch.load (or a zip writer) reads the key from: a local path, or the object's
        bytes in a buffer. ArtifactMissing (one line naming the key and the root) if it is not there."""
        if self.local:
            path = self.path(key)
            if not os.path.isfile(path):
                raise self.missing(key, what)
            return path
        try:
            return io.BytesIO(self._remote(lambda: self.fs.cat_file(self.path(key)), key, "read"))
        except FileNotFoundError:
            raise self.missing(key, what) from None

    def missing(self, key: str, what: str = "the artifact") -> ArtifactMissing:
        return ArtifactMissing(f"{what} {key} is missing from the artifact root {self.root}: put the file back, "
                               f"or point {ENV_VAR}/--artifacts at the root that has it")

    # ---- removing
    def delete(self, key: str) -> None:
        """Remove a key (nothing if it is not there)."""
        if self.local:
            Path(self.path(key)).unlink(missing_ok=True)
            return
        try:
            self._remote(lambda: self.fs.rm_file(self.path(key)), key, "remove")
        except FileNotFoundError:
            pass

    def keys(self) -> dict[str, tuple[float, int]]:
        """Every key under the root with its modification time (seconds since the epoch; now if unknown)
        and size, temporary files of writes in progress included."""
        if self.local and not os.path.isdir(self.base):
            return {}
        self.fs.invalidate_cache()
        found = self._remote(lambda: self.fs.find(self.base, detail=True), "", "list")
        out = {}
        for path, info in found.items():
            key = path[len(self.base):].lstrip("/") if path.startswith(self.base) else path
            stamp = info.get("mtime") or info.get("LastModified") or info.get("created")
            out[key] = (stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp or time.time()),
                        int(info.get("size") or 0))
        return out

    def remove_path(self, key: str) -> None:
        """Remove what keys() listed (a temporary file's name is no valid key)."""
        target = f"{self.base}/{key}"
        if self.local:
            Path(target).unlink(missing_ok=True)
        else:
            self._remote(lambda: self.fs.rm_file(target), key, "remove")

    def _remote(self, call, key: str, action: str):
        try:
            return call()
        except FileNotFoundError:
            raise
        except (OSError, ValueError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise StoreError(f"cannot {action} {key or 'artifacts'} under {self.root} ({reason}): check the "
                             f"artifact root ({ENV_VAR}/--artifacts) and its credentials") from None
        except Exception as exc:   # botocore and aiohttp errors: connection refused, access denied
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise StoreError(f"cannot {action} {key or 'artifacts'} under {self.root} ({type(exc).__name__}: "
                             f"{reason}): check the artifact root ({ENV_VAR}/--artifacts) and its credentials") \
                from None
