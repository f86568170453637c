"""Queueing work: the one path by which the CLI (`train`, `sweep`, `submit`, `fork`, `average`,
`geometry`) and the dashboard turn validated input into stored runs and jobs. Torch-free.

Everything is checked before anything is written (configs, a CIFAR folder's files), and a sweep
is created together with its runs in one transaction, so bad input leaves nothing behind.
"""
from __future__ import annotations

from storage import Store

from .cifar import check_cifar
from .config import IMAGE_DATASETS, ConfigError, RunConfig, check_grid_size


def check_data(configs: list[RunConfig]) -> None:
    """Each CIFAR folder once: present, complete, its test file readable (DataError names the path and
    the layout). Digits ship with scikit-learn and synthetic data is generated: nothing to check."""
    for dataset, data_dir in {(c.dataset, c.data_dir) for c in configs if c.dataset in IMAGE_DATASETS}:
        check_cifar(dataset, data_dir)


def queue_runs(store: Store, configs: list[RunConfig], swept: dict | None = None,
               sweep_name: str | None = None, *, reserve_for: str | None = None) -> list[int]:
    """Store the runs as queued (as one sweep when several values were swept); returns their ids.
    reserve_for: a claimer id (the CLI training them itself); no other claimer takes these runs."""
    configs = list(configs)
    check_grid_size(len(configs))
    check_data(configs)
    items = [{"config": c.to_dict(), "name": c.display_name(), "tags": list(c.tags), "reserved_for": reserve_for}
             for c in configs]
    if not swept and len(configs) == 1:
        return store.create_runs(items)
    spec = {"swept": swept or {}, "base": configs[0].to_dict()}
    _, run_ids = store.create_sweep_runs(sweep_name or default_sweep_name(configs[0], swept or {}), spec, items)
    return run_ids


def default_sweep_name(cfg: RunConfig, swept: dict) -> str:
    ranges = ", ".join(f"{key} {min(v):g}..{max(v):g} ({len(v)})" for key, v in swept.items())
    return f"{cfg.model} {cfg.dataset} {cfg.mode} {ranges}".strip()


# ---- branching and analysing kept checkpoints (README, "Branch, average, compare solutions") ---------------------------------------------

FORK_CHANGES = ("elr", "lr", "wd", "momentum", "mode", "schedule", "seed")


def kept_epochs(store: Store, run_id: int) -> list[int]:
    return [c.epoch for c in store.checkpoints(run_id)]


def _kept_text(store: Store, run_id: int) -> str:
    return ", ".join(map(str, kept_epochs(store, run_id))) or "none: train it with --keep-every EPOCHS"


def _require_kept(store: Store, run_id: int, epoch: int | None, flag: str = "--at") -> int:
    """The kept epoch asked for (default: the last kept one), or ConfigError listing what was kept."""
    kept = kept_epochs(store, run_id)
    if epoch is None:
        if not kept:
            run = store.get_run(run_id)
            still = f" (it is {run.status})" if not run.is_terminal else ""
            raise ConfigError(f"run {run_id} has no kept checkpoint{still}: kept epochs: {_kept_text(store, run_id)}")
        return kept[-1]
    if epoch not in kept:
        raise ConfigError(f"run {run_id} kept no checkpoint at epoch {epoch}: use {flag} with a kept epoch "
                          f"({_kept_text(store, run_id)})")
    return epoch


def fork_config(store: Store, parent_id: int, *, at: int | None = None, changes: dict | None = None,
                epochs: int | None = None) -> tuple[RunConfig, int]:
    """The child's config and its fork epoch. `epochs` counts the child's own epochs after the fork
    (default: the parent's remaining ones); step and epoch numbering go on from the parent's."""
    parent = store.get_run(parent_id)
    at = _require_kept(store, parent_id, at)
    changes = {k: v for k, v in (changes or {}).items() if v is not None}
    unknown = sorted(set(changes) - set(FORK_CHANGES))
    if unknown:
        raise ConfigError(f"a fork cannot change {', '.join(unknown)}: it may change {', '.join(FORK_CHANGES)}")
    cfg = RunConfig.from_dict(parent.config)
    mode = changes.get("mode", cfg.mode)
    if mode != cfg.mode:          # the other mode's rate must be given: nothing sensible to carry over
        needed = "elr" if mode == "sphere" else "lr"
        if needed not in changes:
            raise ConfigError(f"--mode {mode} needs --{needed}: the parent trained with "
                              f"{'an ELR' if cfg.mode == 'sphere' else 'an LR'}")
        cfg = cfg.replace(elr=None, lr=None, wd=0.0 if mode == "sphere" else cfg.wd)
    if epochs is None:
        epochs = cfg.epochs - at
        if epochs < 1:
            raise ConfigError(f"run {parent_id} ends at epoch {cfg.epochs}: give the fork's own --epochs N")
    if epochs < 1:
        raise ConfigError(f"--epochs must be at least 1 (the fork's own epochs after epoch {at}), got {epochs}")
    return cfg.replace(**changes, epochs=at + epochs, name=None), at


def queue_fork(store: Store, parent_id: int, *, at: int | None = None, changes: dict | None = None,
               epochs: int | None = None, name: str | None = None, tags=(), reserve_for: str | None = None) -> int:
    """Queue a child run branching from the parent's kept checkpoint at epoch `at`; returns its id."""
    cfg, at = fork_config(store, parent_id, at=at, changes=changes, epochs=epochs)
    parent = store.get_run(parent_id)
    what = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in (changes or {}).items() if v is not None) or "unchanged"
    cfg = cfg.replace(tags=tuple(tags) or cfg.tags)
    check_data([cfg])
    [run_id] = store.create_runs([{"config": cfg.to_dict(), "name": name or f"#{parent_id}@{at} {what}",
                                   "tags": list(cfg.tags), "parent_id": parent.id, "fork_epoch": at,
                                   "reserved_for": reserve_for}])
    return run_id


def queue_average(store: Store, run_id: int, *, last: int | None = None, at: list[int] | None = None,
                  reserve_for: str | None = None) -> int:
    """Queue the SWA average of a run's kept checkpoints: the last K (default 5, or all if fewer were
    kept) or the epochs given; returns the job id."""
    kept = kept_epochs(store, run_id)
    if at:
        epochs = [_require_kept(store, run_id, e) for e in at]
    else:
        if last is not None and last < 1:
            raise ConfigError(f"--last must be at least 1, got {last}")
        if last is not None and last > len(kept):
            raise ConfigError(f"--last {last} but run {run_id} kept {len(kept)} checkpoint(s) "
                              f"(epochs {_kept_text(store, run_id)})")
        if not kept:
            _require_kept(store, run_id, None)
        epochs = kept[-(last or min(5, len(kept))):]
    return store.create_job("average", run_id, {"epochs": epochs}, reserved_for=reserve_for)


def parse_solution(text: str) -> tuple[int, int | None]:
    """"RUN" or "RUN@EPOCH" -> (run id, epoch or None)."""
    run, _, epoch = str(text).partition("@")
    try:
        return int(run), (int(epoch) if epoch else None)
    except ValueError:
        raise ConfigError(f"bad solution {text!r}: write RUN or RUN@EPOCH, e.g. 7 or 7@30") from None


ARCHITECTURE = ("model", "width", "depth", "init_scale", "dataset", "data_dir", "synthetic_samples",
                "synthetic_shape", "synthetic_classes")


def queue_geometry(store: Store, a: str, b: str, points: int = 21, *, reserve_for: str | None = None) -> int:
    """Queue the geometry between two solutions (RUN = its last kept checkpoint, RUN@EPOCH a kept one)."""
    if not 2 <= points <= 201:
        raise ConfigError(f"--points must be between 2 and 201, got {points}")
    ends = []
    for text in (a, b):
        run_id, epoch = parse_solution(text)
        store.get_run(run_id)
        ends.append({"run": run_id, "epoch": _require_kept(store, run_id, epoch, flag="RUN@EPOCH")})
    configs = [RunConfig.from_dict(store.get_run(e["run"]).config) for e in ends]
    differ = [k for k in ARCHITECTURE if getattr(configs[0], k) != getattr(configs[1], k)]
    if differ:
        raise ConfigError(f"runs {ends[0]['run']} and {ends[1]['run']} differ in {', '.join(differ)}: "
                          "a path between solutions needs one architecture and one dataset")
    return store.create_job("geometry", ends[0]["run"], {"a": ends[0], "b": ends[1], "points": points},
                            other_run_id=ends[1]["run"], reserved_for=reserve_for)
