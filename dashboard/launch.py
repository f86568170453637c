"""Turning the Launch form into queued runs, and starting a worker. The dashboard never trains:
it writes queued runs (and commands); a worker process picks them up."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from engine.config import OPTION, OPTIONS, ConfigError, Option, RunConfig, expand_grid, parse_values

from .data import worker_log_path

REPO_ROOT = Path(__file__).resolve().parent.parent

# The form's label for each CLI flag, so a ConfigError (worded for the CLI) names the form's field.
FIELDS = {**{o.flag: o.label for o in OPTIONS}, "--sweep-name": "Sweep name"}
_FLAG = re.compile(r"--[a-z][a-z-]*( [A-Z]{2,}\b)?")


def form_message(message: str, fields: dict[str, str] | None = None) -> str:
    """A validation message with the CLI's flags replaced by the form's field names (`fields`: flag ->
    label, default the Launch form's)."""
    fields = FIELDS if fields is None else fields
    return _FLAG.sub(lambda m: f"“{fields.get(m.group(0).split()[0], m.group(0))}”", str(message))


def form_start(opt: Option):
    """The value an option's field starts at: its default in the form's terms (0 for "the default" of a
    number whose default is None, text for a shape, a list for tags)."""
    if opt.default is None:
        return opt.start if opt.start is not None else 0 if opt.kind is int else ""
    if opt.kind == "shape":
        return "x".join(map(str, opt.default))
    return list(opt.default) if opt.kind == "tags" else opt.default


def config_value(opt: Option, value):
    """A field's value as the RunConfig takes it (the inverse of form_start); ConfigError for a shape
    that is not sizes joined by x."""
    if opt.kind == "shape":
        try:
            return tuple(int(part) for part in str(value).lower().split("x"))
        except ValueError:
            raise ConfigError(f"{opt.flag} {value!r} is not sizes joined by x, e.g. 64 or 3x32x32", opt.name) from None
    if opt.kind == "tags":
        return tuple(value)
    if opt.default is None and opt.kind is int:
        return value or None
    if opt.default is None and opt.kind is str:
        return value.strip() or None
    return value


class LaunchForm:
    """What the Launch page asks for: every run option (engine.config.OPTIONS, in `values`, by name, in
    the form's terms: see form_start), and the sweep builder. A rate range (start, stop, points) sweeps
    the ELR (sphere) or LR (lrwd) log-spaced with both ends included, in place of the single rate;
    seeds > 1 repeats every point with seeds seed..seed+n-1. Options that do not apply (Option.when: the
    LR on the sphere, the data folder on digits…) are hidden and take their defaults."""

    def __init__(self, *, sweep_rate: bool = False, rate_start: float = 1e-4, rate_stop: float = 1.0,
                 rate_points: int = 6, seeds: int = 1, sweep_name: str = "", **values):
        unknown = sorted(set(values) - set(OPTION))
        if unknown:
            raise TypeError(f"LaunchForm has no field {', '.join(unknown)}")
        self.values = {**{o.name: form_start(o) for o in OPTIONS}, **values}
        self.sweep_rate, self.rate_start, self.rate_stop, self.rate_points = sweep_rate, rate_start, rate_stop, rate_points
        self.seeds, self.sweep_name = seeds, sweep_name

    @property
    def rate_key(self) -> str:
        return "elr" if self.values["mode"] == "sphere" else "lr"

    def base(self) -> RunConfig:
        """The config of the fields that apply (the first point of a swept rate)."""
        values = dict(self.values)
        if self.sweep_rate:
            values[self.rate_key] = self.swept()[self.rate_key][0]
        return RunConfig(**{o.name: config_value(o, values[o.name]) for o in OPTIONS if o.applies(values)})

    def swept(self) -> dict[str, list]:
        swept = {}
        if self.sweep_rate:
            swept[self.rate_key] = parse_values(f"{self.rate_start}:{self.rate_stop}:{self.rate_points}")
        if self.seeds > 1:
            seed = self.values["seed"]
            swept["seed"] = list(range(seed, seed + self.seeds))
        return swept


def configs_of(form: LaunchForm) -> tuple[list[RunConfig], dict]:
    """The checked configs the form describes and what it sweeps. ConfigError (one line, naming
    the form's fields) on bad input."""
    try:
        swept = form.swept()
        base = form.base()
        if swept and base.name:
            # one name for many runs would make them indistinguishable in every list
            base = base.replace(name=None)
        return (expand_grid(base, swept) if swept else [base]), swept
    except ConfigError as exc:
        raise ConfigError(form_message(exc), exc.field) from None


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
