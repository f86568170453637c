"""Real runs: the regimes and periodic behaviour the analysis must recognise, through the CLI and presets."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine.analysis import analyze
from engine.presets import PRESETS
from engine.trainer import train_traces

RANK = {"convergence": 0, "chaotic_equilibrium": 1, "divergence": 2}


def run_memory(cfg):
    torch.set_num_threads(1)
    return train_traces([cfg])[0]


def cli(*args, db):
    out = subprocess.run([sys.executable, "-m", "engine", *args, "--db", db], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_cli_elr_sweep_shows_three_regimes_in_order(tmp_path):
    db = str(tmp_path / "sweep.db")
    ids = [int(x) for x in cli("sweep", "--elr", "1e-4:10:16", db=db).split()]
    assert len(ids) == 16
    labels = [json.loads(cli("analyze", str(i), db=db))["regime"] for i in ids]
    ranked = [RANK[x] for x in labels if x in RANK]
    assert set(ranked) == {0, 1, 2}, labels
    assert ranked == sorted(ranked), labels          # in order of increasing ELR
    assert labels.count("undetermined") <= 1, labels
    assert labels[0] == "convergence" and labels[-1] == "divergence"


@pytest.mark.parametrize("width", [32, 128])
def test_three_regimes_preset_at_other_widths(width):
    preset = PRESETS["Three regimes on digits"]
    labels = [analyze(run_memory(cfg), 10)["regime"] for cfg in preset.configs(width=width)]
    assert labels == list(preset.expected_regimes)


def test_periodic_preset_spikes_with_norm_jumps_and_elr_drops():
    frame = run_memory(PRESETS["Periodic behaviour"].configs()[0])
    result = analyze(frame, 10)
    spikes, period = result["spikes"], result["period"]
    assert len(spikes) >= 3, spikes
    assert 250 <= period <= 500, (spikes, period)
    steps = frame["step"].to_numpy()
    for s in spikes:
        i = int(np.searchsorted(steps, s))
        before, after = frame.iloc[max(i - 10, 0)], frame.iloc[min(i + 10, len(frame) - 1)]
        assert after["si_norm"] > before["si_norm"], s      # gradients blow the norm up
        assert after["elr"] < before["elr"], s              # so the effective LR drops
