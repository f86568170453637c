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


def claim_pack_partners(store, worker_id: str, first, worker_device: str = "auto", free_slots: int = 1,
                        status: str = "queued") -> list:
    """Claim runs of `status` (queued, or interrupted ones to resume) that can share a pack with the
    claimed run `first` (a RunInfo), oldest first.

    The compatible queue is spread evenly over the free slots: this worker's (free_slots, counting
    the one `first` is about to take) plus other live workers' (max_parallel minus the runs they
    hold), so a sweep is not packed into one process while other slots or machines stand idle.
    At most max_pack_size() runs per pack. Returns the claimed RunInfos (with their claim tokens);
    empty when packing is off or nothing fits.
    """
    try:
        cfg = RunConfig.from_dict(first.config)
    except (ConfigError, TypeError):
        return []
    if not packing_enabled(cfg, worker_device):
        return []
    key, compatible = pack_key(cfg), []
    for info in sorted(store.list_runs(status=status), key=lambda r: r.id):
        try:
            if pack_key(RunConfig.from_dict(info.config)) == key:
                compatible.append(info.id)
        except (ConfigError, TypeError):
            continue
    others = sum(max(0, w["max_parallel"] - len(w["run_ids"])) for w in store.live_workers()
                 if w["id"] != worker_id)
    slots = max(1, free_slots) + others
    size = min(max_pack_size(), math.ceil((len(compatible) + 1) / slots))
    claim = store.claim_interrupted if status == "interrupted" else store.claim_next_run
    chosen = []
    for run_id in compatible:
        if len(chosen) >= size - 1:
            break
        claimed = claim(worker_id, run_ids=[run_id])
        if claimed is not None:
            chosen.append(claimed)
    return chosen
