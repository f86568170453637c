"""`python -m engine calibrate`: the reference it judges by, its table, its bad input, and a quick
real calibration (issue 10, item 4). The full calibration and its table are in BENCHMARKS.md."""
import json

import numpy as np
import pandas as pd
import pytest

from engine import analysis, calibrate
from tests.processes import engine

QUICK = ["--seeds", "0", "--widths", "32", "128", "--depths", "2", "--batch-sizes", "64",
         "--elr", "1e-4:1:9", "--horizons", "15", "30"]


def cli(*args, check=True):
    return engine("calibrate", *args, check=check)


def long_run(horizon, loss, egn, untrained=4.0, points_per_epoch=4):
    """A trace to 4x horizon from laws of the epoch."""
    epoch = np.arange(0, 4 * horizon * points_per_epoch + 1) / points_per_epoch
    trace = pd.DataFrame({"step": np.arange(len(epoch)) * 10, "epoch": epoch, "train_loss": loss(epoch),
                          "eff_grad_norm": egn(epoch), "si_norm": np.full(len(epoch), 8.0)})
    trace.loc[0, "train_loss"] = untrained
    return trace


def test_reference_reads_what_loss_and_gradient_norm_did_over_the_extra_time(monkeypatch):
    # the reference never asks the classifier
    monkeypatch.setattr(analysis, "classify", lambda *a, **k: pytest.fail("reference used the classifier"))
    monkeypatch.setattr(analysis, "analyze", lambda *a, **k: pytest.fail("reference used the classifier"))
    h = 30
    falling = long_run(h, lambda t: 0.3 / (1 + t), lambda t: 20 / np.sqrt(1 + t))
    assert calibrate.reference_label(falling, h) == "convergence"
    settled = long_run(h, lambda t: 0.5 + np.exp(-t), lambda t: np.full_like(t, 12.0))
    assert calibrate.reference_label(settled, h) == "chaotic_equilibrium"
    # the loss falls but the gradient norm does not: not convergence
    mixed = long_run(h, lambda t: 0.3 / (1 + t), lambda t: np.full_like(t, 12.0))
    assert calibrate.reference_label(mixed, h) == "chaotic_equilibrium"
    never = long_run(h, lambda t: np.full_like(t, 4.2), lambda t: np.full_like(t, 1e3))
    assert calibrate.reference_label(never, h) == "divergence"
    # a slow fall, 20% over 4x the time, is not enough
    slow = long_run(h, lambda t: 0.3 * (1 + t) ** -0.16, lambda t: 20 * (1 + t) ** -0.16)
    assert calibrate.reference_label(slow, h) == "chaotic_equilibrium"


def test_interior_excludes_both_neighbours_of_every_boundary():
    refs = pd.Series(["convergence"] * 3 + ["chaotic_equilibrium"] * 3 + ["divergence"] * 2)
    assert calibrate._interior(refs).tolist() == [True, True, False, False, True, False, False, True]


@pytest.mark.parametrize("args,message", [
    (["--widths", "0"], "--widths must be positive"),
    (["--seeds", "one"], "--seeds takes whole numbers"),
    (["--elr", "0:1:3"], "positive finite ends"),
    (["--horizons", "30", "x"], "--horizons takes whole numbers"),
    (["--batch-sizes", "5000"], "batch"),
    (["--load-traces", "/nonexistent/traces.parquet"], "cannot read traces"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    out = cli(*args, check=False)
    assert out.returncode == 2, out
    assert out.stdout == "" and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr


@pytest.mark.science
def test_quick_calibration_meets_the_targets_on_real_runs(tmp_path):
    """Two widths x 9 ELRs, labelled at 15 and 30 epochs against the same runs at 60 and 120."""
    saved = tmp_path / "traces.parquet"
    result = json.loads(cli(*QUICK, "--json", "--save-traces", str(saved)).stdout)
    runs = pd.DataFrame(result["runs"])
    assert len(runs) == 2 * 9 * 2
    assert set(runs["reference"]) == {"convergence", "chaotic_equilibrium", "divergence"}
    summary = result["summary"]
    assert summary["all"]["interior_agreement"] >= 0.95, runs[runs["label"] != runs["reference"]]
    assert summary["all"]["undetermined"] <= 0.05 and summary["all"]["undetermined_interior"] == 0
    assert summary["targets_met"] is True
    # the saved traces give the same table without training again, as text
    text = cli("--load-traces", str(saved), "--horizons", "15", "30").stdout
    assert "reference \\ label" in text and "targets" in text and "met" in text
    conv = summary["15"]["confusion"]["convergence"]["convergence"]     # first table, first row
    assert f"{conv:>9}" in text.splitlines()[2]
