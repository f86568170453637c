"""One function per CLI command (registered by engine/cli.py). Each validates everything before it
writes anything. Torch is imported only by the commands that train or read checkpoints, so `--help`
and bad input answer at once."""
from __future__ import annotations

import json
import math
import os
import socket
import sys
import uuid

from storage import LIVE_STATUSES, Store, write_atomically
from storage.records import solution_text

from . import registry, shutdown
from .config import ConfigError, RunConfig, configs_from_flags, parse_values
from .submission import queue_average, queue_fork, queue_geometry, queue_runs


OUT_FIX = "choose a writable --out path"
STUDY_STALE_AFTER_S = 30.0     # a study's run or job whose heartbeat is this old was left by a dead process (the
                               # worker's default --stale-after)


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, allow_nan=False, default=str))


def _progress(desc: str):
    """A progress bar on stderr (the run id stays the last line of stdout) whenever stderr is a terminal."""
    from tqdm import tqdm
    return tqdm(total=None, desc=desc, unit="step", file=sys.stderr, leave=True,
                disable=not sys.stderr.isatty(), dynamic_ncols=True)


def _check_runnable(configs: list[RunConfig]) -> None:
    """Fail on bad data or device before a row is written (a missing CIFAR folder, no GPU)."""
    from .data import load_dataset
    from .models import build_model
    from .runtime import resolve_device
    checked = set()
    for cfg in configs:
        key = (cfg.dataset, cfg.data_dir, cfg.synthetic_samples, tuple(cfg.synthetic_shape),
               cfg.synthetic_classes, cfg.device)
        if key in checked:
            continue
        checked.add(key)
        data = load_dataset(cfg, "cpu")      # also checks the batch size against the data
        resolve_device(cfg.device)
        build_model(cfg, data.input_shape, data.num_classes)


def cmd_train(args) -> int:
    configs, _ = configs_from_flags(vars(args), single=True)
    _check_runnable(configs)
    store, claimer = _training_store(args), _claimer()
    return _run_here(store, queue_runs(store, configs, reserve_for=claimer), claimer)


def cmd_sweep(args) -> int:
    configs, swept = configs_from_flags(vars(args), single=False)
    _check_runnable(configs)
    store, claimer = _training_store(args), _claimer()
    return _run_here(store, queue_runs(store, configs, swept, args.sweep_name, reserve_for=claimer), claimer)


def _training_store(args) -> Store:
    """The store, refused (one line, how to set it) before anything is queued when it has no artifact
    root for checkpoints (a PostgreSQL store without --artifacts/$SPHERELAB_ARTIFACTS)."""
    store = Store(args.db)
    store.artifacts
    return store


def _claimer() -> str:
    """The claimer id of this CLI process: its runs are reserved for it, so a live worker never takes them."""
    return f"cli-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _run_here(store: Store, ids: list[int], claimer: str) -> int:
    """Train runs reserved for this process, here, and print their ids; whatever it never started
    (Ctrl-C, an error) is cancelled, not left for a worker."""
    shutdown.stop_on_ctrl_c()
    try:
        statuses = _train_here(store, ids, claimer, report=True)
    finally:
        store.cancel_reserved(claimer, "the command that created it stopped before training it")
    return 1 if "failed" in statuses.values() else 0


def _train_here(store: Store, ids: list[int], claimer: str, report: bool = False) -> dict[int, str]:
    """Train the runs (queued ones reserved for claimer, or interrupted ones to resume) in this process:
    packs claimed as the worker claims them (packing.claim_pack: compatible runs together where packing
    pays on this device), one after another; returns their final statuses. With report, each run's end
    goes to stderr and its id to stdout."""
    from .packing import claim_pack
    from .runner import execute
    from .runtime import configure_process, resolve_device
    statuses: dict[int, str] = {}
    left = list(ids)
    while left:
        shutdown.raise_if_requested()
        claimed = claim_pack(store, claimer, run_ids=left, spread=False)
        if not claimed:
            break
        left = [i for i in left if i not in {info.id for info in claimed}]     # each run is tried once
        cfg = RunConfig.from_dict(claimed[0].config)
        configure_process(resolve_device(cfg.device), cfg.model)
        label = claimed[0].name + (f" (+{len(claimed) - 1} packed)" if len(claimed) > 1 else "")
        try:
            with _progress(label) as bar:
                statuses.update(execute(store, {info.id: info.claim for info in claimed}, progress=bar))
            shutdown.raise_if_requested()  # the first Ctrl-C stopped the runs in order: end the command here
        except KeyboardInterrupt:      # also before training began: resumable, not left "running"
            for info in claimed:
                if store.get_run(info.id).status in LIVE_STATUSES:
                    store.set_status(info.id, "interrupted")
            raise
        if report:
            for info in claimed:
                final = store.get_run(info.id)
                print(f"run {info.id} {final.name}: {final.status}, regime {final.regime}", file=sys.stderr)
                print(info.id)
    return statuses


def cmd_submit(args) -> int:
    configs, swept = configs_from_flags(vars(args), single=False)
    _check_runnable(configs)
    for run_id in queue_runs(Store(args.db), configs, swept, args.sweep_name):
        print(run_id)
    return 0


def cmd_fork(args) -> int:
    store = Store(args.db)
    changes = {k: getattr(args, k) for k in ("elr", "lr", "wd", "momentum", "mode", "schedule", "seed")}
    claimer = None if args.submit else _claimer()
    child = queue_fork(store, args.run, at=args.at, changes=changes, epochs=args.epochs, name=args.name,
                       tags=args.tags, reserve_for=claimer)
    if args.submit:
        print(child)
        return 0
    return _run_here(store, [child], claimer)


def cmd_checkpoints(args) -> int:
    kept = Store(args.db).checkpoints(args.run)
    if args.json:
        print_json([{"epoch": c.epoch, "step": c.step, "bytes": c.bytes} for c in kept])
        return 0
    print(f"{'epoch':>6} {'step':>8} {'bytes':>12}")
    for c in kept:
        print(f"{c.epoch:>6} {c.step:>8} {c.bytes:>12}")
    return 0


def cmd_average(args) -> int:
    store, claimer = Store(args.db), None if args.submit else _claimer()
    job_id = queue_average(store, args.run, last=args.last, at=args.at, reserve_for=claimer)
    return _job_here(store, job_id, claimer, args)


def cmd_geometry(args) -> int:
    store, claimer = Store(args.db), None if args.submit else _claimer()
    job_id = queue_geometry(store, args.a, args.b, args.points, reserve_for=claimer)
    return _job_here(store, job_id, claimer, args)


def _job_here(store: Store, job_id: int, claimer: str | None, args) -> int:
    """Compute a job reserved for this process (or, with --submit, leave it to the worker), store and
    print it."""
    if args.submit:
        print(job_id)
        return 0
    from .jobs import execute_job
    job = store.claim_job(claimer, job_ids=[job_id])
    status = execute_job(store, job_id, job.claim)
    job = store.get_job(job_id)
    if status != "finished":
        print(f"python -m engine {job.kind}: failed: {(job.error or '').splitlines()[0]}", file=sys.stderr)
        return 1
    if args.json:
        print_json(job.result)
    else:
        _print_job(job)
    return 0


def _print_job(job) -> None:
    r = job.result
    if job.kind == "average":
        print(f"run {r['run']}, average of epochs {', '.join(map(str, r['epochs']))}")
        print(f"  train loss {r['train_loss']:.4g}, accuracy {r['train_acc']:.4f}")
        print(f"  test  loss {r['test_loss']:.4g}, accuracy {r['test_acc']:.4f}")
        return
    a, b = r["a"], r["b"]
    ends = [solution_text(end, f"run {end['run']}") for end in (a, b)]
    print(f"{ends[0]} to {ends[1]}: angle {r['angle']:.4g} rad")
    print("  barriers: " + ", ".join(f"{k} {v:.4g}" for k, v in r["barrier"].items()))
    print(f"  {'alpha':>6} {'train_loss':>11} {'train_err':>10} {'test_loss':>10} {'test_err':>9}")
    for i, alpha in enumerate(r["alphas"]):
        print(f"  {alpha:6.3f} {r['train_loss'][i]:11.4g} {r['train_err'][i]:10.4f} {r['test_loss'][i]:10.4g} "
              f"{r['test_err'][i]:9.4f}")


def cmd_study(args) -> int:
    """Create (or, with --resume, take up again) a learning-rate study and run it here, or leave it to
    the workers (--submit); prints the study id last. Bad input is refused before the store is opened
    (nothing written, not even an empty database file). Exit 1 when the study ended with failures."""
    from . import study
    claimer = None if args.submit else _claimer()
    if args.resume is not None:
        _refuse_flags_on_resume(args)
        store = Store(args.db)
        study_id = store.get_study(args.resume).id
        runs, jobs = store.retry_study(study_id)
        if runs or jobs:
            print(f"study {study_id}: retrying {runs} failed or cancelled run(s) and {jobs} failed job(s)",
                  file=sys.stderr)
        store.hand_over_study(study_id, claimer)
    else:
        flags = {**vars(args), "elr": None, "seed": None, "epochs": args.pretrain_epochs,
                 "data_seed": (args.data_seed or [RunConfig.data_seed])[0], "validation": True}   # what it selects on
        [base], _ = configs_from_flags(flags, single=True)
        pretrain = [v for text in args.pretrain_elr for v in parse_values(text)]
        finetune = [v for text in args.finetune_elr for v in parse_values(text)]
        store = None

        def open_store():
            nonlocal store
            store = Store(args.db)
            return store

        study_id = study.create_study(open_store, base, pretrain_elrs=pretrain, pretrain_epochs=args.pretrain_epochs,
                                      finetune_elrs=finetune, finetune_epochs=args.finetune_epochs,
                                      average=args.average, seeds=args.seed or [0], data_seeds=args.data_seed,
                                      refine=args.refine, points=args.points, name=args.name, reserve_for=claimer)
    if not args.submit:
        _study_here(store, study_id, claimer)
        failed = study.failures(store, study_id)
        if failed:
            print(f"study {study_id} failed: {len(failed)} run(s) or job(s) it needs did not finish "
                  f"(`python -m engine study --resume {study_id}` retries them):", file=sys.stderr)
            for line in failed:
                print(f"  {line}", file=sys.stderr)
            print(study_id)
            return 1
    print(study_id)
    return 0


def _refuse_flags_on_resume(args) -> None:
    """--resume takes up a study as it was made: any other study or training flag would be ignored, so
    it is refused instead."""
    ignored = [key for key, value in vars(args).items()
               if key not in ("db", "resume", "submit", "handler", "flag_default", "command")
               and value != args.flag_default(key)]
    if ignored:
        flag = "--" + ignored[0].replace("_", "-")
        raise ConfigError(f"{flag} cannot change a study being resumed (--resume takes it up as it was made): "
                          f"drop {flag}, or start a new study without --resume")


def _study_here(store: Store, study_id: int, claimer: str) -> None:
    """Advance the study and do its work in this process until it ends: its runs (packed where packing
    pays), then the averages and geometries they allow. Ctrl-C leaves it resumable (--resume): runs stop
    at their next step, a job in progress finishes first (a second Ctrl-C stops it at once)."""
    import time
    from . import study
    from .jobs import execute_job
    shutdown.stop_on_ctrl_c()
    while not study.advance(store, study_id, reserve_for=claimer):
        shutdown.raise_if_requested()
        waiting = [r.id for r in store.list_runs(study_id=study_id, status=["queued", "interrupted"])]
        _train_here(store, sorted(waiting), claimer)
        done = 0
        # every job queued now, before advancing again (advancing reads the whole study: once per job
        # made a study of hundreds of jobs spend its time there)
        for queued in sorted(j.id for j in store.list_jobs(study_id=study_id, status="queued")):
            job = store.claim_job(claimer, job_ids=[queued])
            if job is not None:
                try:
                    execute_job(store, job.id, job.claim)
                except KeyboardInterrupt:       # a second Ctrl-C mid-job: queued again, for --resume to compute whole
                    store.requeue_job(job.id, claim=job.claim)
                    raise
                done += 1
                shutdown.raise_if_requested()   # the first Ctrl-C: stop between jobs
        if not done and not waiting:
            # what is left is held by another process (a worker resuming a run), or by one that died
            # holding it (killed mid-job): its heartbeat stops, and as a worker would, this process
            # queues such pieces again and takes them up
            store.requeue_stale(STUDY_STALE_AFTER_S, except_worker=claimer)
            store.requeue_stale_jobs(STUDY_STALE_AFTER_S)
            time.sleep(0.5)


def cmd_report(args) -> int:
    from .study import report
    result = report(Store(args.db), args.study)
    if args.json:
        print_json(result)
        return 0
    _print_report(result)
    return 0


def _print_report(r: dict) -> None:
    spec = r["spec"]
    fmt = lambda s: "-" if not s else f"{s['mean']:.3f}" + (f"±{s['std']:.3f}" if s["n"] > 1 else "")  # noqa: E731
    data_seeds = spec.get("data_seeds") or [spec["base"].get("data_seed", 0)]
    print(f"study {r['study']} {r['name']} ({r['status']}): seeds {', '.join(map(str, spec['seeds']))}, data seeds "
          f"{', '.join(map(str, data_seeds))}; options chosen on {r['selection']} accuracy, accuracies below are test")
    flrs = [f"{f:g}" for f in spec["finetune_elrs"]]
    print(f"{'PLR':>9} {'regime':<20} {'sub':<7} {'pretrain':>12} " + " ".join(f"{'FLR ' + f:>12}" for f in flrs)
          + f" {'average':>12} {'chosen (val -> test)':>30} {'angle':>6} {'err bar':>7} {'loss bar':>8}")
    for row in r["rows"]:
        # the largest pair-mean angle and barriers over the row's solution pairs
        largest = lambda key: max((g[key]["mean"] for g in row["geometry"] if g.get(key)), default=None)  # noqa: E731
        angle, loss = largest("angle"), largest("barrier_train_loss")
        err = largest("barrier_val_err") if r["selection"] == "validation" else largest("barrier_test_err")
        agree, n = row["regime_agreement"]
        regime = (row["regime"] or ("runs split" if agree else "-")) + (f" {agree}/{n}" if agree < n else "")
        votes = row.get("subregime_votes") or {}
        sub = row["subregime"] or ("/".join(f"{v}{k}" for k, v in votes.items()) if votes else "-")
        chosen = row.get("chosen")
        choice = (f"{chosen['kind']} {chosen['val_acc']['mean']:.3f} -> {chosen['test_acc']['mean']:.3f}"
                  if chosen else "-")
        print(f"{row['pretrain_elr']:>9.3g}{'*' if row.get('refined') else ' '}{regime:<20} {sub:<7} "
              f"{fmt(row['pretrain_test_acc']):>12} "
              + " ".join(f"{fmt(row['finetune_test_acc'][f]):>12}" for f in flrs)
              + f" {fmt(row['average_test_acc']):>12} {choice:>30} "
              + (f"{angle:6.3f} {err:7.4f} {loss:8.4f}" if angle is not None and err is not None else ""))
    if r.get("refined_elrs"):
        print("* refined around the estimated convergence threshold")
    b = r["boundaries"]
    print("boundaries: " + ", ".join(f"{k} {v:.3g}" if v else f"{k} -" for k, v in b.items()))
    sub = r["thresholds"]["2A_2B"]
    if sub["n"]:
        low, high = sub["ci95"]
        print(f"2A/2B boundary over {sub['n']} of {sub['pairs_with_subregime']} pairs: {sub['estimate']:.3g} "
              f"(95% interval {low:.3g} to {high:.3g})" + ("" if sub["determined"] else ": not determined, pairs disagree"))
    for label, best in (("best", r["best"]), ("best of the converged runs", r["best_converged"])):
        if best:
            ratio = best["ratio_to_convergence_threshold"]
            print(f"{label}: {best['kind']} from PLR {best['pretrain_elr']:g}: {r['selection']} accuracy "
                  f"{fmt(best['val_acc'])}, test accuracy {fmt(best['test_acc'])}"
                  + (f" ({ratio:.2g}x the convergence threshold)" if ratio else ""))
    print(_verdict_line(r))
    for line in r.get("failures") or ():
        print(f"failed: {line}")


def _verdict_line(r: dict) -> str:
    """The paired comparison in one sentence (the dashboard's Study page says the same)."""
    gain = r["gain"]
    if not gain:
        return ("paired comparison: no (data seed, seed) pair has both a 2A option and a converged one, "
                "so there is nothing to compare")
    low, high = gain["ci95"]
    head = (f"paired gain of the best 2A option over the best converged one, over {gain['n']} (data seed, seed) "
            f"pairs: mean {gain['mean']:+.4f} (95% interval {low:+.4f} to {high:+.4f}), "
            f"{gain['fraction_positive']:.0%} of pairs gain")
    return head + {"win": ": 2A wins", "loss": ": 2A loses",
                   "not separated": ": not separated"}[r["verdict"]]


def cmd_worker(args) -> int:
    from .executors import LocalExecutor
    from .worker import Worker
    if args.max_parallel is not None and args.max_parallel < 1:
        raise ConfigError(f"--max-parallel must be at least 1, got {args.max_parallel}")
    if args.executor == "ray":
        from .ray_executor import check_available
        check_available()           # one line naming the extra to install, before the store is opened
    elif args.ray_address is not None:
        raise ConfigError("--ray-address is for --executor ray: add --executor ray, or leave --ray-address out")
    if args.device == "cuda" and args.executor == "local":
        # the only choice that can be refused here; otherwise the worker process stays torch-free
        # (its run processes import torch): it starts in a second less, and the app with it.
        # (On a Ray cluster the GPUs are the nodes', not this machine's: Ray places the packs on them.)
        from .runtime import resolve_device
        resolve_device(args.device)
    url = _training_store(args).url
    if args.executor == "ray":      # the choice lives here: executors is what ray_executor builds on
        from .ray_executor import RayExecutor
        executor = RayExecutor(url, device=args.device, max_parallel=args.max_parallel,
                               address=args.ray_address or "auto")
    else:
        executor = LocalExecutor(url, args.device, args.max_parallel)
    return Worker(url, device=args.device, poll_s=args.poll, stale_after_s=args.stale_after,
                  exit_when_idle=args.once, executor=executor).run()


def cmd_app(args) -> int:
    from .app import main as app      # torch-free: it only starts the worker and the dashboard
    return app(args)


def cmd_runs(args) -> int:
    store = Store(args.db)
    runs = store.list_runs(status=args.status, sweep_id=args.sweep, tag=args.tag)
    if args.json:
        print_json([{"id": r.id, "name": r.name, "status": r.status, "regime": r.regime,
                     "progress": round(r.progress, 4), "sweep": r.sweep_id, "tags": r.tags,
                     "parent": r.parent_id, "fork_epoch": r.fork_epoch} for r in runs])
        return 0
    print(f"{'id':>5}  {'status':<11} {'regime':<19} {'progress':>8}  name [tags]")
    for r in runs:
        tags = f"  [{', '.join(r.tags)}]" if r.tags else ""
        print(f"{r.id:>5}  {r.status:<11} {r.regime or '-':<19} {r.progress:>7.0%}  {r.name}{tags}")
    return 0


def cmd_cancel(args) -> int:
    Store(args.db).cancel(args.run)
    return 0


def cmd_delete(args) -> int:
    Store(args.db).delete(args.run, with_children=args.with_children)       # with its checkpoint files
    return 0


def cmd_resume(args) -> int:
    run = Store(args.db).resume_run(args.run)
    print(f"run {run.id} is {run.status} again: a worker takes it up from its checkpoint")
    return 0


def cmd_gc(args) -> int:
    """Artifacts no run references (checkpoints of deleted runs, writes that crashed): listed, or removed
    with --delete. Files younger than GC_GRACE_S are left alone (a checkpoint is written just before
    the row that records it)."""
    found = Store(args.db).collect_garbage(delete=args.delete)
    for key, size in found:
        print(f"{size:>12,}  {key}")
    total = sum(size for _, size in found)
    verb = "removed" if args.delete else "unreferenced (dry run: --delete removes them)"
    print(f"{len(found)} artifact(s), {total:,} bytes, {verb}")
    return 0


def cmd_tag(args) -> int:
    Store(args.db).add_tags(args.run, args.tags)
    return 0


def cmd_export(args) -> int:
    """One row per log point: step, epoch, wall_time, then the metric keys in registry order. CSV
    writes nan/inf/-inf; JSON writes null for them (it has no such numbers)."""
    store = Store(args.db)
    store.get_run(args.run)
    frame = store.read_metrics(args.run)
    frame = frame[[*registry.INDEX_COLUMNS, *registry.order(c for c in frame.columns
                                                            if c not in registry.INDEX_COLUMNS)]]
    if args.format == "csv":
        text = frame.to_csv(index=False, na_rep="nan", lineterminator="\n")
    else:
        rows = [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
                for row in frame.to_dict("records")]
        text = json.dumps(rows, allow_nan=False) + "\n"
    if args.out:
        write_atomically(args.out, lambda tmp: tmp.write_text(text), what="the export", fix=OUT_FIX)
    else:
        sys.stdout.write(text)
    return 0


def cmd_analyze(args) -> int:
    from .analysis import analyze_stored
    store = Store(args.db)
    print_json(analyze_stored(store, store.get_run(args.run).id))
    return 0


def cmd_bundle(args) -> int:
    store = Store(args.db)
    if (args.run is None) == (args.sweep is None):
        raise ConfigError("bundle takes a run id or --sweep S (one of them): e.g. `bundle 3 --out run3.zip`")
    if args.sweep is not None:
        ids = store.get_sweep(args.sweep).run_ids
    else:
        ids = [store.get_run(args.run).id]
    store.export_bundle(ids, args.out, sweep_id=args.sweep, with_checkpoints=args.with_checkpoints)
    print(args.out)
    return 0


def check_imported_config(config: dict) -> None:
    """An imported run's config passes the rules `train` applies (the Run page reads every field)."""
    RunConfig.from_dict(config)


def imported_checkpoint_limit(config: dict) -> int:
    """The most bytes a checkpoint of this config's model can take: the weights, their start copy,
    averages, momentum and the sharpness vector (at most 8 float32 copies), and 1 MiB for the rest."""
    return 32 * RunConfig.from_dict(config).parameter_count + (1 << 20)


# what each dataset feeds the model, known without reading it (a colleague may not have the CIFAR folder)
_SHAPES = {"digits": ((64,), 10), "ticks": ((32,), 2), "cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100)}


def check_imported_checkpoint(config: dict, source) -> None:
    """A bundled checkpoint (a file path or a buffer) holds the weights of its run's model (model, width,
    depth, data shape), and the safe loader reads it."""
    import torch
    from .models import build_model
    from .runner import _load_reason
    cfg = RunConfig.from_dict(config)
    shape, classes = _SHAPES.get(cfg.dataset, (tuple(cfg.synthetic_shape), cfg.synthetic_classes))
    expected = {k: tuple(v.shape) for k, v in build_model(cfg, shape, classes).state_dict().items()}
    try:
        state = torch.load(source, map_location=torch.device("cpu"), weights_only=True)
    except Exception as exc:      # truncated, damaged, or a pickle the safe loader refuses
        raise ConfigError(f"it cannot be loaded ({type(exc).__name__}: {_load_reason(exc)})") from None
    model = state.get("model") if isinstance(state, dict) else None
    got = {k: tuple(v.shape) for k, v in model.items()} if isinstance(model, dict) else None
    if got != expected:
        raise ConfigError(f"its weights are not those of a {cfg.model} of width {cfg.width} on {cfg.dataset}")


def cmd_import(args) -> int:
    for run_id in Store(args.db).import_bundle(args.file, check_config=check_imported_config,
                                               checkpoint_limit=imported_checkpoint_limit,
                                               check_checkpoint=check_imported_checkpoint):
        print(run_id)
    return 0


def cmd_bench(args) -> int:
    from .bench import run_bench
    return run_bench(args)

