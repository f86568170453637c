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
DATASETS = ("digits", "synthetic", "ticks", "cifar10", "cifar100")
NORMS = ("batch", "layer")
MODES = ("sphere", "lrwd")
SCHEDULES = ("constant", "cosine", "step")
DEVICES = ("auto", "cpu", "cuda")

# Which models can read which datasets: the conv nets need 3x32x32 images, digits are 8x8.
IMAGE_DATASETS = ("cifar10", "cifar100")

DEFAULT_WIDTH = {"mlp_si": 64, "convnet_si": 32, "resnet18_si": 32}

# Training-set sizes known before any data is read: digits' fixed stratified 80% split of 1,797
# images; synthetic data has --synthetic-samples. A CIFAR folder's size is checked once it is read.
DIGITS_TRAIN_SIZE = 1437
# With --validation, image and synthetic data hold out this fraction of the training set (rounded down)
# as the validation split; ticks draws a separate validation set instead (its training set is unchanged).
VALIDATION_FRACTION = 0.1


def held_out(train_size: int) -> int:
    """Validation samples taken out of a training set of train_size (datasets other than ticks)."""
    return int(train_size * VALIDATION_FRACTION)
TICKS_TRAIN_SIZE = 512
INPUT_FEATURES = {"digits": 64, "ticks": 32, "cifar10": 3 * 32 * 32, "cifar100": 3 * 32 * 32}

# BatchNorm in train mode normalises by the variance over the batch. mlp_si's BatchNorm1d has one
# value per sample and unit, so one sample has no variance: it needs batches of 2 or more (the conv
# nets' BatchNorm2d also averages over image positions, so one image is enough). Training batches
# are --batch-size (the last partial batch of an epoch is dropped), and the probe behind the
# untrained level and sharpness is evaluated in chunks of --batch-size (its last chunk is the rest).
BN_MIN_BATCH = 2

# Upper bounds: generous, but finite, so that a typo (an extra zero, a pasted number) is a message at
# submit time rather than an allocation traceback or a run that can never end.
MAX_SEED = 2**63 - 1             # a signed 64-bit integer: larger seeds failed mid-run (issue 12)
MAX_DEPTH = 1_000                # mlp_si hidden blocks
MAX_PARAMETERS = 10**9           # model weights (SI layers + frozen head): 4 GB per float32 copy, and
                                 # training keeps several (weights, gradient, momentum, initial, Lanczos)
MAX_SYNTHETIC_SAMPLES = 10_000_000
MAX_SYNTHETIC_DIMS = 4           # --synthetic-shape sizes: C x H x W and one to spare (inputs are flattened)
MAX_DATA_VALUES = 2**31          # synthetic train inputs, samples x features: 8 GiB of float32
MAX_EPOCHS = 100_000             # 100x the papers' longest runs (1,000 epochs)
MAX_STEPS = 10**9                # optimizer steps in one run: epochs x (train samples // batch)
MAX_LANCZOS_ITERS = 500          # each Lanczos iteration keeps one parameter-sized vector
MAX_TRACE_SAMPLES = 10_000       # Hutchinson vectors per sharpness measurement
MAX_GRID_RUNS = 10_000           # runs one sweep or submit may create


def num_classes(config: dict) -> int | None:
    """Classes of a stored config's dataset (chance level for the analysis); torch-free."""
    known = {"digits": 10, "ticks": 2, "cifar10": 10, "cifar100": 100}
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
    norm: str = "batch"               # mlp_si: BatchNorm (batch) or LayerNorm (layer) after each linear layer
    # data
    dataset: str = "digits"
    data_dir: str | None = None       # CIFAR: folder holding cifar-10-batches-py/ or cifar-100-python/
    synthetic_samples: int = 2048     # synthetic: train samples (test = a quarter of it)
    synthetic_shape: tuple[int, ...] = (64,)
    synthetic_classes: int = 10
    augment: bool = False
    data_seed: int = 0                # ticks: the seed of the data (the run seed fixes init and batch order);
                                      # with validation, also the seed of the held-out split of other data
    validation: bool = False          # a validation split (val_loss/val_acc): ticks a separate draw as large
                                      # as the test set; other data hold out VALIDATION_FRACTION of the
                                      # training set (engine/data.py). Learning-rate studies select on it.
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
    keep_last: int = 0                # also keep a checkpoint at each of the last K epochs (SWA)
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
    def min_batch(self) -> int:
        """Smallest batch (or probe chunk) the model's BatchNorm can train on (see BN_MIN_BATCH); LayerNorm
        normalises each sample on its own."""
        return BN_MIN_BATCH if self.model == "mlp_si" and self.norm == "batch" else 1

    @property
    def train_size(self) -> int | None:
        """Training samples, where known without reading data (None for a CIFAR folder)."""
        full = {"digits": DIGITS_TRAIN_SIZE, "ticks": TICKS_TRAIN_SIZE, "synthetic": self.synthetic_samples}.get(
            self.dataset)
        if full is None or not self.validation or self.dataset == "ticks":
            return full
        return full - held_out(full)

    @property
    def parameter_count(self) -> int:
        """Weights of the model this config builds (SI layers and frozen head), computed without building it."""
        c = self.model_width
        classes = num_classes(self.to_dict())
        if self.model == "mlp_si":
            features = INPUT_FEATURES.get(self.dataset) or math.prod(self.synthetic_shape)
            return features * c + (self.depth - 1) * c * c + c * classes
        if self.model == "convnet_si":   # conv 3->c, c->2c, 2c->4c, 4c->8c (3x3); head 8c->classes with bias
            return 27 * c + 378 * c * c + 8 * c * classes + classes
        return 27 * c + 2724 * c * c + 8 * c * classes   # resnet18_si: 2,790,240 SI weights at c=32

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
        if self.norm not in NORMS:
            bad(f"unknown --norm {self.norm!r}: choose batch (BatchNorm) or layer (LayerNorm, mlp_si only)")
        if self.norm == "layer" and self.model != "mlp_si":
            bad(f"--norm layer is an mlp_si option: {self.model} normalises with BatchNorm; drop --norm")
        if not 0 <= self.data_seed <= MAX_SEED:
            bad(f"--data-seed must be a whole number from 0 to 2**63-1, got {self.data_seed}")
        if self.width is not None and self.width < 1:
            bad(f"--width must be a positive integer, got {self.width}")
        if self.depth < 1:
            bad(f"--depth must be at least 1, got {self.depth}")
        if self.depth > MAX_DEPTH:
            bad(f"--depth must be at most {MAX_DEPTH:,} (MAX_DEPTH), got {self.depth}")
        if not 0 <= self.seed <= MAX_SEED:
            bad(f"--seed must be a whole number from 0 to 2**63-1 (a signed 64-bit integer), got {self.seed}")
        for tag in self.tags:
            if not isinstance(tag, str) or not tag.strip():
                bad(f"--tags got an empty tag {tag!r}: tags are words like baseline")
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
        if self.epochs > MAX_EPOCHS:
            bad(f"--epochs must be at most {MAX_EPOCHS:,} (MAX_EPOCHS), got {self.epochs}")
        if self.batch < self.min_batch:
            bad(f"--batch-size must be at least {self.min_batch} for {self.model} (its BatchNorm normalises "
                f"by the variance over the batch, which one sample does not have), got {self.batch}")
        for flag, value, unit in (("--sharpness-every", self.sharpness_every, "steps"),
                                  ("--checkpoint-every", self.checkpoint_every, "epochs"),
                                  ("--keep-every", self.keep_every, "epochs"),
                                  ("--keep-last", self.keep_last, "epochs"),
                                  ("--trace-samples", self.trace_samples, "Hutchinson vectors")):
            if value < 0:
                bad(f"{flag} must be 0 (off) or a positive number of {unit}, got {value}")
        if self.trace_samples > MAX_TRACE_SAMPLES:
            bad(f"--trace-samples must be at most {MAX_TRACE_SAMPLES:,} vectors (MAX_TRACE_SAMPLES), "
                f"got {self.trace_samples}")
        if self.log_every < 1:
            bad(f"--log-every must be at least 1 step, got {self.log_every}")
        if self.eval_every is not None and self.eval_every < 1:
            bad(f"--eval-every must be at least 1 step, got {self.eval_every}")
        if self.probe_size < self.min_batch:
            bad(f"--probe-size must be at least {self.min_batch} samples for {self.model}, got {self.probe_size}")
        if not 2 <= self.lanczos_iters <= MAX_LANCZOS_ITERS:
            bad(f"--lanczos-iters must be from 2 to {MAX_LANCZOS_ITERS} (MAX_LANCZOS_ITERS), got {self.lanczos_iters}")
        if not (math.isfinite(self.lanczos_tol) and 0 < self.lanczos_tol < 1):
            bad(f"--lanczos-tol must be a relative residual between 0 and 1, got {self.lanczos_tol}")
        if self.dataset == "synthetic":
            if not 2 <= self.synthetic_samples <= MAX_SYNTHETIC_SAMPLES:
                bad(f"--synthetic-samples must be from 2 to {MAX_SYNTHETIC_SAMPLES:,} (MAX_SYNTHETIC_SAMPLES), "
                    f"got {self.synthetic_samples}")
            if not 2 <= self.synthetic_classes <= self.synthetic_samples:
                bad(f"--synthetic-classes must be from 2 to --synthetic-samples ({self.synthetic_samples}: "
                    f"every class needs a sample), got {self.synthetic_classes}")
            shape = tuple(self.synthetic_shape)
            if not 1 <= len(shape) <= MAX_SYNTHETIC_DIMS or any(d < 1 for d in shape):
                bad(f"--synthetic-shape must be 1 to {MAX_SYNTHETIC_DIMS} positive sizes like 64 or 3x32x32, "
                    f"got {'x'.join(map(str, shape))}")
            if self.synthetic_samples * math.prod(shape) > MAX_DATA_VALUES:
                bad(f"{self.synthetic_samples:,} synthetic samples of shape {'x'.join(map(str, shape))} are "
                    f"{self.synthetic_samples * math.prod(shape):,} values, more than {MAX_DATA_VALUES:,} "
                    "(MAX_DATA_VALUES, 8 GiB of float32): use fewer or smaller samples")
        if self.parameter_count > MAX_PARAMETERS:
            bad(f"{self.model} with width {self.model_width}"
                f"{f', depth {self.depth}' if self.model == 'mlp_si' else ''} on {self.dataset} has "
                f"{self.parameter_count:,} weights, more than {MAX_PARAMETERS:,} (MAX_PARAMETERS): use a smaller "
                "--width" + (" or --depth" if self.model == "mlp_si" else ""))
        if self.train_size is not None:
            self.check_against_data(self.train_size)
        if self.dataset in IMAGE_DATASETS and not self.data_dir:
            bad(f"dataset {self.dataset} is read from a local folder: pass --data-dir DIR holding "
                f"{'cifar-10-batches-py/' if self.dataset == 'cifar10' else 'cifar-100-python/'} "
                "(python-pickle layout); nothing is downloaded")
        return self

    def check_against_data(self, train_size: int) -> None:
        """The checks that need the number of training samples: validate() makes them where that is
        known from the config, load_dataset() for a CIFAR folder once read. ConfigError if a training
        batch or a probe chunk could not be trained (see BN_MIN_BATCH) or the run could not finish."""
        batch = self.batch
        if batch > train_size:
            raise ConfigError(f"--batch-size {batch} is larger than the {train_size} training samples of "
                              f"{self.dataset}: use at most {train_size}")
        probe = min(self.probe_size, train_size)
        if self.min_batch > 1 and probe % batch == 1:
            raise ConfigError(
                f"--probe-size {self.probe_size} with --batch-size {batch} leaves a probe chunk of 1 sample (the "
                f"{probe}-sample probe is evaluated in batch-sized chunks, and {self.model}'s BatchNorm needs at "
                f"least {self.min_batch}): use --probe-size {probe - 1 if probe > 2 else 2} or another --batch-size")
        steps = self.epochs * (train_size // batch)
        if steps > MAX_STEPS:
            raise ConfigError(f"--epochs {self.epochs} of {train_size // batch:,} batches are {steps:,} steps, more "
                              f"than {MAX_STEPS:,} (MAX_STEPS): use fewer --epochs or a larger --batch-size")

    def _input_shape_text(self) -> str:
        if self.dataset == "digits":
            return "64 (8x8 images)"
        if self.dataset == "ticks":
            return "32 (16 two-dimensional features)"
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
        if not 1 <= n <= MAX_GRID_RUNS:
            raise ConfigError(f"bad range {text!r}: N must be from 1 to {MAX_GRID_RUNS:,} (MAX_GRID_RUNS)")
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
    check_grid_size(math.prod(len(swept[k]) for k in keys), " x ".join(f"{len(swept[k])} {k}" for k in keys))
    configs = []
    for combo in itertools.product(*(swept[k] for k in keys)):
        cfg = base.replace(**dict(zip(keys, combo)))
        configs.append(cfg.validate())
    return configs


def check_grid_size(runs: int, shape: str = "") -> None:
    """ConfigError if a grid (or a list of configs queued together) has more than MAX_GRID_RUNS runs."""
    if runs > MAX_GRID_RUNS:
        raise ConfigError(f"the grid has {runs:,} runs{f' ({shape})' if shape else ''}, more than {MAX_GRID_RUNS:,} "
                          "(MAX_GRID_RUNS): sweep fewer values, or split it into several sweeps")


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
