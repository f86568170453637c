"""Packed sweeps: K runs of one architecture trained in one process on one device (issue 5).

Every member is still its own run, with exactly the single-run metrics (SPEC §6) at the same log
points, its own recorder, its own commands (pause, resume, stop, set_elr/set_lr) and its own
checkpoints in the Trainer's format, so a member that the pack leaves can go on as a single run.

How K members become one network (measured with `python -m engine bench`):
- The K flat SI vectors are the rows of one [K, P] tensor W (row k is member k's SIGroup.w, same
  order). Each step W is split by layer and reshaped into *grouped* weights: a conv layer becomes
  one conv with K*C_out filters and groups=K, a linear layer one batched matmul. The first layer
  sees either the shared batch (groups=1: one dense conv or GEMM with K*C_out outputs) or the
  members' own batches laid side by side as K*C_in channels.
- Activations are [B, K*C, ...]: every BatchNorm of the single model becomes one F.batch_norm over
  K*C channels, which is the very same per-channel computation, with running statistics stored as
  [K, C] rows (in place, no vmap, no copying of statistics in or out). A probe (sharpness, the
  step-0 loss) runs BN in train mode with running statistics *not passed at all*, so it cannot
  disturb them; test evaluation passes each member's rows in eval mode.
- The frozen head is shared: [B, K, F] @ W_head^T. Per-member losses are summed, and one backward
  gives every member's own gradient as the rows of a [K, P] tensor (the members' graphs are
  disjoint, so d(sum)/dW_k = dL_k/dW_k). The update rules, norms, angles and averages are row-wise
  tensor ops with per-member rates, weight decays, momenta and sphere masks.
- Sharpness: one double backward gives the Hessian-vector products of all members at once (the
  Hessian of the summed loss is block diagonal), and Lanczos runs batched over the members with
  per-member stopping (a member whose Ritz value has converged leaves the batch).
torch.func.vmap over functional_call (stack_module_state) was measured against this on the CPU:
about as fast for the step alone, but it cannot update BatchNorm running statistics in place (the
functorch "Patching Batch Norm" workarounds all drop them), which test_loss and test_acc need, and
it does not give the single run's numbers bit for bit: the grouped path does for mlp_si (shared
or per-member batches), and for the conv nets differs only in the rounding of conv weight
gradients (grouped vs dense convolution backward).

Batches: a member's batch order comes from its own generator seeded with its seed, exactly as in
Trainer. Members that share a seed (and step) share one stream and one gathered batch; members with
different seeds each gather their own batch ([B, K, ...]), so seed sweeps pack too.

Control: pause parks a member (its rows are copied out of the pack, it keeps its own batch stream
and simply does not step; the others go on), resume puts it back (it may now be at another step
than the rest: log points, epochs and checkpoints are per member), stop and nonfinite end it
alone, set_elr/set_lr change its rate. Every exit leaves the rest of the pack numerically as it was.

When: the worker packs compatible queued runs (pack_key) on CUDA, and on a CPU for mlp_si
(measured 2-3x faster there; conv nets are not); SPHERELAB_PACK=0 turns packing off, force turns
it on for everything (see packing_enabled).
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
import traceback
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, RunConfig
from .data import Dataset, load_dataset
from .metrics import Schedule, StepAverages
from .models import build_model, si_layer_names, si_parameters
from .optim import schedule_factor
from .trainer import MemoryRecorder, Recorder, TrainResult, configure_threads, resolve_device

# Fields members of one pack may differ in; everything else must be equal (pack_key).
MEMBER_FIELDS = ("elr", "lr", "wd", "momentum", "seed", "mode", "name", "tags", "checkpoint_every")
MAX_PACK = 32
PARKED_SLEEP_S = 0.1


def pack_key(cfg: RunConfig | dict) -> str:
    """Runs with equal keys can share a pack: same model, width, depth, data, batch size, epochs,
    schedule, log/eval/sharpness frequencies, probe, augment and device."""
    d = cfg.to_dict() if isinstance(cfg, RunConfig) else dict(cfg)
    for k in MEMBER_FIELDS:
        d.pop(k, None)
    return json.dumps(d, sort_keys=True, default=str)


# ---- the packed network ----------------------------------------------------------------------

class _PackedSI(nn.Module):
    """An SI conv/linear layer for K members; its weight is a [K, n] piece of W, set per call."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.conv = isinstance(layer, nn.Conv2d)
        self.shape = tuple(layer.weight.shape)
        self.in_features = self.shape[1]
        if self.conv:
            if layer.groups != 1 or layer.bias is not None:
                raise ValueError("packing needs bias-free, ungrouped convolutions")
            self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation
        self.weight: torch.Tensor | None = None
        self.channels_last = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        piece = self.weight
        k = piece.shape[0]
        shared = x.shape[1] == self.in_features          # the first layer on a batch shared by all
        if self.conv:
            w = piece.reshape(k * self.shape[0], *self.shape[1:])
            if self.channels_last:
                w = w.contiguous(memory_format=torch.channels_last)
                x = x.contiguous(memory_format=torch.channels_last)
            return F.conv2d(x, w, None, self.stride, self.padding, self.dilation, 1 if shared else k)
        if shared:
            return F.linear(x, piece.reshape(k * self.shape[0], self.shape[1]))
        b = x.shape[0]
        out = torch.bmm(x.view(b, k, self.in_features).transpose(0, 1),
                        piece.view(k, self.shape[0], self.shape[1]).transpose(1, 2))
        return out.transpose(0, 1).reshape(b, k * self.shape[0])


class _PackedBN(nn.Module):
    """BatchNorm over K*C channels; running statistics are rows of [K, C] tensors passed per call.

    mode "train": batch statistics, running statistics updated in place (what a training step does);
    "probe": batch statistics, running statistics not touched (not even passed); "eval": running ones.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        if bn.affine or not bn.track_running_stats or bn.momentum is None:
            raise ValueError("packing needs affine-free BatchNorm with running statistics and a momentum")
        self.eps, self.momentum = bn.eps, bn.momentum
        self.mode = "train"
        self.stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "probe":
            return F.batch_norm(x, None, None, None, None, True, 0.0, self.eps)
        mean, var = self.stats
        if self.mode == "eval":
            return F.batch_norm(x, mean, var, None, None, False, 0.0, self.eps)
        return F.batch_norm(x, mean, var, None, None, True, self.momentum, self.eps)


class _PackedHead(nn.Module):
    """The frozen head, shared: [B, K*F] -> [B, K, classes]."""

    def __init__(self, head: nn.Linear):
        super().__init__()
        self.in_features = head.in_features
        self.register_buffer("weight", head.weight.detach().clone())
        self.register_buffer("bias", None if head.bias is None else head.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.reshape(x.shape[0], -1, self.in_features), self.weight, self.bias)


class PackedNet(nn.Module):
    """A copy of one SI model whose layers run K members at once (K is read from W per call)."""

    def __init__(self, template: nn.Module, *, channels_last: bool = False):
        super().__init__()
        body = copy.deepcopy(template)
        si_names = [n.removesuffix(".weight") for n, p in template.named_parameters() if p.requires_grad]
        self.bn_names = [n for n, m in template.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.sizes = [p.numel() for p in si_parameters(template)]
        for name, module in list(body.named_modules()):
            for child_name, child in list(module.named_children()):
                path = f"{name}.{child_name}" if name else child_name
                if path in si_names:
                    new = _PackedSI(child)
                    new.channels_last = channels_last and new.conv
                elif isinstance(child, nn.modules.batchnorm._BatchNorm):
                    new = _PackedBN(child)
                elif isinstance(child, nn.Linear) and not child.weight.requires_grad:
                    new = _PackedHead(child)
                elif isinstance(child, (nn.Conv2d, nn.Linear)):
                    raise ValueError(f"cannot pack layer {path}: not an SI weight nor the frozen head")
                else:
                    continue
                setattr(module, child_name, new)
        self.body = body
        self.si = [body.get_submodule(n) for n in si_names]
        self.bns = [body.get_submodule(n) for n in self.bn_names]

    def forward(self, W: torch.Tensor, x: torch.Tensor, mode: str = "train", stats=None) -> torch.Tensor:
        """Logits [B, K, classes] of the K = len(W) members. x: [B, ...] shared by all members, or
        [B, K, C, ...] (member k's batch at [:, k]). stats: per BN layer (mean, var) flat over K*C."""
        if x.dim() == self._packed_dims:             # [B, K, C, ...] -> [B, K*C, ...]
            x = x.reshape(x.shape[0], -1, *x.shape[3:])
        for layer, piece in zip(self.si, W.split(self.sizes, dim=1)):
            layer.weight = piece
        for i, bn in enumerate(self.bns):
            bn.mode = mode
            bn.stats = None if stats is None else stats[i]
        try:
            return self.body(x)
        finally:
            for layer in self.si:
                layer.weight = None
            for bn in self.bns:
                bn.stats = None

    _packed_dims = 0     # set by the trainer: input dims + 2 (B and K)


def member_losses(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean"):
    """Per-member cross-entropy [K] and correct-prediction counts/fractions [K] of logits [B, K, C]."""
    b, k, c = logits.shape
    yy = y[:, None].expand(b, k) if y.dim() == 1 else y
    losses = F.cross_entropy(logits.reshape(b * k, c), yy.reshape(b * k), reduction="none").view(b, k)
    correct = (logits.argmax(-1) == yy)
    if reduction == "mean":
        return losses.mean(0), correct.float().mean(0)
    return losses.sum(0), correct.sum(0)


# ---- members ---------------------------------------------------------------------------------

class BatchStream:
    """One seeded batch order, exactly Trainer's: a permutation per epoch from the run's generator,
    index slices of it, augmentation drawn from the same generator. Shared by members with equal state."""

    def __init__(self, data: Dataset, batch: int, generator: torch.Generator):
        self.data, self.batch, self.gen = data, batch, generator
        self.spe = data.steps_per_epoch(batch)
        self.perm: torch.Tensor | None = None
        self.pos = 0
        self.current: torch.Tensor | None = None

    def advance(self) -> torch.Tensor:
        if self.pos == 0:
            self.perm = torch.randperm(self.data.train_size, generator=self.gen,
                                       device=self.gen.device).to(self.data.x_train.device)
        self.current = self.perm[self.pos * self.batch:(self.pos + 1) * self.batch]
        self.pos = (self.pos + 1) % self.spe
        return self.current

    def clone(self) -> "BatchStream":
        twin = BatchStream(self.data, self.batch, torch.Generator(device=self.gen.device))
        twin.gen.set_state(self.gen.get_state())
        twin.perm, twin.pos = self.perm, self.pos
        return twin


class MemberControl(Protocol):
    def poll(self, member: "PackMember") -> str | None:
        """Called between steps, never blocks: None, "stop", "pause" or "resume"."""


class PackMember:
    """One run inside a pack. Its tensors are row views into the pack's tensors while it is packed,
    and its own copies while it is parked or after it has left."""

    def __init__(self, cfg: RunConfig, data: Dataset, *, recorder: Recorder | None = None,
                 control: MemberControl | None = None, checkpoint: Callable | None = None):
        self.cfg, self.data = cfg, data
        self.recorder = recorder or MemoryRecorder()
        self.control, self.checkpoint = control, checkpoint
        self.on_end: Callable[["PackMember"], None] | None = None
        self.state = "active"                       # active | parked | ended
        self.result: TrainResult | None = None
        self.last: dict = {}
        self.run_id = None
        self.steps_per_epoch = data.steps_per_epoch(cfg.batch)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.step, self.elapsed, self.started = 0, 0.0, 0.0
        self.base_rate = cfg.base_rate
        self.sphere = cfg.mode == "sphere"
        self.test_schedule = Schedule(cfg.eval_every or self.steps_per_epoch)
        self.sharp_schedule = Schedule(cfg.sharpness_every)
        self.sharp_vec: torch.Tensor | None = None
        self.count = 0
        # set by PackedTrainer
        self.w = self.w0 = self.buf = self.sums = None
        self.stats: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.rho0 = 0.0
        self.stream: BatchStream | None = None
        self.pack_trainer: "PackedTrainer | None" = None

    # what StoreControl and the runner's checkpointing read from a trainer
    @property
    def epoch(self) -> float:
        return self.step / self.steps_per_epoch

    def lr(self, step: int | None = None) -> float:
        step = self.step if step is None else step
        rate = self.base_rate * schedule_factor(self.cfg.schedule, step, self.total_steps)
        return rate * self.rho0 ** 2 if self.sphere else rate

    def set_rate(self, value: float) -> None:
        """Change this member's ELR (sphere) or LR (lrwd) between two steps; recorded as an event."""
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"rate must be a positive finite number, got {value}")
        kind = "elr_change" if self.sphere else "lr_change"
        self.recorder.event(self.step, kind, {"from": self.base_rate, "to": value})
        self.base_rate = value

    def state_dict(self) -> dict:
        """Trainer.state_dict()'s format: a member's checkpoint resumes as a single run, and back."""
        return self.pack_trainer.member_state_dict(self)

    def own_tensors(self) -> None:
        """Copy the row views out of the pack (parking, leaving)."""
        self.w, self.w0, self.sums = self.w.clone(), self.w0.clone(), self.sums.clone()
        self.buf = None if self.buf is None else self.buf.clone()
        self.stats = [(m.clone(), v.clone()) for m, v in self.stats]


# ---- the trainer -----------------------------------------------------------------------------

class PackedTrainer:
    """Trains K configurations that share pack_key in lockstep; members may pause, leave or change rate.

    recorders / controls / checkpoints: one per member (None: MemoryRecorder / none / none).
    states: optional per-member Trainer.state_dict()s to resume from (a single run's checkpoint works).
    """

    def __init__(self, cfgs: list[RunConfig], *, data: Dataset | None = None, recorders=None, controls=None,
                 checkpoints=None, states=None, device: torch.device | None = None,
                 tf32: bool | None = None, channels_last: bool = False):
        if not cfgs:
            raise ValueError("a pack needs at least one configuration")
        cfgs = [c.validate() for c in cfgs]
        if len({pack_key(c) for c in cfgs}) != 1:
            first = cfgs[0].to_dict()
            differ = sorted({k for c in cfgs for k, v in c.to_dict().items()
                             if k not in MEMBER_FIELDS and v != first[k]})
            raise ConfigError(f"these runs cannot share a pack: they differ in {', '.join(differ)} "
                              f"(members may differ only in {', '.join(MEMBER_FIELDS[:6])})")
        cfg0 = cfgs[0]
        self.device = device or resolve_device(cfg0.device)
        if self.device.type == "cuda":
            use_tf32 = tf32 if tf32 is not None else os.environ.get("SPHERELAB_PACK_TF32", "1") != "0"
            _set_tf32(use_tf32)
        self.data = data if data is not None else load_dataset(cfg0, self.device)
        n = len(cfgs)
        recorders, controls = recorders or [None] * n, controls or [None] * n
        checkpoints, states = checkpoints or [None] * n, states or [None] * n

        # Exactly Trainer's initialisation, member by member: global seed, build, move.
        self.members: list[PackMember] = []
        self.template = None
        for cfg, rec, ctl, ckpt in zip(cfgs, recorders, controls, checkpoints):
            torch.manual_seed(cfg.seed)
            model = build_model(cfg, self.data.input_shape, self.data.num_classes).to(self.device)
            if self.template is None:
                self.template = model
                self.layer_names = si_layer_names(model)
                self.bn_names = [n for n, m in model.named_modules()
                                 if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            member = PackMember(cfg, self.data, recorder=rec, control=ctl, checkpoint=ckpt)
            member.pack_trainer = self
            w = torch.cat([p.detach().reshape(-1) for p in si_parameters(model)])
            member.w, member.w0 = w, w.clone()
            member.rho0 = float(w.norm())
            member.buf = torch.zeros_like(w) if cfg.momentum else None
            member.sums = torch.zeros(len(StepAverages.KEYS), dtype=torch.float64, device=self.device)
            bns = dict(model.named_modules())
            member.stats = [(bns[n].running_mean.detach().clone(), bns[n].running_var.detach().clone())
                            for n in self.bn_names]
            member.stream = BatchStream(self.data, cfg.batch,
                                        torch.Generator(device=self.device).manual_seed(cfg.seed))
            self.members.append(member)
        self.sizes = [p.numel() for p in si_parameters(self.template)]
        self.numel = sum(self.sizes)
        for member, state in zip(self.members, states):
            if state is not None:
                self.load_member_state(member, state)
        self._share_streams(self.members)
        self.net = PackedNet(self.template, channels_last=channels_last).to(self.device)
        self.net._packed_dims = len(self.data.input_shape) + 2
        self.batch, self.spe = cfg0.batch, self.data.steps_per_epoch(cfg0.batch)
        self._probe_cache: dict[int, torch.Tensor] = {}
        self._lr_key, self._lr = None, None
        self.pack: list[PackMember] = []
        self._dirty = True
        self.lanczos_matvecs = 0          # batched Hessian-vector products of the last sharpness measurement
        self.on_step: Callable[["PackedTrainer"], None] | None = None     # after every pack step (progress)

    # ---- pack bookkeeping ------------------------------------------------------------------
    def _share_streams(self, members: list[PackMember]) -> None:
        """Members with the same seed, step and generator state read one stream (one gathered batch)."""
        groups: dict[tuple, BatchStream] = {}
        for m in members:
            key = (m.cfg.seed, m.step, m.stream.pos, bytes(m.stream.gen.get_state().cpu().numpy()))
            if key in groups:
                m.stream = groups[key]
            else:
                groups[key] = m.stream

    def _sync_pack(self) -> None:
        """Restack the active members' rows into the pack tensors (after someone parked, left or came back)."""
        if not self._dirty:
            return
        self._dirty = False
        self.pack = [m for m in self.members if m.state == "active"]
        if not self.pack:
            return
        ms = self.pack
        self.W = torch.stack([m.w for m in ms])
        self.W0 = torch.stack([m.w0 for m in ms])
        self.SUMS = torch.stack([m.sums for m in ms])
        self.BUF = (torch.stack([m.buf if m.buf is not None else torch.zeros_like(m.w) for m in ms])
                    if any(m.buf is not None for m in ms) else None)
        self.STATS = [(torch.stack([m.stats[i][0] for m in ms]), torch.stack([m.stats[i][1] for m in ms]))
                      for i in range(len(self.bn_names))]
        for k, m in enumerate(ms):
            m.w, m.w0, m.sums = self.W[k], self.W0[k], self.SUMS[k]
            if m.buf is not None:
                m.buf = self.BUF[k]
            m.stats = [(mean[k], var[k]) for mean, var in self.STATS]
        dev = self.device
        self.WD = torch.tensor([m.cfg.wd for m in ms], device=dev)
        self.MU = torch.tensor([m.cfg.momentum for m in ms], device=dev)
        self.SPHERE = torch.tensor([m.sphere for m in ms], device=dev)
        self.RHO0 = torch.tensor([m.rho0 for m in ms], device=dev)
        self.any_wd = any(m.cfg.wd for m in ms)
        self.any_sphere = any(m.sphere for m in ms)
        self.W0_NORM = self.W0.norm(dim=1)
        self._lr_key = None

    def _flat_stats(self, rows: list[int] | None = None):
        if rows is None or len(rows) == len(self.pack):
            return [(m.view(-1), v.view(-1)) for m, v in self.STATS]
        idx = torch.tensor(rows, device=self.device)
        return [(m[idx].reshape(-1), v[idx].reshape(-1)) for m, v in self.STATS]

    def _end(self, m: PackMember, status: str) -> None:
        m.elapsed = time.perf_counter() - m.started
        m.result = TrainResult(status, m.step, m.last)
        if m.state == "active":
            self._dirty = True
            m.own_tensors()
        m.state = "ended"
        if m.on_end is not None:
            m.on_end(m)

    def park(self, m: PackMember) -> None:
        """Take a member out of the pack (pause): it keeps its state and its own batch stream."""
        if m.state != "active":
            return
        m.own_tensors()
        m.stream = m.stream.clone()
        m.state, self._dirty = "parked", True

    def unpark(self, m: PackMember) -> None:
        if m.state == "parked":
            m.state, self._dirty = "active", True

    # ---- the loop ------------------------------------------------------------------------------
    def run(self) -> list[TrainResult]:
        now = time.perf_counter()
        for m in self.members:
            m.started = now - m.elapsed
        for m in self.members:
            if m.state != "ended" and m.step >= m.total_steps:
                self._end(m, "finished")
        self._sync_pack()
        fresh = [m for m in self.pack if m.step == 0]
        if fresh:
            self._log_points(fresh, initial=True)
        while True:
            self._poll()
            self._sync_pack()
            if not self.pack:
                if any(m.state == "parked" for m in self.members):
                    time.sleep(PARKED_SLEEP_S)
                    continue
                break
            self._train_step()
            for m in self.pack:
                m.step += 1
            if self.on_step is not None:
                self.on_step(self)
            due = [m for m in self.pack if m.step % m.cfg.log_every == 0 or m.step == m.total_steps]
            if due:
                self._log_points(due)
            for m in list(self.pack):
                if m.state != "active" or m.step % m.steps_per_epoch:
                    continue
                m.elapsed = time.perf_counter() - m.started
                epoch = m.step // m.steps_per_epoch
                if m.checkpoint is not None and m.cfg.checkpoint_every and epoch % m.cfg.checkpoint_every == 0:
                    m.checkpoint(m)
                if m.step >= m.total_steps:
                    self._end(m, "finished")
        return [m.result for m in self.members]

    def _poll(self) -> None:
        for m in self.members:
            if m.state == "ended" or m.control is None:
                continue
            action = m.control.poll(m)
            if action == "stop":
                self._end(m, "stopped")
            elif action == "pause":
                self.park(m)
            elif action == "resume":
                self.unpark(m)

    def _lrs(self) -> torch.Tensor:
        lrs = [m.lr() for m in self.pack]
        if lrs != self._lr_key:
            self._lr_key, self._lr = lrs, torch.tensor(lrs, device=self.device)
        return self._lr

    def _batch(self):
        """x [B, ...] and y [B] when all members read one stream, else x [B, K, ...] and y [B, K]."""
        streams, order = {}, []
        for m in self.pack:
            if id(m.stream) not in streams:
                idx = m.stream.advance()
                x = self.data.x_train[idx]
                if m.cfg.augment:
                    x = self.data.augment(x, m.stream.gen)
                streams[id(m.stream)] = (x, self.data.y_train[idx])
            order.append(id(m.stream))
        if len(streams) == 1:
            return next(iter(streams.values()))
        return (torch.stack([streams[s][0] for s in order], 1), torch.stack([streams[s][1] for s in order], 1))

    def _train_step(self) -> None:
        x, y = self._batch()
        W = self.W
        Wg = W.detach().requires_grad_()
        logits = self.net(Wg, x, "train", self._flat_stats())
        loss, acc = member_losses(logits, y)
        G, = torch.autograd.grad(loss.sum(), Wg)
        with torch.no_grad():
            lr = self._lrs()
            rho = W.norm(dim=1)
            u_before = W / rho[:, None]
            d = G + self.WD[:, None] * W if self.any_wd else G
            if self.BUF is not None:
                d = self.BUF.mul_(self.MU[:, None]).add_(d)
            W.addcmul_(d, -lr[:, None])         # == w.add_(d, alpha=-lr) bit for bit (one rounding)
            if self.any_sphere:
                # reciprocal * rho0 is what `rho0 / w.norm()` computes for a Python float rho0
                scale = torch.where(self.SPHERE, W.norm(dim=1).reciprocal() * self.RHO0, torch.ones_like(rho))
                W.mul_(scale[:, None])
            gn = G.norm(dim=1)
            chord = (W / W.norm(dim=1, keepdim=True) - u_before).norm(dim=1)
            angle = 2 * torch.asin(torch.clamp(chord / 2, max=1.0))
            self.SUMS += torch.stack([loss.detach(), acc, gn, gn * rho, angle], 1).to(torch.float64)
        for m in self.pack:
            m.count += 1

    # ---- log points ------------------------------------------------------------------------------
    def _log_points(self, due: list[PackMember], initial: bool = False) -> None:
        rows = [self.pack.index(m) for m in due]
        idx = torch.tensor(rows, device=self.device)
        W, W0 = self.W[idx], self.W0[idx]
        with torch.no_grad():
            rho = W.norm(dim=1)
            # per-member dot products, as NormStats computes them (a row-wise sum rounds differently)
            dots = torch.stack([torch.dot(W[i], W0[i]) for i in range(len(rows))])
            cos = dots / (rho * self.W0_NORM[idx])
            layers = torch.stack([p.norm(dim=1) for p in W.split(self.sizes, dim=1)], 1)
            parts = [rho[:, None], cos[:, None], layers]
            if initial:
                parts.append(self._probe_loss(due, W))
            else:
                counts = torch.tensor([max(m.count, 1) for m in due], device=self.device, dtype=torch.float64)
                parts.append(self.SUMS[idx] / counts[:, None])
                self.SUMS[idx] = 0.0
            table = torch.cat([p.to(torch.float64) for p in parts], 1).tolist()
        values = []
        for m, row in zip(due, table):
            rho_f, cos_f, layer_f = row[0], row[1], row[2:2 + len(self.sizes)]
            tail = row[2 + len(self.sizes):]
            if initial:
                v = {"train_loss": tail[0], "train_acc": tail[1]}
            elif m.count:
                v = dict(zip(StepAverages.KEYS, tail))
            else:
                v = {}
            m.count = 0
            lr = m.lr()
            v.update({"si_norm": rho_f, "lr": lr, "elr": lr / rho_f ** 2 if rho_f else float("inf"),
                      "cos_to_init": cos_f})
            for name, n in zip(self.layer_names, layer_f):
                v[f"layer_norm/{name}"] = n
                v[f"layer_elr/{name}"] = lr / n ** 2 if n else float("inf")
            values.append(v)
        finals = [m.step == m.total_steps for m in due]
        test = [i for i, m in enumerate(due) if m.test_schedule.due(m.step, finals[i])]
        if test:
            for i, res in zip(test, self._test_eval([rows[i] for i in test])):
                values[i].update(res)
                due[i].test_schedule.mark(due[i].step)
        sharp = [i for i, m in enumerate(due) if m.sharp_schedule.due(m.step, finals[i])]
        if sharp:
            results = self._sharpness([due[i] for i in sharp], [rows[i] for i in sharp],
                                      [values[i]["elr"] for i in sharp])
            for i, res in zip(sharp, results):
                values[i].update(res)
                due[i].sharp_schedule.mark(due[i].step)
        for m, v in zip(due, values):
            m.recorder.metrics(m.step, m.epoch, time.perf_counter() - m.started, v)
            m.last = v
            bad = [k for k in ("train_loss", "si_norm", "grad_norm") if k in v and not math.isfinite(v[k])]
            if bad:
                m.recorder.event(m.step, "nonfinite", {k: str(v[k]) for k in bad})
                self._end(m, "nonfinite")

    # ---- probes --------------------------------------------------------------------------------
    def _probe_indices(self, m: PackMember) -> torch.Tensor:
        seed = m.cfg.seed
        if seed not in self._probe_cache:
            self._probe_cache[seed] = self.data.probe_indices(min(m.cfg.probe_size, self.data.train_size), seed=seed)
        return self._probe_cache[seed]

    def _probe_chunks(self, members: list[PackMember]):
        """Probe batches: [(x [b, ...], y [b])] when all members share a seed, else [(x [b, K, ...], y [b, K])]."""
        probes = [self._probe_indices(m) for m in members]
        if all(p is probes[0] for p in probes):
            return [(self.data.x_train[i], self.data.y_train[i]) for i in probes[0].split(self.batch)], True
        stacked = torch.stack(probes)
        return [(self.data.x_train[i.T], self.data.y_train[i.T]) for i in stacked.split(self.batch, dim=1)], False

    @torch.no_grad()
    def _probe_loss(self, members: list[PackMember], W: torch.Tensor) -> torch.Tensor:
        """The untrained level at step 0: mean loss and accuracy on the probe, BN in train mode, stats untouched."""
        chunks, _ = self._probe_chunks(members)
        loss = torch.zeros(len(members), dtype=torch.float64, device=self.device)
        correct = torch.zeros_like(loss)
        n = 0
        for x, y in chunks:
            l, c = member_losses(self.net(W, x, "probe"), y, "sum")
            loss += l.double()
            correct += c.double()
            n += len(y)
        return torch.stack([loss, correct], 1) / n

    @torch.no_grad()
    def _test_eval(self, rows: list[int]) -> list[dict]:
        idx = torch.tensor(rows, device=self.device)
        W, stats = self.W[idx], self._flat_stats(rows)
        x_all, y_all = self.data.x_test, self.data.y_test
        chunk = max(64, 8192 // len(rows)) if len(rows) > 8 else 1024
        loss = torch.zeros(len(rows), dtype=torch.float64, device=self.device)
        correct = torch.zeros_like(loss)
        for i in range(0, len(y_all), chunk):
            l, c = member_losses(self.net(W, x_all[i:i + chunk], "eval", stats), y_all[i:i + chunk], "sum")
            loss += l.double()
            correct += c.double()
        table = (torch.stack([loss, correct], 1) / len(y_all)).tolist()
        return [{"test_loss": a, "test_acc": b} for a, b in table]

    def _hvp(self, W: torch.Tensor, V: torch.Tensor, chunks, shared: bool, live) -> torch.Tensor:
        """H_k v_k for every row k: one double backward of the summed loss (block-diagonal Hessian)."""
        Wg = W.detach().requires_grad_()
        total = sum(len(y) for _, y in chunks)
        out = torch.zeros_like(V)
        for x, y in chunks:
            if not shared:
                x, y = x[:, live], y[:, live]
            loss, _ = member_losses(self.net(Wg, x, "probe"), y)
            G, = torch.autograd.grad(loss.sum() * (len(y) / total), Wg, create_graph=True)
            out += torch.autograd.grad((G * V).sum(), Wg)[0]
        return out

    def _sharpness(self, members: list[PackMember], rows: list[int], elrs: list[float],
                   iters: int | None = None) -> list[dict]:
        """Batched Lanczos with per-member stopping (lanczos_top's rules, member by member: same start
        vector from the member's seeded generator or warm start, same tolerance test, same cap), then
        the Hutchinson trace with each member's own Rademacher vectors."""
        cfg = members[0].cfg
        dev, P, n = self.device, self.numel, len(members)
        W = self.W[torch.tensor(rows, device=dev)]
        chunks, shared = self._probe_chunks(members)
        gens = [torch.Generator(device=dev).manual_seed(m.cfg.seed) for m in members]
        starts = []
        for m, g in zip(members, gens):
            v0 = m.sharp_vec
            if v0 is None or not torch.isfinite(v0).all() or v0.norm() == 0:
                v0 = torch.randn(P, generator=g, device=dev, dtype=torch.float32)
            starts.append(v0 / v0.norm())
        Q = torch.stack(starts)[:, None]           # [live, k+1, P]: the live members' Lanczos bases
        alphas: list[list[float]] = [[] for _ in range(n)]
        betas: list[list[float]] = [[] for _ in range(n)]
        done: dict[int, tuple[float, torch.Tensor]] = {}
        live = list(range(n))
        iters = iters or cfg.lanczos_iters
        for k in range(iters):
            self.lanczos_matvecs = k + 1
            li = torch.tensor(live, device=dev)
            q = Q[:, -1]
            with torch.enable_grad():
                w = self._hvp(W[li], q, chunks, shared, li)
            with torch.no_grad():
                alpha = (w * q).sum(1)
                for _ in range(2):                 # full reorthogonalisation, twice
                    w = w - torch.bmm(torch.bmm(Q, w[:, :, None]).transpose(1, 2), Q)[:, 0]
                beta = w.norm(dim=1)
                host = torch.stack([alpha, beta], 1).tolist()
                keep = []
                last = k == iters - 1
                for j, (a_j, b_j) in enumerate(host):
                    i = live[j]
                    alphas[i].append(a_j)
                    T = torch.diag(torch.tensor(alphas[i], dtype=torch.float64))
                    if betas[i]:
                        off = torch.tensor(betas[i], dtype=torch.float64)
                        T += torch.diag(off, 1) + torch.diag(off, -1)
                    evals, evecs = torch.linalg.eigh(T)
                    theta, s = float(evals[-1]), evecs[:, -1]

                    def ritz():
                        return (Q[j].T.to(torch.float64) @ s.to(dev)).to(torch.float32)

                    if not math.isfinite(theta):
                        done[i] = (theta, ritz())
                        continue
                    residual = abs(b_j * float(s[-1]))
                    if residual <= cfg.lanczos_tol * max(abs(theta), 1e-30) or b_j < 1e-10 * max(abs(theta), 1.0) \
                            or last:
                        r = ritz()
                        done[i] = (theta, r / r.norm())
                        continue
                    betas[i].append(b_j)
                    keep.append(j)
                if not keep:
                    break
                kj = torch.tensor(keep, device=dev)
                Q = torch.cat([Q[kj], (w[kj] / beta[kj, None])[:, None]], 1)
                live = [live[j] for j in keep]
        traces = None
        if cfg.trace_samples:
            traces = [0.0] * n
            everyone = torch.arange(n, device=dev)
            with torch.enable_grad():
                for _ in range(cfg.trace_samples):
                    Z = torch.stack([torch.randint(0, 2, (P,), generator=g, device=dev).to(torch.float32) * 2 - 1
                                     for g in gens])
                    HZ = self._hvp(W, Z, chunks, shared, everyone)
                    for i, t in enumerate((Z * HZ).sum(1).tolist()):
                        traces[i] += t
            traces = [t / cfg.trace_samples for t in traces]
        rho2 = (W.norm(dim=1).tolist())
        out = []
        for i, m in enumerate(members):
            lam, m.sharp_vec = done[i]
            r2 = rho2[i] ** 2
            elr = elrs[i]
            res = {"sharpness": lam * r2,
                   "sharpness_threshold": 2 * (1 + m.cfg.momentum) / elr if elr > 0 else float("inf")}
            if traces is not None:
                res["hessian_trace"] = traces[i] * r2 / P
            out.append(res)
        return out

    # ---- checkpoints (Trainer's format) ----------------------------------------------------------
    def member_state_dict(self, m: PackMember) -> dict:
        model = self.template.state_dict()
        state = {}
        pieces = dict(zip(self.layer_names, m.w.split(self.sizes)))
        stats = dict(zip(self.bn_names, m.stats))
        for key, value in model.items():
            prefix, _, leaf = key.rpartition(".")
            if leaf == "weight" and prefix in pieces:
                state[key] = pieces[prefix].reshape(value.shape).clone()
            elif prefix in stats and leaf in ("running_mean", "running_var"):
                state[key] = stats[prefix][0 if leaf == "running_mean" else 1].clone()
            elif prefix in stats and leaf == "num_batches_tracked":
                state[key] = torch.tensor(m.step, dtype=value.dtype, device=value.device)
            else:
                state[key] = value.clone()
        return {"model": state,
                "update": {"base_rate": m.base_rate, "rho0": m.rho0,
                           "buf": None if m.buf is None else m.buf.clone()},
                "step": m.step, "elapsed": m.elapsed, "batch_gen": m.stream.gen.get_state(),
                "averages": {"sums": m.sums.clone(), "count": m.count}, "w0": m.w0.clone(),
                "sharpness_vec": m.sharp_vec, "test_last": m.test_schedule.last,
                "sharpness_last": m.sharp_schedule.last}

    def load_member_state(self, m: PackMember, state: dict) -> None:
        """Resume a member from a Trainer.state_dict() (a single run's or a packed member's checkpoint)."""
        model = state["model"]
        with torch.no_grad():
            m.w.copy_(torch.cat([model[f"{n}.weight"].reshape(-1) for n in self.layer_names]))
            for (mean, var), name in zip(m.stats, self.bn_names):
                mean.copy_(model[f"{name}.running_mean"])
                var.copy_(model[f"{name}.running_var"])
            m.base_rate, m.rho0 = state["update"]["base_rate"], state["update"]["rho0"]
            if m.buf is not None and state["update"]["buf"] is not None:
                m.buf.copy_(state["update"]["buf"])
            m.step, m.elapsed = state["step"], state["elapsed"]
            m.stream.gen.set_state(state["batch_gen"])
            m.stream.pos = 0
            m.sums.copy_(state["averages"]["sums"])
            m.count = state["averages"]["count"]
            m.w0.copy_(state["w0"])
        m.sharp_vec = state["sharpness_vec"]
        m.test_schedule.last = state["test_last"]
        m.sharp_schedule.last = state["sharpness_last"]


def _set_tf32(on: bool) -> None:
    """TF32 tensor cores for fp32 matmuls and convolutions (the packed path's default on CUDA)."""
    precision = "tf32" if on else "ieee"
    try:
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    except AttributeError:   # older torch
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on


# ---- when to pack (the worker's policy) -------------------------------------------------------

# Measured on the CPU (`python -m engine bench`, README): an 8-member mlp_si sweep on digits trains
# about 2.5x faster packed than member after member (1 thread); convnet_si packs ran at 0.6-0.9x
# (grouped convolutions gain nothing on a CPU: every op there is already compute- or memory-bound).
CPU_PACK_MODELS = ("mlp_si",)


def packing_enabled(cfg: RunConfig, worker_device: str = "auto") -> bool:
    """SPHERELAB_PACK: "auto" (default) packs on CUDA, and on the CPU the models measured faster
    packed there (CPU_PACK_MODELS); "force" packs everything; "0"/"off" never packs. Other live
    workers' free slots are counted when a pack is sized (claim_pack_partners)."""
    env = os.environ.get("SPHERELAB_PACK", "auto").strip().lower()
    if env in ("0", "off", "no", "false"):
        return False
    if env == "force":
        return True
    device = cfg.device if worker_device in (None, "auto") else worker_device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return True
    return cfg.model in CPU_PACK_MODELS


def max_pack_size() -> int:
    try:
        return max(1, int(os.environ.get("SPHERELAB_PACK_MAX", MAX_PACK)))
    except ValueError:
        return MAX_PACK


def claim_pack_partners(store, worker_id: str, first, worker_device: str = "auto", free_slots: int = 1,
                        status: str = "queued") -> list[int]:
    """Claim runs of `status` (queued, or interrupted ones to resume) that can share a pack with the
    claimed run `first` (a RunInfo), oldest first.

    The compatible queue is spread evenly over the free slots: this worker's (free_slots, counting
    the one `first` is about to take) plus other live workers' (max_parallel minus the runs they
    hold), so a sweep is not packed into one process while other slots or machines stand idle.
    At most max_pack_size() runs per pack. Empty when packing is off or nothing fits.
    """
    try:
        cfg = RunConfig.from_dict(first.config).validate()
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
    chosen = []
    for run_id in compatible:
        if len(chosen) >= size - 1:
            break
        claim = store.claim_interrupted if status == "interrupted" else store.claim_next_run
        claimed = claim(worker_id, run_ids=[run_id])
        if claimed is not None:
            chosen.append(claimed.id)
    return chosen


# ---- a pack of stored runs (the worker's pack process) ---------------------------------------

def _store_glue():
    from .runner import StoreControl, StoreRecorder, save_checkpoint
    return StoreControl, StoreRecorder, save_checkpoint


def _pack_store_control_class():
    StoreControl, _, _ = _store_glue()

    class PackStoreControl(StoreControl):
        """StoreControl for one member of a pack: same heartbeats, analysis and commands, but it never
        blocks: pause parks the member (the others go on), resume brings it back, stop ends it alone."""

        paused = False

        def _obey(self, commands, member) -> str | None:
            action = None
            for cmd in commands:
                if cmd.kind == "stop":
                    return self._stop(cmd.payload.get("status", "cancelled"))
                if cmd.kind in ("set_elr", "set_lr"):
                    self._apply_rate(cmd, member)
                elif cmd.kind == "pause" and not self.paused:
                    self.recorder.flush()
                    self.store.heartbeat(self.run_id, member.step)     # the step it is parked at
                    self.store.set_status(self.run_id, "paused")
                    self.paused, action = True, "pause"
                elif cmd.kind == "resume" and self.paused:
                    self.store.set_status(self.run_id, "running")
                    self.paused, action = False, "resume"
            return action

    return PackStoreControl


def execute_pack(store, run_ids: list[int], *, device: str | None = None, progress=None) -> dict[int, str]:
    """Train stored runs as one pack; each member's status is set when it ends. Never raises for
    training failures; after a SIGTERM (engine.shutdown) the live members end `interrupted`, resumable."""
    _, StoreRecorder, save_checkpoint = _store_glue()
    PackStoreControl = _pack_store_control_class()
    infos = [store.get_run(run_id) for run_id in run_ids]
    statuses: dict[int, str] = {}
    try:
        cfgs = [RunConfig.from_dict(info.config) for info in infos]
        if device:
            cfgs = [c.replace(device=device) for c in cfgs]
        target = resolve_device(cfgs[0].device)
        states = [torch.load(info.checkpoint_path, map_location=target, weights_only=True)
                  if info.checkpoint_path and Path(info.checkpoint_path).exists() else None for info in infos]
        trainer = PackedTrainer(cfgs, states=states, device=target)
    except ConfigError as exc:
        for info in infos:
            store.set_status(info.id, "failed", error=str(exc))
            statuses[info.id] = "failed"
        return statuses
    configure_threads(cfgs[0], trainer.device)      # as execute_run (mlp_si on a CPU: one thread)

    def finish(m: PackMember) -> None:
        m.recorder.flush()
        status = {"finished": "finished", "nonfinite": "nonfinite"}.get(m.result.status)
        if m.result.status == "stopped":
            status = m.control.stop_reason or "cancelled"
        m.control.refresh_analysis(m)
        store.update_run(m.run_id, step=m.step)
        store.set_status(m.run_id, status)
        statuses[m.run_id] = status

    for info, m in zip(infos, trainer.members):
        m.run_id = info.id
        resumed_from = m.step if m.step else None
        store.truncate_after(info.id, m.step if resumed_from else -1)
        m.recorder = StoreRecorder(store, info.id)
        m.control = PackStoreControl(store, info.id, m.recorder)
        if resumed_from is not None:
            m.control.regime = info.regime
            m.control.spikes = {e.step for e in store.events(info.id, ["spike"])}
        m.checkpoint = lambda member: save_checkpoint(store, member.run_id, member.recorder, member)
        m.on_end = finish
        store.update_run(info.id, device=str(trainer.device), total_steps=m.total_steps, step=m.step,
                         worker_id=info.worker_id)
        store.set_status(info.id, "running")
        if resumed_from is not None:
            store.add_event(info.id, resumed_from, "resume", {"from_step": resumed_from})
        if len(infos) > 1:
            store.add_event(info.id, m.step, "note",
                            {"text": f"packed with run(s) {', '.join(str(i.id) for i in infos if i.id != info.id)} "
                                     f"on {trainer.device}"})
    if progress is not None:      # one bar for the pack: the members' steps added up
        progress.total = sum(m.total_steps for m in trainer.members)
        trainer.on_step = lambda pack: progress.update(sum(m.step for m in pack.members) - progress.n)
    live = lambda: [m for m in trainer.members if m.state != "ended"]   # noqa: E731
    try:
        trainer.run()
        return statuses
    except KeyboardInterrupt:      # Ctrl-C where a pack runs in the foreground: resumable
        for m in live():
            m.recorder.flush()
            store.set_status(m.run_id, "interrupted")
        raise
    except Exception as exc:       # a bug or an OOM marks the live members, never the worker
        error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        for m in live():
            m.recorder.flush()
            store.set_status(m.run_id, "failed", error=error)
            statuses[m.run_id] = "failed"
        return statuses
    finally:
        for m in trainer.members:
            m.recorder.close()
