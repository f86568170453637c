"""Every preset runs and shows what its text promises (engine/presets.py)."""
import json

import numpy as np
import pytest
import torch

from engine.analysis import analyze
from engine.config import ConfigError
from engine.models import si_parameters
from engine.presets import PRESETS, STUDY_PRESETS
from engine.trainer import Trainer, train_traces
from storage import Store
from tests.processes import engine
from tests.test_data import write_cifar10


def labels(preset, **overrides):
    cfgs = preset.configs(**overrides)
    return [analyze(trace, 10)["regime"] for trace in train_traces(cfgs)], cfgs


def test_every_preset_is_verified_here_or_in_test_regimes():
    assert set(PRESETS) == {"Three regimes on digits", "ELR sweep on digits", "Periodic behaviour",
                            "Sharpness vs 2/ELR", "ConvNet on CIFAR-10"}


@pytest.mark.science
def test_three_regimes_preset_shows_its_three_regimes_for_every_seed():
    """Seeds 0-2 (measured: seeds 0-4 on the AVX-512 and the scalar kernel path all show the three)."""
    preset = PRESETS["Three regimes on digits"]
    cfgs = [cfg for seed in range(3) for cfg in preset.configs(seed=seed)]
    found = [analyze(trace, 10)["regime"] for trace in train_traces(cfgs)]
    assert found == list(preset.expected_regimes) * 3, found


@pytest.mark.science
def test_elr_sweep_preset_has_its_two_boundaries_where_its_text_says():
    """"boundaries (about 5e-3 and 3e-2 here)": each estimated boundary within a factor ~2.5 of that."""
    found, cfgs = labels(PRESETS["ELR sweep on digits"])
    rank = {"convergence": 0, "chaotic_equilibrium": 1, "divergence": 2}
    known = [(cfg.elr, rank[label]) for cfg, label in zip(cfgs, found) if label in rank]
    assert [r for _, r in known] == sorted(r for _, r in known), found
    edges = [np.sqrt(a * b) for (a, ra), (b, rb) in zip(known, known[1:]) if ra != rb]
    assert len(edges) == 2, found
    assert 2e-3 <= edges[0] <= 1.25e-2 and 1.2e-2 <= edges[1] <= 7.5e-2, edges


@pytest.mark.science
def test_sharpness_preset_small_elrs_stay_below_the_line_the_large_one_hovers_at_it():
    """Seeds 0 and 1. Median sharpness / line measured over seeds 0-2 on the AVX-512 and the scalar
    kernel path: ELR 1e-3 0.16-0.22, 3e-3 0.30-0.41, 1e-2 1.07-1.21 (above the line at 58-68% of its
    points: it hovers around it)."""
    preset = PRESETS["Sharpness vs 2/ELR"]
    cfgs = [cfg for seed in (0, 1) for cfg in preset.configs(seed=seed)]
    ratios = []
    for trace in train_traces(cfgs):
        measured = trace.dropna(subset=["sharpness"])
        assert len(measured) > 20
        ratios.append((measured["sharpness"] / measured["sharpness_threshold"]).iloc[1:])
    for small, medium, large in (ratios[:3], ratios[3:]):      # ELR 1e-3, 3e-3, 1e-2 of one seed
        assert small.median() < 0.7 and medium.median() < 0.7, (small.median(), medium.median())
        assert 0.5 <= large.median() <= 2.5, large.median()
        assert 0.2 <= (large > 1).mean() <= 0.8, (large > 1).mean()   # around the line, not above it


def test_cifar_preset_needs_the_folder_and_is_convnet_si_32_on_the_sphere(tmp_path):
    preset = PRESETS["ConvNet on CIFAR-10"]
    assert preset.needs_data_dir
    with pytest.raises(ConfigError, match="--data-dir"):
        preset.configs()
    write_cifar10(tmp_path, per_file=26)       # 130 train images: one batch of 128
    [cfg] = preset.configs(data_dir=str(tmp_path))
    assert (cfg.model, cfg.model_width, cfg.dataset, cfg.mode, cfg.elr) == ("convnet_si", 32, "cifar10", "sphere", 1e-3)
    torch.set_num_threads(2)
    trainer = Trainer([cfg.replace(device="cpu")])
    assert trainer.numel == 387_936 == sum(p.numel() for p in si_parameters(trainer.template))
    trainer.train_step()
    assert torch.isfinite(trainer.W).all()
    torch.set_num_threads(1)


# ---- study presets -------------------------------------------------------------------------------------

def test_every_study_preset_is_verified_here():
    assert set(STUDY_PRESETS) == {"Where do large learning rates lead us? (ticks)",
                                  "Where do large learning rates lead us? (digits)"}


def run_study(preset, db, **changes) -> dict:
    """Create the preset's study (with `changes`), run it to its end in a CLI process, return its report."""
    study_id = preset.create(Store(db), **changes)
    engine("study", "--resume", str(study_id), db=db, check=True, timeout=900)
    return json.loads(engine("report", str(study_id), "--json", db=db, check=True).stdout)


def test_ticks_study_preset_finds_the_best_model_just_above_the_convergence_boundary(tmp_path):
    """The preset's protocol (toy, 20k + 10k iterations, both FLRs, SWA of 5) on three of its nine PLRs
    and one seed: the last converged one, the first chaotic one, the largest. Measured with all nine
    and three seeds (README): best = average from PLR 1e-2, 0.833 ± 0.010, against 0.753 ± 0.003 for
    the best converged PLR (5.6e-3)."""
    preset = STUDY_PRESETS["Where do large learning rates lead us? (ticks)"]
    assert preset.pretrain_elrs[3:5] == (0.00562, 0.01) and preset.pretrain_elrs[-1] == 0.1
    r = run_study(preset, str(tmp_path / "ticks.db"), pretrain_elrs=(0.00562, 0.01, 0.1), seeds=(0,))
    rows = {row["pretrain_elr"]: row for row in r["rows"]}
    assert [rows[e]["regime"] for e in (0.00562, 0.01, 0.1)] == ["convergence", "chaotic_equilibrium", "divergence"]
    assert r["best"]["pretrain_elr"] == 0.01 and r["best"]["kind"] in ("average", "finetune@0.0001", "finetune@0.001")
    assert r["best"]["test_acc"]["mean"] > r["best_converged"]["test_acc"]["mean"]
    # a few features strongly (the best model) against all of them weakly (converged)
    best_features = rows[0.01]["feature_acc"][r["best"]["kind"]]
    converged_features = rows[0.00562]["feature_acc"]["pretrain"]
    assert max(best_features) > 0.6 and max(converged_features) < 0.6, (best_features, converged_features)
    assert sorted(best_features)[len(best_features) // 2] < 0.55            # most features stay weak


def test_digits_study_preset_splits_the_chaotic_band_and_finds_its_best_model_converged(tmp_path):
    """The whole preset. Measured (README): boundaries 4.6e-3 (the seeds split at 4.64e-3), 1.5e-2
    (2A/2B), 3.2e-2; best = fine-tuned from PLR 1e-3, 0.985 ± 0.001."""
    r = run_study(STUDY_PRESETS["Where do large learning rates lead us? (digits)"], str(tmp_path / "digits.db"))
    regimes = [row["regime"] for row in r["rows"] if row["regime"]]         # None: the two seeds split
    order = {"convergence": 0, "chaotic_equilibrium": 1, "divergence": 2}
    assert [order[x] for x in regimes] == sorted(order[x] for x in regimes) and set(regimes) == set(order), regimes
    assert [row["subregime"] for row in r["rows"] if row["regime"] == "chaotic_equilibrium"][:2] == ["2A", "2B"]
    assert all(r["boundaries"].values()), r["boundaries"]
    best_row = next(row for row in r["rows"] if row["pretrain_elr"] == r["best"]["pretrain_elr"])
    assert best_row["regime"] == "convergence" and r["best"] == r["best_converged"]
