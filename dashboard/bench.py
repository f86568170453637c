"""`python -m dashboard.bench`: how fast the dashboard reads a big store (a measurement, not a test).

Builds a store of RUNS runs x STEPS logged steps (KEYS per step, written in bulk with
store.log_metrics), then times
  - compare: the Compare page's read + figure build + serialisation, thinned to MAX_POINTS per series,
    without and with smoothing (the EMA runs on all points before thinning);
  - live: how long after store.log_metrics returns the Live page shows the new point, with the
    page's own incremental read (data.LiveTrace) polled every live.REFRESH_S seconds like its fragment.
Targets: compare < 2 s, live < 2 s (the refresh interval dominates).
"""
from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from engine import registry
from storage import Store

from . import charts, data

RUNS, STEPS = 20, 10_000
KEYS = ["train_loss", "test_acc", "si_norm", "elr"]
MAX_POINTS = 2_000
REFRESH_S = 1.0  # the Live page's fragment interval (dashboard/pages/live.py)


def build(store: Store, runs: int, steps: int) -> list[int]:
    rng = np.random.default_rng(0)
    ids = store.create_runs([{"config": {"mode": "sphere", "elr": 10 ** rng.uniform(-4, 0)}, "name": f"bench {i}"}
                             for i in range(runs)])
    step = np.arange(steps)
    for run_id in ids:
        loss = 2.3 * np.exp(-step / rng.uniform(500, 5000)) + 0.05 * rng.random(steps)
        columns = (loss, 1 - loss / 2.5, np.full(steps, 8.0), np.full(steps, 0.01))
        store.log_metrics(run_id, [(int(s), s / 100, s * 0.01, dict(zip(KEYS, map(float, values))))
                                   for s, *values in zip(step, *columns)])
    return ids


def time_compare(store: Store, ids: list[int], smoothing: float) -> tuple[float, float]:
    """(total seconds, of which reading and thinning the data)."""
    started = time.perf_counter()
    runs = store.list_runs(ids=ids)
    keys = ["train_loss", "test_acc"]
    front, faint = data.compare_frames(store, ids, keys, max_points=MAX_POINTS, smoothing=smoothing)
    read = time.perf_counter() - started
    fig = charts.overlay(front, keys, {r.id: data.run_label(r) for r in runs}, faint=faint,
                         log_keys=registry.log_keys(keys))
    fig.to_json()  # what st.plotly_chart sends to the browser
    return time.perf_counter() - started, read


def time_live(store: Store, run_id: int, samples: int) -> tuple[list[float], list[float]]:
    """(latencies from log_metrics to the point being on the page, durations of one incremental read)."""
    trace = data.LiveTrace(run_id, tuple(KEYS)).refresh(store)
    seen: dict[int, float] = {}
    reads: list[float] = []
    stop = threading.Event()

    def poll():  # the fragment: a refresh every REFRESH_S seconds
        while not stop.is_set():
            started = time.perf_counter()
            trace.refresh(store)
            reads.append(time.perf_counter() - started)
            seen.setdefault(trace.last_step, time.perf_counter())
            stop.wait(REFRESH_S)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    latencies, step = [], trace.last_step
    for _ in range(samples):
        time.sleep(random.uniform(0, REFRESH_S))  # points arrive at any phase of the refresh cycle
        step += 1
        store.log_metrics(run_id, [(step, step / 100, step * 0.01, dict.fromkeys(KEYS, 0.1))])
        written = time.perf_counter()
        while step not in seen:
            time.sleep(0.005)
        latencies.append(seen[step] - written)
    stop.set()
    poller.join()
    return latencies, reads


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dashboard.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--samples", type=int, default=8, help="live latency samples")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder, Store(Path(folder) / "bench.db") as store:
        started = time.perf_counter()
        ids = build(store, args.runs, args.steps)
        print(f"store: {args.runs} runs x {args.steps:,} steps x {len(KEYS)} keys "
              f"({args.runs * args.steps * len(KEYS):,} values) written in {time.perf_counter() - started:.1f} s")
        for smoothing in (0.0, 0.9):
            took, read = min(time_compare(store, ids, smoothing) for _ in range(3))
            print(f"compare, {args.runs} runs x 2 metrics, {MAX_POINTS:,} points per series, smoothing {smoothing}: "
                  f"{took:.2f} s best of 3, of which reading {read:.2f} s (target < 2 s)")
        latencies, reads = time_live(store, ids[0], args.samples)
        print(f"live: new point on the page after {statistics.median(latencies):.2f} s median, "
              f"{max(latencies):.2f} s worst, refreshing every {REFRESH_S:g} s (target < 2 s); "
              f"one incremental read takes {1000 * statistics.median(reads):.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
