"""Turning the Launch form into queued runs, and starting a worker. The dashboard never trains:
it writes queued runs (and commands); a worker process picks them up."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from engine.config import RunConfig, expand_grid, parse_values

from .data import worker_log_path

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class LaunchForm:
    """What the Launch page asks for. A rate range (start, stop, points) sweeps the ELR (sphere) or
    LR (lrwd) log-spaced with both ends included; seeds > 1 repeats every point with seeds seed..seed+n-1."""
    model: str = "mlp_si"
    width: int = 0                 # 0: the model's default
    dataset: str = "digits"
    data_dir: str = ""
    mode: str = "sphere"
    rate: float = 0.01             # ELR (sphere) or LR (lrwd)
    wd: float = 0.0
    momentum: float = 0.0
    epochs: int = 10
    seed: int = 0
    seeds: int = 1
    log_every: int = 10
    sharpness_every: int = 0
    sweep_rate: bool = False
    rate_start: float = 1e-4
    rate_stop: float = 1.0
    rate_points: int = 6
    name: str = ""
    tags: list[str] = field(default_factory=list)

    @property
    def rate_key(self) -> str:
        return "elr" if self.mode == "sphere" else "lr"

    def base(self) -> RunConfig:
        rates = {"elr": self.rate} if self.mode == "sphere" else {"lr": self.rate, "wd": self.wd,
                                                                   "momentum": self.momentum}
        return RunConfig(model=self.model, width=self.width or None, dataset=self.dataset,
                         data_dir=self.data_dir.strip() or None, mode=self.mode, epochs=self.epochs,
                         seed=self.seed, log_every=self.log_every, sharpness_every=self.sharpness_every,
                         name=self.name.strip() or None, tags=tuple(self.tags), **rates)

    def swept(self) -> dict[str, list]:
        swept = {}
        if self.sweep_rate:
            swept[self.rate_key] = parse_values(f"{self.rate_start}:{self.rate_stop}:{self.rate_points}")
        if self.seeds > 1:
            swept["seed"] = list(range(self.seed, self.seed + self.seeds))
        return swept


def configs_of(form: LaunchForm) -> tuple[list[RunConfig], dict]:
    """The validated configs the form describes and what it sweeps. ConfigError (one line) on bad input."""
    swept = form.swept()
    base = form.base().validate()
    if swept and base.name:
        # one name for many runs would make them indistinguishable in every list
        base = base.replace(name=None)
    return (expand_grid(base, swept) if swept else [base]), swept


def start_worker(url: str, max_parallel: int = 2) -> tuple[int, Path]:
    """A worker in its own session (it outlives this page and a Streamlit restart); (pid, log path).
    The URL goes through the environment, not the command line, so a password never shows in `ps`."""
    log_path = worker_log_path(url)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "engine", "worker", "--max-parallel", str(max_parallel)],
                                cwd=REPO_ROOT, env={**os.environ, "SPHERELAB_DB": url}, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc.pid, log_path
