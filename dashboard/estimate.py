"""How long queued work will take, estimated from the CPU figures in BENCHMARKS.md (2 cores,
torch 2.13 CPU). An estimate: other machines, other loads and a GPU change it a lot."""
from __future__ import annotations

import math

from engine.config import RunConfig

# BENCHMARKS.md, "CPU: 2 cores": mlp_si 3x64 on digits at batch 32 takes 0.80 ms a step with the
# default metrics; packed mlp_si sweeps run about 3x faster; convnet_si-32 at batch 128 on
# 3x32x32 images takes 461 ms a step; a warm sharpness measurement costs 0.058 s on the digits
# demo and about 1.6% of a convnet epoch (probe 256).
MLP_STEP_S = 0.80e-3
MLP_REFERENCE_WORK = 32 * (64 * 64 + 2 * 64 * 64 + 64 * 10)   # batch x multiply-adds per sample, 3x64 on digits
MLP_PACKED_SPEEDUP = 3.0
CONV_STEP_S = 0.461
MLP_SHARPNESS_S = 0.058
CONV_SHARPNESS_S = 0.016 * 390 * CONV_STEP_S
# From a queued run to its end beyond its training steps: the worker's next poll, the run process,
# the data, the first and last writes. Calibrated
# from the Teach demos through a live worker (2026-12-04, the 2-core machine under a load of 10-14, so
# CPU seconds of the worker's processes less the worker's own, as a quiet machine's wall time):
#   demo                      measured   this model   before (START_S 35, batch-linear steps)
#   a 1-epoch digits run      ~1.5 s     4 s          35 s
#   Three regimes on digits   ~3 s       5 s          36 s
#   Periodic behaviour        ~2 s       6 s          42 s   (200 epochs; ~3 s at the preset's 300)
#   Sharpness vs 2/ELR        ~10 s      8.5 s        40 s
#   ELR sweep on digits (16)  ~6 s       10 s         41 s
# The old figures were 4-7x the demos' times on screen; these err long by at most ~2-3x (a loaded
# machine, the dashboard's own redraws).
START_S = 4.0
# an mlp_si step on a CPU is overhead-bound until its work is several times the digits demo's (the
# periodic demo's batch of 128 steps as fast as batch 32): work scales the step only beyond this
MLP_OVERHEAD_BOUND = 4.0
TRAIN_SIZE = {"digits": 1437, "cifar10": 50_000, "cifar100": 50_000}
CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100}


def run_seconds(cfg: RunConfig) -> float | None:
    """One run's training time on the benchmark CPU; None where BENCHMARKS.md has no figure."""
    samples = TRAIN_SIZE.get(cfg.dataset, cfg.synthetic_samples)
    steps = cfg.epochs * max(1, samples // cfg.batch)
    if cfg.model == "mlp_si":
        inputs = 64 if cfg.dataset == "digits" else math.prod(cfg.synthetic_shape) if cfg.dataset == "synthetic" \
            else 3 * 32 * 32
        width, classes = cfg.model_width, CLASSES.get(cfg.dataset, cfg.synthetic_classes)
        work = cfg.batch * (inputs * width + (cfg.depth - 1) * width * width + width * classes)
        step_s = MLP_STEP_S * max(1.0, work / (MLP_OVERHEAD_BOUND * MLP_REFERENCE_WORK))
        sharpness_s = MLP_SHARPNESS_S
    elif cfg.model == "convnet_si":
        step_s = CONV_STEP_S * (cfg.batch / 128) * (cfg.model_width / 32) ** 2
        sharpness_s = CONV_SHARPNESS_S * (cfg.model_width / 32) ** 2
    else:
        return None
    measurements = steps // cfg.sharpness_every if cfg.sharpness_every else 0
    return steps * step_s + measurements * sharpness_s


def total_seconds(configs: list[RunConfig], parallel: int = 2) -> float | None:
    """Wall time for the worker to train them all: packed when they are an mlp_si sweep (as the
    worker does on a CPU), else `parallel` at a time."""
    each = [run_seconds(c) for c in configs]
    if not each or any(s is None for s in each):
        return None
    if len(configs) > 1 and all(c.model == "mlp_si" for c in configs):
        return START_S + sum(each) / MLP_PACKED_SPEEDUP
    return START_S * math.ceil(len(each) / parallel) + sum(each) / min(parallel, len(each))


def describe(configs: list[RunConfig], parallel: int = 2) -> str:
    seconds = total_seconds(configs, parallel)
    if seconds is None:
        return "No benchmark figure for this model on a CPU (BENCHMARKS.md): expect hours without a GPU."
    if seconds < 90:
        amount = f"about {max(5, round(seconds / 5) * 5):.0f} s"
    elif seconds < 5400:
        amount = f"about {seconds / 60:.0f} min"
    else:
        amount = f"about {seconds / 3600:.1f} h"
    return (f"Expected: {amount} on a 2-core CPU once a worker takes them (an estimate from the figures "
            "in BENCHMARKS.md; a GPU is much faster for the conv nets).")
