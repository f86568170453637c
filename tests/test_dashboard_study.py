"""Learning-rate studies in the dashboard (issue 13): the chart builders, the table and the summary from a
hand-made report; the Study page on a real small study trained by the engine's CLI (ticks toy, so the
per-feature heatmap has data) and on one still queued; launching a study from the Launch page (presets
and the form, bad input named by field with nothing written); Teach's study step; names as plain text."""
import copy
import math
import re

import pytest

from dashboard import study, study_charts
from engine.config import ConfigError, RunConfig
from engine.presets import STUDY_PRESETS
from engine.study import create_study, report
from storage import Store
from tests.test_dashboard import EVIL, charts, markdown_sources, open_app, texts

def shown(at) -> str:
    """What the page wrote, markdown escapes resolved (as a reader sees it)."""
    return re.sub(r"\\(.)", r"\1", texts(at))


@pytest.fixture
def finished_study(small_study):
    """(db, study id): conftest's small ticks study (3 PLRs x 2 seeds, 2 FLRs, SWA of 3), trained once."""
    return small_study


# ---- a hand-made report ---------------------------------------------------------------------------------
def acc(mean, std=0.01, n=3):
    return {"mean": mean, "std": std, "n": n}


def row(elr, regime, sub, pre, ft, avg, barrier=0.002, features=True):
    vector = [0.5 + 0.03 * k for k in range(16)] if features else None
    return {"pretrain_elr": elr, "seed": [0, 1, 2], "runs": [1, 2, 3], "regime": regime, "regime_agreement": [3, 3],
            "subregime": sub, "pretrain_test_acc": acc(pre), "finetune_test_acc": {"0.0001": acc(ft[0]), "0.001": acc(ft[1])},
            "average_test_acc": acc(avg),
            "feature_acc": {"pretrain": vector, "average": vector, "finetune@0.0001": vector, "finetune@0.001": None},
            "geometry": [{"pair": ["finetune@0.0001", "average"], "angle": acc(0.1), "barrier_test_err": acc(barrier),
                          "barrier_train_loss": acc(0.01)},
                         {"pair": ["finetune@0.0001", "finetune@0.001"], "angle": acc(0.2),
                          "barrier_test_err": acc(barrier), "barrier_train_loss": acc(0.02)}]}


REPORT = {
    "study": 1, "name": "s", "status": "finished",
    "spec": {"pretrain_elrs": [1e-3, 4e-3, 1.6e-2, 6.4e-2], "seeds": [0, 1, 2], "finetune_elrs": [1e-4, 1e-3],
             "average": 5, "pretrain_epochs": 10, "finetune_epochs": 5, "base": {"dataset": "ticks"}},
    "rows": [row(1e-3, "convergence", None, 0.80, (0.81, 0.82), 0.81),
             row(4e-3, "chaotic_equilibrium", "2A", 0.78, (0.86, 0.87), 0.90),
             row(1.6e-2, "chaotic_equilibrium", "2B", 0.70, (0.80, 0.82), 0.78, barrier=0.05),
             row(6.4e-2, "divergence", None, 0.50, (0.52, 0.55), 0.50, barrier=0.3)],
    "boundaries": {"convergence_chaotic": 2e-3, "2A_2B": 8e-3, "chaotic_divergence": 3.2e-2},
    "best": {"pretrain_elr": 4e-3, "kind": "average", "test_acc": acc(0.90), "ratio_to_convergence_threshold": 2.0},
    "selection": "validation",
    "pairs": [{"data_seed": ds, "seed": seed, "gain": gain,
               "best_2A": {"pretrain_elr": 4e-3, "kind": "average", "val_acc": 0.9, "test_acc": 0.8 + gain},
               "best_converged": {"pretrain_elr": 1e-3, "kind": "finetune@0.001", "val_acc": 0.8, "test_acc": 0.8}}
              for ds, seed, gain in [(0, 0, 0.06), (0, 1, 0.09), (1, 0, 0.08), (1, 1, 0.09)]],
    "gain": {"mean": 0.08, "ci95": [0.0675, 0.09], "fraction_positive": 1.0, "n": 4}, "verdict": "win",
}


def test_accuracy_chart_has_a_log_plr_axis_bands_boundaries_error_bars_and_the_best_point():
    fig = study_charts.accuracy(REPORT)
    axis = fig.layout.xaxis
    assert axis.type == "log" and list(axis.ticktext) == ["0.001", "0.01", "0.1"] and axis.title.text.startswith("PLR")
    assert axis.range[0] < math.log10(1e-3) and axis.range[1] > math.log10(6.4e-2)   # the outer bands fit
    lines = {t.name: t for t in fig.data if t.mode == "lines+markers"}
    assert list(lines) == ["pre-trained", "fine-tuned at FLR 0.0001", "fine-tuned at FLR 0.001",
                           "average (SWA of last 5)"]
    for trace in lines.values():
        assert list(trace.x) == [1e-3, 4e-3, 1.6e-2, 6.4e-2]
        assert trace.error_y.visible and list(trace.error_y.array) == [0.01] * 4
    assert list(lines["average (SWA of last 5)"].y) == [0.81, 0.90, 0.78, 0.50]
    # one band per labelled PLR, each in its regime's colour, touching its neighbours
    bands = [s for s in fig.layout.shapes if s.type == "rect"]
    assert [b.fillcolor for b in bands] == [study_charts._rgba(c, study_charts.BAND_ALPHA) for c in
                                            ("#1b9e4b", "#f28e00", "#f28e00", "#d62728")]
    assert bands[0].x1 == pytest.approx(bands[1].x0) == pytest.approx(2e-3)
    # the three boundaries as vertical lines (2A|2B dotted), labelled; 2A and 2B written in their bands
    vlines = [s for s in fig.layout.shapes if s.type == "line"]
    assert sorted(s.x0 for s in vlines) == pytest.approx([2e-3, 8e-3, 3.2e-2])
    assert [s.line.dash for s in vlines if s.x0 == pytest.approx(8e-3)] == ["dot"]
    notes = [a.text for a in fig.layout.annotations]
    assert {"1 | 2 ≈ 0.002", "2A | 2B ≈ 0.008", "2 | 3 ≈ 0.032", "<b>2A</b>", "<b>2B</b>"} <= set(notes)
    # the best model: a star at its point, annotated with its ratio to the convergence threshold
    [star] = [t for t in fig.data if t.name == "best model"]
    assert star.marker.symbol == "star" and (list(star.x), list(star.y)) == ([4e-3], [0.90])
    assert any("2× the convergence threshold" in n and "average" in n for n in notes)
    # the regime bands in the legend
    assert [t.name for t in fig.data if t.name and t.name.startswith("band:")] == \
        ["band: convergence", "band: chaotic equilibrium", "band: divergence"]


def test_accuracy_chart_of_a_study_with_nothing_finished():
    empty = copy.deepcopy(REPORT)
    for r in empty["rows"]:
        r.update(regime=None, subregime=None, pretrain_test_acc=None, average_test_acc=None, geometry=[],
                 finetune_test_acc={"0.0001": None, "0.001": None}, feature_acc={})
    empty.update(best=None, boundaries={"convergence_chaotic": None, "2A_2B": None, "chaotic_divergence": None})
    fig = study_charts.accuracy(empty)
    assert fig.layout.xaxis.type == "log" and not [s for s in fig.layout.shapes]
    assert all(len(t.x or ()) == 0 for t in fig.data)
    assert study_charts.features(empty) is None and study_charts.geometry_pairs(empty) == []
    assert study.summary(empty).startswith("No model has finished yet")


def test_geometry_chart_has_angle_and_both_barriers_per_pair_against_the_plr():
    fig = study_charts.geometry(REPORT)
    # the registry's labels and units: a barrier is in its quantity's unit, an error as a percentage
    assert [a.text for a in fig.layout.annotations][:3] == ["angle (rad)", "test error barrier (%)",
                                                            "train loss barrier (nats)"]
    assert [fig.layout[f"yaxis{i or ''}"].title.text for i in ("", 2, 3)] == ["angle (rad)", "test error (%)",
                                                                              "train loss (nats)"]
    assert fig.layout.yaxis2.tickformat == ".1%" and fig.layout.yaxis3.tickformat is None
    pairs = [t for t in fig.data if t.mode == "lines+markers"]
    assert len(pairs) == 2 * 3 and {t.name for t in pairs} == {"finetune@0.0001 vs average",
                                                               "finetune@0.0001 vs finetune@0.001"}
    barrier = [t for t in pairs if t.yaxis == "y2" and t.name == "finetune@0.0001 vs average"][0]
    assert list(barrier.y) == [0.002, 0.002, 0.05, 0.3] and barrier.error_y.visible
    assert fig.layout.xaxis3.type == "log" and fig.layout.xaxis3.title.text.startswith("PLR")
    assert len([s for s in fig.layout.shapes if s.type == "rect"]) == 4 * 3     # bands on every panel


def test_feature_heatmaps_one_per_model_with_features():
    fig = study_charts.features(REPORT)
    maps = [t for t in fig.data if t.type == "heatmap"]
    # fine-tuned at 0.001 has no feature accuracies in this report: no panel for it
    assert [a.text for a in fig.layout.annotations] == ["pre-trained", "fine-tuned at FLR 0.0001", "average (SWA of last 5)"]
    assert len(maps) == 3 and list(maps[0].y) == ["0.001", "0.004", "0.016", "0.064"] and len(maps[0].z[0]) == 16
    seen = max(v for t in maps for line in t.z for v in line if v is not None)
    assert maps[0].zmin == 0.5 and maps[0].zmax == max(0.75, seen) and all(t.zmax == maps[0].zmax for t in maps)
    # every panel's PLR axis is categorical: numeric-looking labels on a linear axis squashed the rows
    assert all(fig.layout[f"yaxis{i or ''}"].type == "category" for i in ("", 2, 3))
    assert "feature accuracy · feature_acc/%{x}" in maps[0].hovertemplate


def test_feature_heatmaps_take_the_feature_count_from_the_report():
    """The count is what the runs logged (the length of the report's vectors), not a literal 16."""
    six = copy.deepcopy(REPORT)
    for row in six["rows"]:
        row["feature_acc"] = {kind: v[:6] if v else v for kind, v in row["feature_acc"].items()}
    assert study_charts.feature_count(six) == 6 and study_charts.feature_count(REPORT) == 16
    maps = [t for t in study_charts.features(six).data if t.type == "heatmap"]
    assert all(list(t.x) == list(range(6)) and {len(line) for line in t.z} == {6} for t in maps)


def test_the_table_and_geometry_table_read_the_rows():
    table = study.table(REPORT)
    assert list(table["PLR"]) == ["0.001", "0.004", "0.016", "0.064"]
    assert list(table["regime"]) == ["convergence (3/3)", "chaotic equilibrium (3/3)", "chaotic equilibrium (3/3)",
                                     "divergence (3/3)"]
    assert list(table["sub-regime"]) == ["—", "2A", "2B", "—"]
    assert list(table.columns[3:]) == ["pre-trained", "FLR 0.0001", "FLR 0.001", "average of 5", "chosen on validation"]
    assert table["average of 5"][1] == "90.0% ± 1.0% (3)"
    assert list(table["chosen on validation"]) == ["—"] * 4          # the hand-made rows choose nothing
    split = copy.deepcopy(REPORT)
    split["rows"][2].update(subregime=None, subregime_votes={"2A": 2, "2B": 1}, refined=True,
                            chosen={"kind": "average", "val_acc": acc(0.79), "test_acc": acc(0.78)})
    table = study.table(split)
    assert table["sub-regime"][2] == "not determined: 2A 2, 2B 1" and table["PLR"][2] == "0.016*"
    assert table["chosen on validation"][2] == "average of 5: 78.0% ± 1.0% (3)"
    gains = study.gains_table(REPORT)
    assert list(gains["gain"]) == ["+6.0 pt", "+9.0 pt", "+8.0 pt", "+9.0 pt"] and list(gains["data seed"]) == [0, 0, 1, 1]
    geometry = study.geometry_table(REPORT)
    assert len(geometry) == 8 and geometry["test_err barrier"][0] == "0.20% ± 1.00%"


def test_the_summary_says_what_the_numbers_show_and_no_more():
    text = study.summary(REPORT)
    assert text.startswith("Models are chosen on validation accuracy and reported on test. The best model comes "
                           "from PLR 0.004: the average of its last 5 checkpoints (SWA), test accuracy 90.0% ± 1.0% "
                           "over 3 runs.")
    assert "chaotic equilibrium (sub-regime 2A)" in text and "2× the estimated convergence threshold (≈ 0.002" in text
    # the engine's paired verdict, not a gap compared with a spread
    assert ("mean +8.0 percentage points over 4 pair(s), 95% bootstrap interval +6.8 to +9.0; 100% of pairs gain. "
            "The interval lies above 0: 2A wins on these data.") in text
    assert "spread" not in text
    close = dict(REPORT, gain={"mean": 0.01, "ci95": [-0.004, 0.03], "fraction_positive": 0.75, "n": 8},
                 verdict="not separated")
    assert "75% of pairs gain. The interval includes 0: the data do not separate the two." in study.summary(close)
    assert "wins" not in study.summary(close)
    few = dict(REPORT, gain={"mean": 0.08, "ci95": [0.06, 0.09], "fraction_positive": 1.0, "n": 3},
               verdict="not separated")
    assert "Fewer than 5 pairs are too few for a verdict: the data do not separate the two." in study.summary(few)
    loss = dict(REPORT, gain={"mean": -0.02, "ci95": [-0.03, -0.01], "fraction_positive": 0.0, "n": 4}, verdict="loss")
    assert "the converged baseline wins on these data" in study.summary(loss)
    unpaired = dict(REPORT, pairs=[], gain=None, verdict=None)
    assert "there is no paired comparison" in study.summary(unpaired)
    old = dict(REPORT, selection="test")
    assert study.summary(old).startswith("This study has no validation split")
    running = dict(REPORT, status="running")
    assert study.summary(running).startswith("So far (the study is still running")
    no_converged = copy.deepcopy(REPORT)
    no_converged["boundaries"]["convergence_chaotic"] = None
    no_converged["best"]["ratio_to_convergence_threshold"] = None
    assert "no threshold" in study.summary(no_converged)


def test_gains_chart_draws_one_point_per_pair_by_data_seed_and_the_interval():
    fig = study_charts.gains(REPORT)
    boxes = [t for t in fig.data if t.type == "box"]
    assert [t.name for t in boxes] == ["data seed 0", "data seed 1"]
    assert [list(t.y) for t in boxes] == [pytest.approx([6.0, 9.0]), pytest.approx([8.0, 9.0])]
    [mean] = [t for t in fig.data if t.type == "scatter"]
    assert mean.y[0] == pytest.approx(8.0)
    assert mean.error_y.array[0] == pytest.approx(1.0) and mean.error_y.arrayminus[0] == pytest.approx(1.25)
    assert fig.layout.title.text.startswith("win · 4 pairs, 100% gain")
    assert [s.y0 for s in fig.layout.shapes] == [0]
    assert study_charts.gains(dict(REPORT, pairs=[], gain=None)) is None


def test_the_study_form_names_its_fields_and_writes_nothing(tmp_path):
    store = Store(tmp_path / "form.db")
    bad = [(dict(pretrain_elrs="1e-3 0"), "“Pre-training ELRs (PLR)” needs one or more positive ELRs"),
           (dict(pretrain_elrs="1e-3:x:3"), "“Pre-training ELRs (PLR)”: bad range"),
           (dict(finetune_elrs=""), "“Fine-tuning ELRs (FLR)” is empty"),
           (dict(average=50), "“Average the last K” must be between 1 and “Pre-training epochs” (40)"),
           (dict(seeds="0 0"), "“Seeds” lists a seed twice"),
           (dict(seeds="0 x"), "“Seeds”: bad value 'x'"),
           # a study holds out a validation split: 1,294 of digits' 1,437 training images are left to train on
           (dict(batch_size=5000), "“Batch size” 5000 is larger than the 1294 training samples"),
           (dict(data_seeds="1 1"), "“Data seeds” lists a data seed twice"),
           (dict(points=1), "“Points on each path” must be between 2 and 201")]
    for changes, message in bad:
        with pytest.raises(ConfigError) as caught:
            study.launch(store, study.StudyForm(**changes))
        assert message in str(caught.value) and "\n" not in str(caught.value), (changes, str(caught.value))
    assert store.list_studies() == [] and store.list_runs() == [] and store.list_sweeps() == []
    study_id = study.launch(store, study.StudyForm(pretrain_elrs="1e-3:1e-1:3", seeds="0, 1", finetune_elrs="1e-4 1e-3"))
    info = store.get_study(study_id)
    assert info.spec["pretrain_elrs"] == [1e-3, 1e-2, 1e-1] and info.spec["seeds"] == [0, 1] and info.owner is None
    assert len(store.list_runs(study_id=study_id)) == 6
    prog = study.progress(store, study_id)
    assert (prog.runs_done, prog.runs_total, prog.jobs_total) == (0, 6 + 12, 6 * 4) and prog.text().startswith("Running")


# ---- the Study page on real studies -----------------------------------------------------------------------
def test_study_page_shows_a_finished_study(finished_study, monkeypatch):
    db, study_id = finished_study
    at = open_app(db, monkeypatch, "study", study=study_id)
    assert at.selectbox(key="study").value == study_id and at.query_params["study"] == str(study_id)
    paired = bool(report(Store(db), study_id)["pairs"])    # the gains chart: only when a pair has both sides
    drawn = charts(at)
    assert len(drawn) == 3 + paired
    accuracy, geometry, features = drawn[0], drawn[-2], drawn[-1]
    if paired:
        assert "mean gain, bootstrap 95% interval" in drawn[1].proto.spec
    assert '"type":"log"' in accuracy.proto.spec.replace(" ", "") and "best model" in accuracy.proto.spec
    assert "test error barrier" in geometry.proto.spec and '"heatmap"' in features.proto.spec
    assert "The best model comes from PLR" in shown(at) and "So far" not in shown(at)
    [progress] = at.get("progress")
    assert progress.value == 100 and progress.proto.text == "Finished: 18 of 18 runs ended, 24 of 24 averages and geometries done."
    table = at.dataframe[0].value
    assert list(table["PLR"]) == ["0.001", "0.03", "1"] and table["regime"][0].startswith("convergence")
    assert len(at.dataframe[-1].value) == 3 * 3    # the geometry: three pairs per PLR
    assert len(at.dataframe) == 2 + paired        # and the pairs' gains, when there are some


def test_study_page_follows_a_study_still_queued_and_says_when_a_link_is_wrong(tmp_path, monkeypatch):
    db = tmp_path / "queued.db"
    store = Store(db)
    study_id = create_study(store, RunConfig(dataset="digits", log_every=10), pretrain_elrs=[1e-3, 1e-2],
                            pretrain_epochs=2, finetune_elrs=[1e-4], finetune_epochs=1, average=1, seeds=[0])
    at = open_app(db, monkeypatch, "study", study=study_id)
    text = shown(at)
    assert "No model has finished yet" in text and "So far (the study is still running" in text
    [progress] = at.get("progress")
    assert progress.proto.text.startswith("Running: 0 of 4 runs ended, 0 of 4 averages and geometries done")
    assert "No worker is running" in text                  # the workers advance it: none here
    at = open_app(db, monkeypatch, "study", study=999)
    assert any("999 is not in this database" in w.value for w in at.warning)
    assert at.selectbox(key="study").value == study_id


def test_a_study_name_stays_plain_text(tmp_path, monkeypatch):
    db = tmp_path / "evil.db"
    store = Store(db)
    create_study(store, RunConfig(dataset="digits"), pretrain_elrs=[1e-3], pretrain_epochs=2, finetune_elrs=[1e-4],
                 finetune_epochs=1, average=1, seeds=[0], name=EVIL)
    at = open_app(db, monkeypatch, "study")
    assert EVIL in at.selectbox(key="study").options[0]        # a widget option: plain text already
    for text in markdown_sources(at):
        bare = re.sub(r"\\[^\w\s]", "", text)
        assert "](" not in bare and "<a" not in bare, text
    for chart in charts(at):
        assert "<a href" not in chart.proto.spec


# ---- launching and teaching -----------------------------------------------------------------------------
def test_launch_a_study_preset_and_a_custom_study(empty_db, monkeypatch):
    at = open_app(empty_db, monkeypatch, "launch")
    at.button(key="study_preset_1").click().run()          # digits: 5 PLRs x 5 seeds
    store = Store(empty_db)
    [info] = store.list_studies()
    preset = STUDY_PRESETS["Where do large learning rates lead us? (digits)"]
    assert info.name == preset.name and info.status == "running" and info.owner is None
    runs = store.list_runs(study_id=info.id)
    planned = len(preset.pretrain_elrs) * len(preset.seeds) * len(preset.data_seeds)
    assert len(runs) == planned == 25 and all(r.status == "queued" and r.study_role.startswith("pretrain:")
                                               for r in runs)
    [link] = [link for link in at.get("page_link") if "Study page" in link.proto.label]
    assert link.proto.page.endswith("study") or "study" in link.proto.page
    assert f"Study #{info.id} created" in shown(at)

    # a bad field: one line naming it, nothing more written
    at.text_input(key="s_plr").set_value("1e-3 -1")
    at.button(key="start_study").click().run()
    assert not at.exception
    [error] = at.error
    assert "“Pre\\-training ELRs \\(PLR\\)” needs one or more positive ELRs" in error.value
    assert len(store.list_studies()) == 1 and len(store.list_runs()) == 25
    # the same field fixed: a custom study on the ticks toy
    at.text_input(key="s_plr").set_value("1e-3:1e-1:3")
    at.text_input(key="s_seeds").set_value("0 1")
    at.selectbox(key="s_dataset").set_value("ticks").run()
    at.selectbox(key="s_norm").set_value("layer")
    at.number_input(key="s_pre_epochs").set_value(5)
    at.number_input(key="s_average").set_value(2)
    at.button(key="start_study").click().run()
    assert not at.error
    custom = store.list_studies()[0]
    assert custom.id != info.id and custom.spec["pretrain_elrs"] == [1e-3, 1e-2, 1e-1] and custom.spec["average"] == 2
    assert custom.spec["base"]["dataset"] == "ticks" and custom.spec["base"]["norm"] == "layer"
    assert custom.spec["seeds"] == [0, 1] and custom.spec["data_seeds"] == [0] and custom.spec["refine"]
    assert len(store.list_runs(study_id=custom.id)) == 6


def test_teach_study_step_launches_the_ticks_study_and_draws_it(empty_db, monkeypatch):
    at = open_app(empty_db, monkeypatch, "teach", topic="study")
    assert "2A" in shown(at) and at.button(key="demo-study").label == "Run this demo"
    at.button(key="demo-study").click().run()
    assert not at.exception
    [info] = Store(empty_db).list_studies()
    assert info.name == "Where do large learning rates lead us? (ticks)" and at.query_params["study_demo"] == str(info.id)
    preset = STUDY_PRESETS["Where do large learning rates lead us? (ticks)"]
    assert len(Store(empty_db).list_runs(study_id=info.id)) == len(preset.pretrain_elrs) * len(preset.seeds) * len(
        preset.data_seeds)
    assert "No model has finished yet" in shown(at) and len(charts(at)) == 1     # the accuracy chart, filling in


def test_teach_draws_a_finished_study_with_the_study_page_charts(finished_study, monkeypatch):
    db, study_id = finished_study
    at = open_app(db, monkeypatch, "teach", topic="study", study_demo=study_id)
    paired = bool(report(Store(db), study_id)["pairs"])
    assert len(charts(at)) == 3 + paired and "The best model comes from PLR" in shown(at)


def test_the_report_is_made_again_only_when_a_piece_of_the_study_moved(tmp_path, monkeypatch):
    store = Store(tmp_path / "cache.db")
    study_id = create_study(store, RunConfig(dataset="digits"), pretrain_elrs=[1e-3, 1e-2], pretrain_epochs=2,
                            finetune_elrs=[1e-4], finetune_epochs=1, average=1, seeds=[0])
    made = []
    monkeypatch.setattr(study, "report", lambda s, i: made.append(i) or {"rows": [], "status": "running"})
    first = study.state(store, study_id)[1]
    assert study.state(store, study_id)[1] is first and made == [study_id]       # nothing moved: not made again
    run = store.list_runs(study_id=study_id)[0]
    store.update_run(run.id, status="failed")
    prog, _ = study.state(store, study_id)
    assert made == [study_id, study_id]
    # a failed pre-training run makes no fork, average or geometry: the totals shrink
    assert (prog.runs_done, prog.runs_total, prog.jobs_total) == (1, 3, 2)
