"""When runs share one process: which configurations can be packed, and the packing policy.

Members of a pack may differ only in MEMBER_FIELDS (rate, weight decay, momentum, mode, seed and
bookkeeping); everything else (model, data, batch size, epochs, schedule, measurement frequencies,
probe, device) must be equal: `pack_key`.

Policy (measured with `python -m engine bench`, BENCHMARKS.md): on CUDA packing always pays; on a
CPU an 8-member mlp_si sweep trains ~3x faster packed, while conv nets run at 0.4-0.9x (grouped
convolutions gain nothing where each op is already compute-bound). SPHERELAB_PACK: "auto" (default)
follows that, "force" packs everything, "0"/"off" never packs; SPHERELAB_PACK_MAX caps a pack.
"""
from __future__ import annotations

import json
import math
import os

from .config import ConfigError, RunConfig

MEMBER_FIELDS = ("elr", "lr", "wd", "momentum", "seed", "mode", "name", "tags", "checkpoint_every", "keep_every")
MAX_PACK = 32
CPU_PACK_MODELS = ("mlp_si",)


def pack_key(cfg: RunConfig | dict) -> str:
    """Runs with equal keys can share a pack."""
    d = cfg.to_dict() if isinstance(cfg, RunConfig) else dict(cfg)
    for k in MEMBER_FIELDS:
        d.pop(k, None)
    return json.dumps(d, sort_keys=True, default=str)


def packing_enabled(cfg: RunConfig, worker_device: str = "auto") -> bool:
    env = os.environ.get("SPHERELAB_PACK", "auto").strip().lower()
    if env in ("0", "off", "no", "false"):
        return False
    if env == "force":
        return True
    if cfg.model in CPU_PACK_MODELS:
        return True                     # on any device: no need to ask torch (a worker stays torch-free)
    device = cfg.device if worker_device in (None, "auto") else worker_device
    if device == "auto":
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device == "cuda"


def max_pack_size() -> int:
    try:
        return max(1, int(os.environ.get("SPHERELAB_PACK_MAX", MAX_PACK)))
    except ValueError:
        return MAX_PACK


def pack_groups(cfgs: list[RunConfig]) -> list[list[int]]:
    """Indices of cfgs split into packs (same pack_key, at most max_pack_size(), where packing is
    enabled) and single runs, in the order of their first member."""
    packs: dict[str, list[list[int]]] = {}
    order: list[list[int]] = []
    for i, cfg in enumerate(cfgs):
        if not packing_enabled(cfg):
            order.append([i])
            continue
        chunks = packs.setdefault(pack_key(cfg), [])
        if not chunks or len(chunks[-1]) >= max_pack_size():
            chunks.append([])
            order.append(chunks[-1])
        chunks[-1].append(i)
    return order


def claim_pack(store, claimer: str, *, run_ids=None, worker_device: str = "auto", free_slots: int = 1,
               spread: bool = True) -> list:
    """Claim the next pack for `claimer` and return its RunInfos (each with its own claim token), oldest
    first; empty when there is nothing to claim. The one place runs are grouped and claimed for
    training: the worker (engine/worker.py) and the CLI's in-process path (commands._train_here) both
    call it.

    The pack starts with the oldest interrupted run the claimer may take (resumed first), else the
    oldest queued one, among run_ids when given; where packing pays on the device (packing_enabled),
    runs of the same status that share its pack_key join it, oldest first, at most max_pack_size().
    spread: share the compatible queue evenly over the free slots, the claimer's (free_slots, counting
    the one this pack takes) and other live workers' (max_parallel minus the runs they hold), so a
    sweep is not packed into one process while other slots or machines stand idle. A CLI process
    training its own (reserved) runs passes spread=False: no one else may take them.
    """
    first, status = store.claim_interrupted(claimer, run_ids=run_ids), "interrupted"
    if first is None:
        first, status = store.claim_next_run(claimer, run_ids=run_ids), "queued"
    if first is None:
        return []
    try:
        cfg = RunConfig.from_dict(first.config)
    except (ConfigError, TypeError):
        return [first]                  # trained alone: its process reports the bad config as the run's error
    if not packing_enabled(cfg, worker_device):
        return [first]
    key, compatible = pack_key(cfg), []
    wanted = None if run_ids is None else set(run_ids)
    for info in sorted(store.list_runs(status=status), key=lambda r: r.id):
        if wanted is not None and info.id not in wanted:
            continue
        try:
            if pack_key(RunConfig.from_dict(info.config)) == key:
                compatible.append(info.id)
        except (ConfigError, TypeError):
            continue
    slots = max(1, free_slots)
    if spread:
        slots += sum(max(0, w["max_parallel"] - len(w["run_ids"])) for w in store.live_workers()
                     if w["id"] != claimer)
    size = min(max_pack_size(), math.ceil((len(compatible) + 1) / slots))
    claim = store.claim_interrupted if status == "interrupted" else store.claim_next_run
    pack = [first]
    for run_id in compatible:
        if len(pack) >= size:
            break
        claimed = claim(claimer, run_ids=[run_id])
        if claimed is not None:
            pack.append(claimed)
    return pack
