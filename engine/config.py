"""Run configuration: one frozen dataclass, its validation, and grid expansion.

Everything a run needs to be reproduced lives here and is stored as JSON with the run.
Validation raises ConfigError with a one-line message that says what is wrong and how to fix it;
the CLI turns that into exit code 2 before anything is written.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field

MODELS = ("mlp_si", "convnet_si", "resnet18_si")
DATASETS = ("digits", "synthetic", "cifar10", "cifar100")
MODES = ("sphere", "lrwd")
SCHEDULES = ("constant", "cosine", "step")
DEVICES = ("auto", "cpu", "cuda")

# Which models can read which datasets: the conv nets need 3x32x32 images, digits are 8x8.
IMAGE_DATASETS = ("cifar10", "cifar100")

DEFAULT_WIDTH = {"mlp_si": 64, "convnet_si": 32, "resnet18_si": 32}


def num_classes(config: dict) -> int | None:
    """Classes of a stored config's dataset (chance level for the analysis); torch-free."""
    known = {"digits": 10, "cifar10": 10, "cifar100": 100}
    return known.get(config.get("dataset", "digits"), config.get("synthetic_classes"))


class ConfigError(ValueError):
    """Bad user input. The message is one line: what is wrong and how to fix it."""


@dataclass(frozen=True)
class RunConfig:
    # model
    model: str = "mlp_si"
    width: int | None = None          # None: the model's default (mlp 64, conv nets 32)
    depth: int = 3                    # mlp_si hidden blocks
    init_scale: float = 10.0          # Frobenius norm of the frozen head
    # data
    dataset: str = "digits"
    data_dir: str | None = None       # CIFAR: folder holding cifar-10-batches-py/ or cifar-100-python/
    synthetic_samples: int = 2048     # synthetic: train samples (test = a quarter of it)
    synthetic_shape: tuple[int, ...] = (64,)
    synthetic_classes: int = 10
    augment: bool = False
    # optimisation
    mode: str = "sphere"
    elr: float | None = None          # sphere: effective learning rate (default 0.01)
    lr: float | None = None           # lrwd: learning rate (default 0.1)
    wd: float = 0.0
    momentum: float = 0.0
    schedule: str = "constant"
    epochs: int = 30
    batch_size: int | None = None     # None: 32 on digits (its 1,437 images need noisy steps to
                                      # show a chaotic band), 128 elsewhere (the papers' value)
    seed: int = 0
    # measurement (frequencies in optimizer steps; 0 turns a measurement off)
    log_every: int = 10
    eval_every: int | None = None     # test-set evaluation; None: once per epoch
    sharpness_every: int = 0
    probe_size: int = 1024
    lanczos_iters: int = 20
    lanczos_tol: float = 1e-3
    trace_samples: int = 0            # Hutchinson vectors for hessian_trace at sharpness steps
    checkpoint_every: int = 1         # epochs between checkpoints (worker runs); 0 = off
    keep_every: int = 0               # epochs between kept checkpoints (forks, averages); 0 = only the latest
    device: str = "auto"
    # bookkeeping
    name: str | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)

    # ---- derived -------------------------------------------------------------------------
    @property
    def model_width(self) -> int:
        return self.width if self.width is not None else DEFAULT_WIDTH[self.model]

    @property
    def batch(self) -> int:
        if self.batch_size is not None:
            return self.batch_size
        return 32 if self.dataset == "digits" else 128

    @property
    def base_rate(self) -> float:
        """The rate the user sets: ELR on the sphere, LR under lrwd."""
        if self.mode == "sphere":
            return self.elr if self.elr is not None else 0.01
        return self.lr if self.lr is not None else 0.1

    def display_name(self) -> str:
        if self.name:
            return self.name
        if self.mode == "sphere":
            rate = f"elr={self.base_rate:.3g}"
        else:
            rate = f"lr={self.base_rate:.3g} wd={self.wd:.3g}"
            if self.momentum:
                rate += f" mom={self.momentum:.3g}"
        return f"{self.model}-{self.model_width} {self.dataset} {self.mode} {rate} seed={self.seed}"

    # ---- validation ------------------------------------------------------------------------
    def validate(self) -> "RunConfig":
        def bad(msg: str) -> None:
            raise ConfigError(msg)

        if self.model not in MODELS:
            bad(f"unknown model {self.model!r}: choose one of {', '.join(MODELS)}")
        if self.dataset not in DATASETS:
            bad(f"unknown dataset {self.dataset!r}: choose one of {', '.join(DATASETS)}")
        if self.mode not in MODES:
            bad(f"unknown mode {self.mode!r}: choose sphere (fixed ELR) or lrwd (LR + weight decay)")
        if self.schedule not in SCHEDULES:
            bad(f"unknown schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.device not in DEVICES:
            bad(f"unknown device {self.device!r}: choose auto, cpu or cuda")
        if self.model in ("convnet_si", "resnet18_si"):
            image_ok = self.dataset in IMAGE_DATASETS or (
                self.dataset == "synthetic" and tuple(self.synthetic_shape) == (3, 32, 32))
            if not image_ok:
                bad(f"model {self.model} needs 3x32x32 images but dataset {self.dataset} "
                    f"has shape {self._input_shape_text()}: use {self.model} with cifar10, cifar100 "
                    f"or synthetic --synthetic-shape 3x32x32, or mlp_si with any dataset")
        if self.width is not None and self.width < 1:
            bad(f"--width must be a positive integer, got {self.width}")
        if self.depth < 1:
            bad(f"--depth must be at least 1, got {self.depth}")
        if not (math.isfinite(self.init_scale) and self.init_scale > 0):
            bad(f"--init-scale must be a positive finite number, got {self.init_scale}")
        if self.mode == "sphere":
            if self.lr is not None:
                bad("--lr is for --mode lrwd; on the sphere set the effective learning rate with --elr")
            if self.wd != 0:
                bad(f"--wd {self.wd} is meaningless with --mode sphere (the norm is fixed): "
                    "drop --wd or use --mode lrwd")
        else:
            if self.elr is not None:
                bad("--elr is for --mode sphere; under --mode lrwd set --lr and --wd (the ELR is measured)")
        rate_flag = "--elr" if self.mode == "sphere" else "--lr"
        rate = self.base_rate
        if not (math.isfinite(rate) and rate > 0):
            bad(f"{rate_flag} must be a positive finite number, got {rate}")
        if not (math.isfinite(self.wd) and self.wd >= 0):
            bad(f"--wd must be a non-negative finite number, got {self.wd}")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            bad(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.epochs < 1:
            bad(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch < 1:
            bad(f"--batch-size must be at least 1, got {self.batch_size}")
        for flag, value in (("--log-every", self.log_every), ("--sharpness-every", self.sharpness_every),
                            ("--checkpoint-every", self.checkpoint_every), ("--keep-every", self.keep_every),
                            ("--trace-samples", self.trace_samples)):
            if value < 0:
                bad(f"{flag} must be 0 (off) or a positive number of steps, got {value}")
        if self.log_every < 1:
            bad(f"--log-every must be at least 1 step, got {self.log_every}")
        if self.eval_every is not None and self.eval_every < 1:
            bad(f"--eval-every must be at least 1 step, got {self.eval_every}")
        if self.probe_size < 1:
            bad(f"--probe-size must be at least 1, got {self.probe_size}")
        if self.lanczos_iters < 2:
            bad(f"--lanczos-iters must be at least 2, got {self.lanczos_iters}")
        if self.dataset == "synthetic":
            if self.synthetic_samples < 2 or self.synthetic_classes < 2:
                bad("--synthetic-samples and --synthetic-classes must each be at least 2")
            if not self.synthetic_shape or any(d < 1 for d in self.synthetic_shape):
                bad(f"--synthetic-shape must be positive sizes like 64 or 3x32x32, got {self.synthetic_shape}")
        if self.dataset in IMAGE_DATASETS and not self.data_dir:
            bad(f"dataset {self.dataset} is read from a local folder: pass --data-dir DIR holding "
                f"{'cifar-10-batches-py/' if self.dataset == 'cifar10' else 'cifar-100-python/'} "
                "(python-pickle layout); nothing is downloaded")
        return self

    def _input_shape_text(self) -> str:
        if self.dataset == "digits":
            return "64 (8x8 images)"
        if self.dataset == "synthetic":
            return "x".join(map(str, self.synthetic_shape))
        return "3x32x32"

    # ---- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["synthetic_shape"] = list(self.synthetic_shape)
        d["tags"] = list(self.tags)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown config keys {sorted(unknown)}: remove them (known: {sorted(known)})")
        d = dict(d)
        if "synthetic_shape" in d:
            d["synthetic_shape"] = tuple(d["synthetic_shape"])
        if "tags" in d:
            d["tags"] = tuple(d["tags"])
        return cls(**d)

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)


# ---- grids --------------------------------------------------------------------------------

SWEEPABLE = ("elr", "lr", "wd", "momentum", "seed", "width", "batch_size")


def parse_values(text: str, kind=float) -> list:
    """One value, or a log range START:STOP:N (N log-spaced values, both ends included)."""
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise ConfigError(f"bad range {text!r}: write START:STOP:N, e.g. 1e-4:10:16")
        try:
            start, stop, n = float(parts[0]), float(parts[1]), int(parts[2])
        except ValueError:
            raise ConfigError(f"bad range {text!r}: write START:STOP:N with numbers, e.g. 1e-4:10:16") from None
        if not (start > 0 and stop > 0 and math.isfinite(start) and math.isfinite(stop)):
            raise ConfigError(f"bad range {text!r}: a log range needs positive finite ends")
        if n < 1:
            raise ConfigError(f"bad range {text!r}: N must be at least 1")
        if n == 1:
            values = [start]
        else:
            a, b = math.log10(start), math.log10(stop)
            values = [float(f"{10 ** (a + (b - a) * i / (n - 1)):.6g}") for i in range(n)]
        return [kind(v) for v in values]
    try:
        return [kind(text)]
    except ValueError:
        raise ConfigError(f"bad value {text!r}: expected a {'number' if kind is float else 'whole number'}") from None


def expand_grid(base: RunConfig, swept: dict[str, list]) -> list[RunConfig]:
    """Cartesian product of the swept values over base; every member is validated."""
    keys = [k for k in swept if len(swept[k]) > 0]
    for k in keys:
        if k not in SWEEPABLE:
            raise ConfigError(f"cannot sweep {k!r}: sweepable flags are {', '.join(SWEEPABLE)}")
    configs = []
    for combo in itertools.product(*(swept[k] for k in keys)):
        cfg = base.replace(**dict(zip(keys, combo)))
        configs.append(cfg.validate())
    return configs


_SWEPT_TYPES = {"elr": float, "lr": float, "wd": float, "momentum": float, "seed": int, "width": int,
                "batch_size": int}


def configs_from_flags(flags: dict, *, single: bool) -> tuple[list[RunConfig], dict]:
    """Validated configs (one, or the grid's product) and the swept values, from the training flags'
    values (the CLI's parsed arguments as a dict: sweepable flags hold lists of texts)."""
    swept: dict[str, list] = {}
    fixed: dict = {}
    for key in SWEEPABLE:
        raw = flags.get(key)
        if raw is None:
            continue
        raw = raw if isinstance(raw, list) else [raw]
        values = [v for text in raw for v in parse_values(str(text), _SWEPT_TYPES[key])]
        if len(values) == 1:
            fixed[key] = values[0]
        elif single:
            raise ConfigError(f"--{key.replace('_', '-')} got {len(values)} values: `train` runs one "
                              "configuration; use `sweep` or `submit` for a grid")
        else:
            swept[key] = values
    given = {f.name: flags[f.name] for f in dataclasses.fields(RunConfig) if f.name in flags and f.name not in SWEEPABLE}
    given["synthetic_shape"] = tuple(given.get("synthetic_shape", RunConfig.synthetic_shape))
    given["tags"] = tuple(given.get("tags") or ())
    base = RunConfig(**given, **fixed)
    configs = expand_grid(base, swept) if swept else [base.validate()]
    if swept and base.name:
        configs = [c.replace(name=f"{base.name} {' '.join(f'{k}={getattr(c, k):g}' for k in swept)}")
                   for c in configs]
    return configs, swept
