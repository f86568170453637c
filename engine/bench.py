"""`python -m engine bench`: throughput and overhead figures (a benchmark, never a timed test).

Figures:
- digits demo: mlp_si on digits in the trainer with default metrics, model-epochs per second;
- convnet_si on synthetic 50,000 x 3x32x32 on the present device: model-epochs per second from the
  time of a number of steps (a CPU cannot afford whole epochs);
- overheads as a fraction of the plain step time (forward, backward, update and nothing else):
  per-step metrics, log points (norms, test eval) with the in-memory recorder and with the real
  SQLite store, and one sharpness measurement per epoch (cold and warm-started Lanczos);
- packed sweeps (engine.packed): model-epochs/s of convnet_si on synthetic 3x32x32 data, one run
  after another vs K members packed (K = 1, 8, 16, 32), plain / with the standard metrics / with
  sharpness every epoch, and an 8-member mlp_si digits sweep end to end (the CPU packing policy).
  `python -m engine.bench packed [--json] [--quick] [--device D]` runs this section alone.
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
    result["packed"] = packed_bench(device, quick)
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
    if "packed" in r:
        _print_packed(r["packed"])


# ---- packed sweeps (engine.packed) -------------------------------------------------------------

def _per_epoch(step_s: float, spe: int, log_every: int, log_s: float, test_s: float, sharp_s: float,
               members: int) -> dict:
    """model-epochs/s of `members` models from the measured parts of one epoch."""
    train = step_s * spe
    metrics = log_s * spe / log_every + test_s
    return {"plain": members / train, "standard_metrics": members / (train + metrics),
            "sharpness_every_epoch": members / (train + metrics + sharp_s) if sharp_s is not None else None,
            "sharpness_every_epoch_overhead": sharp_s / (train + metrics) if sharp_s is not None else None}


def _scaled_test_time(run_eval, data, samples: int, device) -> float:
    """Time a test evaluation on the first `samples` test images and scale to the whole split."""
    import dataclasses
    full = len(data.y_test)
    m = min(full, samples)
    part = dataclasses.replace(data, x_test=data.x_test[:m], y_test=data.y_test[:m])
    run_eval(part)
    return _time(lambda: run_eval(part), device) * full / m


def _single_figures(cfg: RunConfig, data, device, steps: int, test_samples: int, sharp: bool,
                    cold_iters: int) -> dict:
    trainer = Trainer(cfg, data=data, device=device)
    step_s = _time_trainer_steps(trainer, steps)
    trainer.step = 1
    trainer.test.schedule.mark(1)
    trainer.sharpness.schedule.mark(1)
    started = time.perf_counter()
    log_s = _time(lambda: trainer._log_point(started), device)
    test_s = _scaled_test_time(lambda d: trainer.test.measure(trainer.model, d), data, test_samples, device)
    out = {"step_s": step_s, "log_point_s": log_s, "test_eval_s": test_s}
    sharp_s = None
    if sharp:
        trainer.sharpness.iters = cold_iters
        out["sharpness_cold_s"] = _time(lambda: trainer.sharpness.measure(trainer.model, trainer.group, 0.01, 0.0),
                                        device)
        trainer.sharpness.iters = cfg.lanczos_iters
        _time_trainer_steps(trainer, max(1, steps // 2))       # move on a little, then warm-start
        sharp_s = out["sharpness_warm_s"] = _time(
            lambda: trainer.sharpness.measure(trainer.model, trainer.group, 0.01, 0.0), device)
    spe = data.steps_per_epoch(cfg.batch)
    out["model_epochs_per_s"] = _per_epoch(step_s, spe, cfg.log_every, log_s, test_s, sharp_s, 1)
    return out


def _pack_figures(cfgs: list[RunConfig], data, device, steps: int, warmup: int, test_samples: int, sharp: bool,
                  cold_iters: int, **pack_options) -> dict:
    from .packed import PackedTrainer
    pack = PackedTrainer(cfgs, data=data, device=device, **pack_options)
    pack._sync_pack()
    for _ in range(warmup):
        pack._train_step()
    step_s = _time(lambda: [pack._train_step() for _ in range(steps)], device) / steps
    members = list(pack.pack)
    rows = list(range(len(members)))
    for m in members:
        m.step = 1
        m.test_schedule.mark(1)
        m.sharp_schedule.mark(1)
    log_s = _time(lambda: pack._log_points(members), device)

    def run_eval(part):
        saved, pack.data = pack.data, part
        try:
            pack._test_eval(rows)
        finally:
            pack.data = saved

    test_s = _scaled_test_time(run_eval, data, test_samples, device)
    out = {"K": len(cfgs), "step_s": step_s, "log_point_s": log_s, "test_eval_s": test_s}
    sharp_s = None
    if sharp:
        elrs = [0.01] * len(members)
        out["sharpness_cold_s"] = _time(lambda: pack._sharpness(members, rows, elrs, iters=cold_iters), device)
        for _ in range(max(1, steps // 2)):
            pack._train_step()
        sharp_s = out["sharpness_warm_s"] = _time(lambda: pack._sharpness(members, rows, elrs), device)
        out["warm_lanczos_matvecs"] = pack.lanczos_matvecs
    spe = data.steps_per_epoch(cfgs[0].batch)
    out["model_epochs_per_s"] = _per_epoch(step_s, spe, cfgs[0].log_every, log_s, test_s, sharp_s, len(cfgs))
    pack = None     # frees the pack's tensors before empty_cache (the closures hold it too)
    if device.type == "cuda":
        out["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return out


def _digits_sweep(device, quick: bool) -> dict:
    """An 8-member mlp_si digits ELR sweep end to end with the default metrics: one after another
    (as the worker runs them) vs one pack. This is the measurement behind the CPU packing policy."""
    from .data import load_dataset
    from .packed import PackedTrainer
    k, epochs = 8, 3 if quick else 10
    cfgs = [RunConfig(elr=10 ** (-3 + 2 * i / (k - 1)), epochs=epochs, device=device.type) for i in range(k)]
    threads = torch.get_num_threads()
    configure_threads(cfgs[0], device)
    data = load_dataset(cfgs[0], device)
    Trainer(cfgs[0].replace(epochs=1), data=data, device=device).run()          # warm-up
    sequential = _time(lambda: [Trainer(c, data=data, device=device).run() for c in cfgs], device)
    packed = _time(lambda: PackedTrainer(cfgs, data=data, device=device).run(), device)
    torch.set_num_threads(threads)
    return {"K": k, "epochs": epochs, "threads": 1 if device.type == "cpu" else threads,
            "sequential_s": sequential, "packed_s": packed,
            "sequential_model_epochs_per_s": k * epochs / sequential, "packed_model_epochs_per_s": k * epochs / packed,
            "speedup": sequential / packed}


def packed_bench(device: torch.device, quick: bool = False) -> dict:
    """Packed-sweep throughput. On CUDA: ConvNetSI-32, 50,000 images, K in 1, 8, 16, 32, timed over
    30 steps, whole test split, probe 1024. On a CPU (minutes, not hours): width 8, a couple of
    steps, the test time scaled from 128 images, probe 128, sharpness for K <= 8 only; the cold
    Lanczos measurement is capped (it only provides the warm start), the warm one is not.
    --quick: 5,000 images and K in 1, 8."""
    gpu = device.type == "cuda"
    n = 5000 if quick else 50000
    width = 32 if gpu else 8
    ks = (1, 8) if quick else (1, 8, 16, 32)
    steps, warmup = (30, 5) if gpu else (1 if not quick else 2, 1)
    test_samples = 100_000 if gpu else 128
    probe = 1024 if gpu else 128
    cold_iters = 20 if gpu else 3
    base = RunConfig(model="convnet_si", width=width, dataset="synthetic", synthetic_samples=n,
                     synthetic_shape=(3, 32, 32), probe_size=probe, device=device.type)
    from .data import load_dataset
    data = load_dataset(base, device)
    tf32 = _tf32_state()
    out = {"model": "convnet_si", "width": width, "train_samples": n, "batch": base.batch,
           "log_every": base.log_every, "probe_size": probe, "steps_timed": steps,
           "steps_per_epoch": data.steps_per_epoch(base.batch),
           "single": _single_figures(base, data, device, steps if gpu else 2, test_samples, True, cold_iters)}
    out["single"]["tf32"] = tf32
    packs = {}
    for k in ks:
        cfgs = [base.replace(elr=10 ** (-4 + 3 * i / max(k - 1, 1))) for i in range(k)]
        packs[str(k)] = _pack_figures(cfgs, data, device, steps, warmup, test_samples, gpu or k <= 8, cold_iters)
    out["packs"] = packs
    if gpu:   # the two knobs a GPU session should settle: TF32 (default on for packs) and channels_last
        cfgs = [base.replace(elr=10 ** (-4 + 3 * i / 7)) for i in range(8)]
        out["variants_k8"] = {
            "fp32_no_tf32": _pack_figures(cfgs, data, device, steps, warmup, test_samples, False, cold_iters,
                                          tf32=False),
            "channels_last": _pack_figures(cfgs, data, device, steps, warmup, test_samples, False, cold_iters,
                                           channels_last=True)}
    out["tf32_packed"] = _tf32_state()
    _restore_tf32(tf32)
    single = out["single"]["model_epochs_per_s"]["standard_metrics"]
    out["speedup_vs_one_after_another"] = {k: p["model_epochs_per_s"]["standard_metrics"] / single
                                           for k, p in packs.items()}
    out["digits_sweep"] = _digits_sweep(device, quick)
    return out


def _tf32_state() -> dict:
    try:
        return {"matmul": torch.backends.cuda.matmul.fp32_precision, "conv": torch.backends.cudnn.conv.fp32_precision}
    except AttributeError:
        return {"matmul": torch.backends.cuda.matmul.allow_tf32, "conv": torch.backends.cudnn.allow_tf32}


def _restore_tf32(state: dict) -> None:
    try:
        torch.backends.cuda.matmul.fp32_precision = state["matmul"]
        torch.backends.cudnn.conv.fp32_precision = state["conv"]
    except AttributeError:
        torch.backends.cuda.matmul.allow_tf32 = state["matmul"]
        torch.backends.cudnn.allow_tf32 = state["conv"]


def _print_packed(p: dict) -> None:
    print(f"\npacked sweeps: {p['model']}-{p['width']}, {p['train_samples']} images, batch {p['batch']}, "
          f"probe {p['probe_size']} (model-epochs/s)")
    print(f"  {'':14} {'plain':>9} {'metrics':>9} {'+sharp/ep':>10} {'sharp extra':>12}")

    def line(name, d):
        e = d["model_epochs_per_s"]
        sharp = f"{e['sharpness_every_epoch']:10.3f}" if e["sharpness_every_epoch"] else f"{'-':>10}"
        extra = (f"{e['sharpness_every_epoch_overhead']:12.1%}" if e["sharpness_every_epoch_overhead"] is not None
                 else f"{'-':>12}")
        print(f"  {name:14} {e['plain']:9.3f} {e['standard_metrics']:9.3f} {sharp} {extra}")

    line("one by one", p["single"])
    for k, d in p["packs"].items():
        line(f"packed K={k}", d)
    for name, d in p.get("variants_k8", {}).items():
        line(f"K=8 {name}"[:14], d)
    s = p["digits_sweep"]
    print(f"  mlp_si digits sweep of {s['K']} x {s['epochs']} epochs: one by one {s['sequential_s']:.2f} s, "
          f"packed {s['packed_s']:.2f} s ({s['speedup']:.2f}x)")


def _main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m engine.bench", description="benchmark sections")
    parser.add_argument("section", choices=["packed"])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
              f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "packed": packed_bench(device, args.quick)}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"device: {result['device']}   torch {result['torch']}   threads {result['threads']}")
        _print_packed(result["packed"])
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
