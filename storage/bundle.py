"""Bundles: saved runs as one portable zip file (manifest.json + metrics.parquet), to share a run or a
sweep with a colleague. Checkpoints are not included."""

import io
import json
import re
import uuid
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import insert, select

from .errors import StoreError
from .jsontext import to_json
from .schema import EVENT_KINDS, STATUSES, events, metrics, runs, sweeps

FORMAT = "spherelab-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
METRICS_NAME = "metrics.parquet"
RUN_KEYS = ("uid", "name", "config", "status", "regime", "tags", "created_at", "started_at", "finished_at",
            "device", "error", "step", "total_steps")
METRICS_SCHEMA = pa.schema([("run_uid", pa.string()), ("key", pa.string()), ("step", pa.int64()),
                            ("epoch", pa.float64()), ("wall_time", pa.float64()), ("value", pa.float64()),
                            ("special", pa.int8())])

_NUMBER, _NONE = (int, float), type(None)
_RUN_TYPES = {"uid": (str,), "name": (str,), "config": (dict,), "status": (str,), "regime": (str, _NONE),
              "tags": (list,), "created_at": _NUMBER, "started_at": (*_NUMBER, _NONE),
              "finished_at": (*_NUMBER, _NONE), "device": (str, _NONE), "error": (str, _NONE), "step": (int,),
              "total_steps": (int, _NONE), "events": (list,)}
_EVENT_TYPES = {"step": (int,), "kind": (str,), "payload": (dict,), "created_at": _NUMBER}
_SWEEP_TYPES = {"uid": (str,), "name": (str,), "spec": (dict,), "created_at": _NUMBER}
_UID = re.compile(r"[0-9a-f]{32}")


class BundleAPI:
    def export_bundle(self, run_ids: list[int], path, *, sweep_id=None) -> None:
        """Write the runs (or, with sweep_id and no run_ids, all runs of that sweep) to a bundle file.
        The file appears complete or not at all."""
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
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, "sweep": sweep, "runs": entries}
        write_bundle(path, manifest, _metrics_table(metric_rows, uid_of))

    def import_bundle(self, path) -> list[int]:
        """Add a bundle's runs under new ids (uids kept) in one transaction; returns the new ids.
        Runs keep their status; checkpoint fields are cleared (checkpoints do not travel)."""
        manifest, table = read_bundle(path)
        with self._write() as conn:
            for entry in manifest["runs"]:
                existing = conn.execute(select(runs.c.id).where(runs.c.uid == entry["uid"])).scalar()
                if existing is not None:
                    raise StoreError(f"run {entry['uid']} is already in this database as run {existing}: "
                                     f"delete run {existing} first to import it again")
            sweep_id = _import_sweep(conn, manifest["sweep"])
            new_ids = {}
            for entry in manifest["runs"]:
                run_id = conn.execute(insert(runs).values(_run_row(entry, sweep_id))).inserted_primary_key[0]
                new_ids[entry["uid"]] = run_id
                _insert_events(conn, run_id, entry["events"])
            _insert_metrics(conn, table, new_ids)
        return list(new_ids.values())


def write_bundle(path, manifest: dict, table: pa.Table) -> None:
    """Write to a temporary file beside `path`, then rename: no half-written bundle is ever left."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        parquet = io.BytesIO()
        pq.write_table(table, parquet)
        with zipfile.ZipFile(temporary, "x") as archive:
            archive.writestr(MANIFEST_NAME, json.dumps(manifest, indent=1), compress_type=zipfile.ZIP_DEFLATED)
            archive.writestr(METRICS_NAME, parquet.getvalue())  # parquet is compressed already
        temporary.replace(path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        reason = exc.strerror or exc
        raise StoreError(f"cannot write the bundle {path} ({reason}): choose a writable --out path") from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def read_bundle(path) -> tuple[dict, pa.Table]:
    """The checked manifest and metrics table; StoreError (one line) for anything else."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path} is not a file: give the path of a bundle made with `python -m engine bundle`")
    try:
        with zipfile.ZipFile(path) as archive:
            manifest = json.loads(archive.read(MANIFEST_NAME))
            _check_manifest(manifest, path)
            table = pq.read_table(io.BytesIO(archive.read(METRICS_NAME)))
        table = table.select(METRICS_SCHEMA.names).cast(METRICS_SCHEMA)
        _check_metrics(table, {entry["uid"] for entry in manifest["runs"]})
    except (zipfile.BadZipFile, zlib.error, EOFError, KeyError, ValueError, TypeError, OSError,
            pa.ArrowException) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StoreError(f"{path} is not a spherelab bundle ({reason}): "
                         "make one with `python -m engine bundle`") from None
    return manifest, table


def _check_manifest(manifest, path: Path) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{MANIFEST_NAME} does not say format {FORMAT!r}")
    version = manifest.get("version")
    if not isinstance(version, int):
        raise ValueError(f"{MANIFEST_NAME} has no format version")
    if version > FORMAT_VERSION:
        raise StoreError(f"{path} is a version {version} bundle, newer than this spherelab reads "
                         f"({FORMAT_VERSION}): upgrade spherelab")
    if manifest.get("sweep") is not None:
        _check_fields(manifest["sweep"], _SWEEP_TYPES, "the sweep")
    if not isinstance(manifest.get("runs"), list):
        raise ValueError(f"{MANIFEST_NAME} has no list of runs")
    for index, entry in enumerate(manifest["runs"]):
        what = f"run #{index}"
        _check_fields(entry, _RUN_TYPES, what)
        if not _UID.fullmatch(entry["uid"]):
            raise ValueError(f"{what} has a malformed uid")
        if entry["status"] not in STATUSES:
            raise ValueError(f"{what} has unknown status {entry['status']!r}")
        if not all(isinstance(tag, str) for tag in entry["tags"]):
            raise ValueError(f"{what} has a tag that is not a string")
        for event in entry["events"]:
            _check_fields(event, _EVENT_TYPES, f"an event of {what}")
            if event["kind"] not in EVENT_KINDS:
                raise ValueError(f"{what} has an event of unknown kind {event['kind']!r}")
    uids = [entry["uid"] for entry in manifest["runs"]]
    if len(set(uids)) != len(uids):
        raise ValueError("a run uid appears twice")


def _check_fields(entry, types: dict, what: str) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"{what} is not a JSON object")
    for field, allowed in types.items():
        if field not in entry:
            raise ValueError(f"{what} has no {field!r}")
        if not isinstance(entry[field], allowed) or isinstance(entry[field], bool):
            raise ValueError(f"{what} has a {field!r} of the wrong type")


def _check_metrics(table: pa.Table, uids: set[str]) -> None:
    if table.num_rows == 0:
        return
    for name in ("run_uid", "key", "step", "epoch", "wall_time", "special"):
        if table[name].null_count:
            raise ValueError(f"{METRICS_NAME} has empty {name} cells")
    unknown = set(table["run_uid"].unique().to_pylist()) - uids
    if unknown:
        raise ValueError(f"{METRICS_NAME} has metrics of runs not in the manifest")
    special = table["special"].to_numpy()
    value = table["value"].to_numpy(zero_copy_only=False)
    if not np.isin(special, (0, 1, 2, 3)).all() or not np.isfinite(value[special == 0]).all():
        raise ValueError(f"{METRICS_NAME} has values that do not match their special codes")
    if table.group_by(["run_uid", "key", "step"]).aggregate([]).num_rows != table.num_rows:
        raise ValueError(f"{METRICS_NAME} has a (run, key, step) twice")


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


def _insert_metrics(conn, table: pa.Table, new_ids: dict[str, int]) -> None:
    if table.num_rows == 0:
        return
    columns = table.to_pydict()
    columns["run_id"] = [new_ids[uid] for uid in columns.pop("run_uid")]
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


def _run_row(entry: dict, sweep_id: int | None) -> dict:
    row = {key: entry[key] for key in RUN_KEYS}
    row.update(config=to_json(entry["config"], "run config"), tags=to_json(entry["tags"], "tags"),
               sweep_id=sweep_id, heartbeat_at=None, worker_id=None, checkpoint_path=None, checkpoint_step=None)
    return row
