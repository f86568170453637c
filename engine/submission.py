"""Queueing runs: the one path by which the CLI (`train`, `sweep`, `submit`) and the dashboard's
Launch page turn validated configurations into stored runs. Torch-free.

Everything is checked before anything is written (configs, a CIFAR folder's files), and a sweep
is created together with its runs in one transaction, so bad input leaves nothing behind.
"""
from __future__ import annotations

from storage import Store

from .cifar import check_cifar
from .config import IMAGE_DATASETS, RunConfig, check_grid_size


def check_data(configs: list[RunConfig]) -> None:
    """Each CIFAR folder once: present, complete, its test file readable (DataError names the path and
    the layout). Digits ship with scikit-learn and synthetic data is generated: nothing to check."""
    for dataset, data_dir in {(c.dataset, c.data_dir) for c in configs if c.dataset in IMAGE_DATASETS}:
        check_cifar(dataset, data_dir)


def queue_runs(store: Store, configs: list[RunConfig], swept: dict | None = None,
               sweep_name: str | None = None) -> list[int]:
    """Store the runs as queued (as one sweep when several values were swept); returns their ids."""
    check_grid_size(len(configs))
    configs = [c.validate() for c in configs]
    check_data(configs)
    items = [{"config": c.to_dict(), "name": c.display_name(), "tags": list(c.tags)} for c in configs]
    if not swept and len(configs) == 1:
        return store.create_runs(items)
    spec = {"swept": swept or {}, "base": configs[0].to_dict()}
    _, run_ids = store.create_sweep_runs(sweep_name or default_sweep_name(configs[0], swept or {}), spec, items)
    return run_ids


def default_sweep_name(cfg: RunConfig, swept: dict) -> str:
    ranges = ", ".join(f"{key} {min(v):g}..{max(v):g} ({len(v)})" for key, v in swept.items())
    return f"{cfg.model} {cfg.dataset} {cfg.mode} {ranges}".strip()
