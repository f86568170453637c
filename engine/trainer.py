"""The training loop for one run: a scale-invariant network on the sphere or under LR + WD.

Deliberately one readable page. What is measured lives in metrics.py, where it goes is the
recorder's business (memory, the store), and who may pause or steer the run is the control's
(the worker's command poller, a progress bar, a test).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from .config import RunConfig
from .data import Dataset, load_dataset
from .metrics import NormStats, Sharpness, StepAverages, TestEval, angular_update
from .hessian import preserved_buffers
from .models import build_model, si_layer_names, si_parameters
from .optim import SIGroup, SIUpdate


class Recorder(Protocol):
    def metrics(self, step: int, epoch: float, wall_time: float, values: dict[str, float]) -> None: ...
    def event(self, step: int, kind: str, payload: dict) -> None: ...


class Control(Protocol):
    def poll(self, trainer: "Trainer") -> str | None:
        """Called between steps; may block (pause) or return "stop"."""


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from .config import ConfigError
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu or auto")
    return torch.device(name)


def configure_threads(cfg: RunConfig, device: torch.device) -> None:
    """mlp_si on a CPU runs on one thread: its tiny matmuls lose more to thread hand-offs than they
    gain (measured 8x slower with two threads on 2 cores)."""
    if device.type == "cpu" and cfg.model == "mlp_si":
        torch.set_num_threads(1)


@dataclass
class TrainResult:
    status: str          # finished | nonfinite | stopped
    step: int
    last: dict


class Trainer:
    def __init__(self, cfg: RunConfig, *, data: Dataset | None = None, recorder: Recorder | None = None,
                 control: Control | None = None, checkpoint=None, device: torch.device | None = None):
        self.cfg = cfg.validate()
        self.device = device or resolve_device(cfg.device)
        self.data = data if data is not None else load_dataset(cfg, self.device)
        self.recorder = recorder or MemoryRecorder()
        self.control, self.checkpoint = control, checkpoint

        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg, self.data.input_shape, self.data.num_classes).to(self.device)
        self.model.train()
        self.group = SIGroup(si_parameters(self.model))
        self.steps_per_epoch = self.data.steps_per_epoch(cfg.batch)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.update = SIUpdate(self.group, cfg.mode, cfg.base_rate, wd=cfg.wd, momentum=cfg.momentum,
                               schedule=cfg.schedule, total_steps=self.total_steps)
        self.batch_gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.step, self.elapsed = 0, 0.0

        self.averages = StepAverages(self.device)
        self.norms = NormStats(self.group, si_layer_names(self.model), self.group.w.clone())
        self.test = TestEval(cfg.eval_every or self.steps_per_epoch)
        probe = self.data.probe_indices(min(cfg.probe_size, len(self.data.y_train)), seed=cfg.seed)
        self.probe_chunks = [(self.data.x_train[i], self.data.y_train[i])
                             for i in probe.split(cfg.batch)]
        self.sharpness = Sharpness(cfg.sharpness_every, self.probe_chunks, iters=cfg.lanczos_iters,
                                   tol=cfg.lanczos_tol, trace_samples=cfg.trace_samples, seed=cfg.seed)

    # ---- live control ------------------------------------------------------------------------
    def set_rate(self, value: float) -> None:
        """Change the ELR (sphere) or LR (lrwd) between two steps; recorded as an event."""
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"rate must be a positive finite number, got {value}")
        kind = "elr_change" if self.cfg.mode == "sphere" else "lr_change"
        self.recorder.event(self.step, kind, {"from": self.update.base_rate, "to": value})
        self.update.base_rate = value

    @property
    def epoch(self) -> float:
        return self.step / self.steps_per_epoch

    # ---- the loop ------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, data = self.cfg, self.data
        started = time.perf_counter() - self.elapsed
        last: dict = {}
        if self.step == 0:
            last = self._log_point(started, initial=True)
        while self.step < self.total_steps:
            for idx in data.batches(cfg.batch, self.batch_gen):
                if self.control is not None and self.control.poll(self) == "stop":
                    self.elapsed = time.perf_counter() - started
                    return TrainResult("stopped", self.step, last)
                self._train_step(idx)
                self.step += 1
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    last = self._log_point(started)
                    if not self._finite(last):
                        return TrainResult("nonfinite", self.step, last)
            self.elapsed = time.perf_counter() - started
            epoch = self.step // self.steps_per_epoch
            if self.checkpoint is not None and cfg.checkpoint_every and epoch % cfg.checkpoint_every == 0:
                self.checkpoint(self)
        return TrainResult("finished", self.step, last)

    def _train_step(self, idx: torch.Tensor) -> None:
        x, y = self.data.x_train[idx], self.data.y_train[idx]
        if self.cfg.augment:
            x = self.data.augment(x, self.batch_gen)
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        g = self.group.flat_grad(torch.autograd.grad(loss, self.group.params))
        with torch.no_grad():
            w = self.group.w
            rho = w.norm()
            u_before = w / rho
            self.update.step(g, self.step)
            acc = (logits.argmax(1) == y).float().mean()
            self.averages.add(loss.detach(), acc, g.norm(), rho, angular_update(u_before, w))

    def _log_point(self, started: float, initial: bool = False) -> dict:
        final = self.step == self.total_steps
        values = self._initial_train_loss() if initial else self.averages.flush()
        values.update(self.norms.measure(self.update.lr(self.step)))
        if self.test.schedule.due(self.step, final):
            values.update(self.test.measure(self.model, self.data))
            self.test.schedule.mark(self.step)
        if self.sharpness.schedule.due(self.step, final):
            values.update(self.sharpness.measure(self.model, self.group, values["elr"], self.cfg.momentum))
            self.sharpness.schedule.mark(self.step)
        self.recorder.metrics(self.step, self.epoch, time.perf_counter() - started, values)
        return values

    def _initial_train_loss(self) -> dict[str, float]:
        """Untrained level at step 0: the probe batches in train mode, leaving BN statistics as they were."""
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        n = 0
        with preserved_buffers(self.model), torch.no_grad():
            for x, y in self.probe_chunks:
                logits = self.model(x)
                loss += F.cross_entropy(logits, y, reduction="sum").double()
                correct += (logits.argmax(1) == y).sum()
                n += len(y)
        mean = torch.stack([loss, correct]).div(n).tolist()
        return {"train_loss": mean[0], "train_acc": mean[1]}

    def _finite(self, values: dict) -> bool:
        bad = [k for k in ("train_loss", "si_norm", "grad_norm") if k in values and not math.isfinite(values[k])]
        if bad:
            self.recorder.event(self.step, "nonfinite", {k: str(values[k]) for k in bad})
        return not bad

    # ---- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "update": self.update.state_dict(), "step": self.step,
                "elapsed": self.elapsed, "batch_gen": self.batch_gen.get_state(),
                "averages": self.averages.state_dict(), "w0": self.norms.w0,
                "sharpness_vec": self.sharpness.vec, "test_last": self.test.schedule.last,
                "sharpness_last": self.sharpness.schedule.last}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.update.load_state_dict(state["update"])
        self.step, self.elapsed = state["step"], state["elapsed"]
        self.batch_gen.set_state(state["batch_gen"])
        self.averages.load_state_dict(state["averages"])
        self.norms.w0.copy_(state["w0"])
        self.norms.w0_norm = self.norms.w0.norm()
        self.sharpness.vec = state["sharpness_vec"]
        self.test.schedule.last = state["test_last"]
        self.sharpness.schedule.last = state["sharpness_last"]


def train_traces(cfgs: list[RunConfig], *, device: str | None = None) -> list:
    """Train configurations in memory and return each one's trace (a wide DataFrame: step, epoch,
    wall_time, metric keys), in the order given. Compatible configurations train together as packs
    where packing pays (as the worker would pack them). The stable in-process API for analysis,
    calibration and tests: no store involved."""
    from .analysis import memory_trace
    from .packed import PackedTrainer, max_pack_size, pack_key, packing_enabled
    cfgs = [c.validate() if device is None else c.replace(device=device).validate() for c in cfgs]
    groups: dict[str, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        groups.setdefault(pack_key(cfg) if packing_enabled(cfg) else f"single-{i}", []).append(i)
    traces: list = [None] * len(cfgs)
    for members in groups.values():
        for start in range(0, len(members), max_pack_size()):
            chunk = members[start:start + max_pack_size()]
            recorders = [MemoryRecorder() for _ in chunk]
            pack = PackedTrainer([cfgs[i] for i in chunk], recorders=recorders)
            configure_threads(cfgs[chunk[0]], pack.device)
            pack.run()
            for i, recorder in zip(chunk, recorders):
                traces[i] = memory_trace(recorder.rows)
    return traces
