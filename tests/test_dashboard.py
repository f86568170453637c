"""Every dashboard page through Streamlit's AppTest: with an empty store, with a store of real short
runs (trained once per session by the engine's CLI), and with a broken database."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from engine.submission import queue_runs
from dashboard import launch
from storage import Store

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "streamlit_app.py")
PAGES = ["launch", "live", "run", "compare", "regime_map", "periodic", "teach"]
SWEEP_ELRS = ["1e-3", "1e-2", "0.2"]


def open_app(db, monkeypatch, page: str | None = None, **query) -> AppTest:
    monkeypatch.setenv("SPHERELAB_DB", str(db))
    at = AppTest.from_file(APP, default_timeout=60).run()
    if page is not None:
        at.switch_page(f"dashboard/pages/{page}.py")
        at.query_params.update({key: str(value) for key, value in query.items()})
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def texts(at: AppTest) -> str:
    """Everything the page wrote, as one string to search."""
    parts = [e.value for kind in ("title", "subheader", "markdown", "caption", "info", "warning", "error",
                                  "success") for e in getattr(at, kind)]
    parts += [m.value for m in at.metric] + [m.label for m in at.metric]
    return "\n".join(map(str, parts))


def regime_badges(at: AppTest) -> list[str]:
    """The regime labels shown as badges (st.badge is markdown like ':orange-badge[chaotic equilibrium]')."""
    return [m.value.split("[", 1)[1].rstrip("]") for m in at.markdown if "-badge[" in m.value]


def charts(at: AppTest) -> list:
    return at.get("plotly_chart")


@pytest.fixture(scope="session")
def runs_db(tmp_path_factory):
    """A store of real runs: a 3-ELR sphere sweep and one lrwd run measuring sharpness, 2 epochs each."""
    db = tmp_path_factory.mktemp("dashboard") / "runs.db"
    common = ["--db", str(db), "--epochs", "2", "--log-every", "5"]
    jobs = [subprocess.Popen([sys.executable, "-m", "engine", "sweep", *common, "--elr", *SWEEP_ELRS],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
            subprocess.Popen([sys.executable, "-m", "engine", "train", *common, "--mode", "lrwd", "--lr", "0.3",
                              "--wd", "0.01", "--sharpness-every", "20", "--tags", "lrwd"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    for job in jobs:
        out, err = job.communicate(timeout=300)
        assert job.returncode == 0, err[-2000:]
    return db


@pytest.fixture
def empty_db(tmp_path):
    return tmp_path / "empty.db"


# ---- empty store ---------------------------------------------------------------------------------
@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_an_empty_store(empty_db, monkeypatch, page):
    at = open_app(empty_db, monkeypatch, page)
    shown = texts(at)
    if page in ("run", "compare", "periodic"):
        assert "No runs in this database yet" in shown
    elif page == "regime_map":
        assert "No sweeps in this database yet" in shown
    elif page == "live":
        assert "No runs in this database yet" in shown and "No worker is running" in shown
    elif page == "launch":
        assert "No worker is running" in shown
        assert at.button(key="queue_preset").label.startswith("Queue")
    else:
        assert at.latex  # teach: the walkthrough shows its formulas


@pytest.mark.parametrize("page", PAGES)
def test_every_page_handles_runs_that_have_not_started(empty_db, monkeypatch, page):
    configs, swept = launch.configs_of(launch.LaunchForm(sweep_rate=True, rate_start=1e-3, rate_stop=1e-1,
                                                         rate_points=3, epochs=1))
    ids = queue_runs(Store(empty_db), configs, swept)
    at = open_app(empty_db, monkeypatch, page, runs=",".join(map(str, ids)))
    shown = texts(at)
    expected = {"live": "3 run(s) queued", "run": "Nothing logged yet", "compare": "have not logged anything yet",
                "regime_map": "still queued or training", "periodic": "Nothing logged yet"}.get(page, "")
    assert expected in shown


# ---- a store of real runs ------------------------------------------------------------------------
def test_live_shows_runs_that_just_ended_with_their_curves(runs_db, monkeypatch):
    at = open_app(runs_db, monkeypatch, "live")
    runs = Store(runs_db).list_runs()
    shown = texts(at)
    assert all(f"#{run.id} {run.name}" in shown for run in runs)
    assert len(charts(at)) == len(runs)
    assert sorted(regime_badges(at)) == sorted((run.regime or "undetermined").replace("_", " ") for run in runs)


def test_run_page_shows_regime_curves_config_and_events(runs_db, monkeypatch):
    store = Store(runs_db)
    lrwd = store.list_runs(tag="lrwd")[0]
    at = open_app(runs_db, monkeypatch, "run", run=lrwd.id)
    assert at.selectbox(key="run").value == lrwd.id
    shown = texts(at)
    assert "finished" in shown and "regime" in shown
    assert regime_badges(at)[0] in ("convergence", "chaotic equilibrium", "divergence", "undetermined")
    assert len(charts(at)) == 1 and len(at.dataframe) == 2
    assert at.query_params["run"] == str(lrwd.id)


def test_compare_overlays_chosen_runs_and_lists_config_differences(runs_db, monkeypatch):
    ids = [run.id for run in Store(runs_db).list_runs()]
    at = open_app(runs_db, monkeypatch, "compare", runs=",".join(map(str, ids)), metric="train_loss,test_acc",
                  x="epoch", log="y", smooth="0.6")
    assert at.multiselect(key="runs").value == ids
    assert at.multiselect(key="metric").value == ["train_loss", "test_acc"]
    assert at.radio(key="x").value == "epoch" and at.slider(key="smooth").value == pytest.approx(0.6)
    assert len(charts(at)) == 1
    diff = at.dataframe[0].value
    assert set(diff["config"]) >= {"elr", "mode", "lr", "wd"} and "epochs" not in set(diff["config"])
    # the link to this view is the URL: it carries the state
    assert at.query_params["runs"] == ",".join(map(str, ids)) and at.query_params["log"] == "y"


def test_compare_filters_by_config(runs_db, monkeypatch):
    at = open_app(runs_db, monkeypatch, "compare")
    at.text_input(key="config").set_value("mode=lrwd").run()
    at.button(key="select_all").click().run()
    lrwd = Store(runs_db).list_runs(tag="lrwd")
    assert at.multiselect(key="runs").value == [run.id for run in lrwd]


def test_regime_map_shows_the_sweep_with_labels_and_opens_a_run(runs_db, monkeypatch):
    store = Store(runs_db)
    sweep = store.list_sweeps()[0]
    at = open_app(runs_db, monkeypatch, "regime_map", sweep=sweep.id)
    assert len(charts(at)) == 1
    table = at.dataframe[0].value
    assert sorted(table["elr"]) == [0.001, 0.01, 0.2]
    assert set(table["regime"]) <= {"convergence", "chaotic_equilibrium", "divergence", "undetermined"}
    assert "divergence" in set(table["regime"])  # ELR 0.2 never learns, even in 2 epochs
    assert sum(int(m.value) for m in at.metric[:4]) == 3
    target = sweep.run_ids[-1]
    at.selectbox(key="open_run").set_value(target)
    at.button(key="open_button").click().run()
    assert not at.exception
    assert at.selectbox(key="run").value == target and at.query_params["run"] == str(target)


def test_periodic_view_draws_loss_norm_elr_and_sharpness(runs_db, monkeypatch):
    lrwd = Store(runs_db).list_runs(tag="lrwd")[0]
    at = open_app(runs_db, monkeypatch, "periodic", run=lrwd.id)
    assert len(charts(at)) == 2  # periodic panels + sharpness against 2/ELR
    assert "loss spikes" in texts(at)


def test_periodic_view_explains_a_run_without_sharpness(runs_db, monkeypatch):
    sphere = [run for run in Store(runs_db).list_runs() if run.config["mode"] == "sphere"][0]
    at = open_app(runs_db, monkeypatch, "periodic", run=sphere.id)
    assert "did not measure sharpness" in texts(at)


@pytest.mark.parametrize("topic", ["invariance", "elr", "regimes", "periodic", "sharpness"])
def test_teach_topics_render_from_the_url(runs_db, monkeypatch, topic):
    at = open_app(runs_db, monkeypatch, "teach", topic=topic)
    assert at.latex and at.segmented_control(key="topic").value == topic
    if topic in ("regimes", "periodic", "sharpness"):
        assert at.button(key=f"demo-{topic}").label == "Run this demo"


def test_teach_demo_queues_its_preset(empty_db, monkeypatch):
    at = open_app(empty_db, monkeypatch, "teach", topic="regimes")
    at.button(key="demo-regimes").click().run()
    queued = Store(empty_db).list_runs(status="queued")
    assert len(queued) == 3 and len({run.sweep_id for run in queued}) == 1
    assert "Queued 3 run(s)" in texts(at)


# ---- launching -----------------------------------------------------------------------------------
def test_launch_form_queues_a_run_with_the_chosen_config(empty_db, monkeypatch):
    at = open_app(empty_db, monkeypatch, "launch")
    at.radio(key="f_mode").set_value("lrwd").run()
    at.number_input(key="f_lr").set_value(0.05)
    at.number_input(key="f_wd").set_value(0.002)
    at.number_input(key="f_epochs").set_value(3)
    at.number_input(key="f_seed").set_value(4)
    at.number_input(key="f_sharpness_every").set_value(25)
    at.text_input(key="f_tags").set_value("lecture, lrwd").run()
    before = len(Store(empty_db).list_runs(status="queued"))
    at.button(key="queue_custom").click().run()
    assert not at.exception
    queued = Store(empty_db).list_runs(status="queued")
    assert len(queued) == before + 1
    config = queued[0].config
    assert (config["mode"], config["lr"], config["wd"], config["epochs"], config["seed"], config["sharpness_every"]) \
        == ("lrwd", 0.05, 0.002, 3, 4, 25)
    assert queued[0].tags == ["lecture", "lrwd"] and "Queued 1 run(s)" in texts(at)


def test_sweep_builder_queues_a_sweep(empty_db, monkeypatch):
    at = open_app(empty_db, monkeypatch, "launch")
    at.toggle(key="f_sweep").set_value(True).run()
    at.number_input(key="f_start").set_value(1e-3)
    at.number_input(key="f_stop").set_value(1e-1)
    at.number_input(key="f_points").set_value(3)
    at.number_input(key="f_seeds").set_value(2).run()
    at.button(key="queue_custom").click().run()
    queued = Store(empty_db).list_runs(status="queued")
    assert sorted((r.config["elr"], r.config["seed"]) for r in queued) == \
        [(0.001, 0), (0.001, 1), (0.01, 0), (0.01, 1), (0.1, 0), (0.1, 1)]
    assert len({r.sweep_id for r in queued}) == 1


def test_launch_names_a_missing_cifar_folder_and_queues_nothing(empty_db, monkeypatch, tmp_path):
    at = open_app(empty_db, monkeypatch, "launch")
    at.selectbox(key="f_dataset").set_value("cifar10").run()
    at.selectbox(key="f_model").set_value("convnet_si")
    at.text_input(key="f_data_dir").set_value(str(tmp_path / "no-cifar-here")).run()
    at.button(key="queue_custom").click().run()
    assert not at.exception
    assert any("no-cifar-here" in e.value for e in at.error)
    assert Store(empty_db).list_runs() == []


def test_launch_shows_bad_input_as_a_message(empty_db, monkeypatch):
    at = open_app(empty_db, monkeypatch, "launch")
    at.selectbox(key="f_model").set_value("convnet_si").run()  # digits are 8x8: the conv nets cannot take them
    assert any("3x32x32" in e.value for e in at.error)
    assert not any(b.key == "queue_custom" for b in at.button)


def test_preset_queues_its_grid(empty_db, monkeypatch):
    at = open_app(empty_db, monkeypatch, "launch", preset="Three regimes on digits")
    at.button(key="queue_preset").click().run()
    queued = Store(empty_db).list_runs(status="queued")
    assert sorted(r.config["elr"] for r in queued) == [0.001, 0.01, 0.2]


# ---- live control --------------------------------------------------------------------------------
def test_live_controls_send_commands_to_a_running_run(empty_db, monkeypatch):
    store = Store(empty_db)
    at = open_app(empty_db, monkeypatch, "launch")
    at.button(key="queue_custom").click().run()
    run = store.claim_next_run("test-worker")  # what a worker does first: the run is now running
    at = open_app(empty_db, monkeypatch, "live")
    assert f"#{run.id}" in texts(at) and "Waiting for the first log point" in texts(at)
    at.button(key=f"pause-{run.id}").click().run()
    at.number_input(key=f"rate-{run.id}").set_value(0.05)
    at.button(key=f"set-{run.id}").click().run()
    assert not at.exception
    assert [(c.kind, c.payload) for c in store.take_commands(run.id)] == [("pause", {}), ("set_elr", {"value": 0.05})]


def test_start_worker_button_starts_a_worker(empty_db, monkeypatch):
    at = open_app(empty_db, monkeypatch, "launch")
    at.button(key="start_worker").click().run()
    assert not at.exception
    pid = at.session_state["worker_started"]["pid"]
    store = Store(empty_db)
    try:
        deadline = time.monotonic() + 60
        while not store.live_workers() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert [w["pid"] for w in store.live_workers()] == [pid]
        assert "Worker alive" in texts(open_app(empty_db, monkeypatch, "launch"))
    finally:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while store.live_workers() and time.monotonic() < deadline:
            time.sleep(0.2)


# ---- broken databases ----------------------------------------------------------------------------
@pytest.mark.parametrize("page", PAGES)
def test_a_corrupt_database_shows_the_problem_and_the_fix(tmp_path, monkeypatch, page):
    broken = tmp_path / "broken.db"
    broken.write_bytes(b"this is not an SQLite file" * 100)
    at = open_app(broken, monkeypatch, page)
    assert any("not a spherelab database" in e.value for e in at.error)
    assert "SPHERELAB_DB" in texts(at)


def test_an_unreachable_database_shows_the_problem(monkeypatch):
    at = open_app("postgresql://nobody@127.0.0.1:9/nothing", monkeypatch, "compare")
    assert any("Cannot use the run database" in e.value for e in at.error)


def test_a_link_to_a_deleted_run_falls_back_to_the_newest(runs_db, monkeypatch):
    at = open_app(runs_db, monkeypatch, "run", run=99999)
    # an unknown id in the URL falls back to the newest run rather than failing
    assert at.selectbox(key="run").value == Store(runs_db).list_runs()[0].id
