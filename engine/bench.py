"""`python -m engine bench`: throughput and overhead figures (a benchmark, never a timed test).

Figures:
- digits demo: mlp_si on digits with default metrics, model-epochs per second over a whole run;
- convnet_si on synthetic 50,000 x 3x32x32 on the present device: model-epochs per second from the
  time of a number of steps (a CPU cannot afford whole epochs);
- overheads as a fraction of the plain step time (forward, backward, update and nothing else):
  per-step metrics, log points (norms, test eval) with the in-memory recorder and with the real
  SQLite store, and one sharpness measurement per epoch (cold and warm-started Lanczos);
- packs: model-epochs/s of convnet_si on synthetic 3x32x32 data, one run after another vs K members
  packed (K = 1, 8, 16, 32), plain / with the standard metrics / with sharpness every epoch, and an
  8-member mlp_si digits sweep end to end (the CPU packing policy).
  `python -m engine.bench packed [--json] [--quick] [--device D]` runs this section alone.
- artifacts (`python -m engine.bench artifacts`, a section of its own): the time of one checkpoint
  write, a plain file (torch.save aside, then rename: what spherelab did before storage.artifacts)
  against fsspec's local file system and the artifact store itself (local folder, and S3 through a
  local moto server when moto is installed), alternating on every repeat so all see the same load.
- executors (`python -m engine.bench executors`, a section of its own, needs `pip install spherelab[ray]`):
  one small digits sweep (runs unpacked: one task each) trained by a worker with the local executor,
  then by one with the Ray executor on a local Ray instance (cold: its worker processes start and import
  torch; warm: a second sweep in the same Ray job), side by side: wall time and Ray's overhead per task.
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
import time

import torch

from .config import RunConfig
from .packnet import member_losses
from .runtime import configure_process, resolve_device, set_tf32, tf32_state
from .quantities import Sharpness
from .trainer import MemoryRecorder, Trainer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _plain_step(trainer: Trainer):
    """A bare projected-SGD step on the same network and data: forward, backward, update, nothing else
    (the reference the overheads are fractions of)."""
    trainer.train_step()                     # stacks the pack tensors
    stream, neg_lr, rho0 = trainer.active[0].stream, trainer._neg_lrs(), trainer.update.rho0[:, None]

    def one():
        idx = stream.advance()
        Wg = trainer.W.detach().requires_grad_()
        loss, _ = member_losses(trainer.net(Wg, trainer.data.x_train[idx], stats=trainer._stats()),
                                trainer.data.y_train[idx])
        G, = torch.autograd.grad(loss.sum(), Wg)
        with torch.no_grad():
            trainer.W.addcmul_(G, neg_lr)
            trainer.W.mul_(rho0 / trainer.W.norm(dim=1, keepdim=True))
    return one


def _figures(cfgs: list[RunConfig], data, device, *, steps: int, warmup: int = 3, test_samples: int = 10 ** 9,
             sharp: bool = True, cold_iters: int | None = None, plain: bool = False, **options) -> dict:
    """Seconds per step, per log point (norms and step averages), per test pass (timed on at most
    test_samples images and scaled to the split) and per sharpness measurement (cold, with Lanczos
    capped at cold_iters, then warm) of a pack of len(cfgs) members; with plain, the bare step too."""
    trainer = Trainer(cfgs, data=data, device=device, **options)
    out = {"K": len(cfgs)}
    if plain:
        one = _plain_step(trainer)
        out["plain_step_s"] = _time(lambda: [one() for _ in range(warmup + steps)], device) / (warmup + steps)
    for _ in range(warmup):
        trainer.train_step()
    out["step_s"] = _time(lambda: [trainer.train_step() for _ in range(steps)], device) / steps
    out["log_point_s"] = _time(lambda: trainer.measure(["averages", "norms"]), device)
    rows = torch.arange(len(cfgs), device=device)
    part = min(len(data.y_test), test_samples)
    out["test_eval_s"] = _time(lambda: trainer.evaluate(rows, data.x_test[:part], data.y_test[:part]), device) \
        * len(data.y_test) / part
    if sharp:
        out["sharpness_cold_s"] = _time(lambda: trainer.measure([Sharpness(iters=cold_iters)]), device)
        for _ in range(max(1, steps // 2)):             # move on a little, then warm-start
            trainer.train_step()
        out["sharpness_warm_s"] = _time(lambda: trainer.measure(["sharpness"]), device)
        out["warm_lanczos_matvecs"] = trainer.lanczos_matvecs
    spe = trainer.members[0].steps_per_epoch
    out["model_epochs_per_s"] = _per_epoch(out["step_s"], spe, cfgs[0].log_every, out["log_point_s"],
                                           out["test_eval_s"], out.get("sharpness_warm_s"), len(cfgs))
    trainer = None      # frees the pack's tensors before empty_cache
    if device.type == "cuda":
        out["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return out


def _overheads(cfg: RunConfig, device, steps: int) -> dict:
    """A single run's costs as fractions of its plain step: per-step metrics, default metrics (log
    points and one test pass per epoch), one sharpness measurement per epoch."""
    from .data import load_dataset
    data = load_dataset(cfg, device)
    f = _figures([cfg], data, device, steps=steps, plain=True)
    spe = data.steps_per_epoch(cfg.batch)
    plain, step, per_epoch_plain = f["plain_step_s"], f["step_s"], f["plain_step_s"] * spe
    metrics = (step - plain) * spe + f["log_point_s"] * spe / cfg.log_every + f["test_eval_s"]
    return {"plain_step_s": plain, "trainer_step_s": step, "steps_per_epoch": spe,
            "per_step_metrics_overhead": (step - plain) / plain,
            "default_metrics_overhead": metrics / per_epoch_plain,
            "sharpness_cold_s": f["sharpness_cold_s"], "sharpness_warm_s": f["sharpness_warm_s"],
            "sharpness_every_epoch_overhead": f["sharpness_warm_s"] / per_epoch_plain}


def _store_logging_overhead(cfg: RunConfig) -> dict:
    """Whole-run time with the in-memory recorder versus the SQLite store (batched writer)."""
    from storage import Store
    from .runner import StoreRecorder

    def run(recorder) -> float:
        trainer = Trainer(cfg, recorders=[recorder])
        start = time.perf_counter()
        trainer.run()
        if hasattr(recorder, "close"):
            recorder.close()
        return time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(os.path.join(tmp, "bench.db"))
        run_id = store.create_run(cfg.to_dict(), name="bench", status="running")
        memory = min(run(MemoryRecorder()) for _ in range(3))
        stored = min(run(StoreRecorder(store, run_id)) for _ in range(3))
        rows = len(store.read_metrics(run_id))
        store.close()
    return {"memory_run_s": memory, "store_run_s": stored, "store_logging_overhead": (stored - memory) / memory,
            "log_points": rows}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def run_bench(args) -> int:
    device = resolve_device(args.device)
    quick = args.quick
    result = {"device": _device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "mlp_threads": 1}
    threads = torch.get_num_threads()
    demo = RunConfig(elr=0.01, epochs=5 if quick else 30, device=str(device.type))
    configure_process(device, demo.model)
    wall = _time(Trainer(demo).run, device)
    result["digits_demo"] = {"epochs": demo.epochs, "seconds": wall, "model_epochs_per_s": demo.epochs / wall,
                             **_overheads(demo, device, 50), "store": _store_logging_overhead(demo)}
    configure_process(device, "convnet_si", threads)

    n = 5000 if quick else 50000
    conv = RunConfig(model="convnet_si", dataset="synthetic", synthetic_samples=n, synthetic_shape=(3, 32, 32),
                     probe_size=256 if device.type == "cpu" else 1024, log_every=50, device=str(device.type))
    over = _overheads(conv, device, 5 if device.type == "cpu" else 100)
    result["convnet_si_synthetic"] = {"train_samples": n, "probe_size": conv.probe_size,
                                      "model_epochs_per_s": 1.0 / (over["trainer_step_s"] * (n // 128)), **over}
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
    _print_packed(r["packed"])


# ---- packs -----------------------------------------------------------------------------------------

def _per_epoch(step_s: float, spe: int, log_every: int, log_s: float, test_s: float, sharp_s: float | None,
               members: int) -> dict:
    """model-epochs/s of `members` models from the measured parts of one epoch."""
    train = step_s * spe
    metrics = log_s * spe / log_every + test_s
    return {"plain": members / train, "standard_metrics": members / (train + metrics),
            "sharpness_every_epoch": members / (train + metrics + sharp_s) if sharp_s is not None else None,
            "sharpness_every_epoch_overhead": sharp_s / (train + metrics) if sharp_s is not None else None}


def _digits_sweep(device, quick: bool) -> dict:
    """An 8-member mlp_si digits ELR sweep end to end with the default metrics: one after another
    vs one pack. This is the measurement behind the CPU packing policy."""
    from .data import load_dataset
    k, epochs = 8, 3 if quick else 10
    cfgs = [RunConfig(elr=10 ** (-3 + 2 * i / (k - 1)), epochs=epochs, device=device.type) for i in range(k)]
    threads = torch.get_num_threads()
    configure_process(device, "mlp_si")
    data = load_dataset(cfgs[0], device)
    Trainer(cfgs[0].replace(epochs=1), data=data, device=device).run()          # warm-up
    sequential = _time(lambda: [Trainer(c, data=data, device=device).run() for c in cfgs], device)
    packed = _time(lambda: Trainer(cfgs, data=data, device=device).run(), device)
    torch.set_num_threads(threads)
    return {"K": k, "epochs": epochs, "threads": 1 if device.type == "cpu" else threads,
            "sequential_s": sequential, "packed_s": packed,
            "sequential_model_epochs_per_s": k * epochs / sequential, "packed_model_epochs_per_s": k * epochs / packed,
            "speedup": sequential / packed}


def packed_bench(device: torch.device, quick: bool = False) -> dict:
    """Pack throughput. On CUDA: ConvNetSI-32, 50,000 images, K in 1, 8, 16, 32, timed over 30 steps,
    whole test split, probe 1024, TF32 on and off, channels_last. On a CPU (minutes, not hours):
    width 8, a couple of steps, the test time scaled from 128 images, probe 128, sharpness for K <= 8
    only; the cold Lanczos measurement is capped (it only provides the warm start), the warm one is not.
    --quick: 5,000 images and K in 1, 8."""
    from .data import load_dataset
    gpu = device.type == "cuda"
    n = 5000 if quick else 50000
    width = 32 if gpu else 8
    ks = (1, 8) if quick else (1, 8, 16, 32)
    steps, warmup = (30, 5) if gpu else (2, 1)
    test_samples, cold_iters = (100_000, 20) if gpu else (128, 3)
    base = RunConfig(model="convnet_si", width=width, dataset="synthetic", synthetic_samples=n,
                     synthetic_shape=(3, 32, 32), probe_size=1024 if gpu else 128, device=device.type)
    data = load_dataset(base, device)
    tf32 = tf32_state()
    if gpu:
        configure_process(device, base.model)
    out = {"model": "convnet_si", "width": width, "train_samples": n, "batch": base.batch, "log_every": base.log_every,
           "probe_size": base.probe_size, "steps_timed": steps, "steps_per_epoch": data.steps_per_epoch(base.batch),
           "tf32": tf32_state(), "packs": {}}
    for k in ks:
        cfgs = [base.replace(elr=10 ** (-4 + 3 * i / max(k - 1, 1))) for i in range(k)]
        out["packs"][str(k)] = _figures(cfgs, data, device, steps=steps, warmup=warmup, test_samples=test_samples,
                                        sharp=gpu or k <= 8, cold_iters=cold_iters)
    if gpu:   # the two knobs a GPU session should settle: TF32 (default on) and channels_last
        cfgs = [base.replace(elr=10 ** (-4 + 3 * i / 7)) for i in range(8)]
        timing = dict(steps=steps, warmup=warmup, test_samples=test_samples, sharp=False)
        set_tf32(False)
        ieee = _figures(cfgs, data, device, **timing)
        set_tf32(True)
        out["variants_k8"] = {"fp32_no_tf32": ieee, "channels_last": _figures(cfgs, data, device, channels_last=True,
                                                                              **timing)}
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = tf32["matmul"], tf32["conv"]
    one = out["packs"]["1"]["model_epochs_per_s"]["standard_metrics"]
    out["speedup_vs_one_after_another"] = {k: p["model_epochs_per_s"]["standard_metrics"] / one
                                           for k, p in out["packs"].items()}
    out["digits_sweep"] = _digits_sweep(device, quick)
    return out


def _print_packed(p: dict) -> None:
    print(f"\npacks: {p['model']}-{p['width']}, {p['train_samples']} images, batch {p['batch']}, "
          f"probe {p['probe_size']} (model-epochs/s)")
    print(f"  {'':14} {'plain':>9} {'metrics':>9} {'+sharp/ep':>10} {'sharp extra':>12}")
    rows = [(f"K={k}", d) for k, d in p["packs"].items()] + [(f"K=8 {n}"[:14], d)
                                                              for n, d in p.get("variants_k8", {}).items()]
    for name, d in rows:
        e = d["model_epochs_per_s"]
        sharp = f"{e['sharpness_every_epoch']:10.3f}" if e["sharpness_every_epoch"] else f"{'-':>10}"
        extra = (f"{e['sharpness_every_epoch_overhead']:12.1%}" if e["sharpness_every_epoch_overhead"] is not None
                 else f"{'-':>12}")
        print(f"  {name:14} {e['plain']:9.3f} {e['standard_metrics']:9.3f} {sharp} {extra}")
    s = p["digits_sweep"]
    print(f"  mlp_si digits sweep of {s['K']} x {s['epochs']} epochs: one by one {s['sequential_s']:.2f} s, "
          f"packed {s['packed_s']:.2f} s ({s['speedup']:.2f}x)")


# ---- checkpoint writes ---------------------------------------------------------------------------

def artifacts_bench(quick: bool = False) -> dict:
    """Seconds per checkpoint write (min and median over repeats) of a digits mlp_si member and a
    convnet_si-32 member: plain files, fsspec local, the artifact store (local; S3 on a local moto
    server if moto is installed)."""
    import statistics
    import uuid

    import fsspec

    from storage.artifacts import Artifacts
    repeats = 3 if quick else 15
    members = {"mlp_si digits": RunConfig(device="cpu"),
               "convnet_si-32": RunConfig(model="convnet_si", dataset="synthetic", synthetic_samples=256,
                                          synthetic_shape=(3, 32, 32), device="cpu")}
    server = endpoint = None
    try:
        from moto.server import ThreadedMotoServer
        import socket
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        endpoint = f"http://127.0.0.1:{port}"
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                          AWS_ENDPOINT_URL=endpoint)
        fsspec.filesystem("s3", skip_instance_cache=True).mkdir("bench")
    except ImportError:
        pass
    out = {"repeats": repeats, "s3": "local moto server (loopback HTTP)" if endpoint else "not measured: no moto"}
    try:
        with tempfile.TemporaryDirectory() as folder:
            local = Artifacts(os.path.join(folder, "store"))
            fs = fsspec.filesystem("file")
            s3 = Artifacts("s3://bench/spherelab") if endpoint else None
            for name, cfg in members.items():
                state = Trainer([cfg]).members[0].state_dict()

                def plain():
                    final = os.path.join(folder, "plain.pt")
                    tmp = f"{final}.{uuid.uuid4().hex[:8]}.tmp"
                    torch.save(state, tmp)
                    os.replace(tmp, final)

                def fsspec_local():
                    final = os.path.join(folder, "fsspec.pt")
                    tmp = f"{final}.{uuid.uuid4().hex[:8]}.tmp"
                    with fs.open(tmp, "wb") as f:
                        torch.save(state, f)
                    fs.mv(tmp, final)

                key, save = "runs/1/resume-bench.pt", lambda target: torch.save(state, target)
                ways = {"plain_file": plain, "fsspec_local": fsspec_local,
                        "artifacts_local": lambda: local.write(key, save)}
                if s3 is not None:
                    ways["artifacts_s3"] = lambda: s3.write(key, save)
                times = {way: [] for way in ways}
                for _ in range(repeats):
                    for way, write in ways.items():
                        start = time.perf_counter()
                        write()
                        times[way].append(time.perf_counter() - start)
                out[name] = {"bytes": local.size(key),
                             **{way: {"min_s": min(t), "median_s": statistics.median(t)} for way, t in times.items()}}
    finally:
        if server is not None:
            server.stop()
    return out


def _print_artifacts(a: dict) -> None:
    print(f"checkpoint writes ({a['repeats']} repeats, alternating; S3: {a['s3']}): min / median ms")
    for name, row in a.items():
        if not isinstance(row, dict):
            continue
        ways = "   ".join(f"{way} {t['min_s'] * 1e3:.2f} / {t['median_s'] * 1e3:.2f}" for way, t in row.items()
                          if isinstance(t, dict))
        print(f"  {name:14} {row['bytes']:>10,} B   {ways}")


# ---- executors: local processes vs Ray tasks ------------------------------------------------------

def executors_bench(quick: bool = False) -> dict:
    """Wall seconds of one digits sweep (SPHERELAB_PACK=0: one process or task per run, 2 at once) under
    the local executor and under the Ray executor on a local 2-CPU Ray instance (its start timed apart;
    the sweep cold, then again warm), on a fresh SQLite store each."""
    import signal

    import ray

    from storage import Store

    from .ray_executor import RayExecutor
    from .submission import queue_runs
    from .worker import Worker
    runs, epochs, parallel = (4, 2, 2) if quick else (8, 5, 2)
    cfgs = [RunConfig(elr=0.002 * 2 ** i, epochs=epochs, width=16, log_every=10) for i in range(runs)]
    saved = {key: os.environ.get(key) for key in ("SPHERELAB_PACK", "SPHERELAB_ARTIFACTS")}
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    os.environ["SPHERELAB_PACK"] = "0"
    os.environ.pop("SPHERELAB_ARTIFACTS", None)
    out = {"runs": runs, "epochs": epochs, "parallel": parallel, "tasks": runs, "model": "mlp_si-16 digits"}
    try:
        with tempfile.TemporaryDirectory() as folder:
            def sweep(name: str, executor=None) -> float:
                """The sweep's wall seconds; records the overhead per task: the slots' time (wall x
                parallel) not spent training (each run's own wall time, from its trace), per run."""
                url = f"sqlite:///{os.path.join(folder, name + '.db')}"
                store = Store(url)
                queue_runs(store, cfgs)
                worker = Worker(url, max_parallel=parallel, poll_s=0.1, exit_when_idle=True,
                                executor=executor(url) if executor else None)
                start = time.perf_counter()
                worker.run()
                wall = time.perf_counter() - start
                runs_done = store.list_runs()
                assert all(r.status == "finished" for r in runs_done), name
                trained = sum(float(store.read_metrics(r.id, ["train_loss"])["wall_time"].max()) for r in runs_done)
                out[f"{name.replace('-', '_')}_overhead_per_task_s"] = (wall * parallel - trained) / runs
                return wall

            out["local_s"] = sweep("local")
            start = time.perf_counter()
            ray.init(num_cpus=parallel, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
            out["ray_start_s"] = time.perf_counter() - start
            try:
                executor = lambda url: RayExecutor(url, max_parallel=parallel)   # noqa: E731
                out["ray_cold_s"] = sweep("ray-cold", executor)
                out["ray_warm_s"] = sweep("ray-warm", executor)
            finally:
                ray.shutdown()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return out


def _print_executors(e: dict) -> None:
    print(f"one sweep of {e['runs']} {e['model']} runs x {e['epochs']} epochs, one process/task per run, "
          f"{e['parallel']} at once")
    print("  (overhead per task: the slots' time, wall x parallel, not spent training, per run)")
    print(f"  local processes  {e['local_s']:7.2f} s   overhead {e['local_overhead_per_task_s']:.2f} s per task")
    print(f"  Ray start        {e['ray_start_s']:7.2f} s   (a local instance, once)")
    for kind in ("cold", "warm"):
        print(f"  Ray tasks {kind:5}  {e[f'ray_{kind}_s']:7.2f} s   overhead "
              f"{e[f'ray_{kind}_overhead_per_task_s']:.2f} s per task")


def _main(argv=None) -> int:
    import argparse
    sections = {   # section: (its measurement, how it prints); packed runs on --device, the others on the CPU
        "packed": (lambda args, device: packed_bench(device, args.quick), _print_packed),
        "artifacts": (lambda args, device: artifacts_bench(args.quick), _print_artifacts),
        "executors": (lambda args, device: executors_bench(args.quick), _print_executors),
    }
    parser = argparse.ArgumentParser(prog="python -m engine.bench", description="benchmark sections")
    parser.add_argument("section", choices=list(sections))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    device = resolve_device(args.device) if args.section == "packed" else torch.device("cpu")
    measure, show = sections[args.section]
    result = {"device": _device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
              args.section: measure(args, device)}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"device: {result['device']}   torch {result['torch']}   threads {result['threads']}")
        show(result[args.section])
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
