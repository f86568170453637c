"""`python -m engine bench`: throughput and overhead figures (a benchmark, never a timed test).

Figures:
- digits demo: mlp_si on digits in the trainer with default metrics, model-epochs per second;
- convnet_si on synthetic 50,000 x 3x32x32 on the present device: model-epochs per second from the
  time of a number of steps (a CPU cannot afford whole epochs);
- overheads as a fraction of the plain step time (forward, backward, update and nothing else):
  per-step metrics, log points (norms, test eval) with the in-memory recorder and with the real
  SQLite store, and one sharpness measurement per epoch (cold and warm-started Lanczos).
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
import time

import torch
import torch.nn.functional as F

from .config import RunConfig
from .trainer import MemoryRecorder, Trainer, configure_threads, resolve_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_plain_steps(trainer: Trainer, steps: int) -> float:
    """Seconds per step of bare projected SGD on the same model and data: the reference for overheads."""
    data, cfg, group = trainer.data, trainer.cfg, trainer.group
    batches = data.batches(cfg.batch, trainer.batch_gen)
    lr = trainer.update.lr(0)

    def one():
        nonlocal batches
        idx = next(batches, None)
        if idx is None:
            batches = data.batches(cfg.batch, trainer.batch_gen)
            idx = next(batches)
        loss = F.cross_entropy(trainer.model(data.x_train[idx]), data.y_train[idx])
        g = group.flat_grad(torch.autograd.grad(loss, group.params))
        with torch.no_grad():
            group.w.add_(g, alpha=-lr)
            group.w.mul_(trainer.update.rho0 / group.w.norm())

    for _ in range(3):
        one()
    _sync(trainer.device)
    start = time.perf_counter()
    for _ in range(steps):
        one()
    _sync(trainer.device)
    return (time.perf_counter() - start) / steps


def _time_trainer_steps(trainer: Trainer, steps: int) -> float:
    """Seconds per step of the real trainer step (per-step metric accumulation included)."""
    batches = trainer.data.batches(trainer.cfg.batch, trainer.batch_gen)
    idxs = [next(batches) for _ in range(min(steps, trainer.steps_per_epoch))]
    for idx in idxs[:3]:
        trainer._train_step(idx)
    _sync(trainer.device)
    start = time.perf_counter()
    for i in range(steps):
        trainer._train_step(idxs[i % len(idxs)])
    _sync(trainer.device)
    return (time.perf_counter() - start) / steps


def _time(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _overheads(trainer: Trainer, steps: int) -> dict:
    plain = _time_plain_steps(trainer, steps)
    step = _time_trainer_steps(trainer, steps)
    log_every = trainer.cfg.log_every
    spe = trainer.steps_per_epoch
    started = time.perf_counter()
    log_point = _time(lambda: trainer._log_point(started), trainer.device)
    test_eval = _time(lambda: trainer.test.measure(trainer.model, trainer.data), trainer.device)
    sharp_cold = _time(lambda: trainer.sharpness.measure(trainer.model, trainer.group, 0.01, 0.0), trainer.device)
    sharp_warm = _time(lambda: trainer.sharpness.measure(trainer.model, trainer.group, 0.01, 0.0), trainer.device)
    per_epoch_plain = plain * spe
    metrics = (step - plain) * spe + (log_point - test_eval) * spe / log_every + test_eval
    return {
        "plain_step_s": plain, "trainer_step_s": step, "steps_per_epoch": spe,
        "per_step_metrics_overhead": (step - plain) / plain,
        "default_metrics_overhead": metrics / per_epoch_plain,
        "sharpness_cold_s": sharp_cold, "sharpness_warm_s": sharp_warm,
        "sharpness_every_epoch_overhead": sharp_warm / per_epoch_plain,
    }


def _store_logging_overhead(cfg: RunConfig) -> dict:
    """Whole-run time with the in-memory recorder versus the SQLite store (batched writer)."""
    from storage import Store
    from .runner import StoreRecorder

    def run(recorder_factory) -> float:
        trainer = Trainer(cfg)
        trainer.recorder = recorder_factory()
        start = time.perf_counter()
        trainer.run()
        if hasattr(trainer.recorder, "close"):
            trainer.recorder.close()
        return time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(os.path.join(tmp, "bench.db"))
        run_id = store.create_run(cfg.to_dict(), name="bench", status="running")
        memory = min(run(MemoryRecorder) for _ in range(3))
        stored = min(run(lambda: StoreRecorder(store, run_id)) for _ in range(3))
        rows = len(store.read_metrics(run_id))
        store.close()
    return {"memory_run_s": memory, "store_run_s": stored, "store_logging_overhead": (stored - memory) / memory,
            "log_points": rows}


def run_bench(args) -> int:
    device = resolve_device(args.device)
    quick = args.quick
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "mlp_threads": 1,
    }

    demo = RunConfig(elr=0.01, epochs=5 if quick else 30, device=str(device.type))
    threads = torch.get_num_threads()
    configure_threads(demo, device)
    trainer = Trainer(demo)
    wall = _time(trainer.run, device)
    result["digits_demo"] = {"epochs": demo.epochs, "seconds": wall, "model_epochs_per_s": demo.epochs / wall,
                             **_overheads(Trainer(demo), 50)}
    result["digits_demo"]["store"] = _store_logging_overhead(demo)
    torch.set_num_threads(threads)

    n = 5000 if quick else 50000
    conv = RunConfig(model="convnet_si", dataset="synthetic", synthetic_samples=n, synthetic_shape=(3, 32, 32),
                     probe_size=256 if device.type == "cpu" else 1024, log_every=50, device=str(device.type))
    trainer = Trainer(conv)
    steps = 5 if device.type == "cpu" else 100
    over = _overheads(trainer, steps)
    result["convnet_si_synthetic"] = {"train_samples": n, "probe_size": conv.probe_size,
                                      "model_epochs_per_s": 1.0 / (over["trainer_step_s"] * (n // 128)),
                                      **over}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_table(result)
    return 0


def _print_table(r: dict) -> None:
    print(f"device: {r['device']}   torch {r['torch']}   threads {r['threads']}")
    for name in ("digits_demo", "convnet_si_synthetic"):
        d = r[name]
        print(f"\n{name}")
        print(f"  model-epochs/s               {d['model_epochs_per_s']:.3f}")
        print(f"  plain step                   {d['plain_step_s'] * 1e3:.2f} ms")
        print(f"  trainer step                 {d['trainer_step_s'] * 1e3:.2f} ms "
              f"(+{d['per_step_metrics_overhead']:.1%} per-step metrics)")
        print(f"  default metrics overhead     {d['default_metrics_overhead']:.1%} of plain step time")
        print(f"  sharpness cold / warm        {d['sharpness_cold_s']:.3f} s / {d['sharpness_warm_s']:.3f} s")
        print(f"  sharpness every epoch        +{d['sharpness_every_epoch_overhead']:.1%}")
        if "store" in d:
            s = d["store"]
            print(f"  SQLite logging overhead      {s['store_logging_overhead']:+.1%} of a whole run "
                  f"({s['log_points']} log points)")
