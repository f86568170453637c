"""What the pages read from the store, through the public Store API only (never SQL).

Streamlit-free, so the benchmark and the tests can call it directly.
"""
from __future__ import annotations

import io
import json
import math
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from engine import registry
from engine.analysis import KEYS as ANALYSIS_KEYS
from engine.analysis import analyze, analyze_stored
from engine.config import OPTION, OPTIONS, RunConfig, num_classes
from storage import LIVE_STATUSES, TERMINAL_STATUSES, RunInfo, Store
from storage.urls import sqlite_file

from .series import group_mean, smooth_long, tail_mean, thin, with_x

ENDED_VISIBLE_S = 600          # ended runs stay on the Live page this long, with their final curves
# what a sweep's summary reads of each run: what the analysis needs and the regime map's panels
SUMMARY_KEYS = list(dict.fromkeys([*ANALYSIS_KEYS, *registry.REGIME_MAP_KEYS]))
TRACE_EVENTS = ["spike", "elr_change", "lr_change", "resume"]


# ---- runs ----------------------------------------------------------------------------------------
def run_label(run: RunInfo) -> str:
    return f"#{run.id} {run.name}"


def group_label(runs: list[RunInfo]) -> str:
    """A seed group's curve: "#1–#3 mlp_si-… elr=0.01 · mean of 3 seeds (0, 1, 2)", its runs' names without
    their own seed; one run: its label."""
    if len(runs) == 1:
        return run_label(runs[0])
    ids = sorted(r.id for r in runs)
    name = re.sub(r"\s*\bseed=-?\d+\b", "", runs[0].name).strip() or runs[0].name
    seeds = ", ".join(str(r.config.get("seed", "?")) for r in sorted(runs, key=lambda r: r.id))
    return f"#{ids[0]}–#{ids[-1]} {name} · mean of {len(runs)} seeds ({seeds})"


def rate_of(config: dict) -> tuple[str, float]:
    """The rate the user set: ("elr", value) on the sphere, ("lr", value) under lrwd; a rate left
    unset reads as the engine's default."""
    key = "lr" if config.get("mode", "sphere") == "lrwd" else "elr"
    rate = config.get(key)
    return key, rate if rate is not None else RunConfig(mode="lrwd" if key == "lr" else "sphere").base_rate


def parse_config_filter(text: str) -> dict[str, str]:
    """'mode=lrwd, model=mlp_si' -> {'mode': 'lrwd', 'model': 'mlp_si'}; ValueError names a bad part."""
    wanted = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"config filter part {part!r} is not key=value: write e.g. mode=lrwd, elr=0.01")
        wanted[key.strip()] = value.strip()
    return wanted


def config_matches(config: dict, wanted: dict[str, str]) -> bool:
    """Values compare as text; numbers also numerically, so elr=1e-2 finds 0.01."""
    def same(actual, text: str) -> bool:
        if str(actual) == text:
            return True
        try:
            return actual is not None and math.isclose(float(actual), float(text), rel_tol=1e-9)
        except (TypeError, ValueError):
            return False
    return all(key in config and same(config[key], text) for key, text in wanted.items())


def find_runs(store: Store, *, name: str = "", tag: str | None = None, sweep_id: int | None = None,
              config_filter: dict[str, str] | None = None) -> list[RunInfo]:
    runs = store.list_runs(name_contains=name or None, tag=tag or None, sweep_id=sweep_id)
    return [r for r in runs if config_matches(r.config, config_filter or {})]


def all_tags(runs: list[RunInfo]) -> list[str]:
    return sorted({tag for run in runs for tag in run.tags})


def config_diff(runs: list[RunInfo]) -> pd.DataFrame:
    """The run options whose values differ between the runs (rows, in their declared order, with the
    Launch form's label) by run (columns). An option a run's stored config lacks (a run made before the
    option existed) counts as its default."""
    present = set().union(*(run.config for run in runs)) if runs else set()
    keys = [o.name for o in OPTIONS if o.name in present] + sorted(present - set(OPTION))

    def value(run: RunInfo, key: str):
        if key in run.config or key not in OPTION:
            return run.config.get(key)
        default = OPTION[key].default
        return list(default) if isinstance(default, tuple) else default

    table = pd.DataFrame({run_label(run): [as_text(value(run, key)) for key in keys] for run in runs},
                         index=pd.Index(keys, name="config"))
    table = table[table.nunique(axis=1) > 1]
    table.insert(0, "option", [OPTION[key].label if key in OPTION else "" for key in table.index])
    return table


def as_text(value) -> str:
    return "—" if value is None else json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def ended_recently(run: RunInfo, now: float) -> bool:
    return run.is_terminal and run.finished_at is not None and now - run.finished_at < ENDED_VISIBLE_S


def live_page_runs(store: Store) -> list[RunInfo]:
    """Runs a worker holds, then those that ended in the last ENDED_VISIBLE_S seconds."""
    now = time.time()
    held = store.list_runs(status=list(LIVE_STATUSES))
    ended = [r for r in store.list_runs(status=list(TERMINAL_STATUSES)) if ended_recently(r, now)]
    return held + ended


# ---- metrics ------------------------------------------------------------------------------------
def metric_keys(store: Store, run_ids) -> list[str]:
    """Union of the keys the runs logged, in registry order."""
    keys = set().union(*(store.metric_keys(run_id) for run_id in run_ids)) if run_ids else set()
    return registry.order(keys)


def compare_frames(store: Store, run_ids, keys, *, x: str = "step", max_points: int, smoothing: float = 0.0,
                   groups: dict[int, list[int]] | None = None, log_keys=(),
                   lineage: dict[int, list[tuple[int, int]]] | None = None):
    """(front, faint or None): long frames with an x column, ready for charts.overlay. The EMA, the
    seed-group means and the pairing with an x metric all run on the full-resolution data
    (thinned points would change them); only then are the frames thinned for drawing. faint is
    the raw curve behind a smoothed one. lineage (run id -> its ancestors as solutions.lineage gives
    them) puts each fork's ancestors' traces, up to where it branched, before its own under its id,
    as rows with `lead` true and `source` the ancestor's id: one curve, smoothed as one (not with
    seed groups)."""
    wanted = list(dict.fromkeys([*keys, *([] if x in registry.INDEX_COLUMNS else [x])]))
    full = smoothing > 0 or bool(groups) or x not in registry.INDEX_COLUMNS
    raw = store.read_metrics_many(run_ids, wanted, max_points=None if full else max_points)
    if lineage and not groups:
        raw = with_ancestors(store, raw, lineage, wanted, max_points=None if full else max_points)
    front = smooth_long(raw, smoothing) if smoothing > 0 else raw
    faint = raw if smoothing > 0 and not groups else None
    if groups:
        front = group_mean(front, groups, log_keys)

    def ready(long):
        long = with_x(long, x)
        return thin(long[long["key"].isin(list(keys))], max_points)
    return ready(front), None if faint is None else ready(faint)


def with_ancestors(store: Store, long: pd.DataFrame, lineage: dict[int, list[tuple[int, int]]], keys,
                   max_points: int | None = None) -> pd.DataFrame:
    """The long frame with, before each fork's own rows, its ancestors' rows up to where it branched
    (each ancestor's points before the step its descendant in the chain starts at), under the fork's
    run id; `lead` marks those rows and `source` names their run."""
    ancestors = sorted({ancestor for chain in lineage.values() for ancestor, _ in chain})
    theirs = store.read_metrics_many(ancestors, keys, max_points=max_points) if ancestors else long.iloc[0:0]
    pieces = [long.assign(lead=False, source=np.nan)]
    for run_id, chain in lineage.items():
        if run_id not in set(long["run_id"]):
            continue
        for ancestor, upto in chain:
            rows = theirs[(theirs["run_id"] == ancestor) & (theirs["step"] < upto)]
            pieces.append(rows.assign(run_id=run_id, lead=True, source=float(ancestor)))
    joined = pd.concat([p for p in pieces if not p.empty] or pieces[:1], ignore_index=True)
    joined["lead"] = joined["lead"].astype(bool)
    return joined.sort_values(["run_id", "key", "step"], kind="stable", ignore_index=True)


def compare_csv(store: Store, runs: list[RunInfo], keys=None) -> bytes:
    """All points (not thinned) of the runs and metrics (None: all), long format; nan/inf/-inf as text."""
    frame = store.read_metrics_many([r.id for r in runs], keys)
    frame.insert(1, "run_name", frame["run_id"].map({r.id: r.name for r in runs}))
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, na_rep="nan")
    return buffer.getvalue().encode()


def run_analysis(store: Store, run: RunInfo) -> dict:
    """engine.analysis on the stored trace: regime, evidence, spikes, period."""
    return analyze_stored(store, run.id, num_classes(run.config))


_SUMMARIES: dict[tuple, tuple] = {}   # (url, run id) -> ((status, step), row): a moved run is read again


def run_summary(store: Store, run: RunInfo) -> dict:
    """A run's rate, regime (analysis of its trace) and tail means; cached until the run moves on,
    so a regime map that refreshes while its sweep trains reads only the runs that changed."""
    version = (run.status, run.step, run.name)
    cached = _SUMMARIES.get((store.url, run.id))
    if cached and cached[0] == version:
        return cached[1]
    trace = store.read_metrics(run.id, SUMMARY_KEYS)
    result = analyze(trace, num_classes(run.config))
    rate_key, rate = rate_of(run.config)
    row = {"run_id": run.id, "name": run.name, "status": run.status, "rate_key": rate_key,
           "rate": rate, "seed": run.config.get("seed"), "regime": result["regime"],
           **{key: tail_mean(trace[key]) if key in trace else float("nan")
              for key in registry.REGIME_MAP_KEYS},
           "reason": result["evidence"].get("reason", "")}
    _SUMMARIES[(store.url, run.id)] = (version, row)
    return row


def sweep_summary(store: Store, sweep_id) -> pd.DataFrame:
    """One row per run of a sweep: its rate, regime (analysis of its trace) and tail means."""
    rows = [run_summary(store, run) for run in store.list_runs(sweep_id=sweep_id)]
    columns = ["run_id", "name", "status", "rate_key", "rate", "seed", "regime", *registry.REGIME_MAP_KEYS, "reason"]
    return pd.DataFrame(rows, columns=columns).sort_values(["rate", "run_id"], ignore_index=True)


LONG_DTYPES = {"run_id": "int64", "key": "object", "step": "int64", "epoch": "float64", "wall_time": "float64",
               "value": "float64"}


def long_frame(wide: pd.DataFrame | None, run_id: int, keys) -> pd.DataFrame:
    """A wide trace (step, epoch, wall_time, one column per key) as the long frame charts.overlay
    draws (run_id, key, step, epoch, wall_time, value); numeric columns even when empty."""
    present = [key for key in keys if wide is not None and key in wide]
    if wide is None or wide.empty or not present:
        return pd.DataFrame({column: pd.Series(dtype=dtype) for column, dtype in LONG_DTYPES.items()})
    long = wide.melt(id_vars=["step", "epoch", "wall_time"], value_vars=present, var_name="key",
                     value_name="value").dropna(subset=["value"])
    return long.assign(run_id=run_id)[list(LONG_DTYPES)]


def overlay_frame(traces: dict[int, "LiveTrace"], keys) -> pd.DataFrame:
    """Every run's trace as one long frame. Runs that have logged nothing yet are left out: an empty
    piece in the concatenation would turn the numeric columns into objects, which cannot be drawn."""
    pieces = [piece for run_id, trace in traces.items() if not (piece := long_frame(trace.frame, run_id, keys)).empty]
    return pd.concat(pieces, ignore_index=True) if pieces else long_frame(None, 0, keys)


def remaining_s(run: RunInfo, now: float, seen: dict | None = None) -> float | None:
    """Seconds left at the pace the run keeps. With `seen` (run id -> (time, step) when a page first
    saw the run at a step, filled in here): the pace since then, None until it has moved on. Without:
    the pace since it started, which counts the run process's start-up (spawn, imports, data) as
    training: it put 14 minutes on a digits run about to end 30 s later."""
    if run.status != "running" or not run.total_steps or not run.step or run.started_at is None:
        return None
    if seen is not None:
        since, first_step = seen.setdefault(run.id, (now, run.step))
        if run.step <= first_step or now <= since:
            return None
        return max(0.0, (run.total_steps - run.step) * (now - since) / (run.step - first_step))
    elapsed = now - run.started_at
    return max(0.0, (run.total_steps - run.step) * elapsed / run.step) if elapsed > 0 else None


def sharpness_runs(runs: list[RunInfo]) -> list[RunInfo]:
    """Runs configured to measure sharpness."""
    return [r for r in runs if (r.config.get("sharpness_every") or 0) > 0]


# ---- managing runs ------------------------------------------------------------------------------
def acc_text(value: float | None) -> str:
    """An accuracy (a fraction) as every page writes it: a percentage with one decimal, "96.9%"."""
    return "…" if value is None else f"{value:.1%}"


ACC_COLUMN = "%.1f%%"   # a table's accuracy column, holding percentages (acc_text's format)


# ---- what the Teach and Periodic texts say, read from the run shown ------------------------------------
HOVER_RATIO = (0.7, 1.5)    # a median sharpness / line in this band: the run hovers around its line
SETTLED_POINTS = 10         # fewer measurements: the reading is of a run still near its start


@dataclass(frozen=True)
class SharpnessReading:
    """A run's measured sharpness against its own stability line 2(1+μ)/elr, point by point."""
    points: int
    above: float          # fraction of the measurements above the line
    median_ratio: float   # median of sharpness / line

    @property
    def reading(self) -> str:
        """"below", "around" (hovering around its line) or "above"."""
        low, high = HOVER_RATIO
        return "below" if self.median_ratio < low else "around" if self.median_ratio <= high else "above"

    def text(self) -> str:
        words = {"below": "well below its line", "around": "hovering around its line",
                 "above": "mostly above its line"}[self.reading]
        if self.points < SETTLED_POINTS:     # a run still near its start: say what it shows so far, not where it sits
            words = f"so far {words} (too few measurements to say where it settles)"
        return (f"{words}: above it at {self.above:.0%} of its {self.points} measurements, median sharpness / line "
                f"{self.median_ratio:.2f}")


def sharpness_reading(trace: pd.DataFrame) -> SharpnessReading | None:
    """The reading of a wide trace (step, sharpness, sharpness_threshold) after its first step (the
    untrained network's sharpness says nothing about training); None before two measurements."""
    if not {"sharpness", "sharpness_threshold"} <= set(trace.columns):
        return None
    measured = trace[trace["step"] > 0]
    ratio = (measured["sharpness"] / measured["sharpness_threshold"]).to_numpy(float)
    ratio = ratio[np.isfinite(ratio)]
    if len(ratio) < 2:
        return None
    return SharpnessReading(len(ratio), float((ratio > 1).mean()), float(np.median(ratio)))


def sharpness_readings(long: pd.DataFrame) -> dict[int, SharpnessReading]:
    """run id -> its reading, from a long frame (read_metrics_many of sharpness and its line)."""
    out = {}
    for run_id, rows in long.groupby("run_id"):
        wide = rows.pivot_table(index="step", columns="key", values="value", aggfunc="last").reset_index()
        reading = sharpness_reading(wide)
        if reading is not None:
            out[int(run_id)] = reading
    return out


def periodic_text(result: dict) -> str | None:
    """What the analysis found that makes a run periodic, in one line: the spikes, each with its norm
    jump and ELR drop (the smallest of each), and the period with its spread; None unless `periodic`."""
    evidence = result.get("evidence", {})
    spikes = evidence.get("spike_evidence") or []
    if result.get("regime") != "periodic" or not spikes:
        return None
    jumps = [s["norm_jump"] for s in spikes if s.get("norm_jump") is not None]
    drops = [s["elr_drop"] for s in spikes if s.get("elr_drop") is not None]
    each = (f", each with a si_norm jump (at least +{min(jumps):.0%}) and an elr drop (at least −{min(drops):.0%})"
            if jumps and drops and len(jumps) == len(drops) == len(spikes) else "")
    period = ""
    if result.get("period"):
        cv = evidence.get("period_cv")
        spread = f", the spacing varying by {cv:.0%} (std / mean)" if cv is not None else ""
        period = f"; period ≈ {result['period']} steps (the median spacing){spread}"
    return f"{len(spikes)} loss spikes{each}{period}."


def delete_runs(store: Store, runs: list[RunInfo]) -> None:
    """Delete runs with their checkpoint files (refused by the store for runs a worker holds)."""
    for run in runs:
        store.delete(run.id)


def delete_sweep(store: Store, sweep_id) -> int:
    """Delete a sweep and its runs with their checkpoint files; returns how many runs went."""
    return len(store.delete_sweep(sweep_id))


def bundle_bytes(store: Store, run_ids: list[int], sweep_id=None) -> bytes:
    """The portable bundle (`python -m engine import FILE` reads it) of runs or of a whole sweep."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bundle.zip"
        store.export_bundle(run_ids, path, sweep_id=sweep_id)
        return path.read_bytes()


# ---- live traces --------------------------------------------------------------------------------
@dataclass
class LiveTrace:
    """A run's trace kept in session state and extended by incremental reads (steps after the last
    one held), so a 1 s refresh costs one small query however long the run is."""
    run_id: int
    keys: tuple[str, ...]
    frame: pd.DataFrame | None = None
    events: list = field(default_factory=list)

    def refresh(self, store: Store) -> "LiveTrace":
        events = store.events(self.run_id, TRACE_EVENTS)
        resumed = sum(e.kind == "resume" for e in events) != sum(e.kind == "resume" for e in self.events)
        # a resume cuts the stored trace back to its checkpoint: then read it whole again
        since = None if resumed or self.frame is None or self.frame.empty else self.last_step
        new = store.read_metrics(self.run_id, list(self.keys), since_step=since)
        if since is None:
            self.frame = new
        elif len(new):
            self.frame = pd.concat([self.frame, new], ignore_index=True)
        self.events = events
        return self

    @property
    def spikes(self) -> list[int]:
        return sorted({e.step for e in self.events if e.kind == "spike"})

    @property
    def rate_changes(self) -> list[tuple[int, float]]:
        return [(e.step, e.payload.get("to")) for e in self.events if e.kind in ("elr_change", "lr_change")]

    @property
    def last_step(self) -> int:
        return int(self.frame["step"].iloc[-1]) if self.frame is not None and len(self.frame) else 0


# ---- workers ------------------------------------------------------------------------------------
def worker_log_path(url: str) -> Path:
    """Beside an SQLite file, else under ~/.spherelab."""
    db = sqlite_file(url)
    if db is not None:
        return db.parent / (db.name + ".worker.log")
    return Path("~/.spherelab/worker.log").expanduser()
