"""Side-by-side speed of two spherelab source trees on this machine (a benchmark, never a test).

    python scripts/bench_compare.py OLD_TREE NEW_TREE [--repeats 5] [--json]

OLD_TREE, NEW_TREE: checkouts (e.g. `git worktree add /tmp/old <commit>`). Each workload runs in a
fresh subprocess with that tree first on sys.path, alternating old/new for every repeat so both see
the same machine load; the minimum over repeats is reported (the least disturbed), with the median.
Workloads (issue 8's speed gate):
  digits30   one 30-epoch mlp_si digits run in memory, default metrics, 1 torch thread (whole run, s)
  sweep16    `python -m engine sweep --elr 1e-4:10:16` into a fresh SQLite file (whole command, s)
  conv_k1    one convnet_si-32 step, batch 128, synthetic 3x32x32, 2 threads (s per step)
  conv_k8    one step of 8 convnet_si-32 runs packed (s per step)
Both the training API before issue 8 (Trainer._train_step, engine.packed.PackedTrainer) and after
(Trainer([cfg]).train_step()) are driven, whichever the tree has.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SNIPPET = r'''
import sys, time, torch
from engine.config import RunConfig
from engine import trainer as T
work = sys.argv[1]
new_api = hasattr(T.Trainer, "train_step")

def stepper(cfgs):
    if new_api:
        t = T.Trainer(cfgs)
        return t.train_step
    if len(cfgs) == 1:
        t = T.Trainer(cfgs[0])
        stream = iter(())
        def one():
            nonlocal stream
            idx = next(stream, None)
            if idx is None:
                stream = t.data.batches(cfgs[0].batch, t.batch_gen)
                idx = next(stream)
            t._train_step(idx)
        return one
    from engine.packed import PackedTrainer
    p = PackedTrainer(cfgs)
    p._sync_pack()
    return p._train_step

if work == "digits30":
    torch.set_num_threads(1)
    cfg = RunConfig(elr=0.01, epochs=30, device="cpu")
    t = T.Trainer([cfg] if new_api else cfg)
    start = time.perf_counter(); t.run(); print(time.perf_counter() - start)
else:
    torch.set_num_threads(2)
    k = 1 if work == "conv_k1" else 8
    cfgs = [RunConfig(model="convnet_si", dataset="synthetic", synthetic_samples=2048, synthetic_shape=(3, 32, 32),
                      elr=10 ** (-4 + i / 4), device="cpu") for i in range(k)]
    step = stepper(cfgs)
    step()
    n = 3
    start = time.perf_counter()
    for _ in range(n):
        step()
    print((time.perf_counter() - start) / n)
'''


def run_once(tree: str, work: str) -> float:
    env = {**os.environ, "PYTHONPATH": tree, "SPHERELAB_PACK": "auto"}
    if work == "sweep16":
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "engine", "sweep", "--elr", "1e-4:10:16", "--db",
                            os.path.join(tmp, "s.db")], cwd=tree, env=env, check=True, capture_output=True)
            return time.perf_counter() - start
    out = subprocess.run([sys.executable, "-c", SNIPPET, work], cwd=tree, env=env, check=True,
                         capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work", nargs="+", default=["digits30", "sweep16", "conv_k1", "conv_k8"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = {}
    for work in args.work:
        times = {"old": [], "new": []}
        for _ in range(args.repeats):
            for side in ("old", "new"):
                times[side].append(run_once(getattr(args, side), work))
        results[work] = {side: {"min": min(v), "median": statistics.median(v), "all": v} for side, v in times.items()}
        results[work]["new_over_old_min"] = results[work]["new"]["min"] / results[work]["old"]["min"]
        results[work]["new_over_old_median"] = results[work]["new"]["median"] / results[work]["old"]["median"]
        if not args.json:
            r = results[work]
            print(f"{work:9} old {r['old']['min']:.4g} s (median {r['old']['median']:.4g})   new {r['new']['min']:.4g} s "
                  f"(median {r['new']['median']:.4g})   new/old {r['new_over_old_min']:.3f} "
                  f"(medians {r['new_over_old_median']:.3f})", flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
