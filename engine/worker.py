"""`python -m engine worker`: trains queued runs, each in its own spawned process.

The worker process itself holds no torch state: it claims runs atomically in the store, starts
one child per run (spawn, never fork), divides the CPU threads among them, heartbeats, and on
start turns runs whose heartbeat went stale (a killed worker) into `interrupted` and resumes them
from their last checkpoint. Children die with their worker (PR_SET_PDEATHSIG), so a `kill -9` of
the worker leaves no orphan still writing to a run.
"""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import socket
import sys
import time
import uuid

from storage import LIVE_STATUSES, ClaimLost, RunNotFound, Store, StoreError
from storage.database import ReadOnlyStore
from storage.timings import seconds

from . import shutdown

STALE_CHECK_EVERY_S = seconds("SPHERELAB_STALE_CHECK_S", 5.0)   # how often stale runs and jobs are looked for
# A job process takes several queued jobs (a study queues an average and three geometries per PLR and
# seed): on small data a job takes a fraction of a second, starting a process that imports torch ~3 s.
JOBS_PER_PROCESS = 16
SHUTDOWN_GRACE_S = 20.0   # a child still training this long after SIGTERM is killed


def _die_with_parent(parent_pid: int) -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the stale-heartbeat check still recovers the run
    if os.getppid() != parent_pid:   # the parent died before prctl took effect
        os._exit(1)


def _child_main(url: str, claims: dict[int, str], device: str, threads: int, parent_pid: int) -> None:
    """A run process: trains its claimed runs ({run id: claim token}) as one pack (one run: a pack of one)."""
    _die_with_parent(parent_pid)
    # SIGTERM from the worker (its own shutdown) ends the runs at the next step as "interrupted".
    signal.signal(signal.SIGTERM, shutdown.request)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C goes to the worker, which stops us in order
    from .config import RunConfig
    from .runner import EX_TEMPFAIL, execute
    from .runtime import configure_process, resolve_device
    store = Store(url)
    cfg = RunConfig.from_dict(store.get_run(next(iter(claims))).config)
    configure_process(resolve_device(cfg.device if device == "auto" else device), cfg.model, threads)
    statuses = execute(store, claims, device=None if device == "auto" else device)
    if "unrecorded" in statuses.values():
        sys.exit(EX_TEMPFAIL)       # the worker records the end the store refused us


def _job_main(url: str, batch: dict[int, str], device: str, threads: int, parent_pid: int) -> None:
    """A job process: computes its claimed analysis jobs ({job id: claim}, engine.jobs) one after another
    and stores each result. The jobs waiting their turn heartbeat too, so no stale check takes them back."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import threading
    from storage import HEARTBEAT_EVERY_S
    store, waiting, done = Store(url), dict(batch), threading.Event()

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
    import torch
    torch.set_num_threads(threads)
    from .jobs import execute_job
    for job_id, claim in batch.items():
        if waiting.pop(job_id, None) is None:
            continue
        # a job taken back or deleted meanwhile ends "lost", writing nothing; the batch goes on
        execute_job(store, job_id, claim, device=None if device == "auto" else device)
    done.set()


def _exit_cause(code: int | None) -> tuple[str, str]:
    """(status, reason) for a run whose process exited without recording its end."""
    if code == shutdown.EX_TEMPFAIL:
        return "interrupted", "its process could not record its end: the store stayed locked past its patience"
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
        hint = " (the out-of-memory killer, or kill -9)" if -code == signal.SIGKILL else ""
        return "failed", f"its process was killed by {name}{hint}"
    return "failed", f"its process exited with code {code} without recording an end (see the worker's log)"


class Worker:
    def __init__(self, url: str, *, max_parallel: int = 1, device: str = "auto", poll_s: float = 1.0,
                 stale_after_s: float = 30.0, exit_when_idle: bool = False):
        self.url, self.max_parallel, self.device = url, max_parallel, device
        self.poll_s, self.stale_after_s, self.exit_when_idle = poll_s, stale_after_s, exit_when_idle
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.children: dict[int, mp.Process] = {}           # run id -> its process (a pack: one for several)
        self.jobs: dict[int, tuple[mp.Process, str]] = {}    # job id -> its process and claim
        self.threads = max(1, (os.cpu_count() or 1) // max_parallel)
        self.stopping = False
        self.shutdown_grace_s = SHUTDOWN_GRACE_S

    def run(self) -> int:
        store = Store(self.url)
        ctx = mp.get_context("spawn")
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        self.next_stale_check = 0.0
        # A store it cannot write (a read-only file, mount or URL) is one line, not a retry forever.
        store.worker_heartbeat(self.id, host=socket.gethostname(), pid=os.getpid(),
                               device=self.device, max_parallel=self.max_parallel)
        print(f"worker {self.id}: {self.url}, up to {self.max_parallel} run(s) at once, "
              f"{self.threads} torch thread(s) each", file=sys.stderr, flush=True)
        try:
            while not self.stopping:
                try:
                    self._tick(ctx, store)
                    if self.exit_when_idle and self._idle(store):
                        break
                except ReadOnlyStore:
                    raise
                except StoreError as exc:       # a lock held past the store's patience, a server gone:
                    print(f"worker {self.id}: {exc} (retrying)", file=sys.stderr, flush=True)   # never die
                time.sleep(self.poll_s)
        finally:
            self._shutdown(store)
            store.remove_worker(self.id)
        return 0

    def _tick(self, ctx, store: Store) -> None:
        """One look at the store: heartbeat, reap, requeue stale work, start what fits."""
        from .packing import claim_pack
        store.worker_heartbeat(self.id, host=socket.gethostname(), pid=os.getpid(),
                               device=self.device, max_parallel=self.max_parallel)
        self._reap(store)
        if time.monotonic() >= self.next_stale_check:
            for run_id in store.requeue_stale(self.stale_after_s, except_worker=self.id):
                print(f"run {run_id}: heartbeat stale, marked interrupted", file=sys.stderr, flush=True)
            for job_id in store.requeue_stale_jobs(self.stale_after_s):
                print(f"job {job_id}: heartbeat stale, queued again", file=sys.stderr, flush=True)
            self.next_stale_check = time.monotonic() + STALE_CHECK_EVERY_S
        self._advance_studies(store)
        while self._processes() < self.max_parallel:
            claimed = claim_pack(store, self.id, worker_device=self.device,
                                 free_slots=self.max_parallel - self._processes())
            if claimed:
                self._start_claimed(ctx, claimed)
                continue
            batch = self._claim_jobs(store)
            if not batch:
                break
            self._start_jobs(ctx, batch)

    @staticmethod
    def _advance_studies(store: Store) -> None:
        """Studies left to the workers (no owning CLI process): create what their finished pieces allow."""
        from .study import advance
        for study in store.list_studies(status="running"):
            if study.owner is None and advance(store, study.id):      # ended: finished, or failed with its pieces
                print(f"study {study.id}: {store.get_study(study.id).status}", file=sys.stderr, flush=True)

    def _idle(self, store: Store) -> bool:
        return (not self.children and not self.jobs and not store.list_runs(status="queued")
                and not store.list_jobs(status="queued"))

    def _processes(self) -> int:
        return len(self._procs())

    def _procs(self) -> list:
        """The live child processes: a pack's runs share one, a batch of jobs shares one."""
        found = {id(proc): proc for proc in self.children.values()}
        found.update({id(proc): proc for proc, _ in self.jobs.values()})
        return list(found.values())

    def _claim_jobs(self, store: Store) -> list:
        """Claim queued jobs for one process: the queue spread over this worker's free slots, at most
        JOBS_PER_PROCESS."""
        free = max(1, self.max_parallel - self._processes())
        size = min(JOBS_PER_PROCESS, max(1, -(-len(store.list_jobs(status="queued")) // free)))
        batch = []
        while len(batch) < size and (job := store.claim_job(self.id)) is not None:
            batch.append(job)
        return batch

    def _start_jobs(self, ctx, batch: list) -> None:
        claims = {job.id: job.claim for job in batch}
        proc = ctx.Process(target=_job_main, name=f"spherelab-jobs-{batch[0].id}",
                           args=(self.url, claims, self.device, self.threads, os.getpid()))
        proc.start()
        for job in batch:
            self.jobs[job.id] = (proc, job.claim)
        print(f"job(s) {', '.join(str(j.id) for j in batch)} ({', '.join(sorted({j.kind for j in batch}))}): "
              f"started in process {proc.pid}", file=sys.stderr, flush=True)

    def _start_claimed(self, ctx, claimed: list) -> None:
        """Start a claimed pack (packing.claim_pack; one run: a pack of one) in its own process."""
        run_ids = [r.id for r in claimed]
        proc = ctx.Process(target=_child_main, name=f"spherelab-run-{run_ids[0]}",
                           args=(self.url, {r.id: r.claim for r in claimed}, self.device, self.threads, os.getpid()))
        proc.start()
        for run_id in run_ids:
            self.children[run_id] = proc
        what = f"run {run_ids[0]}" if len(run_ids) == 1 else f"runs {', '.join(map(str, run_ids))}"
        print(f"{what}: started{' as one pack' if len(run_ids) > 1 else ''} in process {proc.pid}",
              file=sys.stderr, flush=True)

    def _reap(self, store: Store) -> None:
        """Account for the processes that exited. A process is forgotten only once what it left is
        recorded: if the store refuses (locked, a full disk), the next look tries again, so a live worker
        never leaves a run or a job `running` with no process (no other worker takes a live worker's)."""
        for run_id, proc in list(self.children.items()):
            if not proc.is_alive():
                proc.join()
                # A child that died without recording an end (killed, a segfault, the store locked past
                # its patience) leaves its run live: record why rather than leave it "running" forever.
                self._record_end(store, run_id, *_exit_cause(proc.exitcode))
                store.release(run_id)
                del self.children[run_id]
                print(f"run {run_id}: process exited ({proc.exitcode})", file=sys.stderr, flush=True)
        for job_id, (proc, claim) in list(self.jobs.items()):
            if not proc.is_alive():
                proc.join()
                # A job its process did not end (killed, a crash): the one it was computing is retried a
                # bounded number of times, those waiting their turn go back to the queue as they were.
                try:
                    status = store.job_process_died(job_id, _exit_cause(proc.exitcode)[1], claim=claim)
                except ClaimLost:
                    status = None            # ended, requeued or taken over meanwhile: not ours to end
                except StoreError as exc:
                    if "no job with id" not in str(exc):
                        raise
                    status = None            # deleted with its run
                del self.jobs[job_id]
                print(f"job {job_id}: process exited ({proc.exitcode})"
                      + (f", job {status}" if status else ""), file=sys.stderr, flush=True)

    @staticmethod
    def _record_end(store: Store, run_id: int, status: str, error: str | None = None) -> None:
        """Give a run this worker claimed the status `status` if it is still live under our claim; a run
        deleted, ended or taken over meanwhile is left alone."""
        try:
            if store.get_run(run_id).status in LIVE_STATUSES:
                store.set_status(run_id, status, error=error)
        except (ClaimLost, RunNotFound):
            pass

    def _stop(self, *_):
        self.stopping = True

    def _shutdown(self, store: Store) -> None:
        """SIGTERM every child (each stops at its next step and marks its runs interrupted); kill any
        still busy after the grace period, since a live non-daemon child would also block our exit."""
        procs = self._procs()
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + self.shutdown_grace_s
        for proc in procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                print(f"process {proc.pid}: still running {self.shutdown_grace_s:.0f} s after SIGTERM, killed",
                      file=sys.stderr, flush=True)
                proc.kill()
                proc.join()
        for run_id in self.children:      # killed, or died before it could say: resumable all the same
            self._record_end(store, run_id, "interrupted")
        for job_id, (_, claim) in self.jobs.items():      # a job cut short is computed again, whole
            try:
                if store.get_job(job_id).status == "running":
                    store.requeue_job(job_id, claim=claim)
            except ClaimLost:
                pass
        self.children.clear()
        self.jobs.clear()
