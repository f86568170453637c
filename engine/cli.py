"""`python -m engine ...`: the command-line contract (README, "CLI").

Bad input is one line on stderr and exit code 2, checked before anything is written.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from pathlib import Path

from storage import HEARTBEAT_EVERY_S, MAX_ID, MIN_STALE_AFTER_S, StoreError

from . import calibrate, commands
from .config import DEVICES, OPTIONS, ConfigError, Option, RunConfig
from .executors import EXECUTORS

EXIT_BAD_INPUT = 2
DEBUG_ENV = "SPHERELAB_DEBUG"   # =1: an unexpected error prints its traceback as well
# The worker refreshes its own heartbeat once per --poll, and the dashboard counts a worker live for
# 15 s after its last one: a longer poll would make a working worker look gone.
MAX_POLL_S = 10.0


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


# ---- argument types: a value the command could not use is refused while parsing, naming its flag

def _id(text: str) -> int:
    """A run or sweep id: a whole number the store can hold."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_ID:
        raise argparse.ArgumentTypeError(f"{text!r} is not an id: ids are whole numbers from 1 to 2**63-1; "
                                         "list them with `python -m engine runs`")
    return value


def _db(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: pass a file path or a database URL, or leave --db out to use "
                                         "$SPHERELAB_DB, else ~/.spherelab/spherelab.db")
    return text


def _out_file(text: str) -> str:
    """A file to write: its folder must exist, and it must not be a folder itself."""
    path = Path(text)
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: name the file to write")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder: name a file inside it")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"the folder {path.parent} does not exist: create it first, or write elsewhere")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"the folder {path.parent} is not writable: write elsewhere")
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds")
    return value


def _poll(text: str) -> float:
    value = _seconds(text)
    if not 0 < value <= MAX_POLL_S:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most {MAX_POLL_S:g} seconds, got {text}")
    return value


def _stale_after(text: str) -> float:
    value = _seconds(text)
    if value < MIN_STALE_AFTER_S:
        raise argparse.ArgumentTypeError(
            f"must be at least {MIN_STALE_AFTER_S:g} seconds, got {text}: runs heartbeat every {HEARTBEAT_EVERY_S:g} s, "
            "and a shorter wait would take a live run for dead and train it twice")
    return value


def add_training_flags(p: argparse.ArgumentParser, sweep: bool, study: bool = False) -> None:
    """The training flags of train/sweep/submit, one per run option (engine.config.OPTIONS, in its
    groups); a study takes several seeds and data seeds and sets the rates, epochs and kept checkpoints
    itself."""
    groups = {}
    for opt in OPTIONS:
        if study and opt.study == "set":
            continue
        if opt.group not in groups:
            groups[opt.group] = p.add_argument_group(opt.group)
        argument = _flag(opt, sweep, study)
        groups[opt.group].add_argument(opt.flag, **{**argument, "help": argument["help"].replace("%", "%%")})


def _flag(opt: Option, sweep: bool, study: bool) -> dict:
    """argparse's arguments for one run option. Values are checked when the RunConfig is made, in the
    same words on every surface; argparse only turns the text into the option's kind."""
    default = opt.default_text()
    text = opt.help
    if opt.when:
        text += f"; {opt.when_text()} only"
    if study and opt.study == "list":
        return dict(type=opt.kind, nargs="+", default=None,
                    help=f"{text}; one or more values, each a replicate of the study (default {default})")
    if opt.sweep:   # text, read by parse_values; train takes one value and says "use sweep" for more
        values = "one or more values, or a log range START:STOP:N" if sweep else "one value"
        return dict(nargs="+", default=None, help=f"{text}; {values} (default {default})")
    if opt.kind is bool:
        return dict(action="store_true", help=text)
    if opt.kind == "tags":
        return dict(nargs="*", default=[], help=text)
    kind = _shape if opt.kind == "shape" else opt.kind
    if opt.default is None or opt.kind == "shape":
        text += f" (default {default})"
    choices = dict(metavar="{" + ",".join(opt.choices) + "}") if opt.choices else {}
    return dict(type=kind, default=opt.default, help=text, **choices)


DB_HELP = "SQLAlchemy URL or SQLite path (default $SPHERELAB_DB, else ~/.spherelab/spherelab.db)"
ARTIFACTS_HELP = ("where the store's checkpoints live: a folder or URL (s3://bucket/prefix) every machine using the "
                  "store reaches (default $SPHERELAB_ARTIFACTS, else DB.checkpoints beside an SQLite file; "
                  "required for PostgreSQL)")


def _artifacts(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: pass a folder or URL, or leave --artifacts out to use "
                                         "$SPHERELAB_ARTIFACTS, else the folder beside an SQLite file")
    return text


def program() -> str:
    """How the user started the CLI, for usage lines and errors: `spherelab` (the installed command) or
    `python -m engine`."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "python -m engine" if name in ("", "__main__.py", "-m", "-c") or name.endswith(".py") else name


def build_parser() -> argparse.ArgumentParser:
    fmt = DefaultsFormatter
    p = OneLineParser(prog=program(), description="spherelab engine: train scale-invariant networks, "
                      "store runs, analyse them.", formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    def cmd(name, help_text, db=True):
        parser = sub.add_parser(name, help=help_text, description=help_text, formatter_class=fmt)
        parser.set_defaults(handler=getattr(commands, f"cmd_{name}"), flag_default=parser.get_default)
        if db:
            parser.add_argument("--db", type=_db, default=None, help=DB_HELP)
            parser.add_argument("--artifacts", type=_artifacts, default=None, help=ARTIFACTS_HELP)
        return parser

    add_training_flags(cmd("train", "run one configuration in this process; prints the run id last"), sweep=False)
    s = cmd("sweep", "run a grid of configurations in this process, as one sweep")
    add_training_flags(s, sweep=True)
    s.add_argument("--sweep-name", default=None, help="name of the sweep")
    s = cmd("submit", "queue a configuration or a grid for the worker; prints the run ids, last line = last id")
    add_training_flags(s, sweep=True)
    s.add_argument("--sweep-name", default=None, help="name of the sweep (when several values are given)")

    f = cmd("fork", "a child run from a kept checkpoint of RUN (numbering continues the parent's); trains "
                    "here unless --submit; prints the child's id last")
    f.add_argument("run", type=int)
    f.add_argument("--at", type=int, default=None, help="epoch of the kept checkpoint (default: the last kept one)")
    for flag, kind, text in (("--elr", float, "ELR (sphere)"), ("--lr", float, "learning rate (lrwd)"),
                             ("--wd", float, "weight decay (lrwd)"), ("--momentum", float, "heavy-ball momentum"),
                             ("--mode", str, "sphere | lrwd"), ("--schedule", str, "constant | cosine | step"),
                             ("--seed", int, "a new batch order (default: the parent's, continued)")):
        f.add_argument(flag, type=kind, default=None, help=f"{text} (default: the parent's)")
    f.add_argument("--epochs", type=int, default=None,
                   help="the child's own epochs after the fork (default: the parent's remaining ones)")
    f.add_argument("--name", default=None, help="child run name (default: #PARENT@EPOCH and the changes)")
    f.add_argument("--tags", nargs="*", default=[], help="labels (default: the parent's)")
    f.add_argument("--submit", action="store_true", help="queue the child for the worker instead")
    c = cmd("checkpoints", "a run's kept checkpoints (--keep-every): epoch, step, bytes")
    c.add_argument("run", type=int)
    c.add_argument("--json", action="store_true")
    a = cmd("average", "SWA of kept checkpoints: weights averaged (not projected), BN recomputed, evaluated")
    a.add_argument("run", type=int)
    which = a.add_mutually_exclusive_group()
    which.add_argument("--last", type=int, default=None, help="the last K kept checkpoints (default 5, or all if fewer)")
    which.add_argument("--at", type=int, nargs="+", default=None, help="these kept epochs")
    a.add_argument("--json", action="store_true")
    a.add_argument("--submit", action="store_true", help="queue it for the worker and print the job id")
    g = cmd("geometry", "angle, linear path and barriers between two solutions RUN or RUN@EPOCH")
    g.add_argument("a")
    g.add_argument("b")
    g.add_argument("--points", type=int, default=21, help="alphas on the path, ends included")
    g.add_argument("--json", action="store_true")
    g.add_argument("--submit", action="store_true", help="queue it for the worker and print the job id")

    st = cmd("study", "the learning-rate study: pre-train an ELR sweep on the sphere (over run seeds and data seeds), "
                      "refine it around the convergence threshold, fine-tune every end point, average its last "
                      "checkpoints, measure the geometry; prints the study id last")
    st.add_argument("--pretrain-elr", nargs="+", default=["1e-4:1:9"], help="PLR grid: values or START:STOP:N")
    st.add_argument("--pretrain-epochs", type=int, default=D.epochs, help="pre-training epochs")
    st.add_argument("--finetune-elr", nargs="+", default=["1e-4"], help="one or more FLRs")
    st.add_argument("--finetune-epochs", type=int, default=D.epochs, help="fine-tuning epochs after the fork")
    st.add_argument("--average", type=int, default=5, help="SWA of the last K per-epoch checkpoints of pre-training")
    st.add_argument("--points", type=int, default=21, help="alphas on each geometry path")
    st.add_argument("--refine", action=argparse.BooleanOptionalAction, default=True,
                    help="after the grid, add PLRs at 1, 1.15, 1.33, 1.5 and 2x the estimated convergence threshold")
    st.add_argument("--resume", type=_id, default=None,
                    help="take up an interrupted or failed study again, retrying its failed runs and jobs (takes no "
                         "other study or training flag)")
    st.add_argument("--submit", action="store_true", help="leave the study to the workers and print its id")
    add_training_flags(st, sweep=True, study=True)
    rp = cmd("report", "a study's table: PLR, regime, sub-regime, test accuracies (mean ± std over runs), the option "
                       "chosen on validation, geometry; the paired gain of 2A over converged and its verdict")
    rp.add_argument("study", type=_id)
    rp.add_argument("--json", action="store_true")

    w = cmd("worker", "run queued runs in background processes (here, or as tasks on a Ray cluster)")
    w.add_argument("--max-parallel", type=int, default=None,
                   help="packs of runs trained at the same time (default 1; with --executor ray: as many as "
                        "the cluster's CPUs, or GPUs, fit)")
    w.add_argument("--executor", default="local", choices=EXECUTORS,
                   help="where claimed runs train: local (spawned processes here) or ray (Ray tasks on a cluster; "
                        "pip install spherelab[ray])")
    w.add_argument("--ray-address", default=None,
                   help="with --executor ray: the cluster to join (default auto: the one running on this "
                        "machine, else a new local one)")
    w.add_argument("--device", default="auto", choices=DEVICES, help="auto | cpu | cuda")
    w.add_argument("--poll", type=_poll, default=1.0, help=f"seconds between looks at the queue (at most {MAX_POLL_S:g})")
    w.add_argument("--stale-after", type=_stale_after, default=30.0,
                   help="seconds without heartbeat after which a running run counts as interrupted (at least 3)")
    w.add_argument("--once", action="store_true", help="exit when the queue is empty (scripts, tests)")

    r = cmd("runs", "list runs: id, name, status, regime, progress")
    r.add_argument("--status", default=None)
    r.add_argument("--sweep", type=_id, default=None)
    r.add_argument("--tag", default=None)
    r.add_argument("--json", action="store_true", help="machine-readable list")

    for name, text in (("cancel", "cancel a queued, running or paused run"),
                       ("delete", "delete a run with its metrics, events and checkpoint")):
        c = cmd(name, text)
        c.add_argument("run", type=_id)
    c.add_argument("--with-children", action="store_true",
                   help="also cancel the run's branches that have not ended (they would have nothing to start from)")
    rs = cmd("resume", "let the workers take up again a run that waits for its missing checkpoint (interrupted) "
                       "or failed on a damaged one, once the file is back; refused while it is still missing")
    rs.add_argument("run", type=_id)
    gc = cmd("gc", "list (or with --delete remove) artifacts no run references: checkpoints left by deleted runs, "
                   "crashed writes; files younger than an hour are left alone")
    gc.add_argument("--delete", action="store_true", help="remove them (default: a dry run that lists them)")
    t = cmd("tag", "add tags to a run")
    t.add_argument("run", type=_id)
    t.add_argument("tags", nargs="+")

    e = cmd("export", "metrics of a run, one row per log point")
    e.add_argument("run", type=_id)
    e.add_argument("--format", choices=("csv", "json"), default="csv")
    e.add_argument("--out", type=_out_file, default=None, help="file to write (default: stdout)")
    a = cmd("analyze", "regime, evidence, loss spikes and period of a run, as JSON")
    a.add_argument("run", type=_id)
    b = cmd("bundle", "write a portable file with a run (or a whole sweep) and its metrics")
    b.add_argument("--with-checkpoints", action="store_true",
                   help="carry the kept checkpoints too, so a colleague can fork, average and compare")
    b.add_argument("run", type=_id, nargs="?")
    b.add_argument("--sweep", type=_id, default=None)
    b.add_argument("--out", type=_out_file, required=True)
    i = cmd("import", "import a bundle into this database (new ids)")
    i.add_argument("file")
    cmd("app", "start the worker and the dashboard on 127.0.0.1:8501 (env SPHERELAB_ADDRESS, SPHERELAB_PORT, "
        "SPHERELAB_PARALLEL)")
    bn = cmd("bench", "throughput and overhead figures", db=False)
    bn.add_argument("--json", action="store_true")
    bn.add_argument("--device", default="auto", choices=DEVICES)
    bn.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    calibrate.add_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "artifacts", None):      # every Store this command opens, its workers' included
        os.environ["SPHERELAB_ARTIFACTS"] = args.artifacts
    try:
        return args.handler(args) or 0
    except (ConfigError, StoreError) as exc:
        _debug_traceback()
        sys.stderr.write(f"{program()} {args.command}: error: {exc}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (`engine runs | head`): stop quietly, and keep Python's exit-time flush
        # of stdout from raising again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:   # the one boundary: whatever else went wrong is still one line, exit 2
        _debug_traceback()
        first = (str(exc).strip().splitlines() or [""])[0]
        sys.stderr.write(f"python -m engine {args.command}: error: unexpected {type(exc).__name__}"
                         f"{': ' + first if first else ''} (set {DEBUG_ENV}=1 for the traceback)\n")
        return EXIT_BAD_INPUT


def _debug_traceback() -> None:
    if os.environ.get(DEBUG_ENV) == "1":
        traceback.print_exc()
