"""Issue 12, the defects that live in the store, the config and the CLI: each test names what main did
before and what it must do now, with real processes and real SQLite files (PostgreSQL where the store
behaves differently there). The worker-side items (1, 2, 3, 7, 8 in the worker) are tested with it."""
import io
import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import func, select, text

from engine.cli import main
from engine.config import MAX_GRID_RUNS, ConfigError, RunConfig
from storage import MIN_STALE_AFTER_S, ClaimLost, Store, StoreBusy, StoreError
from storage import bundle as bundles
from storage import migrations
from storage.schema import metrics, sweeps
from tests.processes import engine, wait_for

ROOT = Path(__file__).resolve().parents[1]
TINY = RunConfig(epochs=1, log_every=20)   # a valid config a worker could train in seconds


def refused(out, *phrases):
    """Exit 2 and one line on stderr containing every phrase; nothing on stdout."""
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, (out.returncode, out.stderr[-3000:])
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    assert out.stdout == ""
    return lines[0]


def one_line(raised) -> str:
    message = str(raised.value)
    assert message and "\n" not in message
    return message


def table_count(store, table) -> int:
    with store._read() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar()


# ---------------------------------------------------------------- item 2: staleness floor, fenced claims

def test_worker_refuses_a_stale_after_below_three_heartbeats(tmp_path):
    """Before: `worker --stale-after 0.5` was accepted (heartbeats come every second), so it declared other
    workers' live runs stale and trained them a second time. After: one line, exit 2, nothing written;
    the store refuses such a threshold too."""
    db = tmp_path / "s.db"
    refused(engine("worker", "--stale-after", "0.5", "--once", "--db", str(db)), "--stale-after", "at least 3 seconds")
    assert not db.exists()
    with Store(db) as store:
        with pytest.raises(StoreError) as raised:
            store.requeue_stale(MIN_STALE_AFTER_S / 2)
        assert "trained twice" in one_line(raised)


def run_process(url: str, run_id: int, claim: str, stuck_after: int, report) -> None:
    """A run process: holds its claim, heartbeats and logs a metric every 20 ms; after `stuck_after`
    steps it is stuck for longer than the staleness floor (a long kernel), then carries on."""
    with Store(url) as store:
        store.hold(run_id, claim)
        step = 0
        try:
            while step < 500:
                step += 1
                store.heartbeat(run_id, step)
                store.log_metrics(run_id, [(step, step / 10, 0.0, {"train_loss": 1.0 / step})])
                time.sleep(2 * MIN_STALE_AFTER_S if step == stuck_after else 0.02)
            report.put(("never lost", step, ""))
        except ClaimLost as lost:
            try:   # what a careless runner does next: mark the run failed
                store.set_status(run_id, "failed", error="lost")
                report.put(("wrote after losing", step, str(lost)))
            except ClaimLost:
                report.put(("stopped", step, str(lost)))
        except Exception as exc:  # e.g. a store without hold() (main before this fix)
            report.put((type(exc).__name__, step, str(exc)))


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_a_process_that_lost_its_claim_writes_nothing_more(tmp_path, request, dialect):
    """Before: a run declared stale was claimed again while its first process still trained it; both
    wrote metrics and statuses (a spurious failure, then `finished`). After: the first process's next
    write raises ClaimLost and writes nothing, so the run's trace and status are the new claimer's alone."""
    import multiprocessing
    url = str(tmp_path / "fence.db") if dialect == "sqlite" else request.getfixturevalue("postgres_url")
    spawn = multiprocessing.get_context("spawn")
    with Store(url) as store:
        run_id = store.create_run(TINY.to_dict(), name="fenced")
        first = store.claim_next_run("worker-1")
        report = spawn.Queue()
        child = spawn.Process(target=run_process, args=(url, run_id, first.claim, 10, report))
        child.start()
        try:
            wait_for(lambda: store.last_step(run_id) == 10, timeout=60)
            wait_for(lambda: time.time() - store.get_run(run_id).heartbeat_at > MIN_STALE_AFTER_S, timeout=30)
            assert store.requeue_stale(MIN_STALE_AFTER_S) == [run_id]      # another worker's stale check
            second = store.claim_interrupted("worker-2")
            assert second.id == run_id and second.claim != first.claim
            outcome, step, message = report.get(timeout=60)
        finally:
            child.join(30)
        assert outcome == "stopped", (outcome, message)
        assert step == 11 and "claimed again (by worker-2)" in message
        info = store.get_run(run_id)
        assert (info.status, info.worker_id, info.claim, info.error) == ("running", "worker-2", second.claim, None)
        assert store.last_step(run_id) == 10                      # nothing of the old process after its loss
        statuses = [e.payload["status"] for e in store.events(run_id, ["status"])]
        assert statuses == ["running", "interrupted", "running"]


def test_deleting_or_cancelling_a_held_run_stops_its_process(tmp_path):
    """Before: deleting a running run made its process fail on 'no run with id' (and took the worker
    down); a cancelled paused run's process could still write. After: ClaimLost, one line, nothing written."""
    path = tmp_path / "s.db"
    with Store(path) as user, Store(path) as runner:
        deleted, cancelled = user.create_run({}, name="deleted"), user.create_run({}, name="cancelled")
        for run_id in (deleted, cancelled):
            runner.hold(run_id, user.claim_next_run("w", run_ids=[run_id]).claim)
        runner.set_status(cancelled, "paused")
        user.delete(deleted)
        user.cancel(cancelled)
        with pytest.raises(ClaimLost) as raised:
            runner.heartbeat(deleted, 3)
        assert one_line(raised).startswith(f"run {deleted} was deleted")
        with pytest.raises(ClaimLost) as raised:
            runner.set_status(cancelled, "running")
        assert one_line(raised).startswith(f"run {cancelled} is cancelled now")
        with pytest.raises(ClaimLost):
            runner.log_metrics(cancelled, [(1, 0.1, 0.0, {"train_loss": 1.0})])
        assert user.get_run(cancelled).status == "cancelled" and user.last_step(cancelled) is None
        # a run this store ended itself is released: later writes (e.g. a tag, a regime) are ordinary
        done = user.create_run({}, name="done")
        runner.hold(done, user.claim_next_run("w", run_ids=[done]).claim)
        runner.set_status(done, "finished")
        runner.update_run(done, regime="convergence")


# ---------------------------------------------------------------- item 3: locks

SQLITE_LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""
POSTGRES_LOCKER = """
import psycopg, sys, time
conn = psycopg.connect(sys.argv[1].replace("postgresql+psycopg", "postgresql"))
conn.execute("LOCK TABLE runs IN EXCLUSIVE MODE")   # writers wait, readers do not
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.commit()
"""


def hold_lock(url: str, seconds: float) -> subprocess.Popen:
    """Another process holding the database's write lock for `seconds`."""
    script = POSTGRES_LOCKER if url.startswith("postgresql") else SQLITE_LOCKER
    target = url if url.startswith("postgresql") else url.removeprefix("sqlite:///")
    holder = subprocess.Popen([sys.executable, "-c", script, target, str(seconds)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_a_write_waits_out_a_lock_held_past_the_busy_timeout(tmp_path, request, dialect):
    """Before: a lock held longer than SQLite's busy timeout raised a raw OperationalError ('database is
    locked', a traceback; the worker died around its heartbeat). After: the call waits with backoff and
    succeeds once the lock is gone; reads and opening a store do not wait at all."""
    url = str(tmp_path / "lock.db") if dialect == "sqlite" else request.getfixturevalue("postgres_url")
    with Store(url, busy_timeout_s=0.2, lock_wait_s=30) as store:
        run_id = store.claim_next_run("w", run_ids=[store.create_run({}, name="r")]).id
        holder = hold_lock(store.url, 2.0)
        try:
            started = time.monotonic()
            assert [r.id for r in store.list_runs()] == [run_id]           # readers pass the lock
            Store(url, busy_timeout_s=0.2, lock_wait_s=30).close()         # so does opening a current store
            assert time.monotonic() - started < 1.5
            store.heartbeat(run_id, 7)                                     # waits, then writes
            waited = time.monotonic() - started
        finally:
            holder.wait(30)
        assert waited > 1.0 and store.get_run(run_id).step == 7


def test_a_lock_held_too_long_is_one_line_and_writes_nothing(tmp_path):
    """Before: OperationalError with a traceback after 30 s. After: StoreBusy, one line, after lock_wait_s
    (LOCK_WAIT_S = 120 s by default), and nothing of the call written."""
    path = tmp_path / "lock.db"
    with Store(path, busy_timeout_s=0.2, lock_wait_s=1.0) as store:
        holder = hold_lock(store.url, 60)
        try:
            started = time.monotonic()
            with pytest.raises(StoreBusy) as raised:
                store.create_run({}, name="never")
            assert time.monotonic() - started < 10
        finally:
            holder.kill()
            holder.wait(30)
        assert "stayed locked" in one_line(raised) and "nothing was written" in str(raised.value)
        assert store.list_runs() == []


# ---------------------------------------------------------------- item 4: bundles are data, bounded

def source_with_every_status(path) -> tuple[Store, dict]:
    store = Store(path)
    ids = {}
    for status in ("queued", "running", "paused", "interrupted", "finished"):
        ids[status] = store.create_run(TINY.to_dict(), name=f"was {status}", total_steps=44)
        store.update_run(ids[status], step=20, **({} if status == "queued" else
                                                  {"status": status, "worker_id": "their-worker"}))
    return store, ids


def test_imported_runs_are_never_queued_running_or_claimed(tmp_path):
    """Before: an imported run that said `queued` was claimed and trained by the recipient's worker; one
    that said `running` was declared stale, retrained, and its imported metrics replaced. After: imported
    runs are data: a run that had not ended arrives `interrupted` (its bundle status kept in an event),
    and neither a real worker nor a claim nor a stale check touches any of them."""
    source, ids = source_with_every_status(tmp_path / "source.db")
    for run_id in ids.values():
        source.log_metrics(run_id, [(20, 0.45, 1.0, {"train_loss": 0.5})])
    bundle = tmp_path / "all.zip"
    source.export_bundle(list(ids.values()), bundle)
    target = str(tmp_path / "target.db")
    imported = [int(line) for line in engine("import", str(bundle), "--db", target).stdout.split()]
    assert len(imported) == 5
    worker = engine("worker", "--once", "--poll", "0.2", "--db", target, timeout=240)
    assert worker.returncode == 0, worker.stderr[-2000:]
    with Store(target) as store:
        for status, run_id in zip(ids, imported):
            info = store.get_run(run_id)
            expected = "finished" if status == "finished" else "interrupted"
            assert (info.status, info.step, info.worker_id, info.claim) == (expected, 20, None, None), status
            assert info.imported_at is not None
            assert store.read_metrics(run_id)["step"].tolist() == [20]    # nobody trained it here
            history = [e.payload for e in store.events(run_id, ["status"]) if "bundle_status" in e.payload]
            changed = status not in ("finished", "interrupted")
            assert history == ([{"status": "interrupted", "bundle_status": status}] if changed else [])
        store.update_run(imported[1], heartbeat_at=time.time() - 3600)
        assert store.claim_next_run("w") is None and store.claim_interrupted("w") is None
        assert store.requeue_stale(MIN_STALE_AFTER_S) == []


def rewrite(bundle: Path, out: Path, *, manifest=None, manifest_bytes=None, table=None) -> Path:
    """A copy of `bundle` with its manifest (edited by `manifest(m)`, or raw bytes) or metrics replaced."""
    with zipfile.ZipFile(bundle) as src:
        data = json.loads(src.read("manifest.json"))
        parquet = src.read("metrics.parquet")
    if manifest is not None:
        manifest(data)
    raw = manifest_bytes if manifest_bytes is not None else json.dumps(data).encode()
    if table is not None:
        sink = io.BytesIO()
        pq.write_table(table, sink)
        parquet = sink.getvalue()
    with zipfile.ZipFile(out, "w") as dst:
        dst.writestr("manifest.json", raw, compress_type=zipfile.ZIP_DEFLATED)
        dst.writestr("metrics.parquet", parquet)
    return out


def first_run(field, value):
    def edit(manifest):
        manifest["runs"][0][field] = value
    return edit


def metrics_of(bundle: Path) -> pa.Table:
    with zipfile.ZipFile(bundle) as src:
        return pq.read_table(io.BytesIO(src.read("metrics.parquet")))


def with_column(table: pa.Table, name: str, values) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, pa.array(values, table.schema.field(name).type))


def nested(depth: int):
    value = 1
    for _ in range(depth):
        value = {"a": value}
    return value


CRAFTED = {   # name -> (how the good bundle is changed, words the one-line refusal contains)
    "created_at NaN": (dict(manifest=first_run("created_at", math.nan)), "'created_at' that is not a finite number"),
    "step 1e30": (dict(manifest=first_run("step", 10**30)), "'step' that is not a whole number"),
    "step a float": (dict(manifest=first_run("step", 1e30)), "'step' that is not a whole number"),
    "total_steps -1": (dict(manifest=first_run("total_steps", -1)), "'total_steps'"),
    "config 40 deep": (dict(manifest=first_run("config", nested(40))), "nested at most 32 deep"),
    "manifest 200,000 deep": (dict(manifest_bytes=b"[" * 200_000 + b"]" * 200_000), "nested too deep"),
    "regime 100 characters": (dict(manifest=first_run("regime", "x" * 100)), "'regime'"),
    "an event's step inf": (dict(manifest=lambda m: m["runs"][0]["events"].append(
        {"step": math.inf, "kind": "note", "payload": {}, "created_at": 1.0})), "an event of run #0"),
    "an unknown status": (dict(manifest=first_run("status", "exploded")), "'status' that is not one of"),
}
CRAFTED_METRICS = {
    "a negative step": (lambda t: with_column(t, "step", [-1] * t.num_rows), "negative step"),
    "a NaN epoch": (lambda t: with_column(t, "epoch", [math.nan] * t.num_rows), "not a finite number"),
    "a 200-character key": (lambda t: with_column(t, "key", ["k" * 200] * t.num_rows), "over 128 characters"),
    "a row twice": (lambda t: pa.concat_tables([t, t]), "(run, key, step) twice"),
}


@pytest.fixture
def good_bundle(tmp_path) -> Path:
    with Store(tmp_path / "source.db") as source:
        run_id = source.create_run(TINY.to_dict(), name="good", status="finished")
        source.log_metrics(run_id, [(s, s / 44, 0.1 * s, {"train_loss": 1 / (s + 1)}) for s in range(0, 44, 4)])
        source.export_bundle([run_id], tmp_path / "good.zip")
    return tmp_path / "good.zip"


def assert_import_refused(bundle: Path, target: Path, *phrases) -> None:
    with Store(target) as store:
        kept = store.create_run({}, name="already there")
        with pytest.raises(StoreError) as raised:
            store.import_bundle(bundle)
        message = one_line(raised)
        for phrase in phrases:
            assert phrase in message, message
        assert [r.id for r in store.list_runs()] == [kept]
        assert table_count(store, metrics) == 0 and table_count(store, sweeps) == 0


@pytest.mark.parametrize("name", list(CRAFTED) + list(CRAFTED_METRICS))
def test_a_crafted_bundle_is_one_line_and_writes_nothing(good_bundle, tmp_path, name):
    """Before: NaN, 10**30 or 200,000-deep JSON in a bundle gave tracebacks (or rows that broke later).
    After: one line of StoreError naming the field, and the target store unchanged."""
    if name in CRAFTED:
        change, phrase = CRAFTED[name]
    else:
        edit, phrase = CRAFTED_METRICS[name]
        change = dict(table=edit(metrics_of(good_bundle)))
    bad = rewrite(good_bundle, tmp_path / "bad.zip", **change)
    assert_import_refused(bad, tmp_path / "target.db", "is not a spherelab bundle", phrase)


def test_a_crafted_bundle_is_refused_by_the_cli_and_by_postgresql(good_bundle, tmp_path, postgres_url):
    """The same refusal through `python -m engine import` (exit 2, one line) and on PostgreSQL, whose
    column widths (regime VARCHAR(32)) raised a DataError traceback before."""
    bad = rewrite(good_bundle, tmp_path / "bad.zip", manifest=first_run("step", 10**30))
    db = tmp_path / "cli.db"
    refused(engine("import", str(bad), "--db", str(db)), "'step' that is not a whole number")
    assert Store(db).list_runs() == []
    wide = rewrite(good_bundle, tmp_path / "wide.zip", manifest=first_run("regime", "x" * 33))
    with Store(postgres_url) as store:
        with pytest.raises(StoreError, match="'regime' that is not null or at most 32 characters"):
            store.import_bundle(wide)
        assert store.list_runs() == []
        assert store.import_bundle(good_bundle)                           # the good one still goes in


def test_oversized_bundles_are_refused_before_they_are_read(good_bundle, tmp_path):
    """Before: an 870 KB bundle of 3 million rows took 4.4 GB and 41 s; a manifest padded to 300 MB took
    933 MB. After: the sizes the zip and the parquet footer declare are checked against the limits
    first: a refusal in about a second, one line, nothing written."""
    good = json.loads(zipfile.ZipFile(good_bundle).read("manifest.json"))
    padded = json.dumps(good).encode()[:-1] + b" " * (bundles.MAX_MANIFEST_BYTES + 1) + b"}"
    big_manifest = rewrite(good_bundle, tmp_path / "padded.zip", manifest_bytes=padded)
    assert big_manifest.stat().st_size < 1_000_000                       # deflated padding: tiny on disk
    uid = good["runs"][0]["uid"]
    rows = 100_000
    chunk = pa.table({"run_uid": [uid] * rows, "key": ["train_loss"] * rows, "step": list(range(rows)),
                      "epoch": [0.5] * rows, "wall_time": [1.0] * rows, "value": [0.1] * rows,
                      "special": pa.array([0] * rows, pa.int8())})
    sink = io.BytesIO()
    with pq.ParquetWriter(sink, chunk.schema) as writer:
        for _ in range(bundles.MAX_METRIC_ROWS // rows + 1):
            writer.write_table(chunk)
    many_rows = tmp_path / "rows.zip"
    with zipfile.ZipFile(many_rows, "w") as dst:
        dst.writestr("manifest.json", json.dumps(good))
        dst.writestr("metrics.parquet", sink.getvalue())
    for bundle, phrase in ((big_manifest, "MAX_MANIFEST_BYTES"), (many_rows, "MAX_METRIC_ROWS")):
        started = time.monotonic()
        assert_import_refused(bundle, tmp_path / f"{bundle.stem}.db", "is over an import limit", phrase)
        assert time.monotonic() - started < 10


# ---------------------------------------------------------------- item 6: bad input the trainer would meet

BAD_INPUT = [   # (argv, words of the one-line error); every case wrote nothing before failing, or never failed
    (["submit", "--seed", str(2**63)], "--seed must be a whole number from 0 to 2**63-1"),
    (["submit", "--batch-size", "341"], "leaves a probe chunk of 1 sample"),
    (["submit", "--batch-size", "1"], "--batch-size must be at least 2"),
    (["submit", "--probe-size", "1", "--sharpness-every", "10"], "--probe-size must be at least 2"),
    (["submit", "--width", str(10**6)], "MAX_PARAMETERS"),
    (["submit", "--dataset", "synthetic", "--synthetic-classes", str(10**9)], "--synthetic-classes must be from 2"),
    (["submit", "--depth", str(10**6)], "--depth must be a whole number from 1 to 1,000"),
    (["submit", "--dataset", "synthetic", "--synthetic-samples", str(10**9)],
     "--synthetic-samples must be a whole number from 2 to 10,000,000"),
    (["submit", "--dataset", "synthetic", "--synthetic-shape", "100000x100000"], "MAX_DATA_VALUES"),
    (["submit", "--epochs", str(10**9)], "--epochs must be a whole number from 1 to 100,000"),
    (["submit", "--checkpoint-every", "-1"], "--checkpoint-every must be at least 0"),
    (["submit", "--trace-samples", "-1"], "--trace-samples must be a whole number from 0 to 10,000"),
    (["submit", "--elr", "1e-4:1:101", "--seed", "1:100:100", "--batch-size", "32", "64"], "MAX_GRID_RUNS"),
    (["sweep", "--elr", f"1e-4:1:{MAX_GRID_RUNS + 1}"], "N must be from 1 to"),
    (["export", str(10**20)], "is not an id"),
    (["cancel", "0"], "is not an id"),
    (["export", "1", "--out", "{tmp}/missing/x.csv"], "does not exist"),
    (["export", "1", "--out", "{tmp}"], "is a folder"),
    (["bundle", "1", "--out", "{tmp}/missing/b.zip"], "does not exist"),
    (["worker", "--device", "foo"], "invalid choice: 'foo'"),
    (["worker", "--poll", "-1"], "--poll: must be more than 0"),
    (["worker", "--poll", "nan"], "not a number of seconds"),
]


@pytest.mark.parametrize("args,message", BAD_INPUT, ids=[" ".join(a)[:60] for a, _ in BAD_INPUT])
def test_input_the_trainer_cannot_meet_is_one_line_exit_2(tmp_path, capsys, args, message):
    """Before: each of these was accepted (and failed mid-run, hung, or allocated without end) or gave a
    traceback. After: one line naming the flag, exit 2, nothing written (in-process for speed)."""
    db = tmp_path / "store.db"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    try:
        code = main([*argv, "--db", str(db)])
    except SystemExit as exc:   # argparse's own errors
        code = exc.code
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert code == 2 and len(lines) == 1, out.err
    assert message in lines[0], lines[0]
    assert out.out == "" and list(tmp_path.iterdir()) == []


def test_bad_input_from_real_processes_is_one_line(tmp_path):
    """The exit path of a real process for a few of the cases above, and a run id beyond SQLite's integers."""
    db = str(tmp_path / "s.db")
    refused(engine("submit", "--seed", str(2**63 + 1), "--db", db), "--seed")
    refused(engine("export", str(2**70), "--db", db), "is not an id")
    refused(engine("export", "1", "--out", str(tmp_path), "--db", db), "is a folder")
    assert list(tmp_path.iterdir()) == []


def test_the_probe_chunk_rule_is_the_trainers(monkeypatch):
    """Validation refuses exactly what the trainer cannot run: digits' 1,024-sample probe in chunks of
    341 ends with a 1-sample chunk, which mlp_si's BatchNorm cannot train on (before: the run ended
    `failed`); 340 trains. The conv nets' BatchNorm2d also averages over positions: one image is fine."""
    from engine.trainer import Trainer
    assert Trainer(RunConfig(batch_size=340, epochs=1, log_every=2)).run()[0].status == "finished"
    conv = RunConfig(model="convnet_si", width=2, dataset="synthetic", synthetic_samples=6, synthetic_classes=2,
                     synthetic_shape=(3, 32, 32), batch_size=1, probe_size=3, epochs=1, log_every=3)
    assert Trainer(conv).run()[0].status == "finished"
    with pytest.raises(ConfigError, match="probe chunk of 1 sample"):
        RunConfig(batch_size=341)
    monkeypatch.setattr(RunConfig, "check_against_data", lambda self, train_size: None)   # main's checks
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        Trainer(RunConfig(batch_size=341, epochs=1, log_every=2)).run()


# ---------------------------------------------------------------- items 7 and 9: nothing half-written, stores

def test_an_empty_tag_leaves_no_sweep_and_no_database(tmp_path):
    """Before: `submit … --tags ""` exited 2 but left an orphan sweep row (later: an empty new database
    file). After: refused while validating, before the store is opened."""
    db = tmp_path / "tags.db"
    refused(engine("submit", "--elr", "1e-3", "3e-3", "--tags", "", "--db", str(db)), "--tags got an empty tag")
    assert not db.exists()
    with Store(db) as store:
        store.create_run({}, name="existing")
    refused(engine("submit", "--elr", "1e-3", "3e-3", "--tags", "ok", " ", "--db", str(db)), "empty tag")
    with Store(db) as store:
        assert store.list_sweeps() == [] and len(store.list_runs()) == 1


def test_an_empty_db_never_means_the_home_store(tmp_path):
    """Before: `--db ""` silently used (and created) ~/.spherelab/spherelab.db. After: one line, and the
    home store is not touched; in-memory SQLite, where runs would be lost, is refused the same way."""
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "SPHERELAB_DB": ""}
    refused(engine("runs", "--db", "", env=env), "--db: is empty")
    refused(engine("submit", "--db", "  ", env=env), "--db: is empty")
    for memory in ("sqlite:///:memory:", "sqlite://"):
        refused(engine("submit", "--epochs", "1", "--db", memory, env=env), "in-memory SQLite")
    assert not (home / ".spherelab").exists()


def rollback_journal_store(folder: Path) -> Path:
    """A store copied the way sqlite3's .backup leaves it: rollback journal, not WAL."""
    folder.mkdir()
    path = folder / "s.db"
    with Store(path) as store:
        store.create_run({}, name="kept run")
    with sqlite3.connect(path) as raw:
        raw.execute("PRAGMA journal_mode = DELETE")
    return path


def test_a_read_only_store_can_be_listed(tmp_path):
    """Before: `runs` on a read-only store failed ('attempt to write a readonly database': opening wrote
    the journal mode and took the write lock), and `tag` gave a traceback. After: it lists, and a write
    is one line saying the store is read-only."""
    path = rollback_journal_store(tmp_path / "ro")
    read_only = f"sqlite:///file:{path}?mode=ro&uri=true"
    listed = engine("runs", "--db", read_only)
    assert listed.returncode == 0 and "kept run" in listed.stdout, listed.stderr
    refused(engine("tag", "1", "x", "--db", read_only), "is read-only")
    with Store(path) as store:
        assert store.get_run(1).tags == []


@pytest.mark.skipif(shutil.which("unshare") is None and os.geteuid() == 0, reason="root ignores permissions")
def test_a_store_in_a_read_only_folder_can_be_listed(tmp_path):
    """The same with the folder itself read-only (a read-only mount; chmod when not root)."""
    path = rollback_journal_store(tmp_path / "ro")
    if os.geteuid() != 0:
        path.chmod(0o444)
        path.parent.chmod(0o555)
        listed = engine("runs", "--db", str(path))
    else:   # root: a private read-only bind mount of the folder, seen by this one command only
        folder = str(path.parent)
        listed = subprocess.run(
            ["unshare", "-rm", "sh", "-c", f'mount --bind "{folder}" "{folder}" && '
             f'mount -o remount,ro,bind "{folder}" "{folder}" && exec "$0" -m engine runs --db "$1"',
             sys.executable, str(path)], capture_output=True, text=True, timeout=120, cwd=ROOT)
        if "mount" in listed.stderr and listed.returncode != 0 and os.environ.get("CI", "").lower() != "true":
            pytest.skip(f"no read-only mount here: {listed.stderr.strip()[:200]}")
    assert listed.returncode == 0 and "kept run" in listed.stdout, listed.stderr


# ---------------------------------------------------------------- the error boundary

def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    """Before: an error no command foresaw (here a damaged config in the store) printed a traceback.
    After: one line, exit 2; SPHERELAB_DEBUG=1 adds the traceback."""
    db = tmp_path / "s.db"
    with Store(db) as store:
        store.create_run({}, name="damaged")
    with sqlite3.connect(db) as raw:
        raw.execute("UPDATE runs SET config = '{not json'")
    refused(engine("runs", "--db", str(db)), "unexpected JSONDecodeError", "SPHERELAB_DEBUG=1")
    debug = engine("runs", "--db", str(db), env={"SPHERELAB_DEBUG": "1"})
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr


# ---------------------------------------------------------------- the schema migration

def test_a_store_written_by_schema_version_1_opens_upgraded(tmp_path):
    """A store written by schema version 1 (tests/data/schema_v1.sql, as SQLite dumped it) opens at the
    current version: runs, tags, metrics with their inf/nan, events and sweeps kept; its runs are its
    own (not imported) and hold no claim, so its queued run is still claimable."""
    path = tmp_path / "v1.db"
    with sqlite3.connect(path) as raw:
        raw.executescript((ROOT / "tests" / "data" / "schema_v1.sql").read_text())
    listed = engine("runs", "--json", "--db", str(path))
    assert listed.returncode == 0, listed.stderr
    assert {r["name"]: r["status"] for r in json.loads(listed.stdout)} == {"old queued": "queued",
                                                                          "old finished": "finished"}
    with Store(path) as store:
        assert store.schema_version == migrations.current_version() == 6
        queued, finished = store.get_run(1), store.get_run(2)
        assert queued.tags == ["kept"] and queued.imported_at is None and finished.claim is None
        assert finished.parent_id is None and store.checkpoints(2) == [] and store.list_jobs() == []
        assert store.latest_metrics(2)["train_loss"] == (10, math.inf) and math.isnan(store.latest_metrics(2)["elr"][1])
        assert [e.kind for e in store.events(2)] == ["status", "status", "note"]
        assert store.get_sweep(1).run_ids == [1, 2]
        assert store.claim_next_run("w").id == 1


def test_a_postgresql_store_at_schema_version_1_opens_upgraded(postgres_url):
    """The same migrations on PostgreSQL: a version 1 store (today's tables without what versions 2 to 4 added)."""
    with Store(postgres_url) as store:
        run_id = store.create_run({}, name="old", tags=["kept"])
        with store._write() as conn:
            for column in ("imported_at", "claim", "parent_id", "fork_epoch", "study_id", "study_role", "waiting_for"):
                conn.execute(text(f"ALTER TABLE runs DROP COLUMN {column}"))
            conn.execute(text("DROP TABLE checkpoints"))
            conn.execute(text("DROP TABLE jobs"))
            conn.execute(text("DROP TABLE studies"))
            conn.execute(text("UPDATE meta SET value = '1' WHERE key = 'schema_version'"))
    with Store(postgres_url) as store:
        assert store.schema_version == migrations.current_version() == 6
        assert store.get_run(run_id).tags == ["kept"] and store.claim_next_run("w").id == run_id
        assert store.get_run(run_id).parent_id is None and store.checkpoints(run_id) == []


# ---------------------------------------------------------------- issue 17 item 10: read-only stores

def read_only_mount(folder: Path, *command: str) -> subprocess.CompletedProcess:
    """`python -m engine COMMAND` with `folder` a private read-only bind mount (root ignores permissions)."""
    out = subprocess.run(["unshare", "-rm", "sh", "-c", f'mount --bind "{folder}" "{folder}" && '
                          f'mount -o remount,ro,bind "{folder}" "{folder}" && exec "$0" -m engine "$@"',
                          sys.executable, *command], capture_output=True, text=True, timeout=120, cwd=ROOT)
    if "mount" in out.stderr and out.returncode != 0 and os.environ.get("CI", "").lower() != "true":
        pytest.skip(f"no read-only mount here: {out.stderr.strip()[:200]}")
    return out


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare for a read-only mount")
def test_a_default_wal_store_on_a_read_only_mount_can_be_listed(tmp_path):
    """Issue 17 item 10. Before: a default (WAL) store on a read-only file system could not even be
    listed ('unable to open database file': readers of a WAL file need its -shm file), though README
    says a read-only store can be. Now it is opened read-only and immutable: listed and read, and a
    write or a worker is one line saying it is read-only."""
    folder = tmp_path / "ro"
    folder.mkdir()
    with Store(folder / "s.db") as store:
        store.create_run({}, name="kept run")
    raw = sqlite3.connect(folder / "s.db")
    assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    raw.close()
    assert sorted(os.listdir(folder)) == ["s.db"]       # closed cleanly: no -wal or -shm file to read through
    listed = read_only_mount(folder, "runs", "--db", str(folder / "s.db"))
    assert listed.returncode == 0 and "kept run" in listed.stdout, listed.stderr
    refused(read_only_mount(folder, "tag", "1", "x", "--db", str(folder / "s.db")), "is read-only")
    refused(read_only_mount(folder, "worker", "--once", "--db", str(folder / "s.db")), "is read-only")


def test_a_worker_on_a_read_only_url_refuses_in_one_line(tmp_path):
    """Issue 17 item 10, the worker. Before: `worker` on a `?mode=ro` store logged the read-only error
    and retried it forever. Now it refuses at once: one line, exit 2, nothing written."""
    path = tmp_path / "s.db"
    with Store(path) as store:
        run_id = store.create_run({}, name="queued run")
    out = engine("worker", "--once", "--db", f"sqlite:///file:{path}?mode=ro&uri=true", timeout=60)
    refused(out, "is read-only")
    with Store(path) as store:
        assert store.get_run(run_id).status == "queued" and store.live_workers() == []


# ---------------------------------------------------------------- issue 17 item 6: bundles read in bounded memory

def peak_memory_of(*args) -> tuple[subprocess.CompletedProcess, int]:
    """`python -m engine ARGS` and the most memory it held (max RSS, bytes), measured by a parent of
    its own (this test process's other children do not count)."""
    measure = ("import json, resource, subprocess, sys; out = subprocess.run(sys.argv[1:], capture_output=True, "
               "text=True); print(json.dumps([out.returncode, out.stdout, out.stderr, "
               "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024]))")
    done = subprocess.run([sys.executable, "-c", measure, sys.executable, "-m", "engine", *args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    code, stdout, stderr, peak = json.loads(done.stdout)
    return subprocess.CompletedProcess(args, code, stdout, stderr), peak


def bomb(out: Path, manifest: bytes, parquet: bytes, parquet_compression=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(out, "w") as dst:
        dst.writestr("manifest.json", manifest, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
        dst.writestr("metrics.parquet", parquet, compress_type=parquet_compression, compresslevel=9)
    return out


def test_a_small_bundle_that_inflates_is_refused_in_bounded_memory(good_bundle, tmp_path):
    """Issue 17 item 6. Before: a 215 KB bundle reached 3.7 GB of memory before its one-line refusal
    (a manifest of millions of tiny objects, inflated from a few KB and parsed whole; a metrics file
    inflated in the zip). Now the manifest is counted as it inflates and refused before it is parsed,
    and a metrics file compressed in the zip is refused: peak memory stays under 10x the bundle + 200 MB."""
    with zipfile.ZipFile(good_bundle) as src:
        parquet = src.read("metrics.parquet")
    head = b'{"format": "spherelab-bundle", "version": 1, "sweep": null, "runs": ['
    manifest_bomb = bomb(tmp_path / "manifest.zip", head + b"{}," * (20 << 20) + b"{}]}", parquet)
    metrics_bomb = bomb(tmp_path / "metrics.zip", json.dumps({"format": "spherelab-bundle", "version": 1,
                                                             "sweep": None, "runs": []}).encode(),
                        parquet + b"\0" * (250 << 20), zipfile.ZIP_DEFLATED)
    for bundle, phrase in ((manifest_bomb, "MB of memory"), (metrics_bomb, "compressed")):
        size = bundle.stat().st_size
        target = tmp_path / f"{bundle.stem}.db"
        out, peak = peak_memory_of("import", str(bundle), "--db", str(target))
        refused(out, phrase)
        print(f"{bundle.name}: {size:,} bytes, peak memory {peak / 2**20:.0f} MB")
        assert peak <= 10 * size + (200 << 20), (bundle.name, size, peak)
        assert Store(target).list_runs() == []


@pytest.mark.parametrize("field, value, phrase", [
    ("elr", float("nan"), "--elr must be a positive finite number"),
    ("elr", float("inf"), "--elr must be a positive finite number"),
    ("seed", 10**30, "--seed must be a whole number"),
    ("epochs", "x", "run #0 has a config `train` would refuse"),
])
def test_an_imported_config_follows_the_rules_of_train(good_bundle, tmp_path, field, value, phrase):
    """Issue 17 item 6, the configs. Before: NaN or infinite ELRs, `seed: 10**30` and `"epochs": "x"` were
    imported, and the Run page crashed on them. Now an imported config passes `train`'s checks, else the
    import is one line and writes nothing."""
    def edit(m):
        m["runs"][0]["config"][field] = value
    bad = rewrite(good_bundle, tmp_path / "bad.zip",
                  manifest_bytes=None if not isinstance(value, float) else
                  json.dumps(_edited(good_bundle, edit), allow_nan=True).encode(),
                  manifest=edit if not isinstance(value, float) else None)
    out = engine("import", str(bad), "--db", str(tmp_path / "t.db"))
    refused(out, phrase)
    assert Store(tmp_path / "t.db").list_runs() == []


def _edited(bundle: Path, edit) -> dict:
    with zipfile.ZipFile(bundle) as src:
        data = json.loads(src.read("manifest.json"))
    edit(data)
    return data


def test_an_imported_name_with_nul_is_refused(good_bundle, tmp_path):
    """Issue 17 item 6: a NUL in a run's name or tags was imported (and broke the Run page)."""
    bad = rewrite(good_bundle, tmp_path / "nul.zip", manifest=lambda m: m["runs"][0].update(name="a\0b"))
    refused(engine("import", str(bad), "--db", str(tmp_path / "t.db")), "without NUL")
    assert Store(tmp_path / "t.db").list_runs() == []


def bundle_with_checkpoints(tmp_path, width: int) -> Path:
    db = str(tmp_path / f"w{width}.db")
    out = engine("train", "--width", str(width), "--epochs", "1", "--keep-every", "1", "--log-every", "20", "--db", db)
    assert out.returncode == 0, out.stderr
    bundle = tmp_path / f"w{width}.zip"
    assert engine("bundle", out.stdout.split()[-1], "--with-checkpoints", "--out", str(bundle), "--db", db).returncode == 0
    return bundle


def test_a_bundled_checkpoint_must_fit_its_config(tmp_path):
    """Issue 17 item 6, the checkpoints. Before: a 1.1 MB bundle declaring a 1 GiB checkpoint wrote a
    1 GiB file, and a width-32 checkpoint under a width-64 config was imported (its fork was left
    `running` with no process). Now a checkpoint larger than its config's model can take is refused
    before anything is copied, one of another architecture after, and nothing is left behind."""
    bundle = bundle_with_checkpoints(tmp_path, 32)
    with zipfile.ZipFile(bundle) as src:
        members = {name: src.read(name) for name in src.namelist()}
    manifest = json.loads(members["manifest.json"])
    [member] = [name for name in members if name.startswith("checkpoints/")]
    target = tmp_path / "t.db"

    huge = dict(members, **{member: members[member] + b"\0" * (40 << 20)})
    grown = json.loads(members["manifest.json"])
    grown["runs"][0]["checkpoints"][0]["bytes"] = len(huge[member])
    huge["manifest.json"] = json.dumps(grown).encode()
    too_big = tmp_path / "huge.zip"
    with zipfile.ZipFile(too_big, "w") as dst:
        for name, data in huge.items():
            dst.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED)
    refused(engine("import", str(too_big), "--db", str(target)), "more than its model can take")

    manifest["runs"][0]["config"]["width"] = 64
    members["manifest.json"] = json.dumps(manifest).encode()
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as dst:
        for name, data in members.items():
            dst.writestr(name, data)
    refused(engine("import", str(other), "--db", str(target)), "does not fit its config", "width 64")
    assert Store(target).list_runs() == [] and not [p for p in Path(f"{target}.checkpoints").rglob("*") if p.is_file()]
