"""How a worker's claimed work gets a process: the executor seam.

The store stays the single source of truth: the worker claims runs and jobs there (claims, heartbeats,
fencing), and an executor only decides where and in what process a claimed pack of runs, or a batch of
analysis jobs, is computed. Whatever the executor, the process does the same thing: `train_pack` (the
store orchestration of engine.runner.execute) or `compute_jobs` (engine.jobs), against the store's URL
and its artifact root.

- `LocalExecutor` (the default): one spawned process per pack or batch on this machine, dying with the
  worker (PR_SET_PDEATHSIG).
- `engine.ray_executor.RayExecutor` (`worker --executor ray`): one Ray task per pack or batch, placed by
  Ray on the cluster's nodes. Ray is an optional extra, imported only there.

A handle on started work quacks like a multiprocessing.Process (is_alive, join, terminate, kill), so
the worker supervises both kinds alike; `exit_cause` says why work that ended left runs live.

This module is torch-free: the worker process imports it, and only the process bodies import torch.
"""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys

from . import shutdown

EX_TEMPFAIL = shutdown.EX_TEMPFAIL


# ---- what every pack or job batch runs, wherever it runs ----------------------------------------------
def train_pack(url: str, claims: dict[int, str], device: str, threads: int, *, artifacts: str | None = None,
               note: dict | None = None) -> int:
    """Train claimed runs ({run id: claim token}) as one pack in this process (one run: a pack of one);
    returns the exit code: 0, or EX_TEMPFAIL when the store refused to record their end (the worker
    records it). note: an event every run gets once it starts here (where it trains)."""
    from storage import Store

    from .config import RunConfig
    from .runner import execute
    from .runtime import configure_process, resolve_device
    store = Store(url, artifacts=artifacts)
    cfg = RunConfig.from_dict(store.get_run(next(iter(claims))).config)
    configure_process(resolve_device(cfg.device if device == "auto" else device), cfg.model, threads)
    statuses = execute(store, claims, device=None if device == "auto" else device, note=note)
    return EX_TEMPFAIL if "unrecorded" in statuses.values() else 0


def compute_jobs(url: str, batch: dict[int, str], device: str, threads: int, *, artifacts: str | None = None) -> None:
    """Compute claimed analysis jobs ({job id: claim}, engine.jobs) one after another and store each
    result. The jobs waiting their turn heartbeat too, so no stale check takes them back."""
    import threading

    from storage import HEARTBEAT_EVERY_S, ClaimLost, Store, StoreError
    store, waiting, done = Store(url, artifacts=artifacts), dict(batch), threading.Event()

    def beat() -> None:
        while True:
            for job_id, claim in list(waiting.items()):
                try:
                    store.job_heartbeat(job_id, claim=claim)
                except ClaimLost:
                    waiting.pop(job_id, None)          # requeued or deleted meanwhile: not ours any more
                except StoreError:
                    pass                               # a lock past the store's patience: beat again next time
            if done.wait(HEARTBEAT_EVERY_S):
                return

    # beating before torch is imported (seconds on a loaded machine): a stale check in the meantime
    # would otherwise find the whole batch silent since its claim and queue it again
    threading.Thread(target=beat, name="waiting-jobs-heartbeat", daemon=True).start()
    try:
        import torch
        torch.set_num_threads(threads)
        from .jobs import execute_job
        for job_id, claim in batch.items():
            if waiting.pop(job_id, None) is None:
                continue
            # a job taken back or deleted meanwhile ends "lost", writing nothing; the batch goes on
            execute_job(store, job_id, claim, device=None if device == "auto" else device)
    finally:
        done.set()


def exit_cause(code: int | None) -> tuple[str, str]:
    """(status, reason) for a run whose process exited with `code` without recording its end."""
    if code == EX_TEMPFAIL:
        return "interrupted", "its process could not record its end: the store stayed locked past its patience"
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
        hint = " (the out-of-memory killer, or kill -9)" if -code == signal.SIGKILL else ""
        return "failed", f"its process was killed by {name}{hint}"
    return "failed", f"its process exited with code {code} without recording an end (see the worker's log)"


# ---- local spawned processes -------------------------------------------------------------------------
def _die_with_parent(parent_pid: int) -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the stale-heartbeat check still recovers the run
    if os.getppid() != parent_pid:   # the parent died before prctl took effect
        os._exit(1)


def _child_main(url: str, claims: dict[int, str], device: str, threads: int, parent_pid: int) -> None:
    """A local run process: train_pack, dying with its worker."""
    _die_with_parent(parent_pid)
    # SIGTERM from the worker (its own shutdown) ends the runs at the next step as "interrupted".
    signal.signal(signal.SIGTERM, shutdown.request)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C goes to the worker, which stops us in order
    code = train_pack(url, claims, device, threads)
    if code:
        sys.exit(code)       # the worker records the end the store refused us


def _job_main(url: str, batch: dict[int, str], device: str, threads: int, parent_pid: int) -> None:
    """A local job process: compute_jobs, dying with its worker."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    compute_jobs(url, batch, device, threads)


class LocalExecutor:
    """Each pack or job batch in its own process on this machine, started with spawn (never fork)."""

    name = "local"

    def __init__(self, url: str, device: str = "auto", max_parallel: int | None = None):
        self.url, self.device = url, device
        self.max_parallel = max_parallel or 1
        self.threads = max(1, (os.cpu_count() or 1) // self.max_parallel)
        self._ctx = mp.get_context("spawn")

    def describe(self) -> str:
        return f"up to {self.max_parallel} run(s) at once, {self.threads} torch thread(s) each"

    def capacity(self) -> int:
        """How many packs or job batches may run at once."""
        return self.max_parallel

    def start_runs(self, claims: dict[int, str], config: dict) -> mp.Process:
        return self._start(_child_main, f"spherelab-run-{next(iter(claims))}", claims)

    def start_jobs(self, claims: dict[int, str]) -> mp.Process:
        return self._start(_job_main, f"spherelab-jobs-{next(iter(claims))}", claims)

    def _start(self, target, name: str, claims: dict[int, str]) -> mp.Process:
        proc = self._ctx.Process(target=target, name=name,
                                 args=(self.url, claims, self.device, self.threads, os.getpid()))
        proc.start()
        return proc

    @staticmethod
    def where(proc) -> str:
        return f"process {proc.pid}"

    @staticmethod
    def exit_cause(proc) -> tuple[str, str]:
        return exit_cause(proc.exitcode)

    @staticmethod
    def exit_code(proc):
        return proc.exitcode

    def close(self) -> None:
        pass


EXECUTORS = ("local", "ray")
RAY_MISSING = "--executor ray needs Ray, an optional extra: pip install spherelab[ray]"
