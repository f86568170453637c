"""The training loop: K >= 1 runs of one architecture trained in lockstep on one device.

A single run is a pack of one; a packed sweep is the same loop with K members. Every member is its
own run: its own config (rate, weight decay, momentum, mode, seed), batch order, recorder, control,
checkpoints and log points. The vectorised network is engine/packnet.py, the update rule
engine/optim.py, what is measured engine/quantities.py (which sees the loop only through a
quantities.Measuring: this module is its Source); where values go is the recorder's business
(memory, the store) and who may pause or steer a member is its control's (the worker's command
poller, a test). The loop itself, `Trainer.run`, is one short page.

Members whose seeds and positions agree read one shared batch; others gather their own ([B, K, ...]).
Control never blocks: a pause parks the member (its rows are copied out of the pack; the others go
on; its control keeps being polled, so heartbeats continue), resume brings it back, stop and a
non-finite value end it alone. Every exit leaves the rest of the pack numerically as it was.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from .config import ConfigError, RunConfig
from .data import Dataset, load_dataset
from .models import build_model, si_parameters
from .optim import PackUpdate, schedule_factor
from .packing import MEMBER_FIELDS, pack_key
from .packnet import BN_TYPES, PackedNet, member_losses
from .quantities import QUANTITIES, Measuring, Quantity, Schedule, StepProducts, check_quantities
from .hessian import hvp_operator
from .runtime import resolve_device

PARKED_SLEEP_S = 0.1      # how often an all-paused pack looks at its controls
LEGACY_SUM_NAMES = ("train_loss", "train_acc", "grad_norm", "eff_grad_norm", "angular_update")   # checkpoints before names


class Recorder(Protocol):
    def metrics(self, step: int, epoch: float, wall_time: float, values: dict[str, float]) -> None: ...
    def event(self, step: int, kind: str, payload: dict) -> None: ...


class Control(Protocol):
    def poll(self, member: "Member") -> str | None:
        """Called between two steps for every member that has not ended (parked ones too); never blocks.
        Returns None, "stop", "pause" or "resume" (and may call member.set_rate)."""


class MemoryRecorder:
    """Keeps everything in lists: for tests, benchmarks and notebooks."""

    def __init__(self):
        self.rows: list[tuple[int, float, float, dict]] = []
        self.events: list[tuple[int, str, dict]] = []

    def metrics(self, step, epoch, wall_time, values):
        self.rows.append((step, epoch, wall_time, dict(values)))

    def event(self, step, kind, payload):
        self.events.append((step, kind, dict(payload)))

    def series(self, key: str) -> tuple[list[int], list[float]]:
        pts = [(s, v[key]) for s, _, _, v in self.rows if key in v]
        return [s for s, _ in pts], [v for _, v in pts]


@dataclass
class TrainResult:
    status: str          # finished | nonfinite | stopped
    step: int
    last: dict


class BatchStream:
    """One seeded batch order: a permutation per epoch from the run's generator, index slices of it
    (the last partial batch dropped: BN normalises with the batch's own statistics), augmentation
    drawn from the same generator. Shared by members whose seed and position agree."""

    def __init__(self, data: Dataset, batch: int, generator: torch.Generator):
        self.data, self.batch, self.gen = data, batch, generator
        self.spe = data.steps_per_epoch(batch)
        self.perm: torch.Tensor | None = None
        self.pos = 0

    def advance(self) -> torch.Tensor:
        if self.pos == 0:
            self.perm = torch.randperm(self.data.train_size, generator=self.gen,
                                       device=self.gen.device).to(self.data.x_train.device)
        idx = self.perm[self.pos * self.batch:(self.pos + 1) * self.batch]
        self.pos = (self.pos + 1) % self.spe
        return idx

    def clone(self) -> "BatchStream":
        twin = BatchStream(self.data, self.batch, torch.Generator(device=self.gen.device))
        twin.gen.set_state(self.gen.get_state())
        twin.perm, twin.pos = self.perm, self.pos
        return twin


class Member:
    """One run inside the loop. Its tensors are row views into the pack's tensors while it is active,
    and its own copies while it is parked or after it has ended. Only this module writes its state:
    the store's side connects it through attach(), a control changes its rate through set_rate(), and
    quantities keep their per-member state through Measuring.carry()."""

    def __init__(self, cfg: RunConfig, data: Dataset, *, recorder: Recorder | None = None,
                 control: Control | None = None, checkpoint: Callable[["Member"], None] | None = None,
                 quantities: tuple[Quantity, ...] = QUANTITIES):
        self.cfg, self.recorder, self.control, self.checkpoint = cfg, recorder or MemoryRecorder(), control, checkpoint
        self.on_end: Callable[["Member"], None] | None = None
        self.state = "active"                        # active | parked | ended
        self.result: TrainResult | None = None
        self.last: dict = {}
        self.run_id = None
        self.claim: str | None = None                # the store's claim token the run is trained under
        self.steps_per_epoch = data.steps_per_epoch(cfg.batch)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.step = self.start_step = 0              # start_step: where this run's own schedule begins
        self.elapsed = self.started = 0.0
        self.needs_start_point = True                # a fresh run (or a fork) logs its starting point
        self.base_rate = cfg.base_rate
        self.sphere = cfg.mode == "sphere"
        self.schedules = {q.name: Schedule(q.every(cfg, self.steps_per_epoch)) for q in quantities}
        self.carried: dict[str, object] = {}         # quantity name -> the state it carries (Measuring.carry)
        self.count = 0                               # steps summed since the last log point
        self.rho0 = 0.0
        # set by the Trainer: weights, initial weights, momentum buffer, step sums, BN statistics
        self.w = self.w0 = self.buf = self.sums = None
        self.stats: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.stream: BatchStream | None = None
        self.trainer: "Trainer | None" = None

    def attach(self, *, run_id=None, claim: str | None = None, recorder: Recorder | None = None,
               control: Control | None = None, checkpoint: Callable[["Member", bool], None] | None = None,
               on_end: Callable[["Member"], None] | None = None) -> None:
        """Connect the member to where it is stored (engine/runner.py): the arguments given replace
        its run id, claim, recorder, control, checkpoint writer and end callback."""
        given = dict(run_id=run_id, claim=claim, recorder=recorder, control=control, checkpoint=checkpoint,
                     on_end=on_end)
        for name, value in given.items():
            if value is not None:
                setattr(self, name, value)

    @property
    def epoch(self) -> float:
        return self.step / self.steps_per_epoch

    def lr(self, step: int | None = None) -> float:
        """Learning rate applied at this step (sphere: ELR * rho0^2); schedules run from start_step."""
        step = self.step if step is None else step
        rate = self.base_rate * schedule_factor(self.cfg.schedule, step - self.start_step,
                                                self.total_steps - self.start_step)
        return rate * self.rho0 ** 2 if self.sphere else rate

    def set_rate(self, value: float) -> None:
        """Change the ELR (sphere) or LR (lrwd) between two steps; recorded as an event."""
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"rate must be a positive finite number, got {value}")
        kind = "elr_change" if self.sphere else "lr_change"
        self.recorder.event(self.step, kind, {"from": self.base_rate, "to": value})
        self.base_rate = value

    def state_dict(self) -> dict:
        return self.trainer.member_state(self)

    def own_tensors(self) -> None:
        """Copy the row views out of the pack (parking, ending)."""
        self.w, self.w0, self.sums = self.w.clone(), self.w0.clone(), self.sums.clone()
        self.buf = None if self.buf is None else self.buf.clone()
        self.stats = [(mean.clone(), var.clone()) for mean, var in self.stats]


class Trainer:
    """Trains configurations that share packing.pack_key in lockstep (one configuration: a single run).

    recorders / controls / checkpoints: one per member (None: MemoryRecorder / none / none).
    states: optional per-member checkpoints (Trainer.member_state) to resume from.
    quantities: what is measured (default quantities.QUANTITIES, which the registry names).
    """

    def __init__(self, cfgs: RunConfig | list[RunConfig], *, data: Dataset | None = None, recorders=None,
                 controls=None, checkpoints=None, states=None, forks=None, device: torch.device | None = None,
                 channels_last: bool = False, quantities: tuple[Quantity, ...] = QUANTITIES):
        cfgs = [cfgs] if isinstance(cfgs, RunConfig) else list(cfgs)
        if not cfgs:
            raise ValueError("a pack needs at least one configuration")
        _check_packable(cfgs)
        if quantities is not QUANTITIES:
            check_quantities(quantities)
        self.quantities = tuple(quantities)
        # the columns of the step sums (a member's `sums`, the pack's SUMS), each a sum named by its
        # per-step quantity: the loop and the quantities agree by name, never by position
        self._per_step = [q for q in self.quantities if q.sums]
        self._sum_index = [(i, name) for i, q in enumerate(self._per_step) for name in q.sums]
        self.sum_names = [name for _, name in self._sum_index]
        self.device = device or resolve_device(cfgs[0].device)
        self.data = data if data is not None else load_dataset(cfgs[0], self.device)
        n = len(cfgs)
        recorders, controls = recorders or [None] * n, controls or [None] * n
        checkpoints, states = checkpoints or [None] * n, states or [None] * n
        self.members = [Member(c, self.data, recorder=r, control=ctl, checkpoint=ck, quantities=self.quantities)
                        for c, r, ctl, ck in zip(cfgs, recorders, controls, checkpoints)]
        models = []
        for m in self.members:                   # global seed, build, move: the model a run alone gets
            torch.manual_seed(m.cfg.seed)
            models.append(build_model(m.cfg, self.data.input_shape, self.data.num_classes).to(self.device))
            self._adopt(m, models[-1])
        self.template = models[0]
        self.net = PackedNet(self.template, channels_last=channels_last).to(self.device)
        self.layer_names, self.bn_names, self.sizes = self.net.layer_names, self.net.bn_names, self.net.sizes
        self.numel = sum(self.sizes)
        for m, state, fork in zip(self.members, states, forks or [False] * n):
            if state is not None:
                self.load_member_state(m, state, fork=fork)
        self._share_streams()
        self._probes: dict[int, torch.Tensor] = {}
        self.active: list[Member] = []
        self._dirty, self._lr_key = True, None
        self.diagnostics: dict = {}          # what measurements noted (Measuring.note), e.g. lanczos_matvecs
        self.on_step: Callable[["Trainer"], None] | None = None       # after every step (progress bars)

    def _adopt(self, m: Member, model: nn.Module) -> None:
        m.trainer = self
        w = torch.cat([p.detach().reshape(-1) for p in si_parameters(model)])
        m.w, m.w0, m.rho0 = w, w.clone(), float(w.norm())
        m.buf = torch.zeros_like(w) if m.cfg.momentum else None
        m.sums = torch.zeros(len(self.sum_names), dtype=torch.float64, device=self.device)
        m.stats = [(b.running_mean.detach().clone(), b.running_var.detach().clone())
                   for b in model.modules() if isinstance(b, BN_TYPES)]
        m.stream = BatchStream(self.data, m.cfg.batch, torch.Generator(device=self.device).manual_seed(m.cfg.seed))

    # ---- the loop ------------------------------------------------------------------------------
    def run(self) -> list[TrainResult]:
        now = time.perf_counter()
        for m in self.members:
            m.started = now - m.elapsed
            if m.state != "ended" and m.step >= m.total_steps:
                self._end(m, "finished")
        self._sync()
        fresh = [m for m in self.active if m.needs_start_point]
        if fresh:
            self.log_point(fresh, start=True)
        while True:
            self._poll()
            self._sync()
            if not self.active:
                if any(m.state == "parked" for m in self.members):
                    time.sleep(PARKED_SLEEP_S)
                    continue
                break
            self.train_step()
            if self.on_step is not None:
                self.on_step(self)
            due = [m for m in self.active if m.step % m.cfg.log_every == 0 or m.step == m.total_steps]
            if due:
                self.log_point(due)
            for m in [m for m in self.active if m.state == "active" and m.step % m.steps_per_epoch == 0]:
                m.elapsed = time.perf_counter() - m.started
                self._checkpoint(m)
                if m.step >= m.total_steps:
                    self._end(m, "finished")
        return [m.result for m in self.members]

    def train_step(self) -> None:
        """One optimizer step for every active member, with the per-step quantities' sums (by name,
        in the columns sum_names)."""
        self._sync()
        x, y, per_member = self._batch()
        W = self.W
        Wg = W.detach().requires_grad_()
        logits = self.net(Wg, x, mode="train", stats=self._stats(), per_member_input=per_member)
        loss, acc = member_losses(logits, y)
        G, = torch.autograd.grad(loss.sum(), Wg)
        with torch.no_grad():
            norm = torch.linalg.vector_norm
            rho = norm(W, dim=1)
            u_before = W / rho[:, None]
            self.update.step(W, G, self.BUF, self._neg_lrs())
            products = StepProducts(loss=loss, acc=acc, grad=G, grad_norm=norm(G, dim=1), rho=rho,
                                    u_before=u_before, w_after=W)
            sums = [q.per_step(products) for q in self._per_step]
            self.SUMS.add_(torch.stack([sums[i][name] for i, name in self._sum_index], 1))
        for m in self.active:
            m.count += 1
            m.step += 1

    @property
    def lanczos_matvecs(self) -> int:
        """Batched Hessian-vector products of the last sharpness measurement."""
        return self.diagnostics.get("lanczos_matvecs", 0)

    def measure(self, names: list, members: list[Member] | None = None, start: bool = False) -> list[dict]:
        """Measure the named quantities (and those they require) now, for active members (default: all):
        a probe for tests and benchmarks. A Quantity instance in names is measured in place of the one of
        its name (a variant, e.g. Sharpness(iters=N)). Schedules and recorders are left alone; "averages"
        consumes the step sums, unless start=True, which measures the start-point (probe) loss instead."""
        self._sync()
        members = list(self.active) if members is None else members
        variants = {q.name: q for q in names if isinstance(q, Quantity)}
        quantities = [variants.get(q.name, q) for q in self.quantities]
        needed = {q.name if isinstance(q, Quantity) else q for q in names}
        for q in reversed(quantities):          # providers come first, so one backward pass finds them all
            if q.name in needed:
                needed |= {p.name for p in quantities if set(p.keys) & set(q.requires)}
        point = self._measuring(members, start)
        for q in quantities:
            if q.name in needed:
                q.measure(point)
        self._keep(point)
        return point.values

    def log_point(self, members: list[Member], start: bool = False) -> list[dict]:
        """Measure the members' due quantities, record the values, end members that went non-finite."""
        self._sync()
        point = self._measuring(members, start)
        values = point.values
        final = [m.step == m.total_steps for m in members]
        # a fork's first point measures what needs no state of its own, off the cadence it inherited
        forked = [start and m.start_step > 0 for m in members]
        for q in self.quantities:
            due = [i for i, m in enumerate(members)
                   if ((q.at_fork_start and m.schedules[q.name].every > 0) if forked[i]
                       else m.schedules[q.name].due(m.step, final[i]))]
            if due:
                q.measure(point.subset(due))
                for i in due:
                    if not forked[i]:
                        members[i].schedules[q.name].last = members[i].step
        if not start:               # the step sums are taken at every log point, whoever reads them
            point.step_means()
        self._keep(point)
        for m, v in zip(members, values):
            m.needs_start_point = False
            m.recorder.metrics(m.step, m.epoch, time.perf_counter() - m.started, v)
            m.last = v
            bad = [k for k in ("train_loss", "si_norm", "grad_norm") if k in v and not math.isfinite(v[k])]
            if bad:
                m.recorder.event(m.step, "nonfinite", {k: str(v[k]) for k in bad})
                self._end(m, "nonfinite")
        return values

    def _measuring(self, members: list[Member], start: bool) -> Measuring:
        rows = torch.tensor([self.active.index(m) for m in members], device=self.device)
        return Measuring(self, members, rows, start)

    def _keep(self, point: Measuring) -> None:
        """What the quantities carry for their members, and what they noted."""
        carried, notes = point.outcome()
        for (m, name), value in carried.items():
            m.carried[name] = value
        self.diagnostics.update(notes)

    def _checkpoint(self, m: Member) -> None:
        """At an epoch end: the resume checkpoint every --checkpoint-every epochs, and a kept one (for
        forks and averages) every --keep-every epochs and at the last epoch, and at each of the last
        --keep-last epochs."""
        if m.checkpoint is None:
            return
        epoch, cfg = m.step // m.steps_per_epoch, m.cfg
        keep = (bool(cfg.keep_every) and (epoch % cfg.keep_every == 0 or m.step >= m.total_steps)) \
            or epoch > cfg.epochs - cfg.keep_last
        if keep or (cfg.checkpoint_every and epoch % cfg.checkpoint_every == 0):
            m.checkpoint(m, keep)

    # ---- pack bookkeeping ------------------------------------------------------------------------
    def _poll(self) -> None:
        for m in self.members:
            if m.state == "ended" or m.control is None:
                continue
            action = m.control.poll(m)
            if action == "stop":
                self._end(m, "stopped")
            elif action == "pause" and m.state == "active":
                m.own_tensors()
                m.stream = m.stream.clone()          # it keeps its own position in the batch order
                m.state, self._dirty = "parked", True
            elif action == "resume" and m.state == "parked":
                m.state, self._dirty = "active", True

    def _end(self, m: Member, status: str) -> None:
        m.elapsed = time.perf_counter() - m.started
        m.result = TrainResult(status, m.step, m.last)
        if m.state == "active":
            self._dirty = True
            m.own_tensors()
        m.state = "ended"
        if m.on_end is not None:
            m.on_end(m)

    def _sync(self) -> None:
        """Restack the active members' rows into the pack tensors (after a park, an end or a resume)."""
        if not self._dirty:
            return
        self._dirty, self._lr_key = False, None
        self.active = ms = [m for m in self.members if m.state == "active"]
        if not ms:
            return
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
        self.update = PackUpdate(ms, self.device)
        self._flat_stats = [(mean.view(-1), var.view(-1)) for mean, var in self.STATS]
        streams = {id(m.stream) for m in ms}
        self._one_stream = ms[0].stream if len(streams) == 1 else None

    def _stats(self, rows: torch.Tensor | None = None):
        """BN running statistics of the active members (or of `rows` of them), flat over K*C, as the
        network takes them; for all members they are views, so training updates them in place."""
        if rows is None or len(rows) == len(self.active):
            return self._flat_stats
        return [(mean[rows].reshape(-1), var[rows].reshape(-1)) for mean, var in self.STATS]

    def _neg_lrs(self) -> torch.Tensor:
        """[K, 1]: minus each active member's learning rate at this step (rebuilt only when one changes)."""
        lrs = [m.lr() for m in self.active]
        if lrs != self._lr_key:
            self._lr_key, self._neg_lr = lrs, -torch.tensor(lrs, device=self.device)[:, None]
        return self._neg_lr

    def _share_streams(self) -> None:
        """Members with the same seed, step and generator state read one stream (one gathered batch)."""
        streams: dict[tuple, BatchStream] = {}
        for m in self.members:
            key = (m.cfg.seed, m.step, m.stream.pos, bytes(m.stream.gen.get_state().cpu().numpy()))
            m.stream = streams.setdefault(key, m.stream)

    def _batch(self):
        """(x, y, per_member): x [B, ...] when all members read one stream, else [B, K, ...]."""
        if self._one_stream is not None:
            return (*self._read(self._one_stream, self.active[0].cfg.augment), False)
        batches = {}
        for m in self.active:
            if id(m.stream) not in batches:
                batches[id(m.stream)] = self._read(m.stream, m.cfg.augment)
        parts = [batches[id(m.stream)] for m in self.active]
        return torch.stack([x for x, _ in parts], 1), torch.stack([y for _, y in parts], 1), True

    def _read(self, stream: BatchStream, augment: bool):
        idx = stream.advance()
        x = self.data.x_train[idx]
        return (self.data.augment(x, stream.gen) if augment else x), self.data.y_train[idx]

    # ---- what quantities measure with (quantities.Source) ----------------------------------------------
    def weights(self, rows: torch.Tensor) -> torch.Tensor:
        return self.W[rows]

    def initial_weights(self, rows: torch.Tensor) -> torch.Tensor:
        return self.W0[rows]

    def take_step_means(self, members: list[Member], rows: torch.Tensor) -> list[dict[str, float] | None]:
        """Per member, the means of its step sums since its last log point by name (None: no step summed);
        the sums start again from zero."""
        counts = torch.tensor([max(m.count, 1) for m in members], device=self.device, dtype=torch.float64)
        table = (self.SUMS[rows] / counts[:, None]).tolist()
        self.SUMS[rows] = 0.0
        means = [dict(zip(self.sum_names, row)) if m.count else None for m, row in zip(members, table)]
        for m in members:
            m.count = 0
        return means

    @torch.no_grad()
    def eval_logits(self, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """[b, n, C]: the logits of the active members `rows` on x [b, ...], BN in eval mode."""
        return self.net(self.W[rows], x, mode="eval", stats=self._stats(rows))

    def _probe_chunks(self, members: list[Member]):
        """Each member's fixed probe in training-sized chunks: ([(x [b, ...], y [b])], False) when the
        members share one probe (same seed), else ([(x [b, K, ...], y [b, K])], True)."""
        probes = []
        for m in members:
            if m.cfg.seed not in self._probes:
                size = min(m.cfg.probe_size, self.data.train_size)
                self._probes[m.cfg.seed] = self.data.probe_indices(size, seed=m.cfg.seed)
            probes.append(self._probes[m.cfg.seed])
        batch = members[0].cfg.batch
        if all(p is probes[0] for p in probes):
            return [(self.data.x_train[i], self.data.y_train[i]) for i in probes[0].split(batch)], False
        stacked = torch.stack(probes)
        return [(self.data.x_train[i.T], self.data.y_train[i.T]) for i in stacked.split(batch, dim=1)], True

    @torch.no_grad()
    def probe_loss(self, members: list[Member], rows: torch.Tensor) -> torch.Tensor:
        """[n, 2]: mean loss and accuracy on each member's probe, BN on batch statistics, stats untouched."""
        chunks, per_member = self._probe_chunks(members)
        W = self.W[rows]
        total = torch.zeros(len(members), 2, dtype=torch.float64, device=self.device)
        for x, y in chunks:
            loss, correct = member_losses(self.net(W, x, mode="probe", per_member_input=per_member), y, "sum")
            total += torch.stack([loss, correct], 1).double()
        return total / sum(len(y) for _, y in chunks)

    def probe_hvp(self, members: list[Member], rows: torch.Tensor):
        chunks, per_member = self._probe_chunks(members)
        return hvp_operator(self.net, self.W[rows], chunks, per_member)

    @torch.no_grad()
    def evaluate(self, rows: torch.Tensor, x_all: torch.Tensor, y_all: torch.Tensor) -> torch.Tensor:
        """[n, 2]: mean loss and accuracy of the active members `rows` on a whole split, BN in eval mode."""
        W, stats = self.W[rows], self._stats(rows)
        chunk = max(64, 8192 // len(rows)) if len(rows) > 8 else 1024
        total = torch.zeros(len(rows), 2, dtype=torch.float64, device=self.device)
        for i in range(0, len(y_all), chunk):
            loss, correct = member_losses(self.net(W, x_all[i:i + chunk], mode="eval", stats=stats),
                                          y_all[i:i + chunk], "sum")
            total += torch.stack([loss, correct], 1).double()
        return total / len(y_all)

    # ---- checkpoints: one format for a member, whatever pack it trained in ------------------------------
    def member_state(self, m: Member) -> dict:
        """The member's checkpoint: model weights and BN statistics under the model's own state_dict
        keys, the update state, step, batch generator, step sums, initial weights, schedules and the
        sharpness warm start. Taken at an epoch end (the batch position is 0), so any pack resumes it."""
        pieces = dict(zip(self.layer_names, m.w.split(self.sizes)))
        stats = dict(zip(self.bn_names, m.stats))
        model = {}
        for key, value in self.template.state_dict().items():
            prefix, _, leaf = key.rpartition(".")
            if leaf == "weight" and prefix in pieces:
                model[key] = pieces[prefix].reshape(value.shape).clone()
            elif prefix in stats and leaf in ("running_mean", "running_var"):
                model[key] = stats[prefix][0 if leaf == "running_mean" else 1].clone()
            elif prefix in stats and leaf == "num_batches_tracked":
                model[key] = torch.tensor(m.step, dtype=value.dtype, device=value.device)
            else:
                model[key] = value.clone()
        return {"model": model,
                "update": {"base_rate": m.base_rate, "rho0": m.rho0, "buf": None if m.buf is None else m.buf.clone()},
                "step": m.step, "start_step": m.start_step, "elapsed": m.elapsed,
                "batch_gen": m.stream.gen.get_state(),
                "averages": {"sums": m.sums.clone(), "count": m.count, "names": list(self.sum_names)},
                "w0": m.w0.clone(), **{q.carry_key: m.carried.get(q.name) for q in self.quantities if q.carry_key},
                "schedules": {name: s.last for name, s in m.schedules.items()},
                "config": {"mode": m.cfg.mode, "momentum": m.cfg.momentum, "seed": m.cfg.seed}}

    @torch.no_grad()
    def load_member_state(self, m: Member, state: dict, fork: bool = False) -> None:
        """Resume a member from member_state() (taken in any pack, of any size). With fork, the state is
        another run's checkpoint and the member a new run branching from it (_branch)."""
        model = state["model"]
        m.w.copy_(torch.cat([model[f"{n}.weight"].reshape(-1) for n in self.layer_names]))
        for (mean, var), name in zip(m.stats, self.bn_names):
            mean.copy_(model[f"{name}.running_mean"])
            var.copy_(model[f"{name}.running_var"])
        m.base_rate, m.rho0 = state["update"]["base_rate"], state["update"]["rho0"]
        if m.buf is not None and state["update"]["buf"] is not None:
            m.buf.copy_(state["update"]["buf"])
        m.step, m.elapsed = state["step"], state["elapsed"]
        m.start_step = state.get("start_step", 0)
        m.stream.gen.set_state(state["batch_gen"])
        m.stream.pos = 0
        saved = dict(zip(state["averages"].get("names", LEGACY_SUM_NAMES), state["averages"]["sums"]))
        m.sums.copy_(torch.stack([saved.get(name, m.sums.new_zeros(())) for name in self.sum_names]))
        m.count = state["averages"]["count"]
        m.w0.copy_(state["w0"])
        m.carried = {q.name: state.get(q.carry_key) for q in self.quantities if q.carry_key}
        # checkpoints written before quantities had names kept two schedules under their own keys
        lasts = state.get("schedules") or {"test": state.get("test_last"), "sharpness": state.get("sharpness_last"),
                                           "trace": state.get("sharpness_last")}
        for name, schedule in m.schedules.items():
            schedule.last = lasts.get(name, m.step)
        m.needs_start_point = False
        if fork:
            self._branch(m, state)

    @staticmethod
    def _branch(m: Member, state: dict) -> None:
        """A new run starting from another run's checkpoint: its numbering (and the step sums and
        measurement cadence in flight) go on from there, so a fork that changes nothing is the parent's
        own continuation; its own config rules the rate, mode, momentum and seed, and its schedule starts
        there. A momentum buffer, a sphere radius or a batch order is kept only where the config keeps
        what made it. It logs a first point where it starts (forked_start: log_point)."""
        parent = state.get("config", {})
        m.start_step, m.elapsed, m.needs_start_point = m.step, 0.0, True
        m.base_rate = m.cfg.base_rate
        if m.sphere and parent.get("mode") != "sphere":      # from lrwd: the sphere the weights are on now
            m.rho0 = float(m.w.norm())
        same_momentum = parent.get("momentum") == m.cfg.momentum and parent.get("mode") == m.cfg.mode
        if m.buf is not None and not same_momentum:
            m.buf.zero_()
        if parent.get("seed") != m.cfg.seed:
            m.stream.gen.manual_seed(m.cfg.seed)


def _check_packable(cfgs: list[RunConfig]) -> None:
    if len({pack_key(c) for c in cfgs}) == 1:
        return
    first = cfgs[0].to_dict()
    differ = sorted({k for c in cfgs for k, v in c.to_dict().items() if k not in MEMBER_FIELDS and v != first[k]})
    raise ConfigError(f"these runs cannot share a pack: they differ in {', '.join(differ)} "
                      f"(members may differ only in {', '.join(MEMBER_FIELDS[:6])})")


def train_traces(cfgs: list[RunConfig], *, device: str | None = None) -> list:
    """Train configurations in memory and return each one's trace (a wide DataFrame: step, epoch,
    wall_time, metric keys), in the order given. Compatible configurations train together as packs
    where packing pays (as the worker would pack them). The stable in-process API for analysis,
    calibration and tests: no store involved."""
    from .analysis import memory_trace
    from .packing import pack_groups
    from .runtime import configure_process
    cfgs = [c if device is None else c.replace(device=device) for c in cfgs]
    traces: list = [None] * len(cfgs)
    for group in pack_groups(cfgs):
        recorders = [MemoryRecorder() for _ in group]
        trainer = Trainer([cfgs[i] for i in group], recorders=recorders)
        configure_process(trainer.device, cfgs[group[0]].model)
        trainer.run()
        for i, recorder in zip(group, recorders):
            traces[i] = memory_trace(recorder.rows)
    return traces
