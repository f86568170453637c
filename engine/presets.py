"""Named experiments for one-click launches (dashboard, teaching). Each is verified by a test that
runs it and checks the labels it is meant to show (tests/test_presets.py)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .config import RunConfig, expand_grid


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    base: RunConfig
    swept: dict = field(default_factory=dict)
    expected_regimes: tuple[str, ...] = ()     # in the order of the grid, for the verifying test
    needs_data_dir: bool = False

    def configs(self, **overrides) -> list[RunConfig]:
        base = self.base.replace(**overrides)
        return expand_grid(base, self.swept) if self.swept else [base.validate()]


DIGITS_SPHERE = RunConfig(model="mlp_si", dataset="digits", mode="sphere", epochs=30, log_every=10,
                          tags=("preset",))

PRESETS = {p.name: p for p in (
    Preset("Three regimes on digits",
           "mlp_si on digits on the sphere at three ELRs: a small one converges, a medium one settles into "
           "a chaotic equilibrium, a large one never learns. About 10 s per run on one CPU core.",
           DIGITS_SPHERE, {"elr": [1e-3, 1e-2, 0.2]},
           ("convergence", "chaotic_equilibrium", "divergence")),
    Preset("ELR sweep on digits",
           "The same network over 16 log-spaced ELRs from 1e-4 to 10: the regime map with its two "
           "boundaries (about 5e-3 and 3e-2 here).",
           DIGITS_SPHERE, {"elr": [float(f"{10 ** (-4 + 5 * i / 15):.6g}") for i in range(16)]}),
    Preset("Periodic behaviour",
           "mlp_si on digits with LR + weight decay: weight decay shrinks the norm, the effective LR grows "
           "until training destabilises, the loss spikes, the norm jumps back — and again, about every 300 "
           "steps. About 10 s on one CPU core.",
           RunConfig(model="mlp_si", dataset="digits", mode="lrwd", lr=0.05, wd=0.03, batch_size=128,
                     epochs=200, log_every=5, tags=("preset",))),
    Preset("Sharpness vs 2/ELR",
           "Sharpness (top Hessian eigenvalue at unit norm) measured during training at three ELRs, against "
           "the 2/ELR stability line: the two small ELRs train well below their line, the largest one (a "
           "chaotic equilibrium) is pushed up to it and hovers around it.",
           DIGITS_SPHERE.replace(sharpness_every=22, probe_size=256), {"elr": [1e-3, 3e-3, 1e-2]}),
    Preset("ConvNet on CIFAR-10",
           "ConvNetSI-32 on CIFAR-10 on the sphere at ELR 1e-3 (chaotic equilibrium in the papers). Needs the "
           "CIFAR-10 python files in a local folder; hours on a CPU, minutes per epoch on a GPU.",
           RunConfig(model="convnet_si", dataset="cifar10", mode="sphere", elr=1e-3, epochs=200, log_every=50,
                     sharpness_every=390, tags=("preset",)), needs_data_dir=True),
)}
