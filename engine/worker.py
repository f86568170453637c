"""`python -m engine worker`: trains queued runs, each pack in its own process.

The worker process itself holds no torch state: it claims runs atomically in the store, has its
executor (engine.executors) start one process per pack or job batch (locally: spawn, never fork, the
CPU threads divided among them; on a Ray cluster: a Ray task placed by Ray), heartbeats, and on start
turns runs whose heartbeat went stale (a killed worker) into `interrupted` and resumes them from their
last checkpoint. Local children die with their worker (PR_SET_PDEATHSIG), so a `kill -9` of the worker
leaves no orphan still writing to a run (a Ray job's tasks die with their driver, the worker).
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import time
import uuid

from storage import LIVE_STATUSES, ClaimLost, RunNotFound, Store, StoreError
from storage.database import ReadOnlyStore
from storage.timings import seconds

from .executors import LocalExecutor, exit_cause

STALE_CHECK_EVERY_S = seconds("SPHERELAB_STALE_CHECK_S", 5.0)   # how often stale runs and jobs are looked for
# A job process takes several queued jobs (a study queues an average and three geometries per PLR and
# seed): on small data a job takes a fraction of a second, starting a process that imports torch ~3 s.
JOBS_PER_PROCESS = 16
SHUTDOWN_GRACE_S = 20.0   # a child still training this long after SIGTERM is killed


# the local run process's exit status explained (engine.executors); kept here under its old name
_exit_cause = exit_cause


class Worker:
    def __init__(self, url: str, *, max_parallel: int | None = 1, device: str = "auto", poll_s: float = 1.0,
                 stale_after_s: float = 30.0, exit_when_idle: bool = False, executor=None):
        self.url, self.device = url, device
        self.poll_s, self.stale_after_s, self.exit_when_idle = poll_s, stale_after_s, exit_when_idle
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        # where claimed packs and job batches run (engine.executors): spawned processes here by default
        self.executor = executor or LocalExecutor(url, device, max_parallel)
        self.max_parallel = self.executor.capacity()
        self.children: dict[int, object] = {}           # run id -> its process (a pack: one for several)
        self.jobs: dict[int, tuple[object, str]] = {}    # job id -> its process and claim
        self.stopping = False
        self.shutdown_grace_s = SHUTDOWN_GRACE_S

    def run(self) -> int:
        store = Store(self.url)
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        self.next_stale_check = 0.0
        # A store it cannot write (a read-only file, mount or URL) is one line, not a retry forever.
        store.worker_heartbeat(self.id, host=socket.gethostname(), pid=os.getpid(),
                               device=self.device, max_parallel=self.max_parallel)
        print(f"worker {self.id}: {self.url}, {self.executor.describe()}", file=sys.stderr, flush=True)
        try:
            while not self.stopping:
                try:
                    self._tick(store)
                    if self.exit_when_idle and self._idle(store):
                        break
                except ReadOnlyStore:
                    raise
                except StoreError as exc:       # a lock held past the store's patience, a server gone:
                    print(f"worker {self.id}: {exc} (retrying)", file=sys.stderr, flush=True)   # never die
                time.sleep(self.poll_s)
        finally:
            try:
                self._shutdown(store)
                store.remove_worker(self.id)
            finally:
                self.executor.close()
        return 0

    def _tick(self, store: Store) -> None:
        """One look at the store: heartbeat, reap, requeue stale work, start what fits."""
        from .packing import claim_pack
        self.max_parallel = self.executor.capacity()      # a cluster's nodes come and go
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
                self._start_claimed(claimed)
                continue
            batch = self._claim_jobs(store)
            if not batch:
                break
            self._start_jobs(batch)

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

    def _start_jobs(self, batch: list) -> None:
        proc = self.executor.start_jobs({job.id: job.claim for job in batch})
        for job in batch:
            self.jobs[job.id] = (proc, job.claim)
        print(f"job(s) {', '.join(str(j.id) for j in batch)} ({', '.join(sorted({j.kind for j in batch}))}): "
              f"started in {self.executor.where(proc)}", file=sys.stderr, flush=True)

    def _start_claimed(self, claimed: list) -> None:
        """Start a claimed pack (packing.claim_pack; one run: a pack of one) through the executor."""
        run_ids = [r.id for r in claimed]
        proc = self.executor.start_runs({r.id: r.claim for r in claimed}, claimed[0].config)
        for run_id in run_ids:
            self.children[run_id] = proc
        what = f"run {run_ids[0]}" if len(run_ids) == 1 else f"runs {', '.join(map(str, run_ids))}"
        print(f"{what}: started{' as one pack' if len(run_ids) > 1 else ''} in {self.executor.where(proc)}",
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
                self._record_end(store, run_id, *self.executor.exit_cause(proc))
                store.release(run_id)
                del self.children[run_id]
                print(f"run {run_id}: process exited ({self.executor.exit_code(proc)})", file=sys.stderr, flush=True)
        for job_id, (proc, claim) in list(self.jobs.items()):
            if not proc.is_alive():
                proc.join()
                # A job its process did not end (killed, a crash): the one it was computing is retried a
                # bounded number of times, those waiting their turn go back to the queue as they were.
                try:
                    status = store.job_process_died(job_id, self.executor.exit_cause(proc)[1], claim=claim)
                except ClaimLost:
                    status = None            # ended, requeued or taken over meanwhile: not ours to end
                except StoreError as exc:
                    if "no job with id" not in str(exc):
                        raise
                    status = None            # deleted with its run
                del self.jobs[job_id]
                print(f"job {job_id}: process exited ({self.executor.exit_code(proc)})"
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
                print(f"{self.executor.where(proc)}: still running {self.shutdown_grace_s:.0f} s after SIGTERM, "
                      "killed",
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
