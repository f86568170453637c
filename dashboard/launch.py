"""Turning the Launch form into queued runs, and starting a worker. The dashboard never trains:
it writes queued runs (and commands); a worker process picks them up."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from engine.config import ConfigError, RunConfig, expand_grid, parse_values

from .data import worker_log_path

REPO_ROOT = Path(__file__).resolve().parent.parent

# The form's label for each CLI flag, so a ConfigError (worded for the CLI) names the form's field.
FIELDS = {"--model": "Model", "--width": "Width", "--depth": "Depth", "--init-scale": "Head norm",
          "--dataset": "Dataset", "--data-dir": "Data folder", "--synthetic-samples": "Samples",
          "--synthetic-shape": "Input shape", "--synthetic-classes": "Classes", "--augment": "Augment",
          "--mode": "Mode", "--elr": "ELR", "--lr": "LR", "--wd": "Weight decay", "--momentum": "Momentum",
          "--schedule": "Schedule", "--epochs": "Epochs", "--batch-size": "Batch size", "--seed": "Seed",
          "--log-every": "Log every", "--eval-every": "Test every", "--sharpness-every": "Sharpness every",
          "--probe-size": "Probe size", "--lanczos-iters": "Lanczos iterations",
          "--lanczos-tol": "Lanczos tolerance", "--trace-samples": "Trace vectors",
          "--checkpoint-every": "Checkpoint every", "--keep-every": "Keep checkpoints every", "--device": "Device",
          "--name": "Name", "--tags": "Tags",
          "--sweep-name": "Sweep name"}
_FLAG = re.compile(r"--[a-z][a-z-]*( [A-Z]{2,}\b)?")


def form_message(message: str, fields: dict[str, str] | None = None) -> str:
    """A validation message with the CLI's flags replaced by the form's field names (`fields`: flag ->
    label, default the Launch form's)."""
    fields = FIELDS if fields is None else fields
    return _FLAG.sub(lambda m: f"“{fields.get(m.group(0).split()[0], m.group(0))}”", str(message))


@dataclass
class LaunchForm:
    """What the Launch page asks for: every training option of the CLI. A rate range (start, stop,
    points) sweeps the ELR (sphere) or LR (lrwd) log-spaced with both ends included, in place of the
    single rate; seeds > 1 repeats every point with seeds seed..seed+n-1. 0 in width, batch_size
    and eval_every means the engine's default."""
    model: str = "mlp_si"
    width: int = 0
    depth: int = 3
    init_scale: float = 10.0
    dataset: str = "digits"
    data_dir: str = ""
    synthetic_samples: int = 2048
    synthetic_shape: str = "64"
    synthetic_classes: int = 10
    augment: bool = False
    mode: str = "sphere"
    rate: float = 0.01             # ELR (sphere) or LR (lrwd)
    wd: float = 0.0
    momentum: float = 0.0
    schedule: str = "constant"
    epochs: int = 10
    batch_size: int = 0
    seed: int = 0
    seeds: int = 1
    log_every: int = 10
    eval_every: int = 0
    sharpness_every: int = 0
    probe_size: int = 1024
    lanczos_iters: int = 20
    lanczos_tol: float = 1e-3
    trace_samples: int = 0
    checkpoint_every: int = 1
    keep_every: int = 0
    device: str = "auto"
    sweep_rate: bool = False
    rate_start: float = 1e-4
    rate_stop: float = 1.0
    rate_points: int = 6
    name: str = ""
    sweep_name: str = ""
    tags: list[str] = field(default_factory=list)

    @property
    def rate_key(self) -> str:
        return "elr" if self.mode == "sphere" else "lr"

    def base(self) -> RunConfig:
        rates = {"elr": self.rate} if self.mode == "sphere" else {"lr": self.rate, "wd": self.wd,
                                                                   "momentum": self.momentum}
        try:
            shape = tuple(int(part) for part in self.synthetic_shape.lower().split("x"))
        except ValueError:
            raise ConfigError(f"--synthetic-shape {self.synthetic_shape!r} is not sizes joined by x, "
                              "e.g. 64 or 3x32x32") from None
        return RunConfig(model=self.model, width=self.width or None, depth=self.depth, init_scale=self.init_scale,
                         dataset=self.dataset, data_dir=self.data_dir.strip() or None,
                         synthetic_samples=self.synthetic_samples, synthetic_shape=shape,
                         synthetic_classes=self.synthetic_classes, augment=self.augment, mode=self.mode,
                         schedule=self.schedule, epochs=self.epochs, batch_size=self.batch_size or None,
                         seed=self.seed, log_every=self.log_every, eval_every=self.eval_every or None,
                         sharpness_every=self.sharpness_every, probe_size=self.probe_size,
                         lanczos_iters=self.lanczos_iters, lanczos_tol=self.lanczos_tol,
                         trace_samples=self.trace_samples, checkpoint_every=self.checkpoint_every,
                         keep_every=self.keep_every, device=self.device, name=self.name.strip() or None,
                         tags=tuple(self.tags), **rates)

    def swept(self) -> dict[str, list]:
        swept = {}
        if self.sweep_rate:
            swept[self.rate_key] = parse_values(f"{self.rate_start}:{self.rate_stop}:{self.rate_points}")
        if self.seeds > 1:
            swept["seed"] = list(range(self.seed, self.seed + self.seeds))
        return swept


def configs_of(form: LaunchForm) -> tuple[list[RunConfig], dict]:
    """The validated configs the form describes and what it sweeps. ConfigError (one line, naming
    the form's fields) on bad input."""
    try:
        swept = form.swept()
        base = form.base()
        if form.sweep_rate:
            # the range replaces the single rate field, which the form hides while sweeping
            base = base.replace(**{form.rate_key: swept[form.rate_key][0]})
        base = base.validate()
        if swept and base.name:
            # one name for many runs would make them indistinguishable in every list
            base = base.replace(name=None)
        return (expand_grid(base, swept) if swept else [base]), swept
    except ConfigError as exc:
        raise ConfigError(form_message(exc)) from None


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
