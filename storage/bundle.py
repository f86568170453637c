"""Bundles: saved runs as one portable zip file (manifest.json + metrics.parquet, and with
--with-checkpoints the runs' kept checkpoints), to share a run or a sweep with a colleague, who can
then branch from it, average it or measure its geometry.

A bundle is someone else's file, so an import reads it as data within stated limits: every field is
checked (types, finite numbers, integers within 64 bits, JSON nesting), and the whole import is one
transaction, so a bad or oversized bundle is one line of StoreError and nothing is written. Imported
runs are never queued, running or claimable here: they carry imported_at (claims skip them), and a
run the bundle says had not ended (queued, running, paused, interrupted) is stored as `interrupted`,
with the bundle's status kept in a status event; it cannot resume here (only kept checkpoints
travel, never a run's resume point). Checkpoint files are only ever loaded with torch's safe loader.
"""

import io
import json
import math
import re
import shutil
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from .errors import StoreError
from .files import write_atomically
from .jsontext import to_json
from .schema import EVENT_KINDS, STATUSES, TERMINAL_STATUSES, checkpoints, events, metrics, runs, sweeps

FORMAT = "spherelab-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
METRICS_NAME = "metrics.parquet"
RUN_KEYS = ("uid", "name", "config", "status", "regime", "tags", "created_at", "started_at", "finished_at",
            "device", "error", "step", "total_steps")
METRICS_SCHEMA = pa.schema([("run_uid", pa.string()), ("key", pa.string()), ("step", pa.int64()),
                            ("epoch", pa.float64()), ("wall_time", pa.float64()), ("value", pa.float64()),
                            ("special", pa.int8())])

# Import limits. An import is one transaction (all or nothing), so it holds the database's write lock
# while it runs: the limits keep the largest import to about a minute of writing on a laptop CPU (the
# store's other users wait up to storage.database.LOCK_WAIT_S for it) and a few hundred MB of memory
# (metrics are decoded and written IMPORT_BATCH_ROWS at a time). A 30-epoch digits run logs about 2,000
# metric rows; a 1,000-epoch CIFAR-10 run with every metric every 10 steps under 800,000.
MAX_BUNDLE_BYTES = 256 << 20          # the zip file on disk
MAX_MANIFEST_BYTES = 64 << 20         # manifest.json, uncompressed (configs, events)
MAX_METRICS_BYTES = 256 << 20         # metrics.parquet, as stored in the zip
MAX_METRICS_DECODED_BYTES = 512 << 20  # metrics.parquet's columns decoded, as its footer declares
MAX_RUNS = 10_000                     # runs in one bundle
MAX_METRIC_ROWS = 2_000_000           # metric rows in one bundle
MAX_CHECKPOINT_BYTES = 1 << 30        # one kept checkpoint (a ResNet18SI-32 with momentum is ~35 MB)
MAX_CHECKPOINTS_BYTES = 8 << 30       # all kept checkpoints of a bundle (copied to disk, never held in memory)
MAX_JSON_DEPTH = 32                   # nesting of a config, sweep spec or event payload
MAX_INT = 2**63 - 1                   # steps and counts are 64-bit integers in the database
MAX_KEY_CHARS = 128                   # metrics.key is VARCHAR(128)
MAX_REGIME_CHARS = 32                 # runs.regime is VARCHAR(32)
IMPORT_BATCH_ROWS = 50_000            # metric rows decoded, checked and written at a time
# Reading a bundle takes at most about MEMORY_PER_BUNDLE_BYTE times its size plus MEMORY_BASE_BYTES of
# memory: a few hundred KB of zip can inflate to a manifest whose parse would take gigabytes. The
# manifest is decompressed in chunks and the memory its parse would take (MEMORY_PER_JSON_TOKEN per
# brace, bracket, comma or colon, plus twice its text) is counted as it arrives; metrics.parquet is
# already compressed and is stored as it is, so a ratio above MAX_METRICS_RATIO is no bundle of ours.
MEMORY_PER_BUNDLE_BYTE = 8
MEMORY_BASE_BYTES = 150 << 20
MEMORY_PER_JSON_TOKEN = 80            # measured: at most ~64 bytes of Python objects per token ({"a":{}})
MAX_METRICS_RATIO = 4                 # metrics.parquet's size over its compressed size in the zip

_UID = re.compile(r"[0-9a-f]{32}")


def _count(v) -> bool:
    return type(v) is int and 0 <= v <= MAX_INT


def _time(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _json_object(v) -> bool:
    return type(v) is dict and json_depth(v) <= MAX_JSON_DEPTH


def _maybe(check):
    return lambda v: v is None or check(v)


_COUNT = "a whole number from 0 to 2**63-1"
_TIME = "a finite number"
_OBJECT = f"a JSON object nested at most {MAX_JSON_DEPTH} deep"
# field -> (check, what it must be): every field of a run, event and sweep entry is checked
_RUN_FIELDS = {
    "uid": (lambda v: type(v) is str and _UID.fullmatch(v) is not None, "32 hex digits"),
    "name": (lambda v: type(v) is str and "\x00" not in v and len(v) <= 200, "a string of at most 200 characters "
             "without NUL"),
    "config": (_json_object, _OBJECT),
    "status": (lambda v: type(v) is str and v in STATUSES, f"one of {', '.join(STATUSES)}"),
    "regime": (_maybe(lambda v: type(v) is str and len(v) <= MAX_REGIME_CHARS),
               f"null or at most {MAX_REGIME_CHARS} characters"),
    "tags": (lambda v: type(v) is list and all(type(tag) is str and "\x00" not in tag for tag in v),
             "a list of strings without NUL"),
    "created_at": (_time, _TIME),
    "started_at": (_maybe(_time), f"null or {_TIME}"),
    "finished_at": (_maybe(_time), f"null or {_TIME}"),
    "device": (_maybe(lambda v: type(v) is str), "null or a string"),
    "error": (_maybe(lambda v: type(v) is str), "null or a string"),
    "step": (_count, _COUNT),
    "total_steps": (_maybe(_count), f"null or {_COUNT}"),
    "events": (lambda v: type(v) is list, "a list"),
}
_CHECKPOINT_FIELDS = {
    "epoch": (lambda v: _count(v) and v >= 1, "a whole number from 1"),
    "step": (_count, _COUNT),
    "bytes": (lambda v: _count(v) and v <= MAX_CHECKPOINT_BYTES, "at most MAX_CHECKPOINT_BYTES"),
}
_EVENT_FIELDS = {
    "step": (_count, _COUNT),
    "kind": (lambda v: type(v) is str and v in EVENT_KINDS, f"one of {', '.join(EVENT_KINDS)}"),
    "payload": (_json_object, _OBJECT),
    "created_at": (_time, _TIME),
}
_SWEEP_FIELDS = {
    "uid": _RUN_FIELDS["uid"],
    "name": _RUN_FIELDS["name"],
    "spec": (_json_object, _OBJECT),
    "created_at": (_time, _TIME),
}


class TooLarge(ValueError):
    """A bundle beyond the import limits."""


class BundleAPI:
    def export_bundle(self, run_ids: list[int], path, *, sweep_id=None, with_checkpoints: bool = False) -> None:
        """Write the runs (or, with sweep_id and no run_ids, all runs of that sweep) to a bundle file,
        with their kept checkpoints if asked. The file appears complete or not at all."""
        with self._read() as conn:
            sweep = None
            if sweep_id is not None:
                row = self._require_sweep(conn, sweep_id)
                sweep = {"uid": row.uid, "name": row.name, "spec": json.loads(row.spec),
                         "created_at": row.created_at}
                if not run_ids:
                    run_ids = conn.execute(select(runs.c.id).where(runs.c.sweep_id == row.id)
                                           .order_by(runs.c.id)).scalars().all()
            if not run_ids:
                raise StoreError("nothing to bundle: give run ids, or a sweep that has runs")
            run_rows = [self._require_run(conn, run_id) for run_id in dict.fromkeys(run_ids)]
            uid_of = {row.id: row.uid for row in run_rows}
            event_rows = conn.execute(select(events).where(events.c.run_id.in_(list(uid_of)))
                                      .order_by(events.c.step, events.c.id)).all()
            metric_rows = conn.execute(
                select(metrics.c.run_id, metrics.c.key, metrics.c.step, metrics.c.epoch, metrics.c.wall_time,
                       metrics.c.value, metrics.c.special)
                .where(metrics.c.run_id.in_(list(uid_of)))
                .order_by(metrics.c.run_id, metrics.c.key, metrics.c.step)).all()
        entries = [_manifest_run(row, [e for e in event_rows if e.run_id == row.id]) for row in run_rows]
        files = {}
        if with_checkpoints:
            for row, entry in zip(run_rows, entries):
                entry["checkpoints"] = []
                for kept in self.checkpoints(row.id):
                    member = f"checkpoints/{row.uid}/e{kept.epoch}.pt"
                    if not self.artifacts.exists(kept.path):
                        raise StoreError(f"run {row.id}'s kept checkpoint {kept.path} is missing from the artifact "
                                         f"root {self.artifacts.root}: put it back, or bundle without "
                                         "--with-checkpoints")
                    files[member] = kept.path
                    entry["checkpoints"].append({"epoch": kept.epoch, "step": kept.step,
                                                 "bytes": self.artifacts.size(kept.path)})
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, "sweep": sweep, "runs": entries}
        write_bundle(path, manifest, _metrics_table(metric_rows, uid_of), files,
                     self.artifacts if files else None)

    def import_bundle(self, path, *, check_config=None, checkpoint_limit=None, check_checkpoint=None) -> list[int]:
        """Add a bundle's runs under new ids (uids kept) in one transaction; returns the new ids.
        Imported runs are data (see the module docstring): never claimable, and a status that had not
        ended becomes `interrupted`. Resume checkpoint fields are cleared (a run's resume point does not
        travel); kept checkpoints the bundle carries are written into this store's artifact root.
        check_config(config): raises (with a one-line message) for a run config `train` would refuse;
        the engine passes its own validation (this package never imports the engine).
        checkpoint_limit(config): the most bytes a checkpoint of that config's model can take; a bundled
        checkpoint declared larger is refused before anything is copied. check_checkpoint(config, source):
        raises for a copied checkpoint (source: its local path or its bytes in a buffer) that is not of
        that config's model (another architecture)."""
        manifest, parquet = read_bundle(path)
        for index, entry in enumerate(manifest["runs"]):
            if check_config is not None:
                try:
                    check_config(entry["config"])
                except Exception as exc:
                    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    raise _not_a_bundle(path, ValueError(f"run #{index} has a config `train` would refuse: "
                                                         f"{reason}")) from None
            limit = checkpoint_limit(entry["config"]) if checkpoint_limit is not None else None
            for item in entry.get("checkpoints") or []:
                if limit is not None and item["bytes"] > limit:
                    raise _not_a_bundle(path, ValueError(
                        f"run #{index} has a checkpoint of {item['bytes']:,} bytes, more than its model can take "
                        f"({limit:,})"))
        now = time.time()
        written: list[str] = []
        artifacts = self.artifacts if any(e.get("checkpoints") for e in manifest["runs"]) else None
        try:
            return self._import(path, manifest, parquet, now, written, check_checkpoint, artifacts)
        except BaseException:
            for key in written:      # nothing half-imported: the transaction rolled back, files go too
                artifacts.delete(key)
            raise

    def _import(self, path, manifest: dict, parquet, now: float, written: list[str], check_checkpoint=None,
                artifacts=None) -> list[int]:
        with self._write() as conn:
            for entry in manifest["runs"]:
                existing = conn.execute(select(runs.c.id).where(runs.c.uid == entry["uid"])).scalar()
                if existing is not None:
                    raise StoreError(f"run {entry['uid']} is already in this database as run {existing}: "
                                     f"delete run {existing} first to import it again")
            sweep_id = _import_sweep(conn, manifest["sweep"])
            new_ids = {}
            for entry in manifest["runs"]:
                row = _run_row(entry, sweep_id, now)
                run_id = conn.execute(insert(runs).values(row)).inserted_primary_key[0]
                new_ids[entry["uid"]] = run_id
                _insert_events(conn, run_id, entry["events"])
                if row["status"] != entry["status"]:   # the bundle's claim stays as history
                    _insert_events(conn, run_id, [{"step": entry["step"], "kind": "status", "created_at": now,
                                                   "payload": {"status": row["status"],
                                                               "bundle_status": entry["status"]}}])
            try:
                _insert_metrics(conn, parquet, new_ids)
            except TooLarge as exc:
                raise StoreError(f"{path} is over an import limit ({exc}): split it into smaller bundles, "
                                 "e.g. one per run") from None
            except (ValueError, TypeError, pa.ArrowException) as exc:
                raise _not_a_bundle(path, exc) from None
            except IntegrityError:
                raise _not_a_bundle(path, ValueError(f"{METRICS_NAME} has a (run, key, step) twice")) from None
            for entry in manifest["runs"]:
                _import_checkpoints(conn, path, entry, new_ids[entry["uid"]], artifacts, written, now,
                                    check_checkpoint)
        return list(new_ids.values())


def write_bundle(path, manifest: dict, table: pa.Table, files: dict[str, str] | None = None, artifacts=None) -> None:
    """Write the bundle file (with `files`: zip member name -> artifact key to store, read from
    `artifacts`); it appears complete or not at all (write_atomically)."""
    def write(temporary: Path) -> None:
        parquet = io.BytesIO()
        pq.write_table(table, parquet)
        with zipfile.ZipFile(temporary, "x", allowZip64=True) as archive:
            archive.writestr(MANIFEST_NAME, json.dumps(manifest, indent=1), compress_type=zipfile.ZIP_DEFLATED)
            archive.writestr(METRICS_NAME, parquet.getvalue())  # parquet is compressed already
            for member, key in (files or {}).items():          # torch files are zip archives already
                source = artifacts.source(key, "a kept checkpoint")
                if isinstance(source, str):
                    archive.write(source, member)
                else:
                    with archive.open(member, "w", force_zip64=True) as sink:
                        shutil.copyfileobj(source, sink, 1 << 20)

    write_atomically(path, write, what="the bundle", fix="choose a writable --out path")


def _import_checkpoints(conn, path, entry: dict, run_id: int, artifacts, written: list[str], now: float,
                        check=None) -> None:
    """Copy the entry's kept checkpoints out of the bundle into the artifact store (streamed, each within
    its declared size) and record their keys for the new run."""
    kept = entry.get("checkpoints") or []
    if not kept:
        return
    with zipfile.ZipFile(path) as archive:
        for item in kept:
            key = f"runs/{run_id}/epoch-{item['epoch']}-imported.pt"
            info = archive.getinfo(f"checkpoints/{entry['uid']}/e{item['epoch']}.pt")
            if info.file_size != item["bytes"]:
                raise _not_a_bundle(path, ValueError(f"a checkpoint of run {entry['uid']} is not the size its "
                                                     "manifest says"))
            written.append(key)
            with archive.open(info) as source:
                try:
                    artifacts.put(key, source, limit=item["bytes"], what="a checkpoint")
                except ValueError as exc:
                    raise _not_a_bundle(path, exc) from None
            if check is not None:
                try:
                    check(entry["config"], artifacts.source(key, "the imported checkpoint"))
                except Exception as exc:
                    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    raise _not_a_bundle(path, ValueError(f"the checkpoint of epoch {item['epoch']} of run "
                                                         f"{entry['uid']} does not fit its config: {reason}")) from None
            conn.execute(insert(checkpoints).values(run_id=run_id, epoch=item["epoch"], step=item["step"],
                                                    path=key, bytes=item["bytes"], created_at=now))


def read_bundle(path) -> tuple[dict, pq.ParquetFile]:
    """The checked manifest and the metrics file (its rows are checked as they are imported);
    StoreError (one line) for anything else, before anything is written."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path} is not a file: give the path of a bundle made with `python -m engine bundle`")
    try:
        _limit(path.stat().st_size, MAX_BUNDLE_BYTES + MAX_CHECKPOINTS_BYTES, "the bundle file",
               "MAX_BUNDLE_BYTES + MAX_CHECKPOINTS_BYTES")
        budget = MEMORY_PER_BUNDLE_BYTE * path.stat().st_size + MEMORY_BASE_BYTES
        with zipfile.ZipFile(path) as archive:
            manifest = json.loads(_manifest_text(archive, budget))
            _check_manifest(manifest, path)
            info = archive.getinfo(METRICS_NAME)
            if info.file_size > MAX_METRICS_RATIO * info.compress_size + (64 << 10):
                raise ValueError(f"{METRICS_NAME} is compressed {info.file_size / max(1, info.compress_size):,.0f} "
                                 "times in the zip: a bundle stores its parquet file as it is")
            parquet = pq.ParquetFile(io.BytesIO(_member(archive, METRICS_NAME, MAX_METRICS_BYTES,
                                                        "MAX_METRICS_BYTES")))
        _check_metrics_file(parquet)
    except TooLarge as exc:
        raise StoreError(f"{path} is over an import limit ({exc}): split it into smaller bundles, "
                         "e.g. one per run") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, KeyError, ValueError, TypeError, OSError, RecursionError,
            pa.ArrowException) as exc:
        raise _not_a_bundle(path, exc) from None
    return manifest, parquet


def _not_a_bundle(path, exc: BaseException) -> StoreError:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, RecursionError):
        reason = f"JSON nested too deep (at most {MAX_JSON_DEPTH} levels are read)"
    return StoreError(f"{path} is not a spherelab bundle ({reason}): make one with `python -m engine bundle`")


def _limit(size: int, limit: int, what: str, name: str) -> None:
    if size > limit:
        raise TooLarge(f"{what} is {_size(size)}, more than the {_size(limit)} allowed by {name}")


def _size(n: int) -> str:
    return f"{n:,} bytes"


def _member(archive: zipfile.ZipFile, name: str, limit: int, limit_name: str) -> bytes:
    """A member's bytes, never more than `limit` of them (the size in the zip directory can lie)."""
    info = archive.getinfo(name)
    _limit(info.file_size, limit, name, limit_name)
    with archive.open(info) as member:
        data = member.read(limit + 1)
    _limit(len(data), limit, name, limit_name)
    return data


def _manifest_text(archive: zipfile.ZipFile, budget: int) -> bytes:
    """manifest.json's bytes, decompressed a chunk at a time: refused (TooLarge) as soon as the memory
    its parse would take passes `budget`, or its size MAX_MANIFEST_BYTES, before json.loads runs."""
    info = archive.getinfo(MANIFEST_NAME)
    _limit(info.file_size, MAX_MANIFEST_BYTES, MANIFEST_NAME, "MAX_MANIFEST_BYTES")
    chunks, size, tokens = [], 0, 0
    with archive.open(info) as member:
        while chunk := member.read(1 << 20):
            size += len(chunk)
            tokens += chunk.count(b"{") + chunk.count(b"[") + chunk.count(b",") + chunk.count(b":")
            _limit(size, MAX_MANIFEST_BYTES, MANIFEST_NAME, "MAX_MANIFEST_BYTES")
            needed = MEMORY_PER_JSON_TOKEN * tokens + 2 * size
            if needed > budget:
                raise TooLarge(f"reading {MANIFEST_NAME} would take over {needed >> 20:,} MB of memory, more than "
                               f"the {budget >> 20:,} MB allowed for a bundle this size "
                               "(MEMORY_PER_BUNDLE_BYTE x its size + MEMORY_BASE_BYTES)")
            chunks.append(chunk)
    return b"".join(chunks)


def json_depth(obj) -> int:
    """Nesting depth of JSON data (a scalar is 0, {} is 1), without recursion; stops counting once
    past MAX_JSON_DEPTH."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            if deepest > MAX_JSON_DEPTH:
                return deepest
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _check_manifest(manifest, path: Path) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{MANIFEST_NAME} does not say format {FORMAT!r}")
    version = manifest.get("version")
    if not _count(version):
        raise ValueError(f"{MANIFEST_NAME} has no format version")
    if version > FORMAT_VERSION:
        raise StoreError(f"{path} is a version {version} bundle, newer than this spherelab reads "
                         f"({FORMAT_VERSION}): upgrade spherelab")
    if manifest.get("sweep") is not None:
        _check_fields(manifest["sweep"], _SWEEP_FIELDS, "the sweep")
    if not isinstance(manifest.get("runs"), list):
        raise ValueError(f"{MANIFEST_NAME} has no list of runs")
    if len(manifest["runs"]) > MAX_RUNS:
        raise TooLarge(f"{len(manifest['runs']):,} runs, more than the {MAX_RUNS:,} allowed by MAX_RUNS")
    total = 0
    for index, entry in enumerate(manifest["runs"]):
        what = f"run #{index}"
        _check_fields(entry, _RUN_FIELDS, what)
        for event in entry["events"]:
            _check_fields(event, _EVENT_FIELDS, f"an event of {what}")
        kept = entry.get("checkpoints", [])
        if not isinstance(kept, list):
            raise ValueError(f"{what} has checkpoints that are not a list")
        for item in kept:
            _check_fields(item, _CHECKPOINT_FIELDS, f"a checkpoint of {what}")
            total += item["bytes"]
        if len({item["epoch"] for item in kept}) != len(kept):
            raise ValueError(f"{what} has two checkpoints of one epoch")
    if total > MAX_CHECKPOINTS_BYTES:
        raise TooLarge(f"checkpoints of {_size(total)}, more than the {_size(MAX_CHECKPOINTS_BYTES)} allowed by "
                       "MAX_CHECKPOINTS_BYTES")
    uids = [entry["uid"] for entry in manifest["runs"]]
    if len(set(uids)) != len(uids):
        raise ValueError("a run uid appears twice")


def _check_fields(entry, fields: dict, what: str) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"{what} is not a JSON object")
    for field, (check, expected) in fields.items():
        if field not in entry:
            raise ValueError(f"{what} has no {field!r}")
        if not check(entry[field]):
            raise ValueError(f"{what} has a {field!r} that is not {expected}")


def _check_metrics_file(parquet: pq.ParquetFile) -> None:
    meta = parquet.metadata
    if meta.num_rows > MAX_METRIC_ROWS:
        raise TooLarge(f"{meta.num_rows:,} metric rows, more than the {MAX_METRIC_ROWS:,} allowed by MAX_METRIC_ROWS")
    decoded = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    _limit(decoded, MAX_METRICS_DECODED_BYTES, f"{METRICS_NAME} decoded", "MAX_METRICS_DECODED_BYTES")
    missing = set(METRICS_SCHEMA.names) - set(parquet.schema_arrow.names)
    if missing:
        raise ValueError(f"{METRICS_NAME} has no column(s) {', '.join(sorted(missing))}")


def _metric_batches(parquet: pq.ParquetFile, uids: pa.Array):
    """The metric rows, IMPORT_BATCH_ROWS at a time, each batch checked (ValueError if bad)."""
    rows = 0
    for batch in parquet.iter_batches(batch_size=IMPORT_BATCH_ROWS, columns=METRICS_SCHEMA.names):
        rows += batch.num_rows          # counted as they arrive: the footer's count can lie
        if rows > MAX_METRIC_ROWS:
            raise TooLarge(f"over {MAX_METRIC_ROWS:,} metric rows, the most MAX_METRIC_ROWS allows")
        table = pa.Table.from_batches([batch]).select(METRICS_SCHEMA.names).cast(METRICS_SCHEMA)
        if table.num_rows == 0:
            continue
        for name in ("run_uid", "key", "step", "epoch", "wall_time", "special"):
            if table[name].null_count:
                raise ValueError(f"{METRICS_NAME} has empty {name} cells")
        if not pc.all(pc.is_in(table["run_uid"], value_set=uids)).as_py():
            raise ValueError(f"{METRICS_NAME} has metrics of runs not in the manifest")
        lengths = pc.utf8_length(table["key"])
        if pc.min(lengths).as_py() < 1 or pc.max(lengths).as_py() > MAX_KEY_CHARS:
            raise ValueError(f"{METRICS_NAME} has a metric key that is empty or over {MAX_KEY_CHARS} characters")
        if pc.min(table["step"]).as_py() < 0:
            raise ValueError(f"{METRICS_NAME} has a negative step")
        times = np.concatenate([table[name].to_numpy() for name in ("epoch", "wall_time")])
        special = table["special"].to_numpy()
        value = table["value"].to_numpy(zero_copy_only=False)
        if not np.isfinite(times).all():
            raise ValueError(f"{METRICS_NAME} has an epoch or wall_time that is not a finite number")
        if not np.isin(special, (0, 1, 2, 3)).all() or not np.isfinite(value[special == 0]).all():
            raise ValueError(f"{METRICS_NAME} has values that do not match their special codes")
        yield table


def _manifest_run(row, event_rows) -> dict:
    entry = {key: row._mapping[key] for key in RUN_KEYS}
    entry["config"] = json.loads(row.config)
    entry["tags"] = json.loads(row.tags)
    entry["events"] = [{"step": e.step, "kind": e.kind, "payload": json.loads(e.payload),
                        "created_at": e.created_at} for e in event_rows]
    return entry


def _metrics_table(rows, uid_of: dict[int, str]) -> pa.Table:
    columns = list(zip(*rows)) if rows else [()] * len(METRICS_SCHEMA)
    columns[0] = [uid_of[run_id] for run_id in columns[0]]
    return pa.table([pa.array(column, type=field.type) for column, field in zip(columns, METRICS_SCHEMA)],
                    schema=METRICS_SCHEMA)


def _insert_events(conn, run_id: int, entries: list[dict]) -> None:
    if entries:
        conn.execute(insert(events), [
            dict(run_id=run_id, step=e["step"], kind=e["kind"], payload=to_json(e["payload"], "event payload"),
                 created_at=e["created_at"]) for e in entries])


def _insert_metrics(conn, parquet: pq.ParquetFile, new_ids: dict[str, int]) -> None:
    uids = pa.array(list(new_ids), type=pa.string())
    ids = np.array(list(new_ids.values()), dtype=np.int64)
    for table in _metric_batches(parquet, uids):
        columns = table.to_pydict()
        columns["run_id"] = ids[pc.index_in(table["run_uid"], value_set=uids).to_numpy()].tolist()
        del columns["run_uid"]
        columns["value"] = [v if code == 0 else None for v, code in zip(columns["value"], columns["special"])]
        conn.execute(insert(metrics), [dict(zip(columns, row)) for row in zip(*columns.values())])


def _import_sweep(conn, sweep: dict | None) -> int | None:
    """The target's sweep with that uid (runs of one sweep arriving in several bundles), else a new one."""
    if sweep is None:
        return None
    existing = conn.execute(select(sweeps.c.id).where(sweeps.c.uid == sweep["uid"])).scalar()
    if existing is not None:
        return existing
    row = dict(uid=sweep["uid"], name=sweep["name"], spec=to_json(sweep["spec"], "sweep spec"),
               created_at=sweep["created_at"])
    return conn.execute(insert(sweeps).values(row)).inserted_primary_key[0]


def _run_row(entry: dict, sweep_id: int | None, now: float) -> dict:
    row = {key: entry[key] for key in RUN_KEYS}
    status = entry["status"] if entry["status"] in TERMINAL_STATUSES else "interrupted"
    row.update(status=status, imported_at=now, config=to_json(entry["config"], "run config"),
               tags=to_json(entry["tags"], "tags"), sweep_id=sweep_id, heartbeat_at=None, worker_id=None,
               claim=None, checkpoint_path=None, checkpoint_step=None)
    return row
