"""Every preset runs and shows what its text promises (engine/presets.py)."""
import numpy as np
import pytest
import torch

from engine.analysis import analyze
from engine.config import ConfigError
from engine.models import si_parameters
from engine.presets import PRESETS
from engine.trainer import Trainer, train_traces
from tests.test_data import write_cifar10


def labels(preset, **overrides):
    cfgs = preset.configs(**overrides)
    return [analyze(trace, 10)["regime"] for trace in train_traces(cfgs)], cfgs


def test_every_preset_is_verified_here_or_in_test_regimes():
    assert set(PRESETS) == {"Three regimes on digits", "ELR sweep on digits", "Periodic behaviour",
                            "Sharpness vs 2/ELR", "ConvNet on CIFAR-10"}


def test_three_regimes_preset_shows_its_three_regimes():
    preset = PRESETS["Three regimes on digits"]
    found, _ = labels(preset)
    assert found == list(preset.expected_regimes)


def test_elr_sweep_preset_has_its_two_boundaries_where_its_text_says():
    """"boundaries (about 5e-3 and 3e-2 here)": each estimated boundary within a factor ~2.5 of that."""
    found, cfgs = labels(PRESETS["ELR sweep on digits"])
    rank = {"convergence": 0, "chaotic_equilibrium": 1, "divergence": 2}
    known = [(cfg.elr, rank[label]) for cfg, label in zip(cfgs, found) if label in rank]
    assert [r for _, r in known] == sorted(r for _, r in known), found
    edges = [np.sqrt(a * b) for (a, ra), (b, rb) in zip(known, known[1:]) if ra != rb]
    assert len(edges) == 2, found
    assert 2e-3 <= edges[0] <= 1.25e-2 and 1.2e-2 <= edges[1] <= 7.5e-2, edges


def test_sharpness_preset_small_elrs_stay_below_the_line_the_large_one_hovers_at_it():
    preset = PRESETS["Sharpness vs 2/ELR"]
    cfgs = preset.configs()
    ratios = []
    for trace in train_traces(cfgs):
        measured = trace.dropna(subset=["sharpness"])
        assert len(measured) > 20
        ratios.append(float(np.median((measured["sharpness"] / measured["sharpness_threshold"]).iloc[1:])))
    small, medium, large = ratios               # ELR 1e-3, 3e-3, 1e-2 (measured: 0.19, 0.33, 1.18)
    assert small < 0.7 and medium < 0.7, ratios
    assert 0.5 <= large <= 2.5, ratios


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
