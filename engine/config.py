"""Run configuration: every run option declared once (RunConfig's fields and their Options), the
checks made when a RunConfig is created, grid expansion, and README's option table.

Everything a run needs to be reproduced lives here and is stored as JSON with the run.
Validation raises ConfigError with a one-line message that says what is wrong and how to fix it;
the CLI turns that into exit code 2 before anything is written.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
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
    """Bad user input. The message is one line: what is wrong and how to fix it, worded for the CLI
    (`--flag`); `field` names the run option at fault (None when it is not one option), and a form
    rewords the flags as its labels (dashboard.launch.form_message)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


# ---- the run options, declared once ------------------------------------------------------------
# Each RunConfig field carries an Option: from this one table come the CLI's training flags
# (engine/cli.py), the checks made when a RunConfig is created, the Launch form (dashboard/pages/launch.py),
# the Compare page's table of config differences and README's option table (`python -m engine.config
# --markdown`). Adding a run option is one field here (and its use in the engine).

MODEL_DATA, OPTIMISATION, MEASUREMENT, CHECKPOINTS, WHERE = (
    "model and data", "optimisation", "measurement (frequencies in optimizer steps; 0 = off)", "checkpoints", "where")
GROUPS = (MODEL_DATA, OPTIMISATION, MEASUREMENT, CHECKPOINTS, WHERE)


@dataclass(frozen=True)
class Option:
    """One run option. kind: int, float, str, bool, "shape" (sizes like 3x32x32) or "tags" (words).
    Bounds are inclusive (low, high) or exclusive (above, below); None as a value is allowed only where
    it is the default, and `unset` says what it means. `when` limits where the option applies, e.g.
    {"mode": ("lrwd",)}: the form shows it only then, and the CLI and README say so."""
    kind: object
    default: object
    label: str                      # the form's words for it (error messages use these in the form)
    group: str
    help: str
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    above: float | None = None
    below: float | None = None
    when: tuple = ()                # ((option, (values…)),) …: applies only where each holds
    sweep: bool = False             # sweep/submit take several values or a log range START:STOP:N
    study: str = "flag"             # `study`: "flag" as in train, "list" several values, "set" the study sets it
    unset: str = ""                 # what the default None means
    start: object = None            # the form's first value where the default is None and 0 cannot stand for it
    hint: str = ""                  # the form's words after the label, e.g. "0 = off"
    widget: str = ""                # the form's hint: "radio", "log" (a number in 1e-3 notation), "more" (folded)
    name: str = ""                  # the RunConfig field (filled in from it)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def applies(self, values: dict) -> bool:
        """Whether the option plays a part in a config with these values (a dict or a RunConfig)."""
        get = values.get if isinstance(values, dict) else lambda k, d=None: getattr(values, k, d)
        return all(get(key, OPTION[key].default) in allowed for key, allowed in self.when)

    def when_text(self) -> str:
        return "; ".join(f"{OPTION[key].flag} {', '.join(allowed)}" for key, allowed in self.when)

    def default_text(self) -> str:
        if self.default is None:
            return self.unset
        if self.kind is bool:
            return "off" if not self.default else "on"
        if self.kind == "shape":
            return "x".join(map(str, self.default))
        if self.kind == "tags":
            return "none"
        return f"{self.default:g}" if self.kind is float else str(self.default)

    def bounds_text(self) -> str:
        """The values allowed, in words (README, error messages)."""
        if self.choices:
            return ", ".join(self.choices)
        if self.kind is int:
            if self.high is None:
                return f"at least {_number(self.low)}" if self.low is not None else "a whole number"
            return f"{_number(self.low)} to {_number(self.high)}"
        if self.kind is float:
            if self.high is None and self.below is None:
                return "a positive number" if self.above == 0 else "a non-negative number"
            left = f"[{self.low:g}" if self.low is not None else f"({self.above:g}"
            right = f"{self.high:g}]" if self.high is not None else f"{self.below:g})"
            return f"in {left}, {right}"
        if self.kind == "shape":
            return f"1 to {MAX_SYNTHETIC_DIMS} sizes joined by x"
        return {bool: "given or not", str: "text", "tags": "words"}[self.kind]

    def check(self, value) -> None:
        """ConfigError naming the flag unless value is of the option's kind and within its bounds."""
        def bad(text: str):
            raise ConfigError(f"{self.flag} {text}", self.name)

        if value is None:
            if self.default is not None:
                bad(f"needs a value ({self.default_text()} by default)")
            return
        kind = self.kind
        if kind is int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            bad(f"must be a whole number, got {value!r}")
        if kind is float and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            bad(f"must be a number, got {value!r}")
        if kind is str and not isinstance(value, str) or kind is bool and not isinstance(value, bool):
            bad(f"must be {'text' if kind is str else 'on or off (true or false)'}, got {value!r}")
        if self.choices and value not in self.choices:
            raise ConfigError(f"unknown {self.flag} {value!r}: choose one of {', '.join(self.choices)}", self.name)
        if kind is int and not ((self.low is None or value >= self.low) and (self.high is None or value <= self.high)):
            bad(f"must be {'a whole number from ' if self.high is not None else ''}{self.bounds_text()}, got {value}")
        if kind is float:
            inside = (math.isfinite(value) and (self.low is None or value >= self.low)
                      and (self.above is None or value > self.above) and (self.high is None or value <= self.high)
                      and (self.below is None or value < self.below))
            if not inside:
                text = self.bounds_text()
                bad(f"must be {text if text.startswith('in ') else text.replace(' number', ' finite number')}, "
                    f"got {value}")
        if kind == "shape":
            if (not isinstance(value, tuple) or not 1 <= len(value) <= MAX_SYNTHETIC_DIMS
                    or any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1 for d in value)):
                bad(f"must be 1 to {MAX_SYNTHETIC_DIMS} positive sizes like 64 or 3x32x32, "
                    f"got {'x'.join(map(str, value)) if isinstance(value, tuple) else value!r}")
        if kind == "tags":
            for tag in value if isinstance(value, tuple) else [value]:
                if not isinstance(tag, str) or not tag.strip():
                    bad(f"got an empty tag {tag!r}: tags are words like baseline")


def _number(x) -> str:
    return "2**63-1" if x == MAX_SEED else f"{x:,}"


def option(kind, default, label: str, group: str, help: str, **more):
    """A RunConfig field and its Option."""
    return field(default=default, metadata={"option": Option(kind, default, label, group, help, **more)})


MLP_ONLY = (("model", ("mlp_si",)),)
SPHERE_ONLY, LRWD_ONLY = (("mode", ("sphere",)),), (("mode", ("lrwd",)),)
SYNTHETIC_ONLY = (("dataset", ("synthetic",)),)


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs to be reproduced (stored as JSON with the run). Checked when it is made:
    an invalid RunConfig cannot exist (ConfigError), and replace() returns a checked one."""
    model: str = option(str, "mlp_si", "Model", MODEL_DATA, "the network (the conv nets need 3x32x32 images)",
                        choices=MODELS)
    width: int | None = option(int, None, "Width", MODEL_DATA, "hidden units (mlp_si) or base channels (conv nets)",
                               low=1, sweep=True, unset="64 (mlp_si) / 32 (conv nets)",
                               hint="0 = the model's default")
    depth: int = option(int, 3, "Depth", MODEL_DATA, "hidden blocks of mlp_si", low=1, high=MAX_DEPTH,
                        when=MLP_ONLY, hint="hidden blocks")
    norm: str = option(str, "batch", "Normalisation", MODEL_DATA,
                       "the normalisation after each mlp_si layer: batch (BatchNorm) or layer (LayerNorm)",
                       choices=NORMS, when=MLP_ONLY)
    init_scale: float = option(float, 10.0, "Head norm", MODEL_DATA, "Frobenius norm of the frozen head", above=0,
                               widget="more")
    dataset: str = option(str, "digits", "Dataset", MODEL_DATA, "the data (see Models and data)", choices=DATASETS)
    data_dir: str | None = option(str, None, "Data folder", MODEL_DATA,
                                  "the folder holding cifar-10-batches-py/ or cifar-100-python/ (python-pickle "
                                  "layout); nothing is downloaded", when=(("dataset", IMAGE_DATASETS),), unset="none")
    synthetic_samples: int = option(int, 2048, "Samples", MODEL_DATA,
                                    "synthetic training samples (and a quarter as many test samples)",
                                    low=2, high=MAX_SYNTHETIC_SAMPLES, when=SYNTHETIC_ONLY)
    synthetic_shape: tuple[int, ...] = option("shape", (64,), "Input shape", MODEL_DATA,
                                              "the shape of a synthetic sample, e.g. 64 or 3x32x32",
                                              when=SYNTHETIC_ONLY)
    synthetic_classes: int = option(int, 10, "Classes", MODEL_DATA, "synthetic classes", low=2, when=SYNTHETIC_ONLY)
    augment: bool = option(bool, False, "Augment", MODEL_DATA,
                           "random crop (pad 4) and horizontal flip of whole batches; images only",
                           when=(("dataset", (*IMAGE_DATASETS, "synthetic")),), hint="random crop + flip")
    data_seed: int = option(int, 0, "Data seed", MODEL_DATA,
                            "the seed of the ticks data, and of the validation split of other data (the run's "
                            "--seed fixes the initialisation and batch order)", low=0, high=MAX_SEED, study="list")
    validation: bool = option(bool, False, "Validation split", MODEL_DATA,
                              "hold out a validation split (val_loss, val_acc): ticks draws a separate set as large "
                              "as its test set, other data hold out 10% of the training set (chosen by --data-seed); "
                              "learning-rate studies select on it", study="set", widget="more")
    mode: str = option(str, "sphere", "Mode", OPTIMISATION,
                       "sphere (a fixed ELR on the sphere) or lrwd (a learning rate and weight decay; the ELR is "
                       "measured)", choices=MODES, widget="radio")
    elr: float | None = option(float, None, "ELR", OPTIMISATION, "the effective learning rate", above=0, sweep=True,
                               when=SPHERE_ONLY, study="set", unset="0.01", start=0.01, widget="log")
    lr: float | None = option(float, None, "LR", OPTIMISATION, "the learning rate", above=0, sweep=True,
                              when=LRWD_ONLY, study="set", unset="0.1", start=0.1, widget="log")
    wd: float = option(float, 0.0, "Weight decay", OPTIMISATION, "weight decay (refused on the sphere)", low=0,
                       sweep=True, when=LRWD_ONLY, study="set", widget="log")
    momentum: float = option(float, 0.0, "Momentum", OPTIMISATION, "heavy-ball momentum", low=0, below=1, sweep=True)
    schedule: str = option(str, "constant", "Schedule", OPTIMISATION,
                           "constant, cosine (half a cosine down to 0) or step (x0.1 at 50% and 75% of training)",
                           choices=SCHEDULES)
    epochs: int = option(int, 30, "Epochs", OPTIMISATION, "passes over the training set", low=1, high=MAX_EPOCHS,
                         study="set")
    batch_size: int | None = option(int, None, "Batch size", OPTIMISATION,
                                    "the mini-batch size (digits needs noisy steps to show a chaotic band)", low=1,
                                    sweep=True, unset="32 on digits, 128 elsewhere", hint="0 = default")
    seed: int = option(int, 0, "Seed", OPTIMISATION, "the seed of the initialisation and batch order", low=0,
                       high=MAX_SEED, sweep=True, study="list")
    log_every: int = option(int, 10, "Log every", MEASUREMENT, "steps between log points", low=1)
    eval_every: int | None = option(int, None, "Test every", MEASUREMENT,
                                    "steps between test-set evaluations (at the first log point at or after each "
                                    "multiple)", low=1, unset="once per epoch", hint="steps, 0 = once per epoch",
                                    widget="more")
    sharpness_every: int = option(int, 0, "Sharpness every", MEASUREMENT,
                                  "steps between sharpness (Lanczos) measurements; 0 = off", low=0, hint="0 = off")
    probe_size: int = option(int, 1024, "Probe size", MEASUREMENT,
                             "train samples in the fixed sharpness probe (capped at the train size)", low=1,
                             hint="sharpness samples", widget="more")
    lanczos_iters: int = option(int, 20, "Lanczos iterations", MEASUREMENT, "Lanczos iteration cap", low=2,
                                high=MAX_LANCZOS_ITERS, widget="more")
    lanczos_tol: float = option(float, 1e-3, "Lanczos tolerance", MEASUREMENT, "Lanczos relative residual tolerance",
                                above=0, below=1, widget="more")
    trace_samples: int = option(int, 0, "Trace vectors", MEASUREMENT,
                                "Hutchinson vectors for hessian_trace at sharpness steps; 0 = off", low=0,
                                high=MAX_TRACE_SAMPLES, hint="Hutchinson, 0 = off", widget="more")
    checkpoint_every: int = option(int, 1, "Checkpoint every", CHECKPOINTS,
                                   "epochs between the checkpoints a run resumes from (a stored run writes at most "
                                   "one per 5 s); 0 = off", low=0, hint="epochs, 0 = off", widget="more")
    keep_every: int = option(int, 0, "Keep checkpoints every", CHECKPOINTS,
                             "epochs between kept checkpoints, and the last epoch: what fork, average and geometry "
                             "start from; 0 keeps only the latest", low=0, study="set",
                             hint="epochs, 0 = only the latest")
    keep_last: int = option(int, 0, "Keep the last", CHECKPOINTS,
                            "also keep a checkpoint at each of the last K epochs (what an average of K needs)", low=0,
                            study="set", hint="epochs")
    device: str = option(str, "auto", "Device", WHERE, "auto (CUDA if present), cpu or cuda", choices=DEVICES,
                         widget="more")
    name: str | None = option(str, None, "Name", WHERE, "the run's name", unset="built from the config",
                              hint="optional")
    tags: tuple[str, ...] = option("tags", (), "Tags", WHERE, "labels for finding runs later",
                                   hint="comma separated")

    def __post_init__(self):
        for opt in OPTIONS:
            opt.check(getattr(self, opt.name))
        self._check_together()

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

    # ---- the checks between options (each option's own are its Option's) ---------------------
    def _check_together(self) -> None:
        def bad(msg: str, field: str) -> None:
            raise ConfigError(msg, field)

        if self.model in ("convnet_si", "resnet18_si"):
            image_ok = self.dataset in IMAGE_DATASETS or (
                self.dataset == "synthetic" and tuple(self.synthetic_shape) == (3, 32, 32))
            if not image_ok:
                bad(f"model {self.model} needs 3x32x32 images but dataset {self.dataset} "
                    f"has shape {self._input_shape_text()}: use {self.model} with cifar10, cifar100 "
                    f"or synthetic --synthetic-shape 3x32x32, or mlp_si with any dataset", "model")
        if self.norm == "layer" and self.model != "mlp_si":
            bad(f"--norm layer is an mlp_si option: {self.model} normalises with BatchNorm; drop --norm", "norm")
        if self.mode == "sphere":
            if self.lr is not None:
                bad("--lr is for --mode lrwd; on the sphere set the effective learning rate with --elr", "lr")
            if self.wd != 0:
                bad(f"--wd {self.wd} is meaningless with --mode sphere (the norm is fixed): "
                    "drop --wd or use --mode lrwd", "wd")
        elif self.elr is not None:
            bad("--elr is for --mode sphere; under --mode lrwd set --lr and --wd (the ELR is measured)", "elr")
        if self.batch < self.min_batch:
            bad(f"--batch-size must be at least {self.min_batch} for {self.model} (its BatchNorm normalises "
                f"by the variance over the batch, which one sample does not have), got {self.batch}", "batch_size")
        if self.probe_size < self.min_batch:
            bad(f"--probe-size must be at least {self.min_batch} samples for {self.model}, got {self.probe_size}",
                "probe_size")
        if self.dataset == "synthetic":
            if self.synthetic_classes > self.synthetic_samples:
                bad(f"--synthetic-classes must be from 2 to --synthetic-samples ({self.synthetic_samples}: "
                    f"every class needs a sample), got {self.synthetic_classes}", "synthetic_classes")
            shape = tuple(self.synthetic_shape)
            if self.synthetic_samples * math.prod(shape) > MAX_DATA_VALUES:
                bad(f"{self.synthetic_samples:,} synthetic samples of shape {'x'.join(map(str, shape))} are "
                    f"{self.synthetic_samples * math.prod(shape):,} values, more than {MAX_DATA_VALUES:,} "
                    "(MAX_DATA_VALUES, 8 GiB of float32): use fewer --synthetic-samples or a smaller --synthetic-shape",
                    "synthetic_samples")
        if self.parameter_count > MAX_PARAMETERS:
            bad(f"{self.model} with width {self.model_width}"
                f"{f', depth {self.depth}' if self.model == 'mlp_si' else ''} on {self.dataset} has "
                f"{self.parameter_count:,} weights, more than {MAX_PARAMETERS:,} (MAX_PARAMETERS): use a smaller "
                "--width" + (" or --depth" if self.model == "mlp_si" else ""), "width")
        if self.train_size is not None:
            self.check_against_data(self.train_size)
        if self.dataset in IMAGE_DATASETS and not self.data_dir:
            bad(f"dataset {self.dataset} is read from a local folder: pass --data-dir DIR holding "
                f"{'cifar-10-batches-py/' if self.dataset == 'cifar10' else 'cifar-100-python/'} "
                "(python-pickle layout); nothing is downloaded", "data_dir")

    def check_against_data(self, train_size: int) -> None:
        """The checks that need the number of training samples: made on creation where that is
        known from the config, load_dataset() for a CIFAR folder once read. ConfigError if a training
        batch or a probe chunk could not be trained (see BN_MIN_BATCH) or the run could not finish."""
        batch = self.batch
        if batch > train_size:
            raise ConfigError(f"--batch-size {batch} is larger than the {train_size} training samples of "
                              f"{self.dataset}: use at most {train_size}", "batch_size")
        probe = min(self.probe_size, train_size)
        if self.min_batch > 1 and probe % batch == 1:
            raise ConfigError(
                f"--probe-size {self.probe_size} with --batch-size {batch} leaves a probe chunk of 1 sample (the "
                f"{probe}-sample probe is evaluated in batch-sized chunks, and {self.model}'s BatchNorm needs at "
                f"least {self.min_batch}): use --probe-size {probe - 1 if probe > 2 else 2} or another --batch-size",
                "probe_size")
        steps = self.epochs * (train_size // batch)
        if steps > MAX_STEPS:
            raise ConfigError(f"--epochs {self.epochs} of {train_size // batch:,} batches are {steps:,} steps, more "
                              f"than {MAX_STEPS:,} (MAX_STEPS): use fewer --epochs or a larger --batch-size", "epochs")

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
        """A copy with these changes, checked like any new RunConfig (ConfigError)."""
        return dataclasses.replace(self, **changes)


OPTIONS: tuple[Option, ...] = tuple(dataclasses.replace(f.metadata["option"], name=f.name)
                                    for f in dataclasses.fields(RunConfig))
OPTION: dict[str, Option] = {o.name: o for o in OPTIONS}


# ---- grids --------------------------------------------------------------------------------

SWEEPABLE = tuple(o.name for o in OPTIONS if o.sweep)


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
    """Cartesian product of the swept values over base; every member is checked (ConfigError)."""
    keys = [k for k in swept if len(swept[k]) > 0]
    for k in keys:
        if k not in SWEEPABLE:
            raise ConfigError(f"cannot sweep {k!r}: sweepable flags are {', '.join(SWEEPABLE)}")
    check_grid_size(math.prod(len(swept[k]) for k in keys), " x ".join(f"{len(swept[k])} {k}" for k in keys))
    configs = []
    for combo in itertools.product(*(swept[k] for k in keys)):
        configs.append(base.replace(**dict(zip(keys, combo))))
    return configs


def check_grid_size(runs: int, shape: str = "") -> None:
    """ConfigError if a grid (or a list of configs queued together) has more than MAX_GRID_RUNS runs."""
    if runs > MAX_GRID_RUNS:
        raise ConfigError(f"the grid has {runs:,} runs{f' ({shape})' if shape else ''}, more than {MAX_GRID_RUNS:,} "
                          "(MAX_GRID_RUNS): sweep fewer values, or split it into several sweeps")


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
        values = [v for text in raw for v in parse_values(str(text), OPTION[key].kind)]
        if len(values) == 1:
            fixed[key] = values[0]
        elif single:
            raise ConfigError(f"--{key.replace('_', '-')} got {len(values)} values: `train` runs one "
                              "configuration; use `sweep` or `submit` for a grid", key)
        else:
            swept[key] = values
    given = {o.name: flags[o.name] for o in OPTIONS if o.name in flags and o.name not in SWEEPABLE}
    given["synthetic_shape"] = tuple(given.get("synthetic_shape", OPTION["synthetic_shape"].default))
    given["tags"] = tuple(given.get("tags") or ())
    # the base takes each swept option's first value: its default might not fit the others
    base = RunConfig(**given, **fixed, **{k: v[0] for k, v in swept.items()})
    configs = expand_grid(base, swept) if swept else [base]
    if swept and base.name:
        configs = [c.replace(name=f"{base.name} {' '.join(f'{k}={getattr(c, k):g}' for k in swept)}")
                   for c in configs]
    return configs, swept


# ---- README's option table ------------------------------------------------------------------------

def markdown_table() -> str:
    """README's table of the run options (tests/test_config.py checks README holds exactly this)."""
    rows = ["| flag | form field | default | values | applies to | what |", "|---|---|---|---|---|---|"]
    for o in OPTIONS:
        flag = f"`{o.flag}`" + (" …" if o.sweep else "")
        applies = o.when_text()
        rows.append(f"| {flag} | {o.label} | {o.default_text()} | {o.bounds_text()} | "
                    f"{f'`{applies}`' if applies else 'all runs'} | {o.help.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


README_START = "<!-- run options: generated by `python -m engine.config --markdown` -->\n"
README_END = "<!-- end of run options -->"


def update_readme(path) -> None:
    """Write the generated table into README between its two markers."""
    from pathlib import Path
    text = Path(path).read_text()
    head, rest = text.split(README_START)
    Path(path).write_text(head + README_START + markdown_table() + README_END + rest.split(README_END, 1)[1])


if __name__ == "__main__":
    import sys
    if sys.argv[1:] == ["--markdown"]:
        sys.stdout.write(markdown_table())
    elif sys.argv[1:2] == ["--update-readme"] and len(sys.argv) == 3:
        update_readme(sys.argv[2])
    else:
        sys.exit("usage: python -m engine.config --markdown (prints README's table of run options) | "
                 "--update-readme README.md (writes it there)")
