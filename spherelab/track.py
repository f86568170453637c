"""`spherelab.track`: the lab's measurements on your own model and training loop (README, "Your own model").

    run = spherelab.track(model, optimizer, sweep="my sweep", steps_per_epoch=len(loader))
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(); loss.backward()
        run.before_step()                 # gradients: grad_norm, eff_grad_norm
        optimizer.step()
        run.after_step(train_loss=loss)   # norms, ELR, angular update; a log point every log_every steps
    run.log(test_loss=..., test_acc=...)
    run.finish()                          # or: with spherelab.track(...) as run:

Per-step sums stay on the model's device (no host sync per step); at a log point the averages become
one row, handed to a writer thread that writes it to the store (storage.MetricWriter, once a second)
and heartbeats the run, so the training thread never waits on the database.
"""
from __future__ import annotations

import atexit
import copy
import math
import os
import queue
import socket
import sys
import threading
import time
import uuid

import torch
import torch.nn.functional as F
from torch import nn

from .detect import detect_si

TRACK_PREFIX = "track:"     # the worker id of a tracked run: no worker ever claims or resumes it
SUMMED = ("train_loss", "train_acc", "grad_norm", "eff_grad_norm", "angular_update")


class Tracker:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, db=None, name=None, sweep=None,
                 tags=(), config=None, probe=None, sharpness_every: int = 0, log_every: int = 1,
                 steps_per_epoch: int | None = None, si_params=None, loss_fn=None, lanczos_iters: int = 20,
                 lanczos_tol: float = 1e-3, quiet: bool = False, example=None):
        from storage import HEARTBEAT_EVERY_S, Store
        if not isinstance(log_every, int) or log_every < 1:
            raise ValueError(f"log_every must be a whole number of steps, at least 1, not {log_every!r}")
        if not isinstance(sharpness_every, int) or sharpness_every < 0:
            raise ValueError("sharpness_every must be a whole number of steps, 0 (off) or more, "
                             f"not {sharpness_every!r}")
        if sharpness_every and probe is None:
            raise ValueError("sharpness_every needs a probe batch: pass probe=(x, y)")
        if steps_per_epoch is not None and (not isinstance(steps_per_epoch, int) or steps_per_epoch < 1):
            raise ValueError(f"steps_per_epoch must be a whole number, at least 1, not {steps_per_epoch!r}")
        self.model, self.optimizer = model, optimizer
        self.log_every, self.sharpness_every, self.probe = log_every, sharpness_every, probe
        self.steps_per_epoch = steps_per_epoch or 1
        self.loss_fn = loss_fn or F.cross_entropy
        self.lanczos_iters, self.lanczos_tol = lanczos_iters, lanczos_tol
        # example: a batch for the forward-hook detection when torch.fx cannot trace (default: the probe's)
        found = detect_si(model, example=probe[0] if example is None and probe is not None else example,
                          si_params=si_params)
        self.detection = found
        self.si_names = found.layer_names
        self.si = list(found.si.values())
        self.others = list(found.others.values())
        owner = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        self.layer_group = [owner.get(id(p)) for p in self.si]
        if not self.si and not quiet:
            print(f"spherelab.track: {type(model).__name__} has no scale-invariant weight (none reaches an "
                  "affine-free normalisation); losses are logged, norms and ELRs are not", file=sys.stderr)
        self.device = next(model.parameters()).device
        self.sums = torch.zeros(len(SUMMED), dtype=torch.float64, device=self.device)
        self.counts = 0
        self._given: set[str] = set()      # the step values the loop passed since the last log point
        self.step = 0
        self._before = None
        self._sharp_vec = None
        self._started = time.perf_counter()
        self.store = Store(db)
        self.worker_id = f"{TRACK_PREFIX}{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        sweep_id = None
        if sweep is not None:
            sweep_id = _sweep_named(self.store, sweep)
        cfg = self._config(config or {})
        self.config = cfg
        self.run_id = self.store.create_runs([{
            "config": cfg, "name": name or f"{type(model).__name__} {type(optimizer).__name__} lr={cfg.get('lr')}",
            "tags": list(tags), "sweep_id": sweep_id, "status": "running", "reserved_for": self.worker_id}])[0]
        # the progress the pages show: known when config gives epochs and steps_per_epoch is passed
        epochs = cfg.get("epochs")
        self.total_steps = (int(epochs) * steps_per_epoch if steps_per_epoch and isinstance(epochs, int)
                            and epochs > 0 else None)
        self.store.update_run(self.run_id, device=str(self.device), total_steps=self.total_steps)
        if not self.si:
            self.store.add_event(self.run_id, 0, "note", {"text": "no scale-invariant weight found: losses only"})
        self._queue: queue.Queue = queue.Queue()
        self._flushed = threading.Event()
        self._error: BaseException | None = None
        self._heartbeat_s = HEARTBEAT_EVERY_S
        self._thread = threading.Thread(target=self._write_forever, name=f"spherelab-track-{self.run_id}",
                                         daemon=True)
        self._thread.start()
        self.ended = False
        # set when someone stops the run from the dashboard or `engine cancel`: check it in your loop
        self.stop_requested = False
        atexit.register(self._at_exit)

    def _at_exit(self) -> None:
        """The process ends without finish(): write what is buffered and leave the run interrupted."""
        if not self.ended:
            self.finish("interrupted", error="the process ended without run.finish()")

    # ---- what the run records about itself
    def _config(self, given: dict) -> dict:
        group = self.optimizer.param_groups[0]
        si_ids = {id(p) for p in self.si}
        detected = {
            "source": "track", "model": type(self.model).__name__, "optimizer": type(self.optimizer).__name__,
            "mode": "lrwd", "lr": group.get("lr"), "wd": group.get("weight_decay", 0.0),
            "momentum": group.get("momentum", 0.0),      # heavy-ball momentum (the threshold's mu); Adam's betas apart
            **({"betas": list(group["betas"])} if "betas" in group else {}),
            "param_groups": len(self.optimizer.param_groups),
            "params": sum(p.numel() for p in self.model.parameters()),
            "trainable_params": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            "si_params": sum(p.numel() for p in self.si),
            "non_si_params": sum(p.numel() for p in self.others if id(p) not in si_ids),
            "si_layers": self.si_names, "si_detection": self.detection.method,
            "log_every": self.log_every, "sharpness_every": self.sharpness_every,
        }
        return {**detected, **given}

    # ---- the loop's calls
    @torch.no_grad()
    def before_step(self) -> None:
        """After loss.backward(), before optimizer.step(): the gradient of the SI weights and their norm."""
        if not self.si:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.si]
        gn = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        rho = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(self.si)))
        self._before = ([p.detach().clone() for p in self.si], rho, gn)

    @torch.no_grad()
    def after_step(self, train_loss=None, train_acc=None, **extra) -> None:
        """After optimizer.step(): one step done. train_loss / train_acc (floats or tensors) are averaged
        over the steps since the last log point; extra scalars are logged at this step as they are."""
        self.step += 1
        self.counts += 1
        row = torch.zeros(len(SUMMED), dtype=torch.float64, device=self.device)
        if train_loss is not None:
            row[0] = _scalar(train_loss, self.device)
        if train_acc is not None:
            row[1] = _scalar(train_acc, self.device)
        if self.si and self._before is not None:
            before, rho, gn = self._before
            rho_after = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(self.si)))
            diffs = torch._foreach_sub(torch._foreach_div(list(self.si), rho_after),
                                       torch._foreach_div(before, rho))
            chord = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(diffs)))
            angle = chord.mul(0.5).clamp(max=1.0).asin().mul(2)
            row[2:] = torch.stack([gn, gn * rho, angle]).double()
            self._before = None
        self.sums += row
        self._given.update(k for k, v in (("train_loss", train_loss), ("train_acc", train_acc)) if v is not None)
        if extra:
            self.log(**extra)
        if self.step % self.log_every == 0:
            self._log_point()

    def log(self, **values) -> None:
        """Any scalars (test_loss=..., test_acc=..., your own keys) at the current step."""
        clean = {k: float(v.item() if isinstance(v, torch.Tensor) else v) for k, v in values.items()}
        self._put(clean)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until everything logged so far is in the store."""
        self._flushed.clear()
        self._queue.put("flush")
        if not self._flushed.wait(timeout):
            raise TimeoutError(f"spherelab.track: the store did not take run {self.run_id}'s rows in {timeout:g} s")
        self._raise_writer_error()

    def finish(self, status: str = "finished", error: str | None = None) -> None:
        """End the run: the rows left are written, the status set, the regime judged. Idempotent."""
        if self.ended:
            return
        self.ended = True
        atexit.unregister(self._at_exit)
        if status == "finished" and self.counts:
            self._log_point()
        if status == "finished" and self.stop_requested:
            status = "cancelled"
        self._queue.put(None)
        self._thread.join()
        self.store.update_run(self.run_id, step=self.step,
                              **({"total_steps": self.step} if status == "finished" or not self.total_steps else {}))
        try:
            from engine.analysis import analyze_stored
            result = analyze_stored(self.store, self.run_id)
            self.store.update_run(self.run_id, regime=result["regime"])
        except Exception:          # noqa: BLE001 - a label is a bonus; the run's trace is what matters
            pass
        self.store.set_status(self.run_id, status, error=error)
        self._raise_writer_error()

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is None:
            self.finish()
        elif issubclass(kind, KeyboardInterrupt):
            self.finish("interrupted", error="stopped with Ctrl-C")
        else:
            self.finish("failed", error=f"{kind.__name__}: {exc}"[:500])

    # ---- measurements at a log point
    @torch.no_grad()
    def _log_point(self) -> None:
        values = {}
        n = max(self.counts, 1)
        sums = (self.sums / n).tolist()
        measured = self._given | ({"grad_norm", "eff_grad_norm", "angular_update"} if self.si else set())
        values.update({k: v for k, v in zip(SUMMED, sums) if k in measured})
        self._given = set()
        self.sums.zero_()
        self.counts = 0
        if self.si:
            norms = torch.stack(torch._foreach_norm(self.si))
            rho = float(torch.linalg.vector_norm(norms))
            lrs = [self.optimizer.param_groups[g]["lr"] if g is not None else float("nan") for g in self.layer_group]
            lr = next((x for x in lrs if not math.isnan(x)), float("nan"))
            values.update(si_norm=rho, lr=lr, elr=lr / rho ** 2 if rho else float("inf"))
            for name, norm, layer_lr in zip(self.si_names, norms.tolist(), lrs):
                values[f"layer_norm/{name}"] = norm
                values[f"layer_elr/{name}"] = layer_lr / norm ** 2 if norm else float("inf")
            if self.sharpness_every and self.step % self.sharpness_every == 0:
                values["sharpness"] = self.sharpness() * rho ** 2
                momentum = self.config.get("momentum") or 0.0
                values["sharpness_threshold"] = 2 * (1 + momentum) / values["elr"]
        if self.others:
            values["non_si_norm"] = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(self.others))))
        self._put(values)

    def sharpness(self) -> float:
        """Top Hessian eigenvalue of the loss on the probe w.r.t. the SI weights (not yet at unit norm),
        by the engine's Lanczos, on a copy of the model: the model, its BN statistics and every RNG are
        left as they were."""
        from engine.hessian import lanczos_top
        x, y = self.probe
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            twin = copy.deepcopy(self.model)
            twin.train()
            names = set(self.detection.si)
            params = [p for n, p in twin.named_parameters() if n in names]
            sizes = [p.numel() for p in params]

            def matvec(V: torch.Tensor, live) -> torch.Tensor:
                with torch.enable_grad():
                    loss = self.loss_fn(twin(x), y)
                    grads = torch.autograd.grad(loss, params, create_graph=True)
                    flat = torch.cat([g.reshape(-1) for g in grads])
                    hv = torch.autograd.grad((flat * V[0]).sum(), params)
                return torch.cat([h.reshape(-1) for h in hv])[None]

            start = self._sharp_vec
            if start is None:
                start = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(0)).to(self.device)
            thetas, vecs, _ = lanczos_top(matvec, start[None], iters=self.lanczos_iters, tol=self.lanczos_tol)
        self._sharp_vec = vecs[0]
        return thetas[0]

    # ---- the writer thread
    def _command(self, command) -> None:
        """A command from the dashboard or the CLI: stop is passed on to the loop (stop_requested); the
        others change what only the user's code controls, so the run's events say they were not applied."""
        if command.kind == "stop":
            self.stop_requested = True
        else:
            self.store.add_event(self.run_id, self.step, "note", {"text": _ignored(command.kind)})

    def _put(self, values: dict) -> None:
        self._raise_writer_error()
        elapsed = time.perf_counter() - self._started
        self._queue.put((self.step, self.step / self.steps_per_epoch, elapsed, values))

    def _raise_writer_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"spherelab.track could not write run {self.run_id}: {error}") from error

    def _write_forever(self) -> None:
        writer = self.store.metric_writer(self.run_id)
        next_beat = 0.0
        while True:
            try:
                item = self._queue.get(timeout=self._heartbeat_s)
            except queue.Empty:
                item = "tick"
            try:
                if item is None:
                    writer.close()
                    return
                if item == "flush":
                    writer.flush()
                    self._flushed.set()
                elif item != "tick":
                    writer.log(*item)
                else:
                    writer.flush()
                if time.monotonic() >= next_beat:
                    self.store.heartbeat(self.run_id, self.step)
                    next_beat = time.monotonic() + self._heartbeat_s
                    taken, _ = self.store.take_commands_for([self.run_id])
                    for command in taken.get(self.run_id, []):
                        self._command(command)
            except BaseException as exc:     # noqa: BLE001 - reported on the training thread's next call
                self._error = exc
                self._flushed.set()


def _ignored(kind: str) -> str:
    return (f"{kind} is not applied to a tracked run: its loop is yours (stop sets run.stop_requested)")


def _scalar(value, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=torch.float64).reshape(())
    return torch.tensor(float(value), dtype=torch.float64, device=device)


def _sweep_named(store, name: str) -> int:
    """The sweep called `name` (the newest one), created if there is none: runs tracked with the same
    sweep name land in one sweep, which the Regime map draws."""
    for info in store.list_sweeps():
        if info.name == name:
            return info.id
    return store.create_sweep(str(name), {"source": "track"})


def track(model, optimizer, db=None, name=None, sweep=None, tags=(), config=None, probe=None,
          sharpness_every: int = 0, log_every: int = 1, **options) -> Tracker:
    """Start tracking a training loop as a stored run (README, "Your own model")."""
    return Tracker(model, optimizer, db=db, name=name, sweep=sweep, tags=tags, config=config, probe=probe,
                   sharpness_every=sharpness_every, log_every=log_every, **options)
