"""The learning-rate study (issue 13): one command that pre-trains, fine-tunes, averages and measures,
its report, its resumption, and its bad input — on the ticks toy with real runs."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from engine import study
from storage import Store
from tests.processes import engine as run_engine, start_worker, wait_for

TOY = ["--dataset", "ticks", "--norm", "layer", "--width", "16", "--depth", "2", "--batch-size", "16",
       "--log-every", "32", "--eval-every", "320"]
SMALL = [*TOY, "--pretrain-elr", "1e-3", "3e-2", "1", "--pretrain-epochs", "30", "--finetune-elr", "1e-4", "1e-3",
         "--finetune-epochs", "10", "--average", "3", "--points", "5"]


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
        assert row["subregime"] in (("2A", "2B") if row["regime"] == "chaotic_equilibrium" else (None,))
        assert len(row["feature_acc"]["pretrain"]) == 16
    low, high = r["rows"][0], r["rows"][-1]
    assert low["regime"] == "convergence" and high["regime"] == "divergence"
    assert low["pretrain_test_acc"]["mean"] > high["pretrain_test_acc"]["mean"] + 0.1
    assert low["feature_acc"]["pretrain"] != high["feature_acc"]["pretrain"]
    assert set(r["boundaries"]) == {"convergence_chaotic", "2A_2B", "chaotic_divergence"}
    best = r["best"]
    means = [acc["mean"] for row in r["rows"] for acc in (row["pretrain_test_acc"], row["average_test_acc"],
                                                            *row["finetune_test_acc"].values())]
    assert best["test_acc"]["mean"] == max(means)


def test_sub_regimes_and_boundaries_from_made_up_rows():
    barriers = [(0.005, 0.002), (study.BASIN_BARRIER, study.BASIN_LOSS_BARRIER)]     # (test error, train loss)
    assert study._subregime("chaotic_equilibrium", barriers) == "2A"
    assert study._subregime("chaotic_equilibrium", [*barriers, (study.BASIN_BARRIER + 0.001, 0.0)]) == "2B"
    assert study._subregime("chaotic_equilibrium", [*barriers, (0.0, study.BASIN_LOSS_BARRIER + 0.001)]) == "2B"
    assert study._subregime("convergence", barriers) is None and study._subregime("chaotic_equilibrium", []) is None
    # seeds that split evenly give no regime (it was once a hash-order coin toss), a majority does
    assert study._majority(["convergence", "chaotic_equilibrium"]) is None
    assert study._majority(["chaotic_equilibrium", "convergence", "chaotic_equilibrium", None]) == "chaotic_equilibrium"
    rows = [{"pretrain_elr": e, "regime": r, "subregime": s} for e, r, s in
            [(1e-3, "convergence", None), (4e-3, "chaotic_equilibrium", "2A"), (1.6e-2, "chaotic_equilibrium", "2B"),
             (6.4e-2, "divergence", None)]]
    b = study._boundaries(rows)
    assert b["convergence_chaotic"] == pytest.approx(2e-3)
    assert b["2A_2B"] == pytest.approx(8e-3) and b["chaotic_divergence"] == pytest.approx(3.2e-2)
    assert study._boundaries(rows[:2])["2A_2B"] is None


def test_an_interrupted_study_resumes_where_it_stopped(tmp_path):
    db = str(tmp_path / "resume.db")
    proc = subprocess.Popen([sys.executable, "-m", "engine", "study", *SMALL, "--seed", "0", "--db", db],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    store = wait_for(lambda: os.path.exists(db) and Store(db))
    wait_for(lambda: any(r.study_role.startswith("finetune") for r in store.list_runs()), timeout=300)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    [info] = store.list_studies()
    assert info.status == "running"
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
                          "--submit", db=db).stdout.split()[-1])
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
    (["--mode", "lrwd"], "drop --mode lrwd"),
    (["--average", "40"], "--average K must be between 1 and --pretrain-epochs (30)"),
    (["--seed", "1", "1"], "--seed lists a seed twice"),
    (["--resume", "7"], "no study with id 7"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args, message):
    db = str(tmp_path / "bad.db")
    Store(db).close()
    out = engine("study", *SMALL, *args, db=db, check=False)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and message in out.stderr, out.stderr
    store = Store(db)
    assert store.list_runs() == [] and store.list_studies() == [] and store.list_sweeps() == []
    unknown = engine("report", "9", db=db, check=False)
    assert unknown.returncode == 2 and "no study with id 9" in unknown.stderr
