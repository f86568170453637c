"""Per-step overhead of spherelab.track (BENCHMARKS.md, "spherelab.track overhead"): the same training
step with and without tracking, on the digits MLP (mlp_si 3x64, batch 32) and a small ConvNet
(convnet_si width 8, 3x32x32 batch 64), on one torch thread. Interleaved repeats, median per step.

    python scripts/bench_track.py [--steps 200] [--repeats 5]
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import spherelab  # noqa: E402
from engine.models import convnet_si, mlp_si  # noqa: E402


def timed(model, x, y, steps, db=None, log_every=1):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, weight_decay=0.01)
    run = spherelab.track(model, optimizer, db=db, log_every=log_every) if db else None
    start = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        if run:
            run.before_step()
        optimizer.step()
        if run:
            run.after_step(train_loss=loss)
    elapsed = time.perf_counter() - start
    if run:
        run.finish()
    return elapsed / steps


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cases = {"digits MLP (mlp_si 3x64, batch 32)": (lambda: mlp_si(64, 10), torch.randn(32, 64),
                                                    torch.randint(0, 10, (32,))),
             "ConvNet (convnet_si c=8, 3x32x32, batch 64)": (lambda: convnet_si(10, 8), torch.randn(64, 3, 32, 32),
                                                             torch.randint(0, 10, (64,)))}
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "bench.db")
        print("| model | plain step (ms) | tracked, log every step (ms) | overhead "
              "| tracked, log every 10 (ms) | overhead |")
        print("|---|---|---|---|---|---|")
        for name, (build, x, y) in cases.items():
            times = {"plain": [], "1": [], "10": []}
            for _ in range(args.repeats):
                times["plain"].append(timed(build(), x, y, args.steps))
                times["1"].append(timed(build(), x, y, args.steps, db, 1))
                times["10"].append(timed(build(), x, y, args.steps, db, 10))
            plain, every, tenth = (statistics.median(times[k]) * 1e3 for k in ("plain", "1", "10"))
            print(f"| {name} | {plain:.3f} | {every:.3f} | {every / plain - 1:+.0%} | {tenth:.3f} | "
                  f"{tenth / plain - 1:+.0%} |")


if __name__ == "__main__":
    main()
