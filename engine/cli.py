"""`python -m engine ...`: the command-line contract of SPEC §9.

Bad input is one line on stderr and exit code 2, checked before anything is written.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import calibrate
from .config import ConfigError, RunConfig, SWEEPABLE, expand_grid, parse_values

EXIT_BAD_INPUT = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse, but errors are one line (what is wrong, where to look) and exit 2."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_BAD_INPUT)


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a flag's default unless its help text already explains it (defaults that depend on others)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or "default" in text or action.default == argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


D = RunConfig()  # the defaults shown in --help come from the dataclass itself


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: write sizes joined by x, e.g. 64 or 3x32x32")


def add_training_flags(p: argparse.ArgumentParser, sweep: bool) -> None:
    many = dict(nargs="+")   # train accepts one value; several get a clear "use sweep" error
    vals = "one or more values, or a log range START:STOP:N" if sweep else "one value"
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=D.model, help="mlp_si | convnet_si | resnet18_si")
    g.add_argument("--width", default=None, **many,
                   help=f"channels (conv nets, default 32) or hidden units (mlp_si, default 64); {vals}")
    g.add_argument("--depth", type=int, default=D.depth, help="hidden blocks of mlp_si")
    g.add_argument("--init-scale", type=float, default=D.init_scale, help="Frobenius norm of the frozen head")
    g.add_argument("--dataset", default=D.dataset, help="digits | synthetic | cifar10 | cifar100")
    g.add_argument("--data-dir", default=None, help="folder with cifar-10-batches-py/ or cifar-100-python/")
    g.add_argument("--synthetic-samples", type=int, default=D.synthetic_samples, help="synthetic train samples")
    g.add_argument("--synthetic-shape", type=_shape, default=D.synthetic_shape,
                   help="input shape of synthetic samples, e.g. 64 or 3x32x32 (default 64)")
    g.add_argument("--synthetic-classes", type=int, default=D.synthetic_classes, help="synthetic classes")
    g.add_argument("--augment", action="store_true", help="random crop (pad 4) + horizontal flip, images only")
    g = p.add_argument_group("optimisation")
    g.add_argument("--mode", default=D.mode, help="sphere (fixed ELR on the sphere) | lrwd (LR + weight decay)")
    g.add_argument("--elr", default=None, **many, help=f"effective learning rate, sphere mode (default 0.01); {vals}")
    g.add_argument("--lr", default=None, **many, help=f"learning rate, lrwd mode (default 0.1); {vals}")
    g.add_argument("--wd", default=None, **many, help=f"weight decay, lrwd mode (default 0); {vals}")
    g.add_argument("--momentum", default=None, **many, help=f"heavy-ball momentum (default 0); {vals}")
    g.add_argument("--schedule", default=D.schedule,
                   help="constant | cosine (half cosine to 0) | step (x0.1 at 50%% and 75%% of training)")
    g.add_argument("--epochs", type=int, default=D.epochs, help="passes over the training set")
    g.add_argument("--batch-size", default=None, **many, help=f"mini-batch size (default 32 on digits, 128 elsewhere); {vals}")
    g.add_argument("--seed", default=None, **many, help=f"seed for init and batch order (default {D.seed}); {vals}")
    g = p.add_argument_group("measurement (frequencies in optimizer steps; 0 = off)")
    g.add_argument("--log-every", type=int, default=D.log_every, help="steps between log points")
    g.add_argument("--eval-every", type=int, default=None,
                   help="steps between test-set evaluations (default once per epoch)")
    g.add_argument("--sharpness-every", type=int, default=D.sharpness_every,
                   help="steps between sharpness (Lanczos) measurements")
    g.add_argument("--probe-size", type=int, default=D.probe_size, help="train samples in the fixed sharpness probe")
    g.add_argument("--lanczos-iters", type=int, default=D.lanczos_iters, help="Lanczos iteration cap")
    g.add_argument("--lanczos-tol", type=float, default=D.lanczos_tol, help="Lanczos relative residual tolerance")
    g.add_argument("--trace-samples", type=int, default=D.trace_samples,
                   help="Hutchinson vectors for hessian_trace at sharpness steps")
    g.add_argument("--checkpoint-every", type=int, default=D.checkpoint_every, help="epochs between checkpoints")
    g = p.add_argument_group("where")
    g.add_argument("--device", default=D.device, help="auto | cpu | cuda")
    g.add_argument("--db", default=None, help=DB_HELP)
    g.add_argument("--name", default=None, help="run name (default built from the config)")
    g.add_argument("--tags", nargs="*", default=[], help="labels for finding runs later")


DB_HELP = "SQLAlchemy URL or SQLite path (default $SPHERELAB_DB, else ~/.spherelab/spherelab.db)"

_SWEPT_TYPES = {"elr": float, "lr": float, "wd": float, "momentum": float, "seed": int, "width": int,
                "batch_size": int}


def configs_from_args(args, *, single: bool) -> tuple[list[RunConfig], dict]:
    """Validated configs (one, or the grid's product) and the swept values."""
    swept: dict[str, list] = {}
    fixed: dict = {}
    for key in SWEEPABLE:
        raw = getattr(args, key)
        if raw is None:
            continue
        raw = raw if isinstance(raw, list) else [raw]
        values = [v for text in raw for v in parse_values(str(text), _SWEPT_TYPES[key])]
        if len(values) == 1:
            fixed[key] = values[0]
        else:
            if single:
                raise ConfigError(f"--{key.replace('_', '-')} got {len(values)} values: `train` runs one "
                                  "configuration; use `sweep` or `submit` for a grid")
            swept[key] = values
    base = RunConfig(model=args.model, depth=args.depth, init_scale=args.init_scale, dataset=args.dataset,
                     data_dir=args.data_dir, synthetic_samples=args.synthetic_samples,
                     synthetic_shape=tuple(args.synthetic_shape), synthetic_classes=args.synthetic_classes,
                     augment=args.augment, mode=args.mode, schedule=args.schedule, epochs=args.epochs,
                     log_every=args.log_every, eval_every=args.eval_every,
                     sharpness_every=args.sharpness_every, probe_size=args.probe_size,
                     lanczos_iters=args.lanczos_iters, lanczos_tol=args.lanczos_tol,
                     trace_samples=args.trace_samples, checkpoint_every=args.checkpoint_every,
                     device=args.device, name=args.name, tags=tuple(args.tags), **fixed)
    configs = expand_grid(base, swept) if swept else [base.validate()]
    if swept and args.name:
        configs = [c.replace(name=f"{args.name} {_swept_label(c, swept)}") for c in configs]
    return configs, swept


def _swept_label(cfg: RunConfig, swept: dict) -> str:
    return " ".join(f"{k}={getattr(cfg, k):g}" for k in swept)


def build_parser() -> argparse.ArgumentParser:
    fmt = DefaultsFormatter
    p = OneLineParser(prog="python -m engine", description="spherelab engine: train scale-invariant networks, "
                      "store runs, analyse them.", formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    def cmd(name, help_text):
        return sub.add_parser(name, help=help_text, description=help_text, formatter_class=fmt)

    add_training_flags(cmd("train", "run one configuration in this process; prints the run id last"), sweep=False)
    s = cmd("sweep", "run a grid of configurations in this process, as one sweep")
    add_training_flags(s, sweep=True)
    s.add_argument("--sweep-name", default=None, help="name of the sweep")
    s = cmd("submit", "queue a configuration or a grid for the worker; prints the run ids, last line = last id")
    add_training_flags(s, sweep=True)
    s.add_argument("--sweep-name", default=None, help="name of the sweep (when several values are given)")

    w = cmd("worker", "run queued runs in background processes")
    w.add_argument("--max-parallel", type=int, default=1, help="runs trained at the same time")
    w.add_argument("--device", default="auto", help="auto | cpu | cuda")
    w.add_argument("--db", default=None, help=DB_HELP)
    w.add_argument("--poll", type=float, default=1.0, help="seconds between looks at the queue")
    w.add_argument("--stale-after", type=float, default=30.0,
                   help="seconds without heartbeat after which a running run counts as interrupted")
    w.add_argument("--once", action="store_true", help="exit when the queue is empty (scripts, tests)")

    r = cmd("runs", "list runs: id, name, status, regime, progress")
    r.add_argument("--db", default=None, help=DB_HELP)
    r.add_argument("--status", default=None)
    r.add_argument("--sweep", type=int, default=None)
    r.add_argument("--tag", default=None)
    r.add_argument("--json", action="store_true", help="machine-readable list")

    for name, text in (("cancel", "cancel a queued, running or paused run"),
                       ("delete", "delete a run with its metrics, events and checkpoint")):
        c = cmd(name, text)
        c.add_argument("run", type=int)
        c.add_argument("--db", default=None, help=DB_HELP)
    t = cmd("tag", "add tags to a run")
    t.add_argument("run", type=int)
    t.add_argument("tags", nargs="+")
    t.add_argument("--db", default=None, help=DB_HELP)

    e = cmd("export", "metrics of a run, one row per log point")
    e.add_argument("run", type=int)
    e.add_argument("--format", choices=("csv", "json"), default="csv")
    e.add_argument("--out", default=None, help="file to write (default: stdout)")
    e.add_argument("--db", default=None, help=DB_HELP)
    a = cmd("analyze", "regime, evidence, loss spikes and period of a run, as JSON")
    a.add_argument("run", type=int)
    a.add_argument("--db", default=None, help=DB_HELP)
    b = cmd("bundle", "write a portable file with a run (or a whole sweep) and its metrics")
    b.add_argument("run", type=int, nargs="?")
    b.add_argument("--sweep", type=int, default=None)
    b.add_argument("--out", required=True)
    b.add_argument("--db", default=None, help=DB_HELP)
    i = cmd("import", "import a bundle into this database (new ids)")
    i.add_argument("file")
    i.add_argument("--db", default=None, help=DB_HELP)
    bn = cmd("bench", "throughput and overhead figures")
    bn.add_argument("--json", action="store_true")
    bn.add_argument("--device", default="auto")
    bn.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    calibrate.add_parser(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from . import commands
    from storage import StoreError
    try:
        return (getattr(args, "handler", None) or getattr(commands, f"cmd_{args.command}"))(args) or 0
    except (ConfigError, StoreError) as exc:
        sys.stderr.write(f"python -m engine {args.command}: error: {exc}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, allow_nan=False, default=str))
