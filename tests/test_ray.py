"""The Ray executor (`worker --executor ray`) on a real two-node Ray cluster on 127.0.0.1: a PostgreSQL
store, one shared artifact root, packs placed by Ray on both nodes, a node lost mid-sweep, a study.

One cluster serves the whole file (it takes seconds to start) and this test process is its driver
for the in-process workers: one Ray job, so each node's worker process imports torch once for all
of them. Ray is in requirements-test.txt: without it these tests skip, except under CI=true, where
that is a failure.
"""
import json
import os
import signal
import subprocess
import sys
import threading
from types import SimpleNamespace

# Before ray is imported anywhere in this process: Ray would otherwise swap 127.0.0.1 for this machine's
# network address when joining a cluster; the test cluster lives on the loopback interface only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from engine.config import RunConfig  # noqa: E402
from engine.worker import Worker  # noqa: E402
from storage import Store  # noqa: E402
from tests.processes import ROOT, engine, wait_for  # noqa: E402

NODE = dict(num_cpus=1, object_store_memory=80 * 2**20, node_ip_address="127.0.0.1")
NODE_ENV = ("PYTHONPATH", "SPHERELAB_COMMAND_POLL_S")
SWEEP = ["--width", "16", "--log-every", "4"]
# the ticks toy, tinier than conftest's SMALL_STUDY: 2 PLRs x 1 seed, one FLR
STUDY = ["--dataset", "ticks", "--norm", "layer", "--width", "16", "--depth", "2", "--batch-size", "16",
         "--log-every", "32", "--eval-every", "320", "--pretrain-elr", "1e-3", "1", "--pretrain-epochs", "10",
         "--finetune-elr", "1e-4", "--finetune-epochs", "4", "--average", "2", "--points", "3", "--no-refine"]


def _ray():
    try:
        import ray
        from ray.cluster_utils import Cluster
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("the Ray executor's tests must run in CI but ray is not installed (requirements-test.txt)")
        pytest.skip("ray is not installed (pip install -r requirements-test.txt)")
    return ray, Cluster


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes on 127.0.0.1, one CPU each, told apart by a custom resource; this process connected."""
    ray, Cluster = _ray()
    saved = {key: os.environ.get(key) for key in NODE_ENV}
    # the nodes' worker processes inherit this environment: spherelab importable, commands (pause) taken
    # up within 0.1 s rather than 0.5 s
    os.environ.update({"PYTHONPATH": os.pathsep.join([str(ROOT), *([saved["PYTHONPATH"]] if saved["PYTHONPATH"]
                                                                   else [])]),
                       "SPHERELAB_COMMAND_POLL_S": "0.1"})
    try:
        made = Cluster(initialize_head=True, head_node_args=dict(NODE, resources={"node_a": 1},
                                                                 include_dashboard=False))
        try:
            # the driver joins the head before node b exists: a driver on node b would end with it
            ray.init(address=made.address, log_to_driver=False)
            try:
                b = made.add_node(**NODE, resources={"node_b": 1})
                yield SimpleNamespace(ray=ray, cluster=made, address=made.address, b=b,
                                      nodes={made.head_node.node_id: "a", b.node_id: "b"})
            finally:
                ray.shutdown()
        finally:
            made.shutdown()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_worker(url: str, worker: Worker | None = None) -> Worker:
    """A Ray-executor worker in this process (its Ray job: the fixture's) until the queue is empty."""
    from engine.ray_executor import RayExecutor
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    worker = worker or Worker(url, poll_s=0.2, exit_when_idle=True, executor=RayExecutor(url))
    try:
        assert worker.run() == 0
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return worker


def submit(url: str, *args) -> list[int]:
    return [int(x) for x in engine("submit", *args, db=url, check=True).stdout.split()]


def placements(store: Store, cluster, run_id: int) -> list[str]:
    """The nodes ("a", "b") the run trained on, in order, from its notes."""
    return [cluster.nodes[e.payload["ray_node"]] for e in store.events(run_id, ["note"]) if "ray_node" in e.payload]


def statuses(store: Store, run_id: int) -> list[str]:
    return [e.payload["status"] for e in store.events(run_id, ["status"])]


def test_import_of_the_worker_does_not_import_ray():
    code = "import sys, engine.worker, engine.executors, engine.cli; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_without_ray_the_executor_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    from engine.cli import main
    monkeypatch.setitem(sys.modules, "ray", None)        # `import ray` raises ImportError, as when it is missing
    db = tmp_path / "none.db"
    assert main(["worker", "--executor", "ray", "--db", str(db)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install spherelab[ray]" in err, err
    assert not db.exists()                                # nothing written
    assert main(["worker", "--ray-address", "auto", "--db", str(db)]) == 2
    assert "--ray-address is for --executor ray" in capsys.readouterr().err
    assert not db.exists()


def test_a_sweep_trains_every_run_once_on_both_nodes(cluster, postgres_url, tmp_path, monkeypatch):
    root = tmp_path / "shared-artifacts"
    monkeypatch.setenv("SPHERELAB_ARTIFACTS", str(root))   # the nodes' workers never see it: it is passed
    ids = submit(postgres_url, "--elr", "0.001", "0.002", "0.004", "0.008", "0.016", "0.032", "0.064", "0.128",
                 "--epochs", "3", "--keep-every", "3", *SWEEP)
    run_worker(postgres_url)
    store = Store(postgres_url)
    where = {}
    for run_id in ids:
        info = store.get_run(run_id)
        assert info.status == "finished" and info.progress == 1.0 and info.error is None, (run_id, info.error)
        history = statuses(store, run_id)
        assert history.count("running") == 1 and history[-1] == "finished", history     # trained exactly once
        [where[run_id]] = placements(store, cluster, run_id)
        frame = store.read_metrics(run_id, ["train_loss"])
        assert frame["step"].is_monotonic_increasing and frame["step"].is_unique
        assert int(frame["step"].max()) == info.total_steps
        [kept] = store.checkpoints(run_id)                             # written by a node, into the shared root
        assert (root / kept.path).is_file()
    assert set(where.values()) == {"a", "b"}, where                     # Ray placed packs on both nodes
    packs = {}
    for run_id in ids:
        notes = [e.payload["text"] for e in store.events(run_id, ["note"]) if e.payload.get("text", "").startswith(
            "packed with")]
        packs.setdefault(where[run_id], set()).add(run_id)
        assert notes, f"run {run_id} trained alone"
    assert sorted(len(p) for p in packs.values()) == [4, 4]             # the sweep split over the two slots


def test_a_study_finishes_under_the_ray_executor(cluster, postgres_url, tmp_path, monkeypatch):
    monkeypatch.setenv("SPHERELAB_ARTIFACTS", str(tmp_path / "shared-artifacts"))
    study_id = int(engine("study", *STUDY, "--submit", db=postgres_url, check=True).stdout.split()[-1])
    run_worker(postgres_url)
    store = Store(postgres_url)
    assert store.get_study(study_id).status == "finished"
    runs = store.list_runs(study_id=study_id)
    assert len(runs) == 4 and all(r.status == "finished" for r in runs)       # 2 pre-trainings, 2 fine-tunings
    assert all(placements(store, cluster, r.id) for r in runs)
    jobs = store.list_jobs(study_id=study_id)
    assert jobs and all(j.status == "finished" for j in jobs)                 # averages and geometries too
    report = json.loads(engine("report", str(study_id), "--json", db=postgres_url, check=True).stdout)
    assert [row["finetune_test_acc"]["0.0001"]["n"] for row in report["rows"]] == [1, 1]


def test_the_cli_worker_joins_the_cluster_at_its_address(cluster, postgres_url, tmp_path):
    """`worker --executor ray --ray-address ADDR`: a driver of its own on the cluster (an empty queue here:
    the tests above train through the same executor in this process, whose nodes' workers are warm)."""
    out = engine("worker", "--executor", "ray", "--ray-address", cluster.address, "--once", "--poll", "0.2",
                 "--artifacts", str(tmp_path / "shared-artifacts"), db=postgres_url, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"Ray tasks on the Ray cluster at {cluster.address} (2 node(s)), up to 2 at once" in out.stderr, \
        out.stderr[-3000:]


def test_stopping_the_worker_stops_its_tasks_runs_in_order(cluster, postgres_url, tmp_path, monkeypatch, capsys):
    """SIGTERM or Ctrl-C of a Ray-executor worker (its handler: Worker._stop) cancels its tasks, and a
    pack's runs stop at their next step `interrupted`, resumable, with no task left to kill."""
    from engine.ray_executor import RayExecutor
    monkeypatch.setenv("SPHERELAB_ARTIFACTS", str(tmp_path / "shared-artifacts"))
    [run_id] = submit(postgres_url, "--elr", "0.01", "--epochs", "1000", *SWEEP)
    store = Store(postgres_url)
    worker = Worker(postgres_url, poll_s=0.2, executor=RayExecutor(postgres_url))
    worker.shutdown_grace_s = 120.0

    def stop_when_training():
        wait_for(lambda: (store.last_step(run_id) or 0) > 20, timeout=120)
        worker._stop()
    threading.Thread(target=stop_when_training, daemon=True).start()
    run_worker(postgres_url, worker)
    info = store.get_run(run_id)
    assert info.status == "interrupted" and info.error is None and info.step < info.total_steps
    assert "killed" not in capsys.readouterr().err                # the task stopped by itself


def test_a_node_lost_mid_sweep_loses_nothing(cluster, postgres_url, tmp_path, monkeypatch):
    """Node b goes away while its pack trains (parked by pause commands once it has a checkpoint, so the
    loss lands mid-run whatever the machine's speed): its runs are interrupted, resumed on node a from
    their checkpoints, and each stored trace is one trajectory, the one an uninterrupted run gives."""
    from engine.trainer import train_traces
    monkeypatch.setenv("SPHERELAB_ARTIFACTS", str(tmp_path / "shared-artifacts"))
    # long enough (~1.5 s a pack here) for the pause, taken up within 0.1 s, to land before the end
    ids = submit(postgres_url, "--elr", "0.002", "0.008", "0.032", "0.128", "--epochs", "30", *SWEEP)
    store = Store(postgres_url)
    lost: dict = {}
    failure: list = []

    def lose_node_b():
        try:
            def parked_on_b():
                on_b = [r for r in ids if placements(store, cluster, r) == ["b"]]
                ready = on_b and all(store.get_run(r).checkpoint_step is not None for r in on_b)
                return ready and on_b
            on_b = wait_for(parked_on_b, timeout=240)
            for run_id in on_b:
                store.send_command(run_id, "pause")
            wait_for(lambda: all(store.get_run(r).status == "paused" for r in on_b), timeout=120)
            lost.update({r: store.get_run(r).checkpoint_step for r in on_b})
            cluster.cluster.remove_node(cluster.b)
        except BaseException as exc:          # noqa: BLE001 - reported by the test below
            failure.append(exc)

    watcher = threading.Thread(target=lose_node_b, daemon=True)
    watcher.start()
    run_worker(postgres_url)
    watcher.join(timeout=60)
    assert not failure, failure
    assert lost, "node b was never removed"
    compared = False
    for run_id in ids:
        info = store.get_run(run_id)
        assert info.status == "finished" and info.error is None, (run_id, info.status, info.error)
        stored = store.read_metrics(run_id)
        assert stored["step"].is_monotonic_increasing and stored["step"].is_unique
        if run_id not in lost:
            assert statuses(store, run_id).count("running") == 1 and placements(store, cluster, run_id) == ["a"]
            continue
        history = statuses(store, run_id)
        assert history[-3:] == ["interrupted", "running", "finished"], history
        assert placements(store, cluster, run_id) == ["b", "a"]           # resumed elsewhere
        [resume] = store.events(run_id, ["resume"])
        assert resume.payload["from_step"] == lost[run_id]              # from its checkpoint, not from scratch
        if compared:
            continue
        compared = True                       # one lost run against the same run trained without a loss
        expected = train_traces([RunConfig.from_dict(info.config)])[0]
        assert stored["step"].tolist() == expected["step"].tolist()
        for key in ("train_loss", "si_norm", "test_acc"):
            np.testing.assert_allclose(stored[key], expected[key], rtol=1e-5, equal_nan=True, err_msg=key)
