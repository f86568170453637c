"""Branch, average and compare solutions in the dashboard (issue 9): the Run page's forms queue the
right things and word bad input for the form, a branch links its parent, Compare draws a branch
continuing its parent, the Solutions page queues and shows geometries, Teach's demo queues each step
in turn; and the chart builders (barrier marked at the right α, straight line between the ends, kept
checkpoints on the curves). Runs, kept checkpoints and job results are written straight into the
store (no training, no torch): the worker's side is tested in test_solutions.py and in the browser."""
import base64
import json
import re

import numpy as np
import pandas as pd
import pytest

from dashboard import charts, data, launch, solutions
from engine.config import ConfigError, RunConfig
from engine.study import advance, create_study
from storage import Store
from tests.test_dashboard import charts as page_charts
from tests.test_dashboard import EVIL, assert_plain_text, markdown_sources, open_app, texts

PARENT = RunConfig(elr=0.02, epochs=12, keep_every=2, log_every=10)
STEPS_PER_EPOCH = 44


def trace(store: Store, run_id: int, first: int, last: int, level: float) -> None:
    store.log_metrics(run_id, [(s, s / STEPS_PER_EPOCH, s / 100, {"train_loss": level + 1.0 / (1 + s / 100),
                                                                  "test_acc": 0.5 + s / 2000})
                               for s in range(first, last + 1, 10)])


def keep(store: Store, run_id: int, epochs, tmp_path) -> None:
    for epoch in epochs:
        store.record_checkpoint(run_id, epoch, epoch * STEPS_PER_EPOCH, str(tmp_path / f"run-{run_id}.e{epoch}.pt"), 1000)


def finish(store: Store, job_id: int, result: dict) -> None:
    job = store.claim_job("test-worker", job_ids=[job_id])
    store.finish_job(job_id, result, claim=job.claim)


GEOMETRY = {"angle": 0.2, "alphas": [0.0, 0.25, 0.5, 0.75, 1.0],
            "train_loss": [0.1, 0.12, 0.14, 0.16, 0.2], "test_loss": [0.12, 0.16, 0.2, 0.18, 0.2],
            "train_err": [0.02, 0.02, 0.03, 0.04, 0.05], "test_err": [0.03, 0.03, 0.04, 0.04, 0.04]}
GEOMETRY["barrier"] = {key: charts.barrier_point(GEOMETRY["alphas"], GEOMETRY[key])[3]
                       for key in ("train_loss", "test_loss", "train_err", "test_err")}


@pytest.fixture
def family(tmp_path):
    """(db, parent, [two branches]): a finished parent with kept checkpoints at epochs 2..12, two
    finished branches from epoch 8 (kept 10, 12), the parent's average and a geometry between the
    branches, both finished."""
    db = tmp_path / "family.db"
    store = Store(db)
    [parent] = store.create_runs([{"config": PARENT.to_dict(), "name": "parent"}])
    trace(store, parent, 0, 12 * STEPS_PER_EPOCH, 0.8)
    keep(store, parent, range(2, 13, 2), tmp_path)
    store.update_run(parent, status="finished", step=12 * STEPS_PER_EPOCH)
    forks = [solutions.branch(store, store.get_run(parent), at=8, rate=elr, epochs=4) for elr in (0.002, 0.0005)]
    for fork in forks:
        trace(store, fork, 8 * STEPS_PER_EPOCH, 12 * STEPS_PER_EPOCH, 0.05)
        keep(store, fork, (10, 12), tmp_path)
        store.update_run(fork, status="finished", step=12 * STEPS_PER_EPOCH)
    finish(store, solutions.average(store, parent, 5),
           {"run": parent, "epochs": [4, 6, 8, 10, 12], "train_loss": 0.5, "train_acc": 0.82, "test_loss": 0.47,
            "test_acc": 0.8583})
    geometry = solutions.measure(store, (forks[0], None), (forks[1], None), points=5)
    finish(store, geometry, {"a": {"run": forks[0], "epoch": 12}, "b": {"run": forks[1], "epoch": 12}, **GEOMETRY})
    return db, parent, forks


STUDY_BASE = RunConfig(elr=0.01, epochs=3, log_every=10)


@pytest.fixture
def every_end(family, tmp_path):
    """The family store plus a study as the engine advances it (engine.study.advance), its runs and jobs
    finished by hand: a pre-training run, its two fine-tuned forks and its average, and the study's
    geometries, two of which have an SWA average {"run", "epochs"} as one end. Returns (db, parent,
    forks, pre-training run, study id): every kind of geometry end is in the store."""
    db, parent, forks = family
    store = Store(db)
    study_id = create_study(store, STUDY_BASE, pretrain_elrs=[0.01], pretrain_epochs=3, finetune_elrs=[1e-4, 1e-3],
                            finetune_epochs=2, average=2, seeds=[0], points=5)
    [pre] = store.list_runs(study_id=study_id)
    trace(store, pre.id, 0, 3 * STEPS_PER_EPOCH, 0.6)
    keep(store, pre.id, (2, 3), tmp_path)
    store.update_run(pre.id, status="finished", step=3 * STEPS_PER_EPOCH)
    advance(store, study_id)                              # the forks and the average
    for run in store.list_runs(study_id=study_id):
        if run.id != pre.id:
            trace(store, run.id, 3 * STEPS_PER_EPOCH, 5 * STEPS_PER_EPOCH, 0.1)
            keep(store, run.id, (5,), tmp_path)
            store.update_run(run.id, status="finished", step=5 * STEPS_PER_EPOCH)
    [average] = store.list_jobs(study_id=study_id, kind="average")
    finish(store, average.id, {"run": pre.id, "epochs": [2, 3], "train_loss": 0.4, "train_acc": 0.86,
                               "test_loss": 0.45, "test_acc": 0.84})
    advance(store, study_id)                              # the geometries
    geometries = store.list_jobs(study_id=study_id, kind="geometry")
    assert sum("epochs" in j.spec["b"] for j in geometries) == 2       # the fixture is what it says
    for job in geometries:
        finish(store, job.id, {"a": job.spec["a"], "b": job.spec["b"], **GEOMETRY})
    return db, parent, forks, pre.id, study_id


def links(at) -> list:
    """The page links drawn, with their labels as a reader sees them (markdown escapes resolved)."""
    shown = []
    for link in at.get("page_link"):
        proto = type(link.proto)()
        proto.CopyFrom(link.proto)
        proto.label = re.sub(r"\\(.)", r"\1", proto.label)
        shown.append(proto)
    return shown


def array(value) -> np.ndarray:
    """A trace's data as the chart's JSON holds it: a list, or Plotly's typed array (dtype, bdata, shape)."""
    if isinstance(value, dict) and "bdata" in value:
        out = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        return out.reshape([int(n) for n in value["shape"].split(",")]) if "shape" in value else out
    return np.asarray(value)


def counts(store: Store) -> tuple[int, int]:
    return len(store.list_runs()), len(store.list_jobs())


# ---- the Run page ------------------------------------------------------------------------------------
def test_branch_from_here_queues_a_child_at_the_chosen_epoch_and_rate(family, monkeypatch):
    db, parent, _ = family
    at = open_app(db, monkeypatch, "run", run=parent)
    assert at.selectbox(key=f"b-at-{parent}").options == [str(e) for e in range(2, 13, 2)]
    at.selectbox(key=f"b-at-{parent}").set_value(6)
    at.number_input(key=f"b-rate-{parent}").set_value(0.003)
    at.number_input(key=f"b-epochs-{parent}").set_value(3)
    at.button(key=f"b-go-{parent}").click().run()
    assert not at.exception
    child = Store(db).list_runs()[0]
    assert (child.parent_id, child.fork_epoch, child.status) == (parent, 6, "queued")
    assert (child.config["elr"], child.config["epochs"], child.config["keep_every"]) == (0.003, 9, 2)
    assert f"Queued run #{child.id}: branched at epoch 6" in texts(at)
    assert any(link.query_string == f"run={child.id}" for link in links(at))


@pytest.mark.parametrize("field, value, words", [("rate", 0.0, "“New ELR” must be a positive"),
                                                 ("epochs", 0, "“Epochs after the branch” must be at least 1")])
def test_bad_branch_input_is_worded_for_the_form_and_writes_nothing(family, monkeypatch, field, value, words):
    db, parent, _ = family
    store = Store(db)
    before = counts(store)
    at = open_app(db, monkeypatch, "run", run=parent)
    at.number_input(key=f"b-{field}-{parent}").set_value(value)
    at.button(key=f"b-go-{parent}").click().run()
    assert not at.exception
    [error] = [e.value for e in at.error]
    assert words in error and "--" not in error, error
    assert counts(store) == before


def test_average_the_last_k_queues_an_average_of_those_epochs(family, monkeypatch):
    db, parent, _ = family
    at = open_app(db, monkeypatch, "run", run=parent)
    k = at.number_input(key=f"a-k-{parent}")
    assert (k.value, k.max) == (5, 6)             # bounded by what was kept
    k.set_value(3).run()
    assert at.button(key=f"a-go-{parent}").label == "Average epochs 8–12"
    at.button(key=f"a-go-{parent}").click().run()
    job = Store(db).list_jobs(run_id=parent, kind="average")[0]
    assert (job.status, job.spec["epochs"]) == ("queued", [8, 10, 12])
    assert f"Queued average #{job.id}" in texts(at)


def test_the_run_page_lists_branches_averages_geometries_and_marks_kept_checkpoints(family, monkeypatch):
    db, parent, forks = family
    at = open_app(db, monkeypatch, "run", run=parent)
    shown = links(at)
    for fork in forks:
        assert any(link.query_string == f"run={fork}" and "from epoch 8" in link.label for link in shown)
    compare = [link for link in shown if link.page == "compare" and "ancestors=1" in link.query_string]
    assert compare and f"runs={forks[0]}%2C{forks[1]}" in compare[0].query_string
    [averages] = [frame.value for frame in at.dataframe if "epochs averaged" in frame.value]
    assert averages.iloc[0]["epochs averaged"] == "epochs 4–12 (every 2)" and averages.iloc[0]["test_acc"] == 85.83
    own = Store(db).latest_metrics(parent)["test_acc"][1]
    assert f"this run's own last test_acc is {own:.1%}" in texts(at)        # one format for accuracies: 85.8%
    geometry = Store(db).list_jobs(kind="geometry")[0]
    [line] = [link for link in shown if link.query_string == f"job={geometry.id}"]
    assert "angle 0.2 rad" in line.label and line.page == "solutions"
    kept = [t for t in json.loads(page_charts(at)[0].proto.spec)["data"]
            if t.get("hovertemplate", "").startswith("kept checkpoint")]
    assert len(kept) == 2 and all(t["marker"]["symbol"] == "diamond-open" for t in kept)   # train_loss, test_acc


def test_a_branch_says_where_it_came_from_and_links_its_parent(family, monkeypatch):
    db, parent, forks = family
    at = open_app(db, monkeypatch, "run", run=forks[0])
    [back] = [link for link in links(at) if link.query_string == f"run={parent}"]
    assert back.label.startswith("Branched from #") and back.label.endswith("at epoch 8")
    assert any(link.page == "compare" and link.query_string == f"runs={forks[0]}&ancestors=1" for link in links(at))


def test_a_run_without_kept_checkpoints_says_how_to_keep_them(tmp_path, monkeypatch):
    store = Store(tmp_path / "plain.db")
    [run] = store.create_runs([{"config": RunConfig(epochs=2).to_dict(), "name": "plain"}])
    store.update_run(run, status="finished")
    at = open_app(tmp_path / "plain.db", monkeypatch, "run", run=run)
    assert "this run kept no checkpoints" in texts(at) and "Keep checkpoints every" in texts(at)
    assert not any(b.key == f"b-go-{run}" for b in at.button)


def test_every_end_kind_is_named_in_words():
    assert solutions.solution_text({"run": 3, "epoch": 12}) == "#3 at epoch 12"
    assert solutions.solution_text({"run": 3, "epochs": [6, 7, 8, 9, 10]}) == "#3, average of epochs 6–10"
    assert solutions.solution_text({"run": 3, "epochs": [4, 6, 8]}, "#3 pre") == "#3 pre, average of epochs 4–8 (every 2)"
    assert solutions.solution_text({"run": 3, "epochs": [2, 3]}) == "#3, average of epochs 2, 3"
    assert solutions.solution_text({"run": 3, "epochs": [9]}) == "#3, average of epoch 9"


PAGE_QUERIES = [("launch", {}), ("live", {}), ("compare", {"runs": "{pre}"}), ("regime_map", {}), ("periodic", {}),
                ("study", {"study": "{study}"}), ("solutions", {}), ("teach", {"topic": "solutions", "runs_solutions": "{parent}"}),
                ("teach", {"topic": "study"})]


@pytest.mark.parametrize("page, query", PAGE_QUERIES)
def test_every_page_opens_on_a_store_with_every_kind_of_geometry_end(every_end, monkeypatch, page, query):
    db, parent, _, pre, study_id = every_end
    fill = {"pre": pre, "study": study_id, "parent": parent}
    at = open_app(db, monkeypatch, page, **{k: v.format(**fill) for k, v in query.items()})
    assert not at.exception
    if page == "solutions":
        assert "average of epochs 2, 3" in " ".join(at.selectbox(key="job").options)


def test_every_geometry_opens_on_the_solutions_page_with_its_ends_named(every_end, monkeypatch):
    db, *_ = every_end
    store = Store(db)
    for job in store.list_jobs(kind="geometry"):
        at = open_app(db, monkeypatch, "solutions", job=job.id)
        assert at.selectbox(key="job").value == job.id and len(page_charts(at)) == 1
        title = json.loads(page_charts(at)[0].proto.spec)["layout"]["title"]["text"]   # "A = …<br>B = …"
        for line, end in zip(title.split("<br>"), (job.spec["a"], job.spec["b"])):
            where = "average of epochs 2, 3" if "epochs" in end else f"at epoch {end['epoch']}"
            assert line.startswith(f"{'AB'[line.startswith('B')]} = #{end['run']} ") and line.endswith(where), title


def test_measuring_a_study_run_queues_beside_the_studys_average_ends(every_end, monkeypatch):
    db, _, _, pre, _ = every_end
    store = Store(db)
    before = len(store.list_jobs(kind="geometry"))
    at = open_app(db, monkeypatch, "solutions", a=pre, b=pre, be=2)
    at.button(key="measure").click().run()
    assert not at.exception and len(store.list_jobs(kind="geometry")) == before + 1
    assert any(f"#{pre} at epoch 3 ↔ #{pre} at epoch 2" in re.sub(r"\\(.)", r"\1", s.value) for s in at.success)


def test_every_run_page_lists_its_geometries_whatever_their_ends(every_end, monkeypatch):
    db, *_ = every_end
    store = Store(db)
    listed = set()
    for run in store.list_runs():
        at = open_app(db, monkeypatch, "run", run=run.id)
        listed |= {int(link.query_string.split("=")[1]) for link in links(at) if link.query_string.startswith("job=")}
    assert listed == {j.id for j in store.list_jobs(kind="geometry")}
    pre_page = open_app(db, monkeypatch, "run", run=every_end[3])
    labels = [link.label for link in links(pre_page) if link.query_string.startswith("job=")]
    assert len(labels) == 3 and sum("average of epochs 2, 3" in label for label in labels) == 2


# ---- Compare -----------------------------------------------------------------------------------------
def test_compare_with_ancestors_draws_a_branch_continuing_its_parent(family, monkeypatch):
    db, parent, forks = family
    at = open_app(db, monkeypatch, "compare", runs=forks[0], ancestors=1, metric="train_loss")
    assert at.toggle(key="ancestors").value and at.query_params["ancestors"] == "1"
    traces = json.loads(page_charts(at)[0].proto.spec)["data"]
    [lead] = [t for t in traces if t.get("line", {}).get("dash") == "dot"]
    custom = array(lead["customdata"])
    steps, sources = list(custom[:, 0]), set(custom[:-1, 1])
    fork_step = 8 * STEPS_PER_EPOCH
    assert steps[0] == 0 and steps[-1] == fork_step and all(s < fork_step for s in steps[:-1])
    assert sources == {parent}                                  # the last point is the branch's own first
    [own] = [t for t in traces if t.get("name", "").startswith(f"#{forks[0]} ")]
    assert lead["line"]["color"] == own["line"]["color"] and array(own["x"])[0] == fork_step
    assert any(t.get("marker", {}).get("symbol") == "diamond" for t in traces)
    # off: only the branch's own trace
    at.toggle(key="ancestors").set_value(False).run()
    assert '"dash":"dot"' not in page_charts(at)[0].proto.spec.replace(" ", "")


# ---- Solutions ---------------------------------------------------------------------------------------
def test_solutions_page_shows_a_finished_geometry_from_the_store(family, monkeypatch):
    db, _, forks = family
    job = Store(db).list_jobs(kind="geometry")[0]
    at = open_app(db, monkeypatch, "solutions", job=job.id)
    assert at.selectbox(key="job").value == job.id
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["angle A–B (11.5°)"] == "0.2 rad"
    # the same words as the chart's: the registry's labels
    assert metrics["test loss barrier"] == "0.04" and metrics["train loss barrier"] == "0"
    assert metrics["test error barrier"] == charts.barrier_text("test_err", job.result["barrier"]["test_err"])
    spec = page_charts(at)[0].proto.spec
    assert "test loss barrier 0.04" in spec and "no barrier: train loss" in spec


def test_solutions_page_queues_the_picked_pair_once_and_follows_it(family, monkeypatch):
    db, parent, forks = family
    store = Store(db)
    at = open_app(db, monkeypatch, "solutions", a=parent, ae=10, b=forks[1])
    assert (at.selectbox(key="a").value, at.selectbox(key="ae").value, at.selectbox(key="b").value) == \
        (parent, "10", forks[1])
    at.button(key="measure").click().run()
    assert not at.exception
    job = store.list_jobs(kind="geometry")[0]
    assert job.status == "queued" and job.spec == {"a": {"run": parent, "epoch": 10},
                                                   "b": {"run": forks[1], "epoch": 12}, "points": 21}
    assert at.selectbox(key="job").value == job.id and at.query_params["job"] == str(job.id)
    assert "waiting for a worker" in texts(at) and "No worker is running" in texts(at)
    at.button(key="measure").click().run()                 # the same pair again: shown, not queued twice
    assert len(store.list_jobs(kind="geometry")) == 2 and "Already measured" in texts(at)


def test_solutions_page_refuses_different_architectures_in_the_forms_words(family, monkeypatch, tmp_path):
    db, parent, _ = family
    store = Store(db)
    [wide] = store.create_runs([{"config": PARENT.replace(width=32).to_dict(), "name": "wide"}])
    keep(store, wide, (2,), tmp_path)
    before = counts(store)
    at = open_app(db, monkeypatch, "solutions", a=parent, b=wide)
    at.button(key="measure").click().run()
    assert any("differ in width" in e.value for e in at.error) and counts(store) == before


def test_solutions_page_without_kept_checkpoints_explains(tmp_path, monkeypatch):
    store = Store(tmp_path / "none.db")
    store.create_runs([{"config": RunConfig(epochs=2).to_dict(), "name": "plain"}])
    at = open_app(tmp_path / "none.db", monkeypatch, "solutions")
    assert "No run has kept checkpoints yet" in texts(at)


@pytest.mark.parametrize("page", ["run", "solutions"])
def test_run_names_stay_plain_text_in_branch_lists_and_geometries(family, monkeypatch, page):
    db, parent, forks = family
    store = Store(db)
    for run_id in (parent, *forks):
        store.rename_run(run_id, EVIL)
    job = store.list_jobs(kind="geometry")[0]
    at = open_app(db, monkeypatch, page, run=parent, job=job.id)
    sources = markdown_sources(at) + [link.proto.label for link in at.get("page_link")]
    assert any("evil" in text for text in sources) or page == "solutions"     # there: in select boxes and charts
    assert_plain_text(sources, page_charts(at))


# ---- Teach -------------------------------------------------------------------------------------------
def test_teach_demo_queues_each_step_when_the_one_before_has_ended(tmp_path, monkeypatch):
    db = tmp_path / "demo.db"
    store = Store(db)
    at = open_app(db, monkeypatch, "teach", topic="solutions")
    at.button(key="demo-solutions").click().run()
    [parent] = store.list_runs()
    assert parent.config["keep_every"] == 2 and parent.config["elr"] == 0.02
    assert at.query_params["runs_solutions"] == str(parent.id) and "Step 1 of 3" in texts(at)
    assert solutions.advance_demo(store, parent.id).forks == []            # nothing more while it trains
    trace(store, parent.id, 0, 12 * STEPS_PER_EPOCH, 0.8)
    keep(store, parent.id, range(2, 13, 2), tmp_path)
    store.update_run(parent.id, status="finished")
    at.run()                                                             # the page queues the next step
    forks = solutions.children(store, parent.id)
    assert [(f.fork_epoch, f.config["elr"], f.config["epochs"]) for f in forks] == [(8, 0.002, 12), (8, 0.0005, 12)]
    [average] = store.list_jobs(kind="average")
    assert average.spec["epochs"] == [4, 6, 8, 10, 12] and "Step 2 of 3" in texts(at)
    assert not store.list_jobs(kind="geometry")
    for fork in forks:
        keep(store, fork.id, (10, 12), tmp_path)
        store.update_run(fork.id, status="finished")
    at.run()
    [geometry] = store.list_jobs(kind="geometry")
    assert geometry.spec["points"] == solutions.DEMO_POINTS and {geometry.run_id, geometry.other_run_id} == \
        {f.id for f in forks}
    solutions.advance_demo(store, parent.id)                               # again: nothing twice
    assert (len(store.list_runs()), len(store.list_jobs())) == (3, 2)
    finish(store, average.id, {"run": parent.id, "epochs": [4, 6, 8, 10, 12], "train_loss": 0.5, "train_acc": 0.8,
                                "test_loss": 0.5, "test_acc": 0.85})
    finish(store, geometry.id, {"a": geometry.spec["a"], "b": geometry.spec["b"], **GEOMETRY})
    at.run()
    assert not at.exception and "Done:" in texts(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["average of the last 5, test_acc"] == "85.0%" and "0.2 rad" in metrics.values()
    assert len(page_charts(at)) == 2      # the parent with its branches; the path between the branches


# ---- pure parts -----------------------------------------------------------------------------------------
def test_barrier_is_where_the_path_rises_furthest_above_the_straight_line():
    alphas = np.linspace(0, 1, 11)
    convex = (alphas - 0.3) ** 2                       # never above its chord
    assert charts.barrier_point(alphas, convex)[3] == 0.0
    bumpy = 1 - alphas + 0.5 * np.clip(1 - np.abs(alphas - 0.7) / 0.2, 0, None)   # a tent at α = 0.7
    at, value, line, excess = charts.barrier_point(alphas, bumpy)
    assert at == pytest.approx(0.7) and line == pytest.approx(0.3) and excess == pytest.approx(0.5)
    assert value == pytest.approx(0.8)
    assert list(charts.straight_line(alphas, bumpy)[[0, -1]]) == [bumpy[0], bumpy[-1]]


def test_geometry_chart_draws_the_straight_line_between_the_ends_and_marks_the_barrier():
    fig = charts.geometry(GEOMETRY, "#2 a at epoch 12", "#3 <b>x</b> at epoch 12")
    # legends and labels in the registry's words, the stored key in the hover
    names = {"train_loss": "train loss", "test_loss": "test loss", "train_err": "train error", "test_err": "test error"}
    for key, name in names.items():
        [curve] = [t for t in fig.data if t.name == name]
        assert f"{name} · {key} %{{y:" in curve.hovertemplate
        [line] = [t for t in fig.data if t.name == f"{name} straight line"]
        assert list(line.x) == [0.0, 1.0] and list(line.y) == [GEOMETRY[key][0], GEOMETRY[key][-1]]
        assert line.line.dash == "dash"
    # test_loss rises above its line most at α = 0.5 (0.2 against 0.16): a bar there and an arrow
    [bar] = [t for t in fig.data if t.name == "test loss barrier"]
    assert list(bar.x) == [0.5, 0.5] and list(bar.y) == pytest.approx([0.16, 0.2])
    [arrow] = [a for a in fig.layout.annotations if a.text.startswith("test loss barrier")]
    assert (arrow.x, arrow.y, arrow.showarrow, arrow.text) == (0.5, 0.2, True, "test loss barrier 0.04")
    assert not [t for t in fig.data if t.name == "train loss barrier"]     # convex: none, and the title says so
    assert "no barrier: train loss" in fig.layout.annotations[0].text
    assert (fig.layout.yaxis.title.text, fig.layout.yaxis2.title.text) == ("loss (nats)", "error (%)")
    assert "&lt;b&gt;x&lt;/b&gt;" in fig.layout.title.text                # names stay plain text


def test_kept_checkpoints_sit_on_the_curve_as_drawn():
    steps, values = np.array([0, 10, 20, 30]), np.array([1.0, 0.1, 0.01, 0.01])
    xs, epochs, ys = charts.kept_points(steps, values, [(5, 1), (20, 2), (40, 3)], log=True)
    assert xs == [5, 20] and epochs == [1, 2]                  # step 40 is not logged yet
    assert ys == pytest.approx([10 ** -0.5, 0.01])             # halfway on a log axis
    assert charts.kept_points(steps, values, [(5, 1)], log=False)[2] == pytest.approx([0.55])
    fig = charts.run_curves(pd.DataFrame({"step": steps, "epoch": steps / 10, "train_loss": values}), ["train_loss"],
                            run_id=1, kept=[(20, 2)])
    [marker] = [t for t in fig.data if t.name and t.name.startswith("kept checkpoint")]
    assert list(marker.x) == [20] and list(marker.customdata) == [2]


def test_compare_frames_put_the_ancestors_before_a_branch_and_smooth_them_as_one_curve(family):
    db, parent, forks = family
    store = Store(db)
    run = store.get_run(forks[0])
    lineage = {run.id: solutions.lineage(store, run)}
    assert lineage == {run.id: [(parent, 8 * STEPS_PER_EPOCH)]}
    front, _ = data.compare_frames(store, [run.id], ["train_loss"], max_points=1000, lineage=lineage)
    lead = front[front["lead"]]
    assert set(lead["run_id"]) == {run.id} and set(lead["source"]) == {parent}
    assert lead["step"].max() < 8 * STEPS_PER_EPOCH <= front.loc[~front["lead"], "step"].min()
    smoothed, _ = data.compare_frames(store, [run.id], ["train_loss"], max_points=1000, lineage=lineage,
                                      smoothing=0.9)
    own = smoothed[~smoothed["lead"]]["value"]
    raw = store.read_metrics(run.id, ["train_loss"])["train_loss"]
    assert own.iloc[0] > raw.iloc[0] + 0.3                 # the EMA carries the parent's higher loss on


def test_lineage_goes_back_through_a_branch_of_a_branch(family, tmp_path):
    db, parent, forks = family
    store = Store(db)
    grandchild = solutions.branch(store, store.get_run(forks[0]), at=10, rate=0.001, epochs=2)
    assert solutions.lineage(store, store.get_run(grandchild)) == [(forks[0], 10 * STEPS_PER_EPOCH),
                                                                   (parent, 8 * STEPS_PER_EPOCH)]
    assert solutions.lineage(store, store.get_run(parent)) == []


def test_engine_messages_name_the_forms_fields():
    for message in ("--at 3: use --at with a kept epoch (none: train it with --keep-every EPOCHS)",
                    "--last 9 but run 1 kept 2 checkpoint(s)", "run 1 kept no checkpoint at epoch 5: use RUN@EPOCH"):
        worded = solutions.form_words(ConfigError(message))
        assert "--" not in worded and "RUN@EPOCH" not in worded, worded
    assert "“Keep checkpoints every”" in solutions.form_words(ConfigError("train it with --keep-every EPOCHS"))


def test_the_launch_form_keeps_checkpoints():
    [config], _ = launch.configs_of(launch.LaunchForm(keep_every=2))
    assert config.keep_every == 2
    with pytest.raises(ConfigError, match="“Keep checkpoints every”"):
        launch.configs_of(launch.LaunchForm(keep_every=-1))
