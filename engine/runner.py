"""Execute stored runs: the glue between the training loop and the store.

Used by `engine train`, `engine sweep` and the worker alike, so a run behaves the same wherever it
executes, alone or packed: metrics batched through a MetricWriter, commands obeyed between steps,
checkpoints every K epochs (metrics flushed first, so a checkpoint never points past the stored
trace), resume from the last checkpoint with the trace truncated to it, status and regime at the end.
"""
from __future__ import annotations

import threading
import time
import traceback

import torch

from storage import HEARTBEAT_EVERY_S, ClaimLost, RunNotFound, Store, StoreError
from storage.artifacts import ArtifactMissing
from storage.timings import seconds

from . import shutdown
from .analysis import analyze_stored
from .config import ConfigError, RunConfig
from .runtime import resolve_device
from .trainer import Member, Trainer

POLL_EVERY_S = seconds("SPHERELAB_COMMAND_POLL_S", 0.5)   # how often the store is asked for commands
ANALYZE_EVERY_S = 5.0     # how often the live regime label and spikes are refreshed
ANALYSIS_SHARE_S = 0.5    # in a large pack each member's analysis comes round every this many seconds per member
# Resume checkpoints of a stored run at most this often: epochs of small data last milliseconds, and a
# file per member per epoch cost more than the training (measured 3x on a 27-run ticks pack). A kill
# then costs at most this much recomputation; kept checkpoints (forks, averages) are always written.
CHECKPOINT_MIN_S = 5.0
EX_TEMPFAIL = shutdown.EX_TEMPFAIL


class StoreRecorder:
    """Metrics go through the batched writer; events are rare and written at once. A write that finds
    the run taken from this process (ClaimLost: deleted, ended by someone else, claimed again) marks
    the member lost: nothing more is written for it, and its control stops it at the next poll."""

    def __init__(self, store: Store, run_id: int):
        self.store, self.run_id = store, run_id
        self.writer = store.metric_writer(run_id)
        self.lost: str | None = None

    def metrics(self, step, epoch, wall_time, values):
        if not self.lost:
            self.guard(self.writer.log, step, epoch, wall_time, values)

    def event(self, step, kind, payload):
        if not self.lost:
            self.guard(self.store.add_event, self.run_id, step, kind, payload)

    def flush(self):
        if not self.lost:
            self.guard(self.writer.flush)

    def close(self):
        if self.lost:
            self.writer.discard()
        else:
            self.guard(self.writer.close)

    def guard(self, write, *args, **kwargs):
        """write(...), or mark the run lost if it was taken from this process."""
        try:
            return write(*args, **kwargs)
        except (ClaimLost, RunNotFound) as exc:
            self.lose(exc)
            return None

    def lose(self, error: Exception) -> None:
        self.lost = str(error)
        self.writer.discard()


class PackPoller:
    """The store calls of all members trained in one process, made together whatever the pack's size:
    one heartbeat transaction a second (from its own thread, see beat()), one look at the commands table
    every POLL_EVERY_S, and the members' live analyses spread out (each every ANALYZE_EVERY_S, or every
    ANALYSIS_SHARE_S per member in a large pack, one at a time)."""

    def __init__(self, store: Store):
        self.store = store
        self.controls: dict[int, "StoreControl"] = {}
        self.next_poll = self.next_analysis = 0.0
        self.lost: dict[int, Exception] = {}      # found by the heartbeat thread, applied by the training thread
        self._stop = threading.Event()
        self._heart: threading.Thread | None = None

    def live(self) -> dict[int, "StoreControl"]:
        return {rid: c for rid, c in list(self.controls.items())
                if c.member is not None and not c.recorder.lost and c.stop_reason is None and not c.ended
                and rid not in self.lost}

    # ---- heartbeats: a thread of their own, so a step that lasts minutes (a sharpness measurement
    # with hundreds of Lanczos iterations, a long evaluation) never makes a live run look stale.
    def start(self) -> None:
        self._heart = threading.Thread(target=self._beat_forever, name="run-heartbeat", daemon=True)
        self._heart.start()

    def stop(self) -> None:
        self._stop.set()
        if self._heart is not None:
            self._heart.join()

    def _beat_forever(self) -> None:
        while not self._stop.is_set():
            self.beat()
            self._stop.wait(HEARTBEAT_EVERY_S)

    def beat(self) -> None:
        """One heartbeat transaction for the live members. A run taken from this process is noted (the
        training thread stops it at its next poll); a store error is tried again at the next beat."""
        live = self.live()
        if not live:
            return
        try:
            lost = self.store.heartbeats({rid: c.member.step for rid, c in live.items()}, held_only=True)
        except StoreError:
            return
        self.lost.update(lost)

    def work(self) -> None:
        now = time.monotonic()
        for run_id, error in list(self.lost.items()):
            control = self.controls.get(run_id)
            if control is not None and not control.recorder.lost:
                control.recorder.lose(error)
        live = self.live()
        if now >= self.next_poll and live:
            taken, lost = self.store.take_commands_for(list(live))
            for run_id, error in lost.items():
                live[run_id].recorder.lose(error)
            for run_id, cmds in taken.items():
                live[run_id].inbox.extend(cmds)
            self.next_poll = now + POLL_EVERY_S

    def analysis_turn(self, control: "StoreControl") -> bool:
        """Whether `control` may refresh its analysis now: it is due, and no other member did just now."""
        now = time.monotonic()
        if now < control.next_analysis or now < self.next_analysis:
            return False
        period = max(ANALYZE_EVERY_S, ANALYSIS_SHARE_S * len(self.controls))
        control.next_analysis = now + period
        self.next_analysis = now + period / max(1, len(self.controls))
        return True


class StoreControl:
    """A member's control (trainer.Control): heartbeats, the live regime label, and the commands table —
    pause parks the member, resume brings it back, stop ends it, set_elr/set_lr change its rate — through
    the pack's PackPoller. After a SIGTERM of the process (engine.shutdown) the member stops as
    `interrupted`, resumable; a member whose run was taken from this process (recorder.lost) stops and
    writes nothing more."""

    def __init__(self, store: Store, run_id: int, recorder: StoreRecorder, poller: PackPoller):
        self.store, self.run_id, self.recorder, self.poller = store, run_id, recorder, poller
        poller.controls[run_id] = self
        self.member: Member | None = None
        self.inbox: list = []
        self.next_analysis = 0.0
        self.stop_reason: str | None = None
        self.paused = self.ended = False
        self.regime: str | None = None
        self.spikes: set[int] = set()

    def poll(self, member: Member) -> str | None:
        if shutdown.requested():
            return self._stop("interrupted")
        self.member = member
        action = self.recorder.guard(self._poll, member)
        return self._stop("lost") if self.recorder.lost else action

    def _poll(self, member: Member) -> str | None:
        self.poller.work()
        if not self.paused and self.poller.analysis_turn(self):
            self.refresh_analysis(member)
        action = None
        commands, self.inbox = self.inbox, []
        for cmd in commands:
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
        """The run ends at this step with status `reason` (cancelled, interrupted, ...; lost: none)."""
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


class DiskFull(StoreError):
    """A checkpoint could not be written for want of space: the run ends `interrupted` (resumable once
    there is space), never `failed` (execute treats it as the store errors it is kin to)."""


def _disk_full(exc: BaseException) -> bool:
    """Whether a failed checkpoint write ran out of space. torch.save reports a short write as a
    RuntimeError ('unexpected pos N vs M', 'file write failed'), not as the OSError it was."""
    import errno
    text = str(exc)
    if any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in (exc, exc.__cause__,
                                                                                           exc.__context__)):
        return True
    if "No space left" in text or "quota exceeded" in text.lower():
        return True
    return isinstance(exc, RuntimeError) and ("unexpected pos" in text or "file write failed" in text)


def save_checkpoint(store: Store, member: Member, keep: bool = False) -> None:
    """The run's resume checkpoint, and with keep a kept one for forks and averages (a hard link to the
    same bytes, or a server-side copy), written as artifacts (storage.artifacts) by key. Metrics are
    flushed first, so a checkpoint never points past the stored trace; files appear whole or not at all,
    and carry the claim in their keys, so a process that lost its run never overwrites its successor's
    files (the store's writes are fenced)."""
    member.recorder.flush()
    artifacts = store.artifacts
    tag = (member.claim or "here")[:12]
    key = f"runs/{member.run_id}/resume-{tag}.pt"
    previous = store.get_run(member.run_id).checkpoint_path
    full = False
    try:
        artifacts.write(key, lambda target: torch.save(member.state_dict(), target), what="the checkpoint")
    except (StoreError, RuntimeError, OSError) as exc:
        if not _disk_full(exc):
            raise
        # torch's writer, still open in the traceback's frames, holds the unlinked partial file's space:
        # free it, so that the store (often on the same disk) can still record the run's end
        traceback.clear_frames(exc.__traceback__)
        full = True
    if full:
        import gc
        gc.collect()
        raise DiskFull(f"disk full at {artifacts.path(key) if artifacts.local else artifacts.describe(key)}: "
                       "free space and resume")
    store.update_run(member.run_id, checkpoint_path=key, checkpoint_step=member.step)
    if previous and previous != key:      # the file of an earlier claim of this run
        artifacts.delete(previous)
    if keep:
        epoch = member.step // member.steps_per_epoch
        kept = f"runs/{member.run_id}/epoch-{epoch}-{tag}.pt"
        size = artifacts.link(key, kept, what="the kept checkpoint")
        store.record_checkpoint(member.run_id, epoch, member.step, kept, size)


def execute(store: Store, claims: dict[int, str], *, device: str | None = None, progress=None,
            note: dict | None = None) -> dict[int, str]:
    """Train the claimed runs ({run id: claim token}) to their end in this process, as one pack (one
    run: a pack of one), each resumed from its checkpoint (or, for a fork, started from its parent's)
    if it has one; returns each run's final status. Never raises for training failures (they mark the
    runs failed); a run taken from this process ends "lost" with nothing more written; a store locked
    for longer than storage.LOCK_WAIT_S leaves the runs interrupted (or "unrecorded" if even that
    could not be written); Ctrl-C leaves the live runs interrupted. note: a "note" event payload every
    run gets as it starts (where it trains: engine.executors)."""
    for run_id, claim in claims.items():
        store.hold(run_id, claim)
    infos = [store.get_run(run_id) for run_id in claims]
    statuses: dict[int, str] = {}
    try:
        cfgs = [RunConfig.from_dict(info.config) for info in infos]
        if device:
            cfgs = [c.replace(device=device) for c in cfgs]
        target = resolve_device(cfgs[0].device)
        starts = []
        for info, cfg in list(zip(infos, cfgs)):
            try:
                starts.append(start_state(store, info, target))
            except CheckpointMissing as exc:     # never a fresh start: the run waits for its file
                statuses[info.id] = _wait_for_checkpoint(store, info.id, exc)
                infos.remove(info)
                cfgs.remove(cfg)
        if not infos:
            return statuses
        trainer = Trainer(cfgs, states=[s for s, _ in starts], forks=[f for _, f in starts], device=target)
    except ConfigError as exc:
        for info in infos:
            statuses[info.id] = _end_run(store, info.id, "failed", str(exc))
        return statuses
    except StoreError as exc:      # the artifact root unreachable (no root, no network): resumable later
        for info in infos:
            statuses[info.id] = _end_run(store, info.id, "interrupted", str(exc))
        return statuses

    poller = PackPoller(store)

    def finish(m: Member) -> None:
        m.control.ended = True
        status = m.result.status if m.result.status != "stopped" else m.control.stop_reason or "cancelled"
        if status != "lost":
            m.recorder.flush()
            m.recorder.guard(m.control.refresh_analysis, m)
            m.recorder.guard(store.update_run, m.run_id, step=m.step)
        statuses[m.run_id] = _end_run(store, m.run_id, status, recorder=m.recorder)
        if statuses[m.run_id] == "finished":
            _drop_resume_checkpoint(store, m.run_id)

    for info, m in zip(infos, trainer.members):
        _attach(store, info, m, claims[info.id], finish, poller)
        if note:
            m.recorder.event(m.step, "note", note)
        if len(infos) > 1:
            others = ", ".join(str(i.id) for i in infos if i.id != info.id)
            m.recorder.event(m.step, "note", {"text": f"packed with run(s) {others} on {trainer.device}"})
    if progress is not None:      # one bar: the members' steps added up
        progress.total = sum(m.total_steps for m in trainer.members)
        trainer.on_step = lambda t: progress.update(sum(m.step for m in t.members) - progress.n)
    live = lambda: [m for m in trainer.members if m.state != "ended"]   # noqa: E731
    poller.start()
    try:
        trainer.run()
        return statuses
    except KeyboardInterrupt:      # Ctrl-C where runs train in the foreground: resumable
        for m in live():
            statuses[m.run_id] = _end_run(store, m.run_id, "interrupted", recorder=m.recorder)
        raise
    except StoreError as exc:      # locked past LOCK_WAIT_S (StoreBusy) or gone: resumable by a worker later
        for m in live():
            statuses[m.run_id] = _end_run(store, m.run_id, "interrupted", str(exc), recorder=m.recorder)
        return statuses
    except Exception as exc:       # a bug or an OOM marks the live runs, never kills the worker
        error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        for m in live():
            statuses[m.run_id] = _end_run(store, m.run_id, "failed", error, recorder=m.recorder)
        return statuses
    finally:
        poller.stop()
        for m in trainer.members:
            m.recorder.close()


def _end_run(store: Store, run_id: int, status: str, error: str | None = None, recorder=None) -> str:
    """Record a run's final status; returns what was recorded: the status, "lost" (the run is no
    longer this process's: nothing written) or "unrecorded" (the store refused the write)."""
    if status == "lost" or (recorder is not None and recorder.lost):
        return "lost"
    try:
        if recorder is not None:
            recorder.flush()
        store.set_status(run_id, status, error=error)
        return status
    except ClaimLost:
        return "lost"
    except StoreError:
        return "unrecorded"


def _wait_for_checkpoint(store: Store, run_id: int, missing: "CheckpointMissing") -> str:
    """The run's recorded checkpoint is missing: it becomes interrupted, waiting for that key (no worker
    claims it until `resume` finds it back), its error the one line naming the key and the root, its
    stored trace untouched."""
    try:
        error = f"{missing}; then `python -m engine resume {run_id}`"
        store.update_run(run_id, status="interrupted", error=error, waiting_for=missing.key)
        return "interrupted"
    except ClaimLost:
        return "lost"
    except StoreError:
        return "unrecorded"


def _drop_resume_checkpoint(store: Store, run_id: int) -> None:
    """A finished run never resumes: its resume checkpoint goes (200 tiny runs kept 24 MB of them). Its
    kept checkpoints (--keep-every, --keep-last: other files, hard links to the same bytes) stay for
    forks, averages and geometries. The row forgets the file first, so it never points at nothing."""
    try:
        key = store.get_run(run_id).checkpoint_path
        if key:
            store.update_run(run_id, checkpoint_path=None, checkpoint_step=None)
            store.artifacts.delete(key)
    except (StoreError, OSError):
        pass          # a lock past the store's patience, a vanished run: the file stays (engine gc removes it)


class CheckpointMissing(StoreError):
    """A recorded checkpoint a run starts from is not under the artifact root: the run waits for it
    (interrupted, RunInfo.waiting_for), it never starts afresh."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


def start_state(store: Store, info, device: torch.device) -> tuple[dict | None, bool]:
    """(checkpoint, is_fork) a stored run starts from: its own latest checkpoint (a resume), else, for a
    fork, its parent's kept checkpoint at the fork epoch, else nothing (a fresh run: only a run with no
    recorded checkpoint). A recorded checkpoint that is missing is CheckpointMissing (never a fresh
    start); one that cannot be read (truncated, damaged, refused by the safe loader) is a ConfigError
    naming it."""
    if info.checkpoint_path:
        return load_checkpoint(store, info.checkpoint_path, device, f"run {info.id}'s checkpoint"), False
    if info.parent_id is None:
        if info.fork_epoch is not None:      # a fork whose parent was deleted: never a fresh start
            raise ConfigError(f"run {info.id} branches from a run that was deleted, at epoch {info.fork_epoch}, "
                              "whose kept checkpoint is gone")
        return None, False
    kept = {c.epoch: c.path for c in store.checkpoints(info.parent_id)}
    if info.fork_epoch not in kept:
        raise ConfigError(f"run {info.id} branches from run {info.parent_id} at epoch {info.fork_epoch}, "
                          "whose kept checkpoint is gone")
    return load_checkpoint(store, kept[info.fork_epoch], device, f"run {info.parent_id}'s kept checkpoint"), True


def load_checkpoint(store: Store, key: str, device: torch.device, what: str) -> dict:
    """torch.load of an artifact with the safe loader. A missing one is CheckpointMissing (one line naming
    the key and the root); one that cannot be read (truncated, damaged, a pickle the safe loader refuses)
    is a ConfigError naming `what` and the key, in one line."""
    artifacts = store.artifacts
    try:
        source = artifacts.source(key, what)
    except ArtifactMissing as exc:
        raise CheckpointMissing(str(exc), key) from None
    try:
        return torch.load(source, map_location=device, weights_only=True)
    except Exception as exc:      # truncated, damaged, or a pickle the safe loader refuses
        raise ConfigError(f"{what} {artifacts.describe(key)} cannot be loaded ({type(exc).__name__}: "
                          f"{_load_reason(exc)}): it is damaged or not a spherelab checkpoint") from None


def _load_reason(exc: Exception) -> str:
    """The line of torch's message that says what is wrong with the file. Its advice to re-run with
    weights_only=False is left out: that would run whatever code the file carries."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if "weights_only" not in line and "Weights only load failed" not in line
              and "documentation" not in line]
    if useful:
        return useful[0][:200]
    return "refused by the safe loader" if lines else type(exc).__name__


def _attach(store: Store, info, m: Member, claim: str, finish, poller: PackPoller) -> None:
    """Connect a member to its stored run: recorder, control, checkpoints, the trace cut back to where
    it resumes (the stored trace is exactly one trajectory), status running."""
    resumed_from = m.step if not m.needs_start_point else None
    store.truncate_after(info.id, m.step if resumed_from is not None else -1)
    recorder = StoreRecorder(store, info.id)
    control = StoreControl(store, info.id, recorder, poller)
    control.member = m            # heartbeats start before its first step (which may be a long measurement)
    if resumed_from is not None:   # what was already announced before the checkpoint stays announced
        control.regime = info.regime
        control.spikes = {e.step for e in store.events(info.id, ["spike"])}
    written_at = -CHECKPOINT_MIN_S

    def checkpoint(member: Member, keep: bool) -> None:
        nonlocal written_at
        if keep or time.monotonic() - written_at >= CHECKPOINT_MIN_S:
            written_at = time.monotonic()
            member.recorder.guard(save_checkpoint, store, member, keep)
    m.attach(run_id=info.id, claim=claim, recorder=recorder, control=control, checkpoint=checkpoint, on_end=finish)
    store.update_run(info.id, device=str(m.trainer.device), total_steps=m.total_steps, step=m.step)
    store.set_status(info.id, "running")
    if resumed_from is not None:
        store.add_event(info.id, resumed_from, "resume", {"from_step": resumed_from})
