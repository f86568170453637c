"""The CLI contract (SPEC §9): bad input, run ids on stdout, export formats, analyze, bundles."""
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.cli import main
from storage import Store
from tests.processes import engine

BAD_INPUT = [
    (["train", "--elr", "0"], "--elr must be a positive finite number"),
    (["train", "--elr", "-1"], "--elr must be a positive finite number"),
    (["train", "--elr", "nan"], "--elr must be a positive finite number"),
    (["train", "--elr", "inf"], "--elr must be a positive finite number"),
    (["train", "--mode", "lrwd", "--lr", "0"], "--lr must be a positive finite number"),
    (["train", "--mode", "lrwd", "--wd", "-0.1"], "--wd must be a non-negative"),
    (["train", "--model", "vgg"], "unknown --model 'vgg'"),
    (["train", "--dataset", "mnist"], "unknown --dataset 'mnist'"),
    (["train", "--mode", "adam"], "unknown --mode 'adam'"),
    (["train", "--epochs", "0"], "--epochs must be a whole number from 1 to 100,000"),
    (["train", "--batch-size", "5000"], "larger than the 1437 training samples"),
    (["train", "--mode", "sphere", "--wd", "0.1"], "meaningless with --mode sphere"),
    (["train", "--model", "convnet_si"], "needs 3x32x32 images"),
    (["train", "--dataset", "cifar10"], "pass --data-dir"),
    (["train", "--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "/nonexistent/cifar"),
    (["train", "--elr", "1e-3", "1e-2"], "`train` runs one configuration"),
    (["sweep", "--elr", "1e-4:10"], "bad range"),
    (["sweep", "--elr", "1e-4:10:16", "--epochs", "-3"], "--epochs must be a whole number from 1 to 100,000"),
    (["submit", "--momentum", "1.5"], "--momentum must be in [0, 1)"),
    (["train", "--nonsense"], "unrecognized arguments"),
    (["worker", "--max-parallel", "0"], "--max-parallel must be at least 1"),
]


@pytest.mark.parametrize("args,message", BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args, message):
    """In-process for speed (21 cases); the two subprocess cases below check the real exit path."""
    db = tmp_path / "store.db"
    try:
        code = main([*args, "--db", str(db)])
    except SystemExit as exc:          # argparse's own errors
        code = exc.code
    out = capsys.readouterr()
    assert code == 2, out.err
    lines = out.err.strip().splitlines()
    assert len(lines) == 1, out.err
    assert message in lines[0]
    assert out.out == ""
    assert not db.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [["train", "--elr", "0"], ["sweep", "--bogus"]])
def test_bad_input_exit_code_from_a_real_process(tmp_path, args):
    out = engine(*args, db=str(tmp_path / "s.db"))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_unknown_run_and_corrupt_bundle_are_one_line(tmp_path):
    db = str(tmp_path / "s.db")
    for args in (["export", "42"], ["analyze", "42"], ["cancel", "42"], ["delete", "42"], ["tag", "42", "x"],
                 ["bundle", "42", "--out", str(tmp_path / "b.zip")]):
        out = engine(*args, db=db)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, (args, out.stderr)
        assert "no run with id 42" in out.stderr
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip at all")
    out = engine("import", str(bad), db=db)
    assert out.returncode == 2 and "not a spherelab bundle" in out.stderr
    assert Store(db).list_runs() == []
    assert not (tmp_path / "b.zip").exists()


def test_unwritable_db_path_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = engine("train", "--epochs", "1", db=str(blocker / "sub" / "s.db"))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two real runs: a healthy one and a numerical blow-up (lr 1e30 sends the norm to inf)."""
    db = str(tmp_path_factory.mktemp("cli") / "runs.db")
    ok = engine("train", "--elr", "0.01", "--epochs", "2", "--sharpness-every", "40", "--tags", "demo", db=db,
                check=True)
    boom = engine("train", "--mode", "lrwd", "--lr", "1e30", "--epochs", "2", db=db, check=True)
    return db, int(ok.stdout.split()[-1]), int(boom.stdout.split()[-1])


def test_train_prints_run_id_last_and_records_everything(trained):
    db, ok, boom = trained
    store = Store(db)
    info = store.get_run(ok)
    assert info.status == "finished" and info.tags == ["demo"]
    keys = set(store.metric_keys(ok))
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "si_norm", "lr", "elr", "grad_norm",
                "eff_grad_norm", "angular_update", "cos_to_init", "sharpness", "sharpness_threshold",
                "layer_norm/fc0", "layer_elr/fc0"):
        assert key in keys, key
    blown = store.get_run(boom)
    assert blown.status == "nonfinite"
    assert [e.kind for e in store.events(boom, ["nonfinite"])] == ["nonfinite"]


def test_export_csv_and_json_keep_nonfinite_values(trained, tmp_path):
    db, ok, boom = trained
    text = engine("export", str(boom), db=db, check=True).stdout
    rows = list(csv.DictReader(io.StringIO(text)))
    header = text.splitlines()[0].split(",")
    assert header[:5] == ["step", "epoch", "wall_time", "train_loss", "train_acc"]
    assert rows[-1]["si_norm"] == "inf"
    assert rows[0]["grad_norm"] == "nan"              # nothing to average before the first step
    out = tmp_path / "boom.json"
    engine("export", str(boom), "--format", "json", "--out", str(out), db=db, check=True)
    data = json.loads(out.read_text())
    assert data[-1]["si_norm"] is None and data[0]["step"] == 0
    assert len(data) == len(rows)


def test_analyze_prints_the_contract(trained):
    db, ok, boom = trained
    result = json.loads(engine("analyze", str(boom), db=db, check=True).stdout)
    assert set(result) == {"regime", "evidence", "spikes", "period"}
    assert result["regime"] == "divergence" and "non-finite" in result["evidence"]["reason"]
    result = json.loads(engine("analyze", str(ok), db=db, check=True).stdout)
    assert result["regime"] in ("convergence", "chaotic_equilibrium", "divergence", "undetermined")
    assert result["evidence"]["untrained_loss"] > 1.0


def test_bundle_round_trip_gives_identical_export(trained, tmp_path):
    db, ok, boom = trained
    for run_id in (ok, boom):
        engine("bundle", str(run_id), "--out", str(tmp_path / f"{run_id}.zip"), db=db, check=True)
    fresh = str(tmp_path / "fresh.db")
    existing = Store(fresh).create_run({"model": "mlp_si"}, name="already here")   # imported ids must differ
    new_ok = int(engine("import", str(tmp_path / f"{ok}.zip"), db=fresh, check=True).stdout.split()[-1])
    assert new_ok != existing
    assert Store(fresh).get_run(existing).name == "already here"
    assert Store(fresh).get_run(new_ok).name == Store(db).get_run(ok).name
    a = engine("export", str(ok), db=db, check=True).stdout
    b = engine("export", str(new_ok), db=fresh, check=True).stdout
    assert a == b
    again = engine("import", str(tmp_path / f"{ok}.zip"), db=fresh)
    assert again.returncode == 2 and "already in this database" in again.stderr
    assert len(Store(fresh).list_runs()) == 2            # the refused import wrote nothing


def test_manage_runs_tag_cancel_delete(tmp_path):
    db = str(tmp_path / "m.db")
    ids = [int(x) for x in engine("submit", "--elr", "1e-3", "1e-2", "--epochs", "1", db=db,
                                  check=True).stdout.split()]
    engine("tag", str(ids[0]), "keep", "paper", db=db, check=True)
    engine("cancel", str(ids[1]), db=db, check=True)
    listing = json.loads(engine("runs", "--json", db=db, check=True).stdout)
    by_id = {r["id"]: r for r in listing}
    assert by_id[ids[0]]["tags"] == ["keep", "paper"] and by_id[ids[0]]["status"] == "queued"
    assert by_id[ids[1]]["status"] == "cancelled"
    assert by_id[ids[0]]["sweep"] == by_id[ids[1]]["sweep"] is not None
    engine("delete", str(ids[1]), db=db, check=True)
    assert [r["id"] for r in json.loads(engine("runs", "--json", db=db, check=True).stdout)] == [ids[0]]
    assert "keep" in engine("runs", "--tag", "keep", db=db, check=True).stdout


def test_default_db_comes_from_environment(tmp_path):
    env = {**os.environ, "SPHERELAB_DB": str(tmp_path / "env.db")}
    out = subprocess.run([sys.executable, "-m", "engine", "submit", "--epochs", "1"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(tmp_path / "env.db").exists()


def test_help_shows_every_training_flag_with_defaults():
    text = engine("train", "--help", check=True).stdout
    for flag in ("--model", "--width", "--depth", "--dataset", "--data-dir", "--mode", "--elr", "--lr", "--wd",
                 "--momentum", "--schedule", "--epochs", "--batch-size", "--augment", "--seed", "--log-every",
                 "--sharpness-every", "--probe-size", "--checkpoint-every", "--device", "--db", "--name",
                 "--tags"):
        assert flag in text, flag
    assert "(default: mlp_si)" in text and "(default: 10)" in text


def test_sweep_packs_mlp_runs_on_a_cpu_and_matches_the_same_sweep_run_singly(tmp_path):
    args = ["sweep", "--elr", "1e-3", "3e-2", "--epochs", "3", "--log-every", "5"]
    traces = {}
    for packing in ("auto", "0"):
        db = str(tmp_path / f"pack-{packing}.db")
        out = subprocess.run([sys.executable, "-m", "engine", *args, "--db", db], capture_output=True, text=True,
                             timeout=300, env={**os.environ, "SPHERELAB_PACK": packing})
        assert out.returncode == 0, out.stderr[-2000:]
        ids = [int(x) for x in out.stdout.split()]
        store = Store(db)
        assert [store.get_run(i).status for i in ids] == ["finished", "finished"]
        notes = [e.payload["text"] for i in ids for e in store.events(i, ["note"])]
        assert sum(n.startswith("packed with") for n in notes) == (2 if packing == "auto" else 0), notes
        traces[packing] = [store.read_metrics(i).drop(columns="wall_time") for i in ids]
        store.close()
    for packed, alone in zip(traces["auto"], traces["0"]):
        assert list(packed.columns) == list(alone.columns) and len(packed) == len(alone) > 5
        np.testing.assert_allclose(packed.to_numpy(float), alone.to_numpy(float), rtol=1e-6, equal_nan=True)


def test_usage_names_the_command_the_user_typed(monkeypatch, capsys):
    """`spherelab --help` printed `usage: python -m engine`."""
    from engine.cli import build_parser
    for argv0, name in (("/usr/local/bin/spherelab", "spherelab"), ("/repo/engine/__main__.py", "python -m engine")):
        monkeypatch.setattr(sys, "argv", [argv0, "--help"])
        assert build_parser().format_usage().startswith(f"usage: {name} ")
