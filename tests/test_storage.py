"""Storage API against real databases: SQLite files and (where it can start) a real PostgreSQL."""

import json
import math
import os
import sqlite3
import time
import zipfile

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import func, inspect, select, text

from storage import (MetricWriter, RunNotFound, Store, StoreError, default_db_url, downsample_extremes,
                     resolve_db_url)
from storage import migrations
from storage.schema import commands, events, metrics


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request):
    """Here every store test runs on both dialects (conftest's `store` is SQLite only)."""
    if request.param == "sqlite":
        yield request.getfixturevalue("sqlite_store")
        return
    with Store(request.getfixturevalue("postgres_url")) as opened:
        yield opened


def count(store, table, run_id) -> int:
    with store._read() as conn:
        return conn.execute(select(func.count()).select_from(table).where(table.c.run_id == run_id)).scalar()


def one_line(exc) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


# ---------------------------------------------------------------- values

def test_nonfinite_and_finite_values_round_trip(store):
    run = store.create_run({"elr": 1e-3}, name="values")
    finite = [0.1, 1 / 3, -2.5e300, 1e-300, math.pi, 0.0, 123456789.123456789]
    special = [math.nan, math.inf, -math.inf, None]
    store.log_metrics(run, [(i, i / 10, 100.0 + i, {"x": v}) for i, v in enumerate(finite + special)])

    column = store.read_metrics(run)["x"].tolist()
    assert column[:len(finite)] == finite  # bit-exact
    assert math.isnan(column[-4]) and column[-3] == math.inf and column[-2] == -math.inf
    assert math.isnan(column[-1])  # None is stored as nan
    assert store.latest_metrics(run)["x"][0] == len(column) - 1
    long = store.read_metrics_many([run], ["x"])
    assert long["value"].iloc[len(finite) + 1] == math.inf and long["value"].iloc[len(finite) + 2] == -math.inf


def test_nonfinite_kind_survives_the_sqlite_file(tmp_path):
    path = tmp_path / "file.db"
    with Store(path) as first:
        run = first.create_run({}, name="r")
        first.log_metrics(run, [(1, 0.0, 0.0, {"nan": math.nan, "pinf": math.inf, "ninf": -math.inf, "one": 1.0})])
    with Store(f"sqlite:///{path}") as reopened:
        latest = reopened.latest_metrics(run)
    assert math.isnan(latest["nan"][1])
    assert latest["pinf"] == (1, math.inf) and latest["ninf"] == (1, -math.inf) and latest["one"] == (1, 1.0)
    raw = sqlite3.connect(path).execute("SELECT key, value, special FROM metrics ORDER BY key").fetchall()
    assert raw == [("nan", None, 1), ("ninf", None, 3), ("one", 1.0, 0), ("pinf", None, 2)]


def test_log_metrics_replaces_on_the_same_step(store):
    run = store.create_run({}, name="upsert")
    store.log_metrics(run, [(5, 0.5, 1.0, {"loss": math.nan, "acc": 0.1})])
    store.log_metrics(run, [(5, 0.6, 2.0, {"loss": 2.0}), (6, 0.7, 3.0, {"loss": 1.0})])
    frame = store.read_metrics(run)
    assert frame["step"].tolist() == [5, 6]
    assert frame["loss"].tolist() == [2.0, 1.0]  # nan replaced by a finite value: the marker is reset
    assert frame["acc"].iloc[0] == 0.1 and math.isnan(frame["acc"].iloc[1])
    assert frame["wall_time"].tolist() == [2.0, 3.0]
    assert count(store, metrics, run) == 3


def test_read_metrics_wide_since_and_missing_keys(sqlite_store):
    run = sqlite_store.create_run({}, name="wide")
    sqlite_store.log_metrics(run, [(s, s / 4, 10.0 + s, {"train_loss": 1.0 / (s + 1), "elr": 1e-3}) for s in range(8)])
    sqlite_store.log_metrics(run, [(s, s / 4, 10.0 + s, {"sharpness": 50.0 + s}) for s in (0, 4)])

    frame = sqlite_store.read_metrics(run)
    assert list(frame.columns) == ["step", "epoch", "wall_time", "elr", "sharpness", "train_loss"]
    assert frame["step"].dtype == np.int64 and frame["step"].tolist() == list(range(8))
    assert frame["sharpness"].notna().sum() == 2

    later = sqlite_store.read_metrics(run, ["train_loss", "test_acc"], since_step=5)
    assert list(later.columns) == ["step", "epoch", "wall_time", "train_loss", "test_acc"]
    assert later["step"].tolist() == [6, 7] and later["test_acc"].isna().all()
    assert sqlite_store.read_metrics(run, since_step=7).empty
    empty = sqlite_store.read_metrics(sqlite_store.create_run({}, name="none"), ["x"])
    assert list(empty.columns) == ["step", "epoch", "wall_time", "x"] and empty.empty
    assert sqlite_store.metric_keys(run) == ["elr", "sharpness", "train_loss"]
    assert sqlite_store.last_step(run) == 7


def test_read_metrics_many_is_long_and_sorted(store):
    runs = [store.create_run({}, name=f"r{i}") for i in range(3)]
    for i, run in enumerate(runs):
        store.log_metrics(run, [(s, s, s, {"loss": i + s / 10, "acc": s / 10}) for s in range(5)])
    long = store.read_metrics_many(runs[::-1], ["loss"])
    assert list(long.columns) == ["run_id", "key", "step", "epoch", "wall_time", "value"]
    assert len(long) == 15 and set(long["key"]) == {"loss"}
    assert long["run_id"].tolist() == sorted(long["run_id"].tolist())
    assert long[long["run_id"] == runs[2]]["value"].tolist() == pytest.approx([2.0, 2.1, 2.2, 2.3, 2.4])


# ---------------------------------------------------------------- downsampling

def noisy_series(n=10_000, seed=0):
    rng = np.random.default_rng(seed)
    values = 1.0 + 0.05 * rng.standard_normal(n)
    values[int(n * 0.6123)] = 40.0  # a loss spike
    values[int(n * 0.2345)] = -3.0  # a dip
    return pd.DataFrame({"key": "train_loss", "step": np.arange(n), "value": values})


def test_downsample_keeps_spikes_ends_and_bounds_the_size():
    frame = noisy_series()
    thinned = downsample_extremes(frame, 400)
    assert len(thinned) <= 400
    kept = set(thinned["step"])
    assert {0, 9_999, 6_123, 2_345} <= kept
    assert thinned["value"].max() == 40.0 and thinned["value"].min() == -3.0
    assert thinned.index.is_monotonic_increasing  # rows keep their order


def test_downsample_keeps_nonfinite_points_and_short_series():
    frame = noisy_series()
    frame.loc[[100, 200, 300], "value"] = [math.nan, math.inf, -math.inf]
    short = pd.DataFrame({"key": "acc", "step": np.arange(50), "value": np.linspace(0, 1, 50)})
    both = pd.concat([frame, short], ignore_index=True)
    thinned = downsample_extremes(both, 100)
    assert {100, 200, 300} <= set(thinned[thinned["key"] == "train_loss"]["step"])
    assert len(thinned[thinned["key"] == "acc"]) == 50
    assert len(thinned[thinned["key"] == "train_loss"]) <= 100 + 3


def test_downsample_handles_ties_unsorted_input_and_many_series():
    constant = pd.DataFrame({"run_id": 1, "key": "acc", "step": np.arange(1_000), "value": 1.0})
    assert len(downsample_extremes(constant, 40, by=("run_id", "key"))) <= 40

    rng = np.random.default_rng(1)
    n, n_runs, keys = 10_000, 20, ["train_loss", "elr", "si_norm", "grad_norm", "sharpness"]
    big = pd.DataFrame({"run_id": np.repeat(np.arange(n_runs), n * len(keys)),
                        "key": np.tile(np.repeat(keys, n), n_runs),
                        "step": np.tile(np.arange(n), n_runs * len(keys)),
                        "value": rng.standard_normal(n_runs * len(keys) * n)})
    thinned = downsample_extremes(big, 1_000, by=("run_id", "key"))   # its speed: dashboard.bench
    assert thinned.groupby(["run_id", "key"]).size().max() <= 1_000
    extremes = big.groupby(["run_id", "key"])["value"].agg(["min", "max"])
    pd.testing.assert_frame_equal(thinned.groupby(["run_id", "key"])["value"].agg(["min", "max"]), extremes)
    shuffled = downsample_extremes(big.sample(frac=1.0, random_state=0), 1_000, by=("run_id", "key"))
    assert shuffled.sort_index().equals(thinned)


def test_read_metrics_downsampled_keeps_the_spike(store):
    run = store.create_run({}, name="spiky")
    series = noisy_series(2_000)
    store.log_metrics(run, [(int(s), s / 100, float(s), {"train_loss": v, "elr": 1e-3})
                            for s, v in zip(series["step"], series["value"])])
    frame = store.read_metrics(run, max_points=100)
    assert len(frame) <= 200 and frame["train_loss"].min() == series["value"].min()
    assert frame["train_loss"].notna().all() and frame["elr"].notna().all()  # no holes from thinning
    many = store.read_metrics_many([run], ["train_loss"], max_points=100)
    assert len(many) <= 100 and many["value"].min() == series["value"].min()


# ---------------------------------------------------------------- writer

def test_metric_writer_flushes_by_size_and_on_close(sqlite_store):
    run = sqlite_store.create_run({}, name="writer")
    writer = sqlite_store.metric_writer(run, flush_every_s=3600, max_rows=10)
    for step in range(4):
        writer.log(step, step, step, {"a": step, "b": math.nan, "c": math.inf})  # 3 values a row
    assert sqlite_store.last_step(run) == 3  # the 4th row reached 12 >= 10 values: written
    writer.log(4, 4, 4, {"a": 4.0})
    assert sqlite_store.last_step(run) == 3
    with pytest.raises(RuntimeError), writer:
        raise RuntimeError("training crashed")
    assert sqlite_store.last_step(run) == 4  # leaving the block wrote what was buffered
    assert isinstance(writer, MetricWriter)


def test_metric_writer_flushes_by_time_and_buffers_in_between(sqlite_store):
    run = sqlite_store.create_run({}, name="timer")
    with sqlite_store.metric_writer(run, flush_every_s=0.05, max_rows=10**9) as writer:
        writer.log(0, 0, 0, {"a": 1.0})
        time.sleep(0.06)
        writer.log(1, 0, 0, {"a": 1.0})
        assert sqlite_store.last_step(run) == 1
    with sqlite_store.metric_writer(run, flush_every_s=3600, max_rows=10**9) as writer:
        values = {f"k{i}": 0.5 for i in range(4)}
        for step in range(2, 5_002):
            writer.log(step, 0.0, 0.0, values)
        assert sqlite_store.last_step(run) == 1      # buffered: a log call never touches the database
    assert sqlite_store.last_step(run) == 5_001      # (its cost: BENCHMARKS.md, "SQLite logging")
    assert len(sqlite_store.read_metrics(run, ["k0"]).dropna()) == 5_000


# ---------------------------------------------------------------- runs, events, commands

def test_create_runs_is_atomic_and_validated(store):
    sweep = store.create_sweep("grid", {"elr": [1e-3, 1e-2]})
    ids = store.create_runs([dict(config={"elr": e}, name=f"elr={e}", sweep_id=sweep, tags=["grid"])
                             for e in (1e-3, 1e-2)])
    assert ids == sorted(ids) and store.get_sweep(sweep).run_ids == ids
    with pytest.raises(StoreError, match="unknown run status"):
        store.create_runs([dict(config={}, name="ok"), dict(config={}, name="bad", status="converged")])
    with pytest.raises(StoreError, match="no sweep with id 999"):
        store.create_runs([dict(config={}, name="orphan", sweep_id=999)])
    with pytest.raises(StoreError, match="JSON"):
        store.create_run({"f": object()}, name="x")
    assert [run.id for run in store.list_runs()] == ids[::-1]


def test_status_lifecycle_records_times_and_events(store):
    run = store.create_run({}, name="life", total_steps=200)
    assert store.get_run(run).progress == 0.0
    store.set_status(run, "running")
    started = store.get_run(run).started_at
    assert started is not None and store.get_run(run).heartbeat_at is not None
    store.heartbeat(run, 50)
    assert store.get_run(run).progress == 0.25
    store.update_run(run, regime="chaotic_equilibrium", device="cpu", checkpoint_path="runs/1/resume-c.pt", checkpoint_step=50)
    store.set_status(run, "failed", error="CUDA out of memory")
    info = store.get_run(run)
    assert (info.status, info.error, info.regime, info.checkpoint_step) == ("failed", "CUDA out of memory",
                                                                            "chaotic_equilibrium", 50)
    assert info.finished_at >= started and info.is_terminal
    statuses = [e.payload["status"] for e in store.events(run, kinds=["status"])]
    assert statuses == ["running", "failed"]
    with pytest.raises(StoreError, match="unknown run status 'divergence'"):
        store.set_status(run, "divergence")
    with pytest.raises(StoreError, match="cannot update run field"):
        store.update_run(run, config={})


def test_events_are_ordered_and_filtered(store):
    run = store.create_run({}, name="events")
    store.add_event(run, 30, "spike", {"value": math.inf})
    store.add_event(run, 10, "elr_change", {"from": 1e-3, "to": 1e-2})
    store.add_event(run, 20, "note", {"text": "lecture demo"})
    assert [e.step for e in store.events(run)] == [10, 20, 30]
    assert store.events(run)[2].payload == {"value": math.inf}
    assert [e.kind for e in store.events(run, kinds="note")] == ["note"]
    with pytest.raises(StoreError, match="unknown event kind"):
        store.add_event(run, 1, "whatever")


def test_commands_are_consumed_exactly_once(store):
    run = store.create_run({}, name="cmd", status="running")
    assert store.take_commands(run) == []
    store.send_command(run, "pause")
    store.send_command(run, "set_elr", {"value": 0.01})
    store.send_command(run, "resume")
    taken = store.take_commands(run)
    assert [c.kind for c in taken] == ["pause", "set_elr", "resume"] and taken[1].payload == {"value": 0.01}
    assert store.take_commands(run) == []
    with pytest.raises(StoreError, match="unknown command"):
        store.send_command(run, "explode")
    with pytest.raises(StoreError, match="positive number"):
        store.send_command(run, "set_lr", {"value": -1})
    store.set_status(run, "finished")
    with pytest.raises(StoreError, match="already finished"):
        store.send_command(run, "stop")


def test_cancel_by_status(store):
    queued, running, done = (store.create_run({}, name=n) for n in ("q", "r", "d"))
    store.set_status(running, "running")
    store.set_status(done, "finished")
    store.cancel(queued)
    assert store.get_run(queued).status == "cancelled" and store.get_run(queued).finished_at
    store.cancel(running)
    assert store.get_run(running).status == "running"  # its worker ends it
    assert [c.kind for c in store.take_commands(running)] == ["stop"]
    with pytest.raises(StoreError) as raised:
        store.cancel(done)
    assert one_line(raised).startswith(f"run {done} is already finished")


def test_tags(store):
    run = store.create_run({}, name="tagged", tags=["baseline", " lecture "])
    other = store.create_run({}, name="other", tags=["baseline-2"])
    store.add_tags(run, ["lecture", "sweep-a"])
    assert store.get_run(run).tags == ["baseline", "lecture", "sweep-a"]
    assert [r.id for r in store.list_runs(tag="baseline")] == [run]  # exact tag, not a substring
    assert [r.id for r in store.list_runs(tag="baseline-2")] == [other]
    with pytest.raises(StoreError, match="tag"):
        store.add_tags(run, [""])


def test_list_runs_filters(store):
    sweep = store.create_sweep("s", {})
    a = store.create_run({}, name="ConvNet elr=1e-3", sweep_id=sweep)
    b = store.create_run({}, name="mlp elr=1e-2")
    c = store.create_run({}, name="mlp elr=1e-1", status="running")
    assert [r.id for r in store.list_runs()] == [c, b, a]
    assert [r.id for r in store.list_runs(status="queued")] == [b, a]
    assert [r.id for r in store.list_runs(status=["queued", "running"], name_contains="MLP")] == [c, b]
    assert [r.id for r in store.list_runs(sweep_id=sweep)] == [a]
    assert [r.id for r in store.list_runs(ids=[a, c])] == [c, a]
    assert [s.id for s in store.list_sweeps()] == [sweep] and store.list_sweeps()[0].run_ids == [a]


def test_truncate_after(store):
    run = store.create_run({}, name="resume")
    store.log_metrics(run, [(s, s, s, {"loss": float(s)}) for s in range(10)])
    store.add_event(run, 3, "note")
    store.add_event(run, 8, "spike")
    store.heartbeat(run, 9)
    store.truncate_after(run, 5)
    assert store.read_metrics(run)["step"].tolist() == list(range(6))
    assert [e.step for e in store.events(run)] == [3]
    assert store.get_run(run).step == 5


def test_delete_cascades(store):
    keep = store.create_run({}, name="keep")
    run = store.create_run({}, name="doomed", status="running")
    for target in (keep, run):
        store.log_metrics(target, [(1, 0, 0, {"loss": 1.0})])
        store.add_event(target, 1, "note")
        store.send_command(target, "pause")
    store.delete(run)
    assert [count(store, table, run) for table in (metrics, events, commands)] == [0, 0, 0]
    assert [count(store, table, keep) for table in (metrics, events, commands)] == [1, 1, 1]
    with pytest.raises(RunNotFound):
        store.delete(run)
    assert store.create_run({}, name="next") > run  # ids are never reused


def test_unknown_run_is_one_clear_line(store):
    calls = [lambda: store.get_run(4242), lambda: store.delete(4242), lambda: store.read_metrics(4242),
             lambda: store.log_metrics(4242, [(1, 0, 0, {"a": 1.0})]), lambda: store.send_command(4242, "stop"),
             lambda: store.heartbeat(4242, 1), lambda: store.take_commands(4242), lambda: store.events(4242),
             lambda: store.read_metrics_many([4242], ["a"]), lambda: store.get_run("seven")]
    for call in calls:
        with pytest.raises(RunNotFound) as raised:
            call()
        assert one_line(raised).startswith("no run with id ") and "python -m engine runs" in str(raised.value)


# ---------------------------------------------------------------- workers and claims (one process)

def test_claims_requeue_and_resume(store):
    first, second = store.create_run({}, name="a"), store.create_run({}, name="b")
    claimed = store.claim_next_run("w1")
    assert (claimed.id, claimed.status, claimed.worker_id) == (first, "running", "w1")
    assert store.claim_next_run("w2", run_ids=[first]) is None
    assert store.claim_next_run("w2").id == second
    assert store.claim_next_run("w3") is None

    store.heartbeat(second, 7)
    assert store.requeue_stale(60.0) == []
    for run in (first, second):   # both workers went silent a minute ago
        store.update_run(run, heartbeat_at=time.time() - 61)
    assert sorted(store.requeue_stale(60.0)) == [first, second]
    assert store.events(second)[-1].payload == {"status": "interrupted"}
    resumed = store.claim_interrupted("w4")
    assert (resumed.id, resumed.status, resumed.worker_id) == (first, "running", "w4")


def test_workers(store):
    store.worker_heartbeat("host:1", host="host", pid=1, device="cuda:0", max_parallel=4)
    started = store.live_workers()[0]["started_at"]
    store.worker_heartbeat("host:1", host="host", pid=1, device="cuda:0", max_parallel=8)
    run = store.create_run({}, name="r")
    store.claim_next_run("host:1")
    (worker,) = store.live_workers()
    assert worker["max_parallel"] == 8 and worker["started_at"] == started and worker["run_ids"] == [run]
    assert store.live_workers(max_age_s=-1.0) == []
    store.remove_worker("host:1")
    assert store.live_workers() == []


# ---------------------------------------------------------------- opening databases

def test_fresh_database_has_the_current_schema_version(sqlite_store):
    assert sqlite_store.schema_version == 6 == migrations.current_version()
    journal = sqlite3.connect(sqlite_store.url.removeprefix("sqlite:///")).execute("PRAGMA journal_mode").fetchone()
    assert journal == ("wal",)


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "future.db"
    Store(path).close()
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE meta SET value = '7' WHERE key = 'schema_version'")
    with pytest.raises(StoreError) as raised:
        Store(path)
    assert one_line(raised) == f"database schema version 7 is newer than this spherelab ({migrations.current_version()}): upgrade spherelab"


def test_migration_upgrades_an_older_database(tmp_path, monkeypatch):
    path = tmp_path / "old.db"
    next_version = migrations.current_version() + 1
    with Store(path) as old:
        run = old.create_run({"elr": 1e-3}, name="before", tags=["kept"])
        old.log_metrics(run, [(1, 0.1, 1.0, {"train_loss": math.inf})])

    def add_notes(conn):  # what a real next version could look like
        conn.execute(text("ALTER TABLE runs ADD COLUMN notes TEXT"))
        conn.execute(text("UPDATE runs SET notes = 'was: ' || name"))

    monkeypatch.setitem(migrations.MIGRATIONS, next_version, add_notes)
    with Store(path) as upgraded:
        assert upgraded.schema_version == next_version
        assert upgraded.get_run(run).tags == ["kept"]
        assert upgraded.latest_metrics(run) == {"train_loss": (1, math.inf)}
        with upgraded._read() as conn:
            assert conn.execute(text("SELECT notes FROM runs")).scalar() == "was: before"
    with Store(path) as again:  # already upgraded: add_notes must not run twice (it would fail)
        assert again.schema_version == next_version


def test_failed_migration_changes_nothing(tmp_path, monkeypatch):
    path = tmp_path / "old.db"
    with Store(path) as old:
        old.create_run({}, name="before")

    def broken(conn):
        conn.execute(text("ALTER TABLE runs ADD COLUMN notes TEXT"))
        conn.execute(text("UPDATE runs SET no_such_column = 1"))

    old_version = migrations.current_version()
    monkeypatch.setitem(migrations.MIGRATIONS, old_version + 1, broken)
    with pytest.raises(StoreError) as raised:
        Store(path)
    assert f"schema version {old_version + 1} failed" in one_line(raised)
    monkeypatch.delitem(migrations.MIGRATIONS, old_version + 1)
    with Store(path) as reopened:
        assert reopened.schema_version == old_version
        assert [run.name for run in reopened.list_runs()] == ["before"]
        with reopened._read() as conn:
            assert "notes" not in {c["name"] for c in inspect(conn).get_columns("runs")}


def test_unwritable_paths_fail_cleanly(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for path in (blocker / "x.db", blocker / "deeper" / "x.db", tmp_path):
        before = sorted(p.name for p in tmp_path.rglob("*"))
        with pytest.raises(StoreError) as raised:
            Store(path)
        assert str(path) in one_line(raised) and "--db" in str(raised.value)
        assert sorted(p.name for p in tmp_path.rglob("*")) == before
    if os.path.isdir("/proc/self"):  # not even root can create files there
        with pytest.raises(StoreError) as raised:
            Store("/proc/spherelab-test/x.db")
        assert "/proc/spherelab-test/x.db" in one_line(raised)
        assert not os.path.exists("/proc/spherelab-test")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only directories")
def test_read_only_directory_fails_cleanly(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(StoreError) as raised:
        Store(locked / "sub" / "x.db")
    assert "not writable" in one_line(raised) and list(locked.iterdir()) == []


def test_corrupt_database_file_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not SQLite at all " * 200)
    with pytest.raises(StoreError) as raised:
        Store(path)
    assert one_line(raised).startswith(f"{path} is not a spherelab database")
    assert path.read_bytes() == b"this is not SQLite at all " * 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.db"]


def test_missing_parent_directories_are_created(tmp_path):
    with Store(tmp_path / "a" / "b" / "x.db") as created:
        assert created.list_runs() == []
    assert (tmp_path / "a" / "b" / "x.db").is_file()


def test_url_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("SPHERELAB_DB", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_db_url() == f"sqlite:///{tmp_path}/.spherelab/spherelab.db"
    assert not (tmp_path / ".spherelab").exists()  # only opening creates it
    with Store() as default:
        assert default.url == default_db_url()
    assert (tmp_path / ".spherelab" / "spherelab.db").is_file()

    monkeypatch.chdir(tmp_path)
    assert resolve_db_url("runs.db") == f"sqlite:///{tmp_path}/runs.db"
    assert resolve_db_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    monkeypatch.setenv("SPHERELAB_DB", "env.db")
    assert resolve_db_url(None) == f"sqlite:///{tmp_path}/env.db"
    assert resolve_db_url("sqlite:///x.db") == "sqlite:///x.db"  # explicit beats the environment


# ---------------------------------------------------------------- bundles

def make_sweep_with_runs(store):
    sweep = store.create_sweep("elr grid", {"elr": [1e-3, 1.0]})
    ids = store.create_runs([dict(config={"elr": e}, name=f"elr={e}", sweep_id=sweep, tags=["grid"], total_steps=50)
                             for e in (1e-3, 1.0)])
    for run in ids:
        store.log_metrics(run, [(s, s / 10, 1000.0 + s, {"train_loss": 1.0 / (s + 1), "si_norm": 12.5})
                                for s in range(50)])
        store.set_status(run, "running")
        store.update_run(run, checkpoint_path="runs/1/resume-x.pt", checkpoint_step=40, regime="convergence")
    store.log_metrics(ids[1], [(50, 5.0, 1050.0, {"train_loss": math.nan, "si_norm": math.inf, "elr": -math.inf})])
    store.add_event(ids[1], 50, "nonfinite", {"key": "train_loss"})
    store.set_status(ids[1], "nonfinite")
    return sweep, ids


def test_bundle_round_trip_into_another_database(store, tmp_path):
    sweep, ids = make_sweep_with_runs(store)
    bundle = tmp_path / "grid.spherelab.zip"
    store.export_bundle([], bundle, sweep_id=sweep)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left

    with Store(tmp_path / "colleague.db") as target:
        target.create_run({}, name="already there")
        new_ids = target.import_bundle(bundle)
        assert len(new_ids) == 2 and not set(new_ids) & {1}
        for old, new in zip(ids, new_ids):
            pd.testing.assert_frame_equal(store.read_metrics(old), target.read_metrics(new))
            before, after = store.get_run(old), target.get_run(new)
            # a run that had not ended arrives interrupted (never claimable), its status kept as history
            status = before.status if before.is_terminal else "interrupted"
            assert (after.uid, after.status, after.config, after.tags) == (before.uid, status, before.config,
                                                                          before.tags)
            assert after.checkpoint_path is None and after.checkpoint_step is None and after.worker_id is None
            assert after.imported_at is not None and before.imported_at is None
            history = [] if status == before.status else [
                (before.step, "status", {"status": status, "bundle_status": before.status})]
            assert [(e.step, e.kind, e.payload) for e in target.events(new)] == \
                   [(e.step, e.kind, e.payload) for e in store.events(old)] + history
        assert target.get_sweep(target.get_run(new_ids[0]).sweep_id).run_ids == new_ids

        with pytest.raises(StoreError) as raised:
            target.import_bundle(bundle)
        assert one_line(raised) == (f"run {store.get_run(ids[0]).uid} is already in this database as run "
                                    f"{new_ids[0]}: delete run {new_ids[0]} first to import it again")
        assert len(target.list_runs()) == 3


def test_bundle_into_postgresql(tmp_path, postgres_url):
    with Store(tmp_path / "source.db") as source:
        _, ids = make_sweep_with_runs(source)
        source.export_bundle(ids, tmp_path / "b.zip")
        with Store(postgres_url) as target:
            new_ids = target.import_bundle(tmp_path / "b.zip")
            for old, new in zip(ids, new_ids):
                pd.testing.assert_frame_equal(source.read_metrics(old), target.read_metrics(new))


def corrupt_bundles(tmp_path, good):
    def rewritten(name, replace):
        path = tmp_path / name
        with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as dst:
            for item in src.namelist():
                dst.writestr(item, replace(item, src.read(item)))
        return path

    garbage = tmp_path / "garbage.zip"
    garbage.write_bytes(b"PK\x03\x04 definitely not a zip")
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    no_metrics = tmp_path / "no-metrics.zip"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(no_metrics, "w") as dst:
        dst.writestr("manifest.json", src.read("manifest.json"))
    return [garbage, truncated, no_metrics,
            rewritten("wrong-format.zip", lambda n, b: b.replace(b"spherelab-bundle", b"other") if n == "manifest.json" else b),
            rewritten("bad-json.zip", lambda n, b: b[:-5] if n == "manifest.json" else b),
            rewritten("bad-status.zip", lambda n, b: b.replace(b'"nonfinite"', b'"exploded"') if n == "manifest.json" else b),
            rewritten("bad-parquet.zip", lambda n, b: b[:100] if n == "metrics.parquet" else b)]


def test_corrupt_bundles_are_refused_and_change_nothing(sqlite_store, tmp_path):
    _, ids = make_sweep_with_runs(sqlite_store)
    good = tmp_path / "good.zip"
    sqlite_store.export_bundle(ids, good)
    with Store(tmp_path / "target.db") as target:
        kept = target.create_run({}, name="existing")
        target.log_metrics(kept, [(1, 0, 0, {"a": 1.0})])
        for bad in corrupt_bundles(tmp_path, good):
            with pytest.raises(StoreError) as raised:
                target.import_bundle(bad)
            assert one_line(raised).startswith(f"{bad} is not a spherelab bundle (")
            assert str(raised.value).endswith("make one with `python -m engine bundle`")
        assert [r.id for r in target.list_runs()] == [kept] and target.list_sweeps() == []
        with target._read() as conn:
            assert conn.execute(select(func.count()).select_from(metrics)).scalar() == 1
        with pytest.raises(StoreError, match="is not a file"):
            target.import_bundle(tmp_path / "missing.zip")


def test_bundle_export_failure_leaves_no_file(sqlite_store, tmp_path):
    run = sqlite_store.create_run({}, name="r")
    with pytest.raises(StoreError) as raised:
        sqlite_store.export_bundle([run], tmp_path / "no-such-dir" / "b.zip")
    assert "--out" in one_line(raised) and not (tmp_path / "no-such-dir").exists()
    with pytest.raises(StoreError, match="nothing to bundle"):
        sqlite_store.export_bundle([], tmp_path / "b.zip")
    with pytest.raises(RunNotFound):
        sqlite_store.export_bundle([run, 999], tmp_path / "b.zip")
    assert list(tmp_path.glob("*.zip")) == [] and [p for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_newer_bundle_format_is_refused(sqlite_store, tmp_path):
    good, future = tmp_path / "good.zip", tmp_path / "future.zip"
    sqlite_store.export_bundle([sqlite_store.create_run({}, name="r")], good)
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(future, "w") as dst:
        for item in src.namelist():
            data = src.read(item)
            if item == "manifest.json":
                data = json.dumps({**json.loads(data), "version": 2})
            dst.writestr(item, data)
    with pytest.raises(StoreError) as raised:
        sqlite_store.import_bundle(future)
    assert one_line(raised) == f"{future} is a version 2 bundle, newer than this spherelab reads (1): upgrade spherelab"
