"""Every dashboard page through Streamlit's AppTest: with an empty store, with a store of real short
runs (trained once per session by the engine's CLI), and with a broken database."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from engine.submission import queue_runs
from dashboard import launch, plain
from storage import Store

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "streamlit_app.py")
PAGES = ["launch", "live", "run", "compare", "regime_map", "periodic", "solutions", "study", "teach"]
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


# ---- empty store ---------------------------------------------------------------------------------
@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_an_empty_store(empty_db, monkeypatch, page):
    at = open_app(empty_db, monkeypatch, page)
    shown = texts(at)
    if page in ("run", "compare", "periodic", "solutions"):
        assert "No runs in this database yet" in shown
    elif page == "regime_map":
        assert "No sweeps in this database yet" in shown
    elif page == "study":
        assert "No study in this database yet" in shown
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
                "regime_map": "still queued or training", "periodic": "Nothing logged yet",
                "launch": "3 run(s) queued", "solutions": "No run has kept checkpoints yet",
                "study": "No study in this database yet",
                "teach": "Scale-invariant networks in seven short steps"}
    assert set(expected) == set(PAGES) and expected[page] in shown


# ---- a store of real runs ------------------------------------------------------------------------
def test_live_overview_lists_runs_that_just_ended_and_overlays_them(runs_db, monkeypatch):
    at = open_app(runs_db, monkeypatch, "live")
    runs = Store(runs_db).list_runs()
    table = at.dataframe[0].value
    assert list(table["run"]) == [f"#{run.id} {run.name}" for run in runs]
    assert list(table["regime"]) == [(run.regime or "undetermined").replace("_", " ") for run in runs]
    assert list(table["progress"]) == [1.0] * len(runs)
    # one overlay of every run (cards are collapsed: their curves are drawn only when opened)
    [overlay] = charts(at)
    cards = [e.label for e in at.expander]
    assert all(any(c.startswith(plain.md(f"#{run.id} {run.name}")) for c in cards) for run in runs)
    # sphere runs open with the norm-free panels, lrwd ones with the norm and the ELR, in the order of the
    # newest run's mode (the fixture's sweep and lrwd run are created concurrently: either may be newer)
    panels = {"sphere": ["train_loss", "test_acc", "eff_grad_norm", "angular_update"],
              "lrwd": ["train_loss", "si_norm", "elr", "test_acc"]}
    first = runs[0].config.get("mode", "sphere")
    expected = list(dict.fromkeys(panels[first] + panels["lrwd" if first == "sphere" else "sphere"]))
    assert at.multiselect(key="metric").value == expected


def test_run_page_shows_regime_curves_config_and_events(runs_db, monkeypatch):
    store = Store(runs_db)
    lrwd = store.list_runs(tag="lrwd")[0]
    at = open_app(runs_db, monkeypatch, "run", run=lrwd.id)
    assert at.selectbox(key="run").value == lrwd.id
    shown = texts(at)
    assert "finished" in shown and "regime" in shown
    assert regime_badges(at)[0] in ("convergence", "chaotic equilibrium", "divergence", "undetermined")
    # the curves, and each SI layer's ELR as a heatmap (a row per layer of the 3-block mlp_si)
    assert [c.key for c in charts(at)] == ["run-curves", "run-layer-heatmap"] and len(at.dataframe) == 2
    assert json.loads(charts(at)[1].proto.spec)["data"][0]["y"] == ["fc0", "fc1", "fc2"]
    assert at.query_params["run"] == str(lrwd.id)


def test_compare_overlays_chosen_runs_and_lists_config_differences(runs_db, monkeypatch):
    ids = [run.id for run in Store(runs_db).list_runs()]
    at = open_app(runs_db, monkeypatch, "compare", runs=",".join(map(str, ids)), metric="train_loss,test_acc",
                  x="epoch", log="train_loss", smooth="0.6")
    assert at.multiselect(key="runs").value == ids
    assert at.multiselect(key="metric").value == ["train_loss", "test_acc"]
    assert at.selectbox(key="x").value == "epoch" and at.slider(key="smooth").value == pytest.approx(0.6)
    assert len(charts(at)) == 1
    diff = at.dataframe[0].value
    assert set(diff["config"]) >= {"elr", "mode", "lr", "wd"} and "epochs" not in set(diff["config"])
    # the link to this view is the URL: it carries the state
    assert at.query_params["runs"] == ",".join(map(str, ids)) and at.pills(key="log").value == ["train_loss"]


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
    assert sum(int(m.value) for m in at.metric) == 3
    target = sweep.run_ids[-1]
    at.selectbox(key="open_run").set_value(target)
    at.button(key="open_button").click().run()
    assert not at.exception
    assert at.selectbox(key="run").value == target and at.query_params["run"] == str(target)


def test_periodic_view_draws_loss_norm_elr_and_sharpness(runs_db, monkeypatch):
    lrwd = Store(runs_db).list_runs(tag="lrwd")[0]
    at = open_app(runs_db, monkeypatch, "periodic", run=lrwd.id)
    assert len(charts(at)) == 3  # periodic panels, the cycle picture, sharpness against 2/ELR
    assert "loss spikes" in texts(at) and at.multiselect(key="sharp").value == [lrwd.id]


def test_sharpness_defaults_to_runs_that_measure_it(runs_db, monkeypatch):
    store = Store(runs_db)
    sphere = [run for run in store.list_runs() if run.config["mode"] == "sphere"][0]
    at = open_app(runs_db, monkeypatch, "periodic", run=sphere.id)
    assert at.multiselect(key="sharp").value == [store.list_runs(tag="lrwd")[0].id]
    assert "on the sphere" in texts(at)


@pytest.mark.parametrize("topic", ["invariance", "elr", "regimes", "periodic", "sharpness", "solutions", "study"])
def test_teach_topics_render_from_the_url(runs_db, monkeypatch, topic):
    at = open_app(runs_db, monkeypatch, "teach", topic=topic)
    assert at.latex and at.segmented_control(key="topic").value == topic
    if topic in ("regimes", "periodic", "sharpness", "solutions", "study"):
        assert at.button(key=f"demo-{topic}").label == "Run this demo"


def test_teach_demo_queues_its_preset(empty_db, monkeypatch):
    at = open_app(empty_db, monkeypatch, "teach", topic="regimes")
    at.button(key="demo-regimes").click().run()
    queued = Store(empty_db).list_runs(status="queued")
    assert len(queued) == 3 and len({run.sweep_id for run in queued}) == 1
    assert "3 run(s) queued" in texts(at)
    # the worker panel is drawn after the click: it counts the demo's runs waiting (it said nothing of them)
    assert any("3 run(s) queued." in w.value for w in at.warning), [w.value for w in at.warning]
    assert at.query_params["runs_regimes"] == ",".join(str(r.id) for r in sorted(queued, key=lambda r: r.id))


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
    assert any("no-cifar-here" in e.value.replace("\\", "") for e in at.error)
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
    assert at.expander[0].label.startswith(plain.md(f"#{run.id}")) and "Waiting for the first log point" in texts(at)
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


@pytest.mark.parametrize("page, param", [("run", "run"), ("periodic", "run"), ("regime_map", "sweep")])
def test_a_link_to_a_missing_run_or_sweep_says_so(runs_db, monkeypatch, page, param):
    at = open_app(runs_db, monkeypatch, page, **{param: 99999})
    assert any("99999 is not in this database" in w.value for w in at.warning)
    # then it shows the newest one rather than failing
    store = Store(runs_db)
    newest = store.list_runs()[0].id if param == "run" else store.list_sweeps()[0].id
    if page == "periodic":
        newest = store.list_runs(tag="lrwd")[0].id
    assert at.selectbox(key=param).value == newest


# ---- plain text, managing runs, following training, teaching ----------------------------------------
EVIL = "[click](http://evil.example) ![x](http://evil.example/i.png) <a href=x>y</a>"


def markdown_sources(at: AppTest) -> list[str]:
    """Every string the page handed Streamlit to render as markdown."""
    parts = [e.value for kind in ("title", "subheader", "markdown", "caption", "info", "warning", "error", "success",
                                  "toast") for e in getattr(at, kind)]
    parts += [e.label for kind in ("expander", "button", "metric", "tabs") for e in getattr(at, kind)]
    return [str(p) for p in parts]


@pytest.mark.parametrize("page", ["live", "run", "compare", "regime_map", "periodic", "teach"])
def test_names_notes_and_errors_never_render_as_links_or_images(empty_db, monkeypatch, page):
    store = Store(empty_db)
    sweep_id, [run_id] = store.create_sweep_runs(EVIL, {}, [{"config": {"mode": "lrwd", "sharpness_every": 5},
                                                             "name": EVIL, "tags": [EVIL]}])
    store.log_metrics(run_id, [(s, s / 10, s / 10, {"train_loss": 2.0 / (s + 1), "sharpness": 1.0 + s,
                                                   "sharpness_threshold": 50.0, "elr": 0.01, "eff_grad_norm": 3.0})
                               for s in range(0, 100, 10)])
    store.set_notes(run_id, EVIL)
    store.update_run(run_id, status="failed", error=EVIL)
    at = open_app(empty_db, monkeypatch, page, run=run_id, runs=run_id, sweep=sweep_id, topic="sharpness",
                  runs_sharpness=run_id)
    sources = markdown_sources(at)
    assert any("evil" in text for text in sources) or page in ("compare", "teach", "periodic")  # there: widgets, charts
    assert_plain_text(sources, charts(at))


def assert_plain_text(sources, page_charts) -> None:
    """No markdown source makes a link, an image or HTML of user text, and no chart carries it as HTML."""
    for text in sources:
        # a link or an image needs an unescaped "](", HTML an unescaped "<"; a bare-URL autolink is
        # found after escapes resolve, so "http://" must not survive even in the resolved text
        bare = re.sub(r"\\[^\w\s]", "", text)
        assert "](" not in bare and "<a" not in bare, text
        assert "://" not in re.sub(r"\\(.)", r"\1", text), text
    for chart in page_charts:
        assert "<a href" not in chart.proto.spec and "evil.example/i.png\"" not in chart.proto.spec


def test_manage_a_run_rename_tags_notes_and_delete_with_confirmation(empty_db, monkeypatch):
    store = Store(empty_db)
    keep, gone = store.create_runs([{"config": {}, "name": "keep"}, {"config": {}, "name": "gone"}])
    at = open_app(empty_db, monkeypatch, "run", run=keep)
    at.text_input(key=f"m-name-{keep}").set_value("renamed").run()
    at.button(key=f"m-rename-{keep}").click().run()
    at.multiselect(key=f"m-tags-{keep}").set_value(["lecture"]).run()
    at.button(key=f"m-save-tags-{keep}").click().run()
    at.text_area(key=f"m-notes-{keep}").set_value("ELR too small here")
    at.button(key=f"m-save-notes-{keep}").click().run()
    run = store.get_run(keep)
    assert (run.name, run.tags, store.notes(keep)) == ("renamed", ["lecture"], "ELR too small here")

    at = open_app(empty_db, monkeypatch, "run", run=gone)
    at.button(key=f"m-delete-{gone}-ask").click().run()
    assert [r.id for r in store.list_runs()] == [gone, keep]     # asking is not deleting
    at.button(key=f"m-delete-{gone}-yes").click().run()
    assert not at.exception and [r.id for r in store.list_runs()] == [keep]
    assert any(f"Deleted run #{gone}" in s.value.replace("\\", "") for s in at.success)


def test_a_run_being_trained_is_not_offered_for_deletion(empty_db, monkeypatch):
    store = Store(empty_db)
    run_id = store.create_run({}, name="busy")
    store.update_run(run_id, status="running")
    at = open_app(empty_db, monkeypatch, "run", run=run_id)
    assert not any(b.key == f"m-delete-{run_id}-ask" for b in at.button)
    assert "is being trained. Stop it first" in texts(at)


def test_manage_a_sweep_rename_and_delete(empty_db, monkeypatch):
    store = Store(empty_db)
    sweep_id, ids = store.create_sweep_runs("s", {}, [{"config": {"elr": e}, "name": f"e{e}"} for e in (0.01, 0.1)])
    at = open_app(empty_db, monkeypatch, "regime_map", sweep=sweep_id)
    at.text_input(key=f"m-sweep-name-{sweep_id}").set_value("lecture sweep").run()
    at.button(key=f"m-sweep-rename-{sweep_id}").click().run()
    assert store.get_sweep(sweep_id).name == "lecture sweep"
    at.button(key=f"m-sweep-delete-{sweep_id}-ask").click().run()
    at.button(key=f"m-sweep-delete-{sweep_id}-yes").click().run()
    assert not at.exception and store.list_runs() == [] and store.list_sweeps() == []


def test_compare_draws_a_phase_diagram_and_seed_bands(empty_db, monkeypatch):
    store = Store(empty_db)
    ids = store.create_runs([{"config": {"mode": "sphere", "elr": 0.01, "seed": seed}, "name": f"seed {seed}"}
                             for seed in (0, 1)])
    for run_id in ids:
        store.log_metrics(run_id, [(s, s / 10, s / 10, {"train_loss": (2.0 + run_id) / (s + 1),
                                                       "eff_grad_norm": 5.0 / (s + 1) ** 0.5}) for s in range(0, 200, 10)])
    at = open_app(empty_db, monkeypatch, "compare", runs=",".join(map(str, ids)))
    at.button(key="show-phase").click().run()
    assert at.selectbox(key="x").value == "eff_grad_norm" and at.multiselect(key="metric").value == ["train_loss"]
    assert set(at.pills(key="log").value) == {"x", "train_loss"}
    spec = charts(at)[0].proto.spec
    assert '"start"' in spec and '"type":"log"' in spec.replace(" ", "")
    at.toggle(key="seeds").set_value(True).run()
    assert "mean of 2 seeds" in charts(at)[0].proto.spec and '"tonexty"' in charts(at)[0].proto.spec


def test_teach_draws_the_demo_runs_on_the_same_page(runs_db, monkeypatch):
    store = Store(runs_db)
    sweep = store.list_sweeps()[0]
    at = open_app(runs_db, monkeypatch, "teach", topic="regimes", runs_regimes=",".join(map(str, sweep.run_ids)))
    overlay, regime_map = charts(at)
    assert all(f"#{i} " in overlay.proto.spec for i in sweep.run_ids)       # every run of the demo, labelled
    assert "tail mean of the train loss" in regime_map.proto.spec
    assert len(regime_badges(at)) == len(sweep.run_ids)
    assert f"The demo's {len(sweep.run_ids)} run(s) have ended: {len(sweep.run_ids)} finished." in texts(at)


def test_the_worker_panel_says_a_live_worker_is_taking_queued_work_not_idle(empty_db, monkeypatch):
    """Right after a study was queued the panel said 'idle': the worker had not claimed the runs yet."""
    store = Store(empty_db)
    store.worker_heartbeat("w1", host="here", pid=1, device="cpu", max_parallel=2)
    at = open_app(empty_db, monkeypatch, "launch")
    assert "Worker alive" in texts(at) and "idle." in texts(at)
    queue_runs(store, launch.configs_of(launch.LaunchForm(epochs=1))[0])
    [run_id] = [r.id for r in store.list_runs()]
    store.create_job("average", run_id, {"epochs": [1]})
    at = open_app(empty_db, monkeypatch, "launch")
    shown = texts(at)
    assert "taking the queued work" in shown and "idle" not in shown, shown
    assert "1 run(s) queued. 1 job(s) queued." in shown
