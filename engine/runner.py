"""Execute stored runs: the glue between the training loop and the store.

Used by `engine train`, `engine sweep` and the worker alike, so a run behaves the same wherever it
executes, alone or packed: metrics batched through a MetricWriter, commands obeyed between steps,
checkpoints every K epochs (metrics flushed first, so a checkpoint never points past the stored
trace), resume from the last checkpoint with the trace truncated to it, status and regime at the end.
"""
from __future__ import annotations

import os
import shutil
import time
import traceback
from pathlib import Path

import torch

from storage import Store

from . import shutdown
from .analysis import analyze_stored
from .config import ConfigError, RunConfig
from .runtime import resolve_device
from .trainer import Member, Trainer

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
    """A member's control (trainer.Control): heartbeats, the live regime label, and the commands table —
    pause parks the member, resume brings it back, stop ends it, set_elr/set_lr change its rate.
    After a SIGTERM of the process (engine.shutdown) the member stops as `interrupted`, resumable."""

    def __init__(self, store: Store, run_id: int, recorder: StoreRecorder):
        self.store, self.run_id, self.recorder = store, run_id, recorder
        self.next_poll = self.next_beat = self.next_analysis = 0.0
        self.stop_reason: str | None = None
        self.paused = False
        self.regime: str | None = None
        self.spikes: set[int] = set()

    def poll(self, member: Member) -> str | None:
        if shutdown.requested():
            return self._stop("interrupted")
        now = time.monotonic()
        if now >= self.next_beat:
            self.store.heartbeat(self.run_id, member.step)
            self.next_beat = now + HEARTBEAT_EVERY_S
        if now >= self.next_analysis and not self.paused:
            self.refresh_analysis(member)
            self.next_analysis = now + ANALYZE_EVERY_S
        if now < self.next_poll:
            return None
        self.next_poll = now + POLL_EVERY_S
        action = None
        for cmd in self.store.take_commands(self.run_id):
            if cmd.kind == "stop":
                return self._stop(cmd.payload.get("status", "cancelled"))
            if cmd.kind in ("set_elr", "set_lr"):
                try:
                    member.set_rate(float(cmd.payload["value"]))
                except (KeyError, ValueError) as exc:   # a bad value becomes a note, not a crash
                    member.recorder.event(member.step, "note", {"text": f"ignored {cmd.kind}: {exc}"})
            elif cmd.kind == "pause" and not self.paused:
                self.recorder.flush()
                self.store.heartbeat(self.run_id, member.step)     # the step a reader sees while paused is exact
                self.store.set_status(self.run_id, "paused")
                self.paused, action = True, "pause"
            elif cmd.kind == "resume" and self.paused:
                self.store.set_status(self.run_id, "running")
                self.paused, action = False, "resume"
        return action

    def _stop(self, reason: str) -> str:
        """The run ends at this step with status `reason` (cancelled, interrupted, ...)."""
        self.stop_reason = reason
        return "stop"

    def refresh_analysis(self, member: Member) -> dict:
        self.recorder.flush()
        result = analyze_stored(self.store, self.run_id, member.trainer.data.num_classes)
        if result["regime"] != self.regime:
            self.regime = result["regime"]
            self.store.update_run(self.run_id, regime=self.regime)
            self.store.add_event(self.run_id, member.step, "regime",
                                 {"regime": self.regime, "reason": result["evidence"].get("reason", "")})
        for step in result["spikes"]:
            if step not in self.spikes:
                self.spikes.add(step)
                self.store.add_event(self.run_id, step, "spike", {"period": result["period"]})
        return result


def save_checkpoint(store: Store, member: Member, keep: bool = False) -> None:
    """The run's resume checkpoint (run-N.pt), and with keep a kept one for forks and averages
    (run-N.eE.pt, a hard link to the same bytes). Metrics are flushed first, so a checkpoint never
    points past the stored trace; files appear whole or not at all (written aside, then renamed)."""
    member.recorder.flush()
    folder = store.checkpoint_dir
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"run-{member.run_id}.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save(member.state_dict(), tmp)
    os.replace(tmp, path)
    store.update_run(member.run_id, checkpoint_path=str(path), checkpoint_step=member.step)
    if keep:
        epoch = member.step // member.steps_per_epoch
        kept = folder / f"run-{member.run_id}.e{epoch}.pt"
        tmp = kept.with_suffix(".pt.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)
        except OSError:           # a file system without hard links
            shutil.copyfile(path, tmp)
        os.replace(tmp, kept)
        store.record_checkpoint(member.run_id, epoch, member.step, str(kept), kept.stat().st_size)


def start_state(store: Store, info, device: torch.device) -> tuple[dict | None, bool]:
    """(checkpoint, is_fork) a stored run starts from: its own latest checkpoint (a resume), else, for a
    fork, its parent's kept checkpoint at the fork epoch, else nothing (a fresh run)."""
    if info.checkpoint_path and Path(info.checkpoint_path).exists():
        return torch.load(info.checkpoint_path, map_location=device, weights_only=True), False
    if info.parent_id is None:
        return None, False
    kept = {c.epoch: c.path for c in store.checkpoints(info.parent_id)}
    if info.fork_epoch not in kept or not Path(kept[info.fork_epoch]).exists():
        raise ConfigError(f"run {info.id} branches from run {info.parent_id} at epoch {info.fork_epoch}, "
                          "whose kept checkpoint is gone")
    return torch.load(kept[info.fork_epoch], map_location=device, weights_only=True), True


def execute(store: Store, run_ids: list[int], *, device: str | None = None, progress=None) -> dict[int, str]:
    """Train stored runs to their end in this process, as one pack (one run: a pack of one), each
    resumed from its checkpoint if it has one; returns each run's final status. Never raises for
    training failures (they mark the runs failed); Ctrl-C leaves the live runs interrupted."""
    infos = [store.get_run(run_id) for run_id in run_ids]
    statuses: dict[int, str] = {}
    try:
        cfgs = [RunConfig.from_dict(info.config) for info in infos]
        if device:
            cfgs = [c.replace(device=device) for c in cfgs]
        target = resolve_device(cfgs[0].device)
        starts = [start_state(store, info, target) for info in infos]
        trainer = Trainer(cfgs, states=[s for s, _ in starts], forks=[f for _, f in starts], device=target)
    except ConfigError as exc:
        for info in infos:
            store.set_status(info.id, "failed", error=str(exc))
            statuses[info.id] = "failed"
        return statuses

    def finish(m: Member) -> None:
        m.recorder.flush()
        status = m.result.status if m.result.status != "stopped" else m.control.stop_reason or "cancelled"
        m.control.refresh_analysis(m)
        store.update_run(m.run_id, step=m.step)
        store.set_status(m.run_id, status)
        statuses[m.run_id] = status

    for info, m in zip(infos, trainer.members):
        _attach(store, info, m, finish)
        if len(infos) > 1:
            others = ", ".join(str(i.id) for i in infos if i.id != info.id)
            store.add_event(info.id, m.step, "note", {"text": f"packed with run(s) {others} on {trainer.device}"})
    if progress is not None:      # one bar: the members' steps added up
        progress.total = sum(m.total_steps for m in trainer.members)
        trainer.on_step = lambda t: progress.update(sum(m.step for m in t.members) - progress.n)
    live = lambda: [m for m in trainer.members if m.state != "ended"]   # noqa: E731
    try:
        trainer.run()
        return statuses
    except KeyboardInterrupt:      # Ctrl-C where runs train in the foreground: resumable
        for m in live():
            m.recorder.flush()
            store.set_status(m.run_id, "interrupted")
        raise
    except Exception as exc:       # a bug or an OOM marks the live runs, never kills the worker
        error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        for m in live():
            m.recorder.flush()
            store.set_status(m.run_id, "failed", error=error)
            statuses[m.run_id] = "failed"
        return statuses
    finally:
        for m in trainer.members:
            m.recorder.close()


def _attach(store: Store, info, m: Member, finish) -> None:
    """Connect a member to its stored run: recorder, control, checkpoints, the trace cut back to where
    it resumes (the stored trace is exactly one trajectory), status running."""
    m.run_id = info.id
    resumed_from = m.step if not m.needs_start_point else None
    store.truncate_after(info.id, m.step if resumed_from is not None else -1)
    m.recorder = StoreRecorder(store, info.id)
    m.control = StoreControl(store, info.id, m.recorder)
    if resumed_from is not None:   # what was already announced before the checkpoint stays announced
        m.control.regime = info.regime
        m.control.spikes = {e.step for e in store.events(info.id, ["spike"])}
    m.checkpoint = lambda member, keep: save_checkpoint(store, member, keep)
    m.on_end = finish
    store.update_run(info.id, device=str(m.trainer.device), total_steps=m.total_steps, step=m.step,
                     worker_id=info.worker_id)
    store.set_status(info.id, "running")
    if resumed_from is not None:
        store.add_event(info.id, resumed_from, "resume", {"from_step": resumed_from})
