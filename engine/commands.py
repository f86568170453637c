"""One function per CLI command. Each validates everything before it writes anything."""
from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path

from storage import Store

from .cli import configs_from_args, print_json
from . import registry
from .config import ConfigError, RunConfig
from .data import load_dataset
from .models import build_model
from .packed import execute_pack, max_pack_size, pack_key, packing_enabled
from .submission import queue_runs
from .runner import analyze_stored, checkpoint_dir, execute_run
from .trainer import resolve_device


def _progress(total: int, desc: str):
    from tqdm import tqdm
    # stderr, so the run id stays the last line of stdout
    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False,
                disable=None, dynamic_ncols=True)


def _check_runnable(configs: list[RunConfig]) -> None:
    """Fail on bad data or device before a row is written (a missing CIFAR folder, no GPU)."""
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
    configs, _ = configs_from_args(args, single=True)
    _check_runnable(configs)
    store = Store(args.db)
    [run_id] = queue_runs(store, configs)
    return _run_here(store, [run_id])


def cmd_sweep(args) -> int:
    configs, swept = configs_from_args(args, single=False)
    _check_runnable(configs)
    store = Store(args.db)
    ids = queue_runs(store, configs, swept, args.sweep_name)
    return _run_here(store, ids)


def _run_here(store: Store, ids: list[int]) -> int:
    """Train queued runs in this process, claiming them so no worker takes them: compatible runs as
    packs where packing pays on this device (as the worker does), the others one after another."""
    failed = 0
    for group in _pack_groups(store, ids):
        claimed = [run_id for run_id in group if store.claim_next_run("cli", run_ids=[run_id]) is not None]
        if not claimed:
            continue
        label = store.get_run(claimed[0]).name + (f" (+{len(claimed) - 1} packed)" if len(claimed) > 1 else "")
        with _progress(None, label) as bar:
            if len(claimed) > 1:
                statuses = execute_pack(store, claimed, progress=bar)
            else:
                statuses = {claimed[0]: execute_run(store, claimed[0], progress=bar)}
        for run_id in claimed:
            final = store.get_run(run_id)
            print(f"run {run_id} {final.name}: {final.status}, regime {final.regime}", file=sys.stderr)
            failed += statuses.get(run_id) == "failed"
            print(run_id)
    return 1 if failed else 0


def _pack_groups(store: Store, ids: list[int]) -> list[list[int]]:
    """ids split into packs (same pack_key, at most max_pack_size()) and single runs, in order."""
    groups: dict[str, list[list[int]]] = {}
    order: list[list[int]] = []
    for run_id in ids:
        cfg = RunConfig.from_dict(store.get_run(run_id).config)
        if not packing_enabled(cfg):
            order.append([run_id])
            continue
        packs = groups.setdefault(pack_key(cfg), [])
        if not packs or len(packs[-1]) >= max_pack_size():
            packs.append([])
            order.append(packs[-1])
        packs[-1].append(run_id)
    return order


def cmd_submit(args) -> int:
    configs, swept = configs_from_args(args, single=False)
    _check_runnable(configs)
    store = Store(args.db)
    for run_id in queue_runs(store, configs, swept, args.sweep_name):
        print(run_id)
    return 0


def cmd_worker(args) -> int:
    from .worker import Worker
    if args.max_parallel < 1:
        raise ConfigError(f"--max-parallel must be at least 1, got {args.max_parallel}")
    resolve_device(args.device)
    return Worker(Store(args.db).url, max_parallel=args.max_parallel, device=args.device, poll_s=args.poll,
                  stale_after_s=args.stale_after, exit_when_idle=args.once).run()


def cmd_runs(args) -> int:
    store = Store(args.db)
    runs = store.list_runs(status=args.status, sweep_id=args.sweep, tag=args.tag)
    if args.json:
        print_json([{"id": r.id, "name": r.name, "status": r.status, "regime": r.regime,
                     "progress": round(r.progress, 4), "sweep": r.sweep_id, "tags": r.tags} for r in runs])
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
    store = Store(args.db)
    info = store.get_run(args.run)
    store.delete(args.run)
    for path in (info.checkpoint_path, str(checkpoint_dir(store) / f"run-{args.run}.pt")):
        if path:
            Path(path).unlink(missing_ok=True)
    return 0


def cmd_tag(args) -> int:
    Store(args.db).add_tags(args.run, args.tags)
    return 0


def export_rows(store: Store, run_id: int) -> tuple[list[str], list[dict]]:
    """Columns step, epoch, wall_time, then the metric keys in registry order, one row per log point."""
    frame = store.read_metrics(run_id)
    keys = registry.order(k for k in frame.columns if k not in registry.INDEX_COLUMNS)
    columns = [*registry.INDEX_COLUMNS, *keys]
    return columns, frame[columns].to_dict("records")


def _csv_value(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "nan"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return repr(v) if isinstance(v, float) else str(v)


def cmd_export(args) -> int:
    store = Store(args.db)
    store.get_run(args.run)
    columns, rows = export_rows(store, args.run)
    if args.format == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(columns)
        for row in rows:
            w.writerow([_csv_value(row[c]) if c != "step" else int(row[c]) for c in columns])
        text = buf.getvalue()
    else:
        clean = [{c: (int(r[c]) if c == "step" else _json_value(r[c])) for c in columns} for r in rows]
        text = json.dumps(clean, allow_nan=False) + "\n"
    if args.out:
        tmp = Path(args.out + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.out)
    else:
        sys.stdout.write(text)
    return 0


def _json_value(v):
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def cmd_analyze(args) -> int:
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
    store.export_bundle(ids, args.out, sweep_id=args.sweep)
    print(args.out)
    return 0


def cmd_import(args) -> int:
    for run_id in Store(args.db).import_bundle(args.file):
        print(run_id)
    return 0


def cmd_bench(args) -> int:
    from .bench import run_bench
    return run_bench(args)

