"""The learning-rate study (issue 13): one command that pre-trains, fine-tunes, averages and measures,
its report, its resumption, and its bad input — on the ticks toy with real runs."""
import json
import os
import signal
import subprocess
import sys

import pytest

from engine import study
from engine.ticks import FEATURES
from storage import Store
from tests.processes import engine as run_engine, start_worker, wait_for

TOY = ["--dataset", "ticks", "--norm", "layer", "--width", "16", "--depth", "2", "--batch-size", "16",
       "--log-every", "32", "--eval-every", "320"]
SMALL = [*TOY, "--pretrain-elr", "1e-3", "3e-2", "1", "--pretrain-epochs", "30", "--finetune-elr", "1e-4", "1e-3",
         "--finetune-epochs", "10", "--average", "3", "--points", "5", "--no-refine"]


def engine(*args, db, check=True):
    return run_engine(*args, db=db, check=check, timeout=900)


@pytest.fixture(scope="module")
def finished(small_study):
    """A small study run to its end by the CLI: 3 PLRs x 2 seeds, 2 FLRs, SWA of 3 (SMALL with seeds 0
    and 1: conftest trains it once for every test file that reads it)."""
    db, study_id = small_study
    return db, study_id, json.loads(engine("report", str(study_id), "--json", db=db).stdout)


def test_the_study_runs_the_whole_protocol_once(finished):
    db, study_id, _ = finished
    store = Store(db)
    info = store.get_study(study_id)
    assert info.status == "finished"
    runs = store.list_runs(study_id=study_id)
    roles = sorted(r.study_role.split(":")[0] for r in runs)
    assert roles.count("pretrain") == 6 and roles.count("finetune") == 12       # 3 PLRs x 2 seeds, x 2 FLRs
    assert all(r.status == "finished" for r in runs)
    assert [r.id for r in store.list_runs(sweep_id=info.sweep_id)] == \
        sorted((r.id for r in runs if r.study_role.startswith("pretrain")), reverse=True)
    forks = [r for r in runs if r.study_role.startswith("finetune")]
    assert all(r.parent_id and r.fork_epoch == 30 for r in forks)
    jobs = store.list_jobs(study_id=study_id)
    assert sum(j.kind == "average" for j in jobs) == 6
    assert sum(j.kind == "geometry" for j in jobs) == 6 * 3          # each FLR vs the average, low vs high FLR
    assert all(j.status == "finished" for j in jobs)
    # advancing a finished study again creates nothing
    assert study.advance(store, study_id)
    assert len(store.list_runs(study_id=study_id)) == 18 and len(store.list_jobs(study_id=study_id)) == 24


def test_the_report_aggregates_seeds_and_places_the_regimes(finished):
    _, study_id, r = finished
    assert r["study"] == study_id and len(r["rows"]) == 3 and len(r["runs"]) == 6
    for row in r["rows"]:
        assert row["seed"] == [0, 1]
        for acc in (row["pretrain_test_acc"], row["average_test_acc"], *row["finetune_test_acc"].values()):
            assert acc["n"] == 2 and 0 <= acc["mean"] <= 1 and acc["std"] >= 0
        assert {tuple(g["pair"]) for g in row["geometry"]} == {("finetune@0.0001", "average"),
                                                               ("finetune@0.001", "average"),
                                                               ("finetune@0.0001", "finetune@0.001")}
        # each run's own sub-regime; the row's only when its runs agree
        subs = [e["subregime"] for e in r["runs"] if e["pretrain_elr"] == row["pretrain_elr"]]
        assert all(s in (("2A", "2B") if e["regime"] == "chaotic_equilibrium" else (None,))
                   for s, e in zip(subs, (e for e in r["runs"] if e["pretrain_elr"] == row["pretrain_elr"])))
        labelled = {s for s in subs if s}
        chaotic = row["regime"] == "chaotic_equilibrium"
        assert row["subregime"] == (labelled.pop() if len(labelled) == 1 and chaotic else None)
        # one accuracy per feature of the toy, read from what the runs and averages logged
        assert len(row["feature_acc"]["pretrain"]) == len(row["feature_acc"]["average"]) == FEATURES
    low, high = r["rows"][0], r["rows"][-1]
    assert low["regime"] == "convergence" and high["regime"] == "divergence"
    assert low["pretrain_test_acc"]["mean"] > high["pretrain_test_acc"]["mean"] + 0.1
    assert low["feature_acc"]["pretrain"] != high["feature_acc"]["pretrain"]
    assert set(r["boundaries"]) == {"convergence_chaotic", "2A_2B", "chaotic_divergence"}
    # the best model is chosen on validation accuracy and reported on test
    assert r["selection"] == "validation"
    best = r["best"]
    means = [acc["mean"] for row in r["rows"] for acc in (row["pretrain_val_acc"], row["average_val_acc"],
                                                            *row["finetune_val_acc"].values())]
    assert best["val_acc"]["mean"] == max(means)
    row = next(row for row in r["rows"] if row["pretrain_elr"] == best["pretrain_elr"])
    assert best["test_acc"] == row["chosen"]["test_acc"]
    assert r["verdict"] in ("win", "loss", "not separated", None) and len(r["pairs"]) <= 2


def test_feature_vectors_are_what_was_logged_in_feature_order():
    """However many feature_acc/<k> a run logged (ticks: 16), in feature order (10 after 9), and
    nothing for a dataset without features."""
    latest = {f"feature_acc/{k}": (320, k / 100) for k in range(12)} | {"test_acc": (320, 0.9)}
    assert study._feature_vector(latest, lambda key: latest[key][1]) == [k / 100 for k in range(12)]
    assert study._feature_vector({"test_acc": 0.9}, lambda key: 0.0) is None


def test_sub_regimes_and_boundaries_from_made_up_rows():
    barriers = [(0.005, 0.002), (study.BASIN_BARRIER, study.BASIN_LOSS_BARRIER)]     # (val error, train loss)
    assert study.subregime("chaotic_equilibrium", barriers) == "2A"
    assert study.subregime("chaotic_equilibrium", [*barriers, (study.BASIN_BARRIER + 0.001, 0.0)]) == "2B"
    assert study.subregime("chaotic_equilibrium", [*barriers, (0.0, study.BASIN_LOSS_BARRIER + 0.001)]) == "2B"
    assert study.subregime("convergence", barriers) is None and study.subregime("chaotic_equilibrium", []) is None
    # runs that split evenly give no regime (it was once a hash-order coin toss), a majority does
    assert study._majority(["convergence", "chaotic_equilibrium"]) is None
    assert study._majority(["chaotic_equilibrium", "convergence", "chaotic_equilibrium", None]) == "chaotic_equilibrium"
    # a row's sub-regime only when its pairs agree
    assert study.agreed(["2A", None, "2A"]) == "2A" and study.agreed(["2A", "2B"]) is None and study.agreed([None]) is None
    rows = [{"pretrain_elr": e, "regime": r, "subregime": s} for e, r, s in
            [(1e-3, "convergence", None), (4e-3, "chaotic_equilibrium", "2A"), (1.6e-2, "chaotic_equilibrium", "2B"),
             (6.4e-2, "divergence", None)]]
    b = study._boundaries(rows)
    assert b["convergence_chaotic"] == pytest.approx(2e-3)
    assert b["2A_2B"] == pytest.approx(8e-3) and b["chaotic_divergence"] == pytest.approx(3.2e-2)
    assert study._boundaries(rows[:2])["2A_2B"] is None


def test_bootstrap_interval_and_verdict_on_hand_made_pairs():
    assert study.BOOTSTRAP_RESAMPLES >= 2000
    same = study.bootstrap([0.02] * 7)
    assert same == {"mean": pytest.approx(0.02), "ci95": [pytest.approx(0.02), pytest.approx(0.02)],
                    "fraction_positive": 1.0, "n": 7}
    assert study.verdict(same) == "win"
    assert study.verdict(study.bootstrap([-0.01, -0.03, -0.02, -0.02, -0.01])) == "loss"
    # too few pairs for a verdict, however clear they look
    assert study.MIN_PAIRS_FOR_VERDICT == 5 and study.verdict(study.bootstrap([0.05, 0.06, 0.05, 0.07])) == "not separated"
    # two pairs gain a lot, eight lose a little: the mean is positive, the interval is not
    mixed = study.bootstrap([0.10, 0.12] + [-0.01] * 8)
    assert mixed["mean"] == pytest.approx(0.014) and mixed["fraction_positive"] == pytest.approx(0.2)
    assert mixed["ci95"][0] < 0 < mixed["ci95"][1] and study.verdict(mixed) == "not separated"
    # the percentile interval of a resampled mean: inside the data's range, around the mean, seeded
    values = [0.03, -0.01, 0.05, 0.02, 0.00, 0.04, 0.01, 0.06, -0.02, 0.03]
    one = study.bootstrap(values)
    assert one == study.bootstrap(list(values)) and min(values) < one["ci95"][0] < one["mean"] < one["ci95"][1] < max(values)
    # the interval of the mean shrinks like 1/sqrt(n): ten copies of the pairs give a ~sqrt(10) narrower one
    wide, narrow = one["ci95"][1] - one["ci95"][0], study.bootstrap(values * 10)["ci95"]
    assert (narrow[1] - narrow[0]) == pytest.approx(wide / 10 ** 0.5, rel=0.15)
    assert study.bootstrap([]) is None and study.verdict(None) is None
    assert study.bootstrap([0.0, -0.0])["fraction_positive"] == 0.0          # a tie is no gain


def test_refinement_places_plrs_around_the_threshold_and_skips_the_grid():
    grid = [1e-3, 3.16e-3, 1e-2, 3.16e-2, 0.1]
    # 1x, 1.15x, 1.33x (9.98e-3: the grid's 1e-2 is within 5%, skipped), 1.5x, 2x
    assert study.refine_elrs(grid, 7.5e-3) == [0.0075, 0.00862, 0.0112, 0.015]
    assert study.refine_elrs(grid, None) == [] and study.refine_elrs([], 1.0) == [1.0, 1.15, 1.33, 1.5, 2.0]


def labelled(table):
    """Per-run labels from {pair: [regime at each PLR]} over PLRs 1, 2, 4, 8."""
    names = {"c": "convergence", "e": "chaotic_equilibrium", "d": "divergence", "-": None}
    return [{"pretrain_elr": elr, "pair": pair, "regime": names[label]}
            for pair, labels in table.items() for elr, label in zip((1.0, 2.0, 4.0, 8.0), labels)]


def test_the_threshold_comes_from_each_pairs_own_labels():
    t = study.convergence_threshold(labelled({(0, 0): "ccee", (0, 1): "ceed", (1, 0): "cced", (1, 1): "c-ed"}))
    # (0,0): between 2 and 4; (0,1): 1 and 2; (1,0): 2 and 4; (1,1) skips its unlabelled 2: between 1 and 4
    assert [p[2] for p in t["per_pair"]] == pytest.approx([8 ** 0.5, 2 ** 0.5, 8 ** 0.5, 2.0])
    assert t["estimate"] == pytest.approx((8 ** 0.5 * 2 ** 0.5 * 8 ** 0.5 * 2) ** 0.25)
    assert t["range"] == pytest.approx([2 ** 0.5, 8 ** 0.5]) and t["n"] == 4
    # no threshold for a pair that converged everywhere, nowhere, or again above a PLR where it did not
    none = study.convergence_threshold(labelled({(0, 0): "cccc", (0, 1): "eeed", (1, 0): "cece"}))
    assert none["estimate"] is None and none["n"] == 0


def entry(ds, seed, elr, regime, sub, val, test):
    """One pre-training run's options for the paired comparison: val/test accuracies of pretrain,
    average and finetune@0.001 (tuples of three)."""
    return {"data_seed": ds, "seed": seed, "pretrain_elr": elr, "regime": regime, "subregime": sub,
            "pretrain_val_acc": val[0], "pretrain_test_acc": test[0], "average_val_acc": val[1],
            "average_test_acc": test[1], "finetune_val_acc": {"0.001": val[2]}, "finetune_test_acc": {"0.001": test[2]}}


def test_paired_gains_select_on_validation_and_use_each_pairs_own_labels():
    C, E = "convergence", "chaotic_equilibrium"
    entries = [
        # pair (0, 0): converged at 1 and 2; 2A at 4 and 8
        entry(0, 0, 1.0, C, None, (0.70, 0.71, 0.72), (0.70, 0.71, 0.72)),
        # the highest TEST accuracy of its converged options (0.90, pretrain) is not chosen: its validation is lower
        entry(0, 0, 2.0, C, None, (0.74, 0.80, 0.75), (0.90, 0.78, 0.76)),
        entry(0, 0, 4.0, E, "2A", (0.85, 0.84, 0.86), (0.83, 0.85, 0.84)),
        entry(0, 0, 8.0, E, "2A", (0.80, 0.81, 0.82), (0.95, 0.80, 0.81)),
        # pair (0, 1): chaotic at 2 (a PLR most runs converged at): not in its baseline, which is PLR 1 only
        entry(0, 1, 1.0, C, None, (0.70, 0.72, 0.71), (0.69, 0.70, 0.71)),
        entry(0, 1, 2.0, E, "2A", (0.90, 0.88, 0.89), (0.86, 0.88, 0.87)),
        # pair (1, 0): no 2A run (2B only): no gain for it
        entry(1, 0, 1.0, C, None, (0.70, 0.70, 0.70), (0.70, 0.70, 0.70)),
        entry(1, 0, 4.0, E, "2B", (0.90, 0.90, 0.90), (0.90, 0.90, 0.90)),
    ]
    pairs = study.paired_gains(entries)
    assert [(p["data_seed"], p["seed"]) for p in pairs] == [(0, 0), (0, 1)]
    first, second = pairs
    assert first["best_converged"] == {"pretrain_elr": 2.0, "kind": "average", "val_acc": 0.80, "test_acc": 0.78}
    assert first["best_2A"] == {"pretrain_elr": 4.0, "kind": "finetune@0.001", "val_acc": 0.86, "test_acc": 0.84}
    assert first["gain"] == pytest.approx(0.84 - 0.78)
    assert second["best_converged"]["pretrain_elr"] == 1.0 and second["best_converged"]["kind"] == "average"
    assert second["best_2A"]["pretrain_elr"] == 2.0 and second["gain"] == pytest.approx(0.86 - 0.70)


def test_the_2a_2b_boundary_is_per_pair_and_undetermined_when_pairs_disagree():
    def runs(table):
        return [{"data_seed": 0, "seed": seed, "pretrain_elr": elr, "subregime": sub}
                for seed, subs in table.items() for elr, sub in zip((1.0, 4.0, 16.0), subs)]
    agree = study.subregime_boundary(runs({0: ["2A", "2A", "2B"], 1: ["2A", "2A", "2B"]}))
    assert agree["determined"] and agree["estimate"] == pytest.approx(8.0) and agree["ci95"] == pytest.approx([8.0, 8.0])
    split = study.subregime_boundary(runs({0: ["2A", "2A", "2B"], 1: ["2A", "2B", "2B"], 2: ["2A", "2A", "2A"]}))
    assert not split["determined"] and split["n"] == 2 and split["pairs_with_subregime"] == 3
    assert split["estimate"] == pytest.approx((8.0 * 2.0) ** 0.5) and split["ci95"] == pytest.approx([2.0, 8.0])
    backwards = study.subregime_boundary(runs({0: ["2B", "2A", "2B"]}))
    assert backwards["n"] == 0 and backwards["estimate"] is None and not backwards["determined"]


def test_an_interrupted_study_resumes_where_it_stopped(tmp_path):
    """Ctrl-C while the fine-tuning runs train: they stop in order at their next step (`interrupted`),
    the command exits 130, and --resume finishes the study creating nothing twice. The fine-tuning
    runs are long enough here (100 epochs, seconds) for the signal to land while they train; with 10
    the rest of the study took 0.7 s and could end before the signal arrived."""
    db = str(tmp_path / "resume.db")
    args = [*SMALL[:SMALL.index("--finetune-epochs") + 1], "100", *SMALL[SMALL.index("--finetune-epochs") + 2:]]
    proc = subprocess.Popen([sys.executable, "-m", "engine", "study", *args, "--seed", "0", "--db", db],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    store = wait_for(lambda: os.path.exists(db) and Store(db))
    wait_for(lambda: any(r.study_role.startswith("finetune") and r.status == "running" for r in store.list_runs()),
             timeout=300)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    [info] = store.list_studies()
    assert info.status == "running"
    stopped = [r for r in store.list_runs(study_id=info.id) if r.study_role.startswith("finetune")]
    assert stopped and all(r.status in ("interrupted", "queued") for r in stopped)
    assert any(r.status == "interrupted" for r in stopped)
    before = {r.study_role: r.id for r in store.list_runs(study_id=info.id)}
    engine("study", "--resume", str(info.id), db=db)
    assert store.get_study(info.id).status == "finished"
    after = {r.study_role: r.id for r in store.list_runs(study_id=info.id)}
    assert {k: after[k] for k in before} == before and len(after) == 3 + 6     # nothing made twice
    assert all(r.status == "finished" for r in store.list_runs(study_id=info.id))


def test_a_submitted_study_is_run_by_the_workers(tmp_path):
    db = str(tmp_path / "submit.db")
    study_id = int(engine("study", *TOY, "--pretrain-elr", "1e-3", "1", "--pretrain-epochs", "10",
                          "--finetune-elr", "1e-4", "--finetune-epochs", "4", "--average", "2", "--points", "3",
                          "--no-refine", "--submit", db=db).stdout.split()[-1])
    store = Store(db)
    assert store.get_study(study_id).owner is None and len(store.list_runs(study_id=study_id)) == 2
    worker = start_worker(db)
    try:
        wait_for(lambda: store.get_study(study_id).status == "finished", timeout=300)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    report = json.loads(engine("report", str(study_id), "--json", db=db).stdout)
    assert [row["finetune_test_acc"]["0.0001"]["n"] for row in report["rows"]] == [1, 1]


@pytest.mark.parametrize("args,message", [
    (["--pretrain-elr", "0"], "--pretrain-elr needs one or more positive ELRs"),
    (["--pretrain-elr", "0:1:3"], "a log range needs positive finite ends"),
    (["--finetune-elr", "0"], "--finetune-elr needs one or more positive ELRs"),
    (["--finetune-elr", "-1"], "--finetune-elr needs one or more positive ELRs"),
    (["--mode", "lrwd"], "drop --mode lrwd"),
    (["--average", "40"], "--average K must be between 1 and --pretrain-epochs (30)"),
    (["--points", "1"], "--points must be between 2 and 201, got 1"),
    (["--seed", "1", "1"], "--seed lists a seed twice"),
    (["--seed", "0", "0"], "--seed lists a seed twice"),
    (["--data-seed", "3", "3"], "--data-seed lists a data seed twice"),
    (["--pretrain-elr", "1e-3", "1e-2", "1e-3"], "--pretrain-elr lists 0.001 twice: give each rate once"),
    (["--finetune-elr", "1e-4", "1.0000001e-4"], "--finetune-elr lists 0.0001 twice in effect"),
    (["--resume", "7", "--pretrain-elr", "1e-3"], "--pretrain-elr cannot change a study being resumed"),
    (["--resume", "7", "--data-seed", "2"], "--data-seed cannot change a study being resumed"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args, message):
    """Checked before the store is opened: not even an empty database file is left behind."""
    db = tmp_path / "bad.db"
    flags = SMALL if "--resume" not in args else []
    out = engine("study", *flags, *args, db=str(db), check=False)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and message in out.stderr, out.stderr
    assert not db.exists() and list(tmp_path.iterdir()) == []


def test_unknown_studies_are_one_line_errors(tmp_path):
    db = str(tmp_path / "known.db")
    Store(db).close()
    for command in (["study", "--resume", "7"], ["report", "9"]):
        out = engine(*command, db=db, check=False)
        assert out.returncode == 2 and "no study with id" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_a_study_with_a_failed_piece_is_failed_says_which_and_resume_retries_it(tmp_path):
    from sqlalchemy import update
    from storage.schema import jobs, runs
    db = str(tmp_path / "failed.db")
    tiny = [*TOY, "--pretrain-elr", "1e-3", "--pretrain-epochs", "6", "--finetune-elr", "1e-4", "--finetune-epochs", "2",
            "--average", "2", "--points", "3", "--no-refine"]
    study_id = int(engine("study", *tiny, db=db).stdout.split()[-1])
    store = Store(db)
    assert store.get_study(study_id).status == "finished"
    average = next(j for j in store.list_jobs(study_id=study_id) if j.kind == "average")
    fork = next(r for r in store.list_runs(study_id=study_id) if r.study_role.startswith("finetune"))
    geometry = next(j for j in store.list_jobs(study_id=study_id) if j.kind == "geometry")
    # as a crashed computation leaves them: the average failed, the fork cancelled before it trained
    with store._write() as conn:
        conn.execute(update(jobs).where(jobs.c.id == average.id).values(status="failed", error="boom\ntraceback",
                                                                           result=None))
        conn.execute(update(runs).where(runs.c.id == fork.id).values(status="cancelled"))
    store.set_study_status(study_id, "running")
    assert study.advance(store, study_id) and store.get_study(study_id).status == "failed"
    report = json.loads(engine("report", str(study_id), "--json", db=db).stdout)
    assert report["status"] == "failed"
    assert report["failures"] == sorted([f"average job {average.id} ({average.study_role}): failed: boom",
                                         f"run {fork.id} ({fork.study_role}): cancelled"])
    assert "failed: average job" in engine("report", str(study_id), db=db).stdout
    out = engine("study", "--resume", str(study_id), db=db)
    assert "retrying 1 failed or cancelled run(s) and 1 failed job(s)" in out.stderr
    assert store.get_study(study_id).status == "finished"
    assert store.get_job(average.id).status == "finished" and "test_acc" in store.get_job(average.id).result
    assert store.get_run(fork.id).status == "finished"
    # a study whose job was left running by a dead process: resuming takes it up once its heartbeat is stale
    with store._write() as conn:
        conn.execute(update(jobs).where(jobs.c.id == geometry.id).values(status="running", result=None,
                                                                            heartbeat_at=1.0, worker_id="gone"))
    store.set_study_status(study_id, "running")
    engine("study", "--resume", str(study_id), db=db)
    assert store.get_job(geometry.id).status == "finished" and store.get_study(study_id).status == "finished"
    assert json.loads(engine("report", str(study_id), "--json", db=db).stdout)["failures"] == []


def test_an_old_study_without_data_seeds_or_validation_still_reports(tmp_path):
    """A study made before data seeds and validation splits: pretrain:ELR:SEED roles, no val_acc. Its
    report selects on test and says so."""
    db = str(tmp_path / "old.db")
    store = Store(db)
    base = {**study.RunConfig(dataset="ticks", norm="layer", width=8, depth=2, batch_size=16, epochs=2).to_dict()}
    base.pop("validation")
    spec = {"base": base, "pretrain_elrs": [1e-3], "seeds": [0], "pretrain_epochs": 2, "finetune_elrs": [1e-4],
            "finetune_epochs": 1, "average": 1, "points": 3}
    study_id = store.create_study("old", spec, [{"config": base, "name": "old run", "study_role": "pretrain:0.001:0"}])
    r = study.report(store, study_id)
    assert r["selection"] == "test" and [e["data_seed"] for e in r["runs"]] == [0] and r["rows"][0]["runs"]
    assert r["pairs"] == [] and r["gain"] is None and r["verdict"] is None


def test_the_validation_split_is_held_out_seeded_and_leaves_the_rest_alone():
    import torch
    from engine.config import RunConfig
    from engine.data import load_dataset
    plain = load_dataset(RunConfig(dataset="ticks"), "cpu")
    ticks = load_dataset(RunConfig(dataset="ticks", validation=True), "cpu")
    assert plain.x_val is None
    # ticks: a separate draw as large as the test set; training, test and probe data unchanged
    assert ticks.x_val.shape == ticks.x_test.shape and torch.equal(ticks.x_train, plain.x_train)
    assert torch.equal(ticks.x_test, plain.x_test) and torch.equal(ticks.feature_x, plain.feature_x)
    assert not torch.equal(ticks.x_val, ticks.x_test) and ticks.y_val.float().mean() == 0.5
    other = load_dataset(RunConfig(dataset="ticks", validation=True, data_seed=1), "cpu")
    assert not torch.equal(other.x_val, ticks.x_val)
    # digits: 10% of the training images held out, chosen by the data seed; test unchanged
    full = load_dataset(RunConfig(dataset="digits"), "cpu")
    held = load_dataset(RunConfig(dataset="digits", validation=True), "cpu")
    assert (held.train_size, len(held.y_val)) == (1294, 143) == (RunConfig(dataset="digits", validation=True).train_size, 143)
    assert torch.equal(held.x_test, full.x_test)
    rows = lambda x: {tuple(r) for r in x.tolist()}  # noqa: E731
    assert rows(held.x_train) | rows(held.x_val) == rows(full.x_train) and not rows(held.x_train) & rows(held.x_val)
    again = load_dataset(RunConfig(dataset="digits", validation=True), "cpu")
    moved = load_dataset(RunConfig(dataset="digits", validation=True, data_seed=3), "cpu")
    assert torch.equal(again.x_val, held.x_val) and not torch.equal(moved.x_val, held.x_val)
