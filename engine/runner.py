"""Execute one stored run: the glue between a Trainer and the store.

Used by `engine train`, `engine sweep` and the worker alike, so a run behaves the same wherever
it executes: metrics batched through a MetricWriter, commands obeyed between steps, checkpoints
every K epochs (flushed metrics first, so a checkpoint never points past the stored trace),
resume from the last checkpoint with the trace truncated to it, status and regime at the end.
"""
from __future__ import annotations

import os
import time
import traceback
from pathlib import Path

import torch

from storage import Store
from storage.urls import sqlite_file

from . import analysis, shutdown
from .config import ConfigError, RunConfig
from .config import num_classes as classes_of
from .trainer import Trainer, configure_threads

POLL_EVERY_S = 0.5        # how often the store is asked for commands
ANALYZE_EVERY_S = 5.0     # how often the live regime label and spikes are refreshed
HEARTBEAT_EVERY_S = 1.0


class StoreRecorder:
    """Metrics go through the batched writer; events are rare and written at once."""

    def __init__(self, store: Store, run_id: int):
        self.store, self.run_id = store, run_id
        self.writer = store.metric_writer(run_id)

    def metrics(self, step, epoch, wall_time, values):
        self.writer.log(step, epoch, wall_time, values)

    def event(self, step, kind, payload):
        self.store.add_event(self.run_id, step, kind, payload)

    def flush(self):
        self.writer.flush()

    def close(self):
        self.writer.close()


class StoreControl:
    """Obeys the commands table between steps: pause (blocks, heartbeating), resume, stop, set_elr/lr."""

    def __init__(self, store: Store, run_id: int, recorder: StoreRecorder, progress=None):
        self.store, self.run_id, self.recorder, self.progress = store, run_id, recorder, progress
        self.next_poll = self.next_beat = self.next_analysis = 0.0
        self.stop_reason: str | None = None
        self.regime: str | None = None
        self.spikes: set[int] = set()

    def poll(self, trainer: Trainer) -> str | None:
        if shutdown.requested():       # the worker is stopping: resumable from the last checkpoint
            return self._stop("interrupted")
        if self.progress is not None:
            self.progress.update(trainer.step - self.progress.n)
        now = time.monotonic()
        if now >= self.next_beat:
            self.store.heartbeat(self.run_id, trainer.step)
            self.next_beat = now + HEARTBEAT_EVERY_S
        if now >= self.next_analysis:
            self.refresh_analysis(trainer)
            self.next_analysis = now + ANALYZE_EVERY_S
        if now < self.next_poll:
            return None
        self.next_poll = now + POLL_EVERY_S
        return self._obey(self.store.take_commands(self.run_id), trainer)

    def _obey(self, commands, trainer: Trainer) -> str | None:
        for cmd in commands:
            if cmd.kind == "stop":
                return self._stop(cmd.payload.get("status", "cancelled"))
            if cmd.kind in ("set_elr", "set_lr"):
                self._apply_rate(cmd, trainer)
            elif cmd.kind == "pause":
                if self._pause(trainer) == "stop":
                    return "stop"
        return None

    def _stop(self, reason: str) -> str:
        """The run ends at this step with status `reason` (cancelled, interrupted, ...)."""
        self.stop_reason = reason
        return "stop"

    @staticmethod
    def _apply_rate(cmd, target) -> None:
        """set_elr/set_lr on a Trainer or a pack member; a bad value becomes a note, not a crash."""
        try:
            target.set_rate(float(cmd.payload["value"]))
        except (KeyError, ValueError) as exc:
            target.recorder.event(target.step, "note", {"text": f"ignored {cmd.kind}: {exc}"})

    def _pause(self, trainer: Trainer) -> str | None:
        self.recorder.flush()
        self.store.heartbeat(self.run_id, trainer.step)   # the step a reader sees while paused is exact
        self.store.set_status(self.run_id, "paused")
        while True:
            time.sleep(POLL_EVERY_S)
            if shutdown.requested():
                return self._stop("interrupted")
            self.store.heartbeat(self.run_id, trainer.step)
            for cmd in self.store.take_commands(self.run_id):
                if cmd.kind == "resume":
                    self.store.set_status(self.run_id, "running")
                    return None
                if cmd.kind == "stop":
                    return self._stop(cmd.payload.get("status", "cancelled"))
                if cmd.kind in ("set_elr", "set_lr"):
                    self._obey([cmd], trainer)

    def refresh_analysis(self, trainer: Trainer) -> dict:
        self.recorder.flush()
        result = analyze_stored(self.store, self.run_id, trainer.data.num_classes)
        if result["regime"] != self.regime:
            self.regime = result["regime"]
            self.store.update_run(self.run_id, regime=self.regime)
            self.store.add_event(self.run_id, trainer.step, "regime",
                                 {"regime": self.regime, "reason": result["evidence"].get("reason", "")})
        for step in result["spikes"]:
            if step not in self.spikes:
                self.spikes.add(step)
                self.store.add_event(self.run_id, step, "spike", {"period": result["period"]})
        return result


def analyze_stored(store: Store, run_id: int, num_classes: int | None = None) -> dict:
    """analysis.analyze on a stored run's trace (num_classes from its config when not given)."""
    if num_classes is None:
        num_classes = classes_of(store.get_run(run_id).config)
    return analysis.analyze(store.read_metrics(run_id, analysis.KEYS), num_classes)


def checkpoint_dir(store: Store) -> Path:
    """Beside an SQLite file (so a copied folder keeps its checkpoints), else under ~/.spherelab."""
    db = sqlite_file(store.url)
    if db is not None:
        return db.parent / (db.name + ".checkpoints")
    return Path(os.path.expanduser("~/.spherelab/checkpoints"))


def save_checkpoint(store: Store, run_id: int, recorder: StoreRecorder, trainer: Trainer) -> None:
    recorder.flush()
    folder = checkpoint_dir(store)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"run-{run_id}.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save(trainer.state_dict(), tmp)
    os.replace(tmp, path)     # atomic: a kill mid-save leaves the previous checkpoint intact
    store.update_run(run_id, checkpoint_path=str(path), checkpoint_step=trainer.step)


def build_trainer(store: Store, run_id: int, device: str | None = None) -> Trainer:
    """A Trainer for a stored run, restored from its checkpoint if it has one."""
    info = store.get_run(run_id)
    cfg = RunConfig.from_dict(info.config)
    if device:
        cfg = cfg.replace(device=device)
    trainer = Trainer(cfg)
    if info.checkpoint_path and Path(info.checkpoint_path).exists():
        state = torch.load(info.checkpoint_path, map_location=trainer.device, weights_only=True)
        trainer.load_state_dict(state)
    return trainer


def execute_run(store: Store, run_id: int, *, device: str | None = None, progress=None) -> str:
    """Train a stored run to its end; returns the final status. Never raises for training failures."""
    info = store.get_run(run_id)
    try:
        trainer = build_trainer(store, run_id, device)
    except ConfigError as exc:
        store.set_status(run_id, "failed", error=str(exc))
        return "failed"
    configure_threads(trainer.cfg, trainer.device)
    resumed_from = trainer.step if trainer.step else None
    # The stored trace must be exactly one trajectory: drop whatever was logged after the checkpoint.
    store.truncate_after(run_id, trainer.step if resumed_from else -1)
    recorder = StoreRecorder(store, run_id)
    control = StoreControl(store, run_id, recorder, progress)
    if resumed_from is not None:   # what was already announced before the checkpoint stays announced
        control.regime = info.regime
        control.spikes = {e.step for e in store.events(run_id, ["spike"])}
    trainer.recorder, trainer.control = recorder, control
    trainer.checkpoint = lambda t: save_checkpoint(store, run_id, recorder, t)
    store.update_run(run_id, device=str(trainer.device), total_steps=trainer.total_steps,
                     step=trainer.step, worker_id=info.worker_id)
    store.set_status(run_id, "running")
    if resumed_from is not None:
        store.add_event(run_id, resumed_from, "resume", {"from_step": resumed_from})
    try:
        result = trainer.run()
        recorder.flush()
        status = {"finished": "finished", "nonfinite": "nonfinite"}.get(result.status)
        if result.status == "stopped":
            status = control.stop_reason or "cancelled"
        control.refresh_analysis(trainer)
        store.update_run(run_id, step=trainer.step)
        store.set_status(run_id, status)
        return status
    except KeyboardInterrupt:  # Ctrl-C on `engine train`: resumable from the last checkpoint
        recorder.flush()
        store.set_status(run_id, "interrupted")
        raise
    except Exception as exc:  # a bug or an OOM must mark the run, not kill the worker
        recorder.flush()
        store.set_status(run_id, "failed", error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        return "failed"
    finally:
        recorder.close()
