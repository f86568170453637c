"""Metric rows: logging (upsert on run/key/step) and the reads charts and exports use."""

import numpy as np
import pandas as pd
from sqlalchemy import and_, func, select

from . import nonfinite
from .database import as_id
from .downsample import downsample_extremes
from .errors import StoreError
from .schema import metrics
from .upsert import upsert
from .writer import MetricWriter

LONG_COLUMNS = ("run_id", "key", "step", "epoch", "wall_time", "value")


class MetricsAPI:
    def log_metrics(self, run_id, rows) -> None:
        """Store rows of (step, epoch, wall_time, {key: value}) in one transaction. A (run, key, step)
        already stored is overwritten. Values may be nan, inf, -inf (or None, stored as nan)."""
        records = metric_records(as_id(run_id), rows)
        if not records:
            return
        with self._write() as conn:
            self._run_for_write(conn, run_id)
            upsert(conn, metrics, records, key=("run_id", "key", "step"),
                   replace=("epoch", "wall_time", "value", "special"))

    def metric_writer(self, run_id, *, flush_every_s: float = 1.0, max_rows: int = 5000) -> MetricWriter:
        with self._read() as conn:
            run = self._require_run(conn, run_id)
        return MetricWriter(self, run.id, flush_every_s=flush_every_s, max_rows=max_rows)

    def metric_keys(self, run_id) -> list[str]:
        with self._read() as conn:
            run = self._require_run(conn, run_id)
            keys = conn.execute(select(metrics.c.key).where(metrics.c.run_id == run.id).distinct())
            return sorted(keys.scalars())

    def read_metrics(self, run_id, keys=None, *, since_step=None, max_points=None) -> pd.DataFrame:
        """Wide frame, one row per logged step (ascending): step, epoch, wall_time, then one column per
        key (the keys asked for, in that order, else all keys sorted). A key not logged at a step reads
        NaN there. since_step S returns only steps > S (incremental live reads). max_points thins each
        key with downsample_extremes and keeps every step any key needs, with all keys' values there."""
        keys = _key_list(keys)
        with self._read() as conn:
            run = self._require_run(conn, run_id)
            long = _read_long(conn, [run.id], keys, since_step)
        if max_points is not None:
            kept_steps = downsample_extremes(long, max_points, by=("key",))["step"].unique()
            long = long[long["step"].isin(kept_steps)]
        return _to_wide(long, keys)

    def read_metrics_many(self, run_ids, keys=None, *, max_points=None) -> pd.DataFrame:
        """Long frame for many runs in one query: run_id, key, step, epoch, wall_time, value, sorted
        by run_id, key, step. max_points thins each (run, key) series with downsample_extremes."""
        keys = _key_list(keys)
        with self._read() as conn:
            ids = [self._require_run(conn, run_id).id for run_id in run_ids]
            long = _read_long(conn, ids, keys, None)
        long = downsample_extremes(long, max_points, by=("run_id", "key"))
        return long[list(LONG_COLUMNS)].reset_index(drop=True)

    def latest_metrics(self, run_id) -> dict[str, tuple[int, float]]:
        """key -> (step, value) at the last step that key was logged."""
        with self._read() as conn:
            run = self._require_run(conn, run_id)
            mine = metrics.c.run_id == run.id
            last = (select(metrics.c.key, func.max(metrics.c.step).label("step"))
                    .where(mine).group_by(metrics.c.key).subquery())
            rows = conn.execute(
                select(metrics.c.key, metrics.c.step, metrics.c.value, metrics.c.special)
                .join_from(metrics, last, and_(metrics.c.key == last.c.key, metrics.c.step == last.c.step))
                .where(mine)).all()
        return {key: (step, nonfinite.decode_one(value, special)) for key, step, value, special in rows}

    def last_step(self, run_id) -> int | None:
        """The highest step with a stored metric, None if there is none."""
        with self._read() as conn:
            run = self._require_run(conn, run_id)
            return conn.execute(select(func.max(metrics.c.step)).where(metrics.c.run_id == run.id)).scalar()


def metric_records(run_id: int | None, rows) -> list[dict]:
    records = []
    for step, epoch, wall_time, values in rows:
        step, epoch, wall_time = int(step), float(epoch), float(wall_time)
        for key, raw in values.items():
            if not isinstance(key, str) or not key:
                raise StoreError(f"metric key {key!r} is not a non-empty string: use names like 'train_loss'")
            value, special = nonfinite.encode(raw)
            records.append({"run_id": run_id, "key": key, "step": step, "epoch": epoch,
                            "wall_time": wall_time, "value": value, "special": special})
    return records


def _key_list(keys) -> list[str] | None:
    return [keys] if isinstance(keys, str) else None if keys is None else list(keys)


def _read_long(conn, run_ids: list[int], keys: list[str] | None, since_step) -> pd.DataFrame:
    """Long frame with decoded values, sorted by run_id, key, step."""
    query = select(metrics.c.run_id, metrics.c.key, metrics.c.step, metrics.c.epoch, metrics.c.wall_time,
                   metrics.c.value, metrics.c.special).where(metrics.c.run_id.in_(run_ids))
    if keys is not None:
        query = query.where(metrics.c.key.in_(keys))
    if since_step is not None:
        query = query.where(metrics.c.step > int(since_step))
    rows = conn.execute(query.order_by(metrics.c.run_id, metrics.c.key, metrics.c.step)).all()
    columns = list(zip(*rows)) if rows else [()] * 7
    return pd.DataFrame({
        "run_id": np.array(columns[0], dtype=np.int64),
        "key": pd.Series(columns[1], dtype="str"),
        "step": np.array(columns[2], dtype=np.int64),
        "epoch": np.array(columns[3], dtype=np.float64),
        "wall_time": np.array(columns[4], dtype=np.float64),
        "value": nonfinite.decode(np.array(columns[5], dtype=np.float64),  # NULL -> nan, then restored
                                  np.array(columns[6], dtype=np.int64)),
    })


def _to_wide(long: pd.DataFrame, keys: list[str] | None) -> pd.DataFrame:
    """One row per step (ascending): step, epoch and wall_time (the largest any key logged there), then
    one float column per key (NaN where it was not logged). Built with numpy scatter, not a pandas
    pivot: this runs for every live analysis and every chart read (measured 15 ms -> 1 ms)."""
    names = list(keys) if keys is not None else sorted(long["key"].unique())
    steps, row = np.unique(long["step"].to_numpy(np.int64), return_inverse=True)
    column = pd.Index(names).get_indexer(long["key"])
    wanted = column >= 0  # keys the caller did not ask for are dropped, as a pivot + reindex would
    table = np.full((len(steps), len(names)), np.nan)
    table[row[wanted], column[wanted]] = long["value"].to_numpy(np.float64)[wanted]
    times = np.full((len(steps), 2), -np.inf)
    np.maximum.at(times, row, long[["epoch", "wall_time"]].to_numpy(np.float64))
    wide = pd.DataFrame(table, columns=names)
    wide.insert(0, "step", steps)
    wide.insert(1, "epoch", times[:, 0])
    wide.insert(2, "wall_time", times[:, 1])
    return wide
