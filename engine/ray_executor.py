"""`worker --executor ray`: packs of runs and batches of analysis jobs as Ray tasks on a Ray cluster.

The store stays the single source of truth: this worker (the Ray driver) claims runs and jobs there
as the local worker does, and hands each claimed pack or batch to Ray as one task; Ray places it on a
node with the resources it asks for and runs the same process body as a local process
(engine.executors.train_pack / compute_jobs) against the store's URL and its artifact root, which every
node must reach (PostgreSQL, and a shared folder or an S3 bucket).

- Resources per task: on a GPU device `num_gpus=1/SPHERELAB_RAY_PACKS_PER_GPU` (default 1: a GPU per
  pack; 4: four packs share each GPU), otherwise `num_cpus=SPHERELAB_RAY_CPUS` (default 1). A pack's
  device is the worker's --device, else its configuration's; `auto` means a GPU when the cluster has
  any.
- Ray's own retries are off (max_retries=0, retry_exceptions=False): resumption is spherelab's. A task
  whose node dies ends its runs `interrupted` (their claim taken back, so nothing more is written by
  the old task) and any worker resumes them from their last checkpoint; a run is never trained twice
  from the same point. If the worker itself dies, its tasks die with it (a Ray job's tasks end with
  their driver) and the runs' heartbeats go stale: another worker resumes them.
- Each run's events get a note naming the node it trains on (`ray_node`, `host`): the dashboard's Run
  page lists it among the events.

Ray is an optional extra (`pip install spherelab[ray]`), imported only by this module.
"""
from __future__ import annotations

import math
import os
import signal
import socket

from storage.artifacts import root_for

from . import shutdown
from .config import ConfigError
from .executors import RAY_MISSING, compute_jobs, exit_cause, train_pack

CPUS_ENV = "SPHERELAB_RAY_CPUS"
PACKS_PER_GPU_ENV = "SPHERELAB_RAY_PACKS_PER_GPU"


def check_available() -> None:
    """ConfigError (one line: the extra to install) when Ray is not installed."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ConfigError(RAY_MISSING) from None


def _positive(env: str, default: float) -> float:
    text = os.environ.get(env, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{env}={text!r} is not a positive number: set it to e.g. 1, or unset it")
    return value


# ---- the task bodies (module level: Ray ships them by reference, every node imports spherelab) --------
def _where() -> dict:
    import ray
    node, host = ray.get_runtime_context().get_node_id(), socket.gethostname()
    return {"text": f"trains on Ray node {node[:8]} ({host}, {ray.util.get_node_ip_address()})",
            "ray_node": node, "host": host}


def run_pack_task(url: str, claims: dict[int, str], device: str, threads: int, artifacts: str | None) -> int:
    # ray.cancel (the worker's orderly stop) arrives as SIGINT in this thread: made the flag a local run
    # process's SIGTERM sets, the runs stop at their next step `interrupted` (a KeyboardInterrupt could
    # land inside a store transaction or a finaliser and be lost). The process is reused: forget it after.
    shutdown.clear()
    previous = signal.signal(signal.SIGINT, shutdown.request)
    try:
        return train_pack(url, claims, device, threads, artifacts=artifacts, note=_where())
    finally:
        signal.signal(signal.SIGINT, previous)
        shutdown.clear()


def job_batch_task(url: str, batch: dict[int, str], device: str, threads: int, artifacts: str | None) -> int:
    compute_jobs(url, batch, device, threads, artifacts=artifacts)
    return 0


class RayTask:
    """A pack's or a batch's Ray task, supervised like a process (engine.worker)."""

    def __init__(self, ref, name: str):
        import ray
        self.ray, self.ref, self.name = ray, ref, name

    def is_alive(self) -> bool:
        return not self.ray.wait([self.ref], timeout=0, fetch_local=False)[0]

    def join(self, timeout: float | None = None) -> None:
        self.ray.wait([self.ref], timeout=timeout, fetch_local=False)

    def terminate(self) -> None:
        """An orderly stop: a pack's runs end `interrupted` at their next step (run_pack_task), a job
        batch is interrupted (its jobs go back to the queue)."""
        self.ray.cancel(self.ref, force=False)

    def kill(self) -> None:
        self.ray.cancel(self.ref, force=True)


class RayExecutor:
    """Each claimed pack or job batch as one Ray task (see the module docstring)."""

    name = "ray"

    def __init__(self, url: str, *, device: str = "auto", max_parallel: int | None = None, address: str = "auto"):
        check_available()
        import ray
        self.ray, self.url, self.device, self.max_parallel = ray, url, device, max_parallel
        self.cpus = _positive(CPUS_ENV, 1.0)
        self.packs_per_gpu = _positive(PACKS_PER_GPU_ENV, 1.0)
        self.threads = max(1, int(self.cpus))
        # resolved here, where --artifacts and $SPHERELAB_ARTIFACTS are known: a node's environment is its own
        self.artifacts = root_for(url)
        self.owns_ray = not ray.is_initialized()
        if self.owns_ray:
            self.address = self._connect(address)
        else:                        # a driver that is connected already (a test, a notebook): its cluster
            self.address = "the connected Ray cluster"
        options = dict(max_retries=0, retry_exceptions=False)    # resumption is spherelab's, never Ray's
        self._run_pack = ray.remote(**options)(run_pack_task)
        self._job_batch = ray.remote(**options)(job_batch_task)

    def _connect(self, address: str) -> str:
        ray = self.ray
        if address == "auto":
            try:
                ray.init(address="auto", log_to_driver=True)
                return "the Ray cluster running on this machine"
            except ConnectionError:
                # none running: a local one, reachable from this machine only
                ray.init(include_dashboard=False, _node_ip_address="127.0.0.1")
                return "a new local Ray instance"
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, ValueError) as exc:
            raise ConfigError(f"--ray-address {address}: cannot join that Ray cluster "
                              f"({(str(exc).strip().splitlines() or [''])[0]}): give the head node's address "
                              "(HOST:6379), or auto") from None
        return f"the Ray cluster at {address}"

    def describe(self) -> str:
        nodes = sum(1 for node in self.ray.nodes() if node.get("Alive"))
        asks = ", ".join(f"{k}={v:g}" for k, v in self._resources(self.device)[0].items())
        return f"Ray tasks on {self.address} ({nodes} node(s)), up to {self.capacity()} at once, each asking {asks}"

    def _cluster_gpus(self) -> float:
        return self.ray.cluster_resources().get("GPU", 0.0)

    def capacity(self) -> int:
        """--max-parallel if given, else as many tasks as the cluster's resources fit now (nodes come and go)."""
        if self.max_parallel:
            return self.max_parallel
        resources = self.ray.cluster_resources()
        if self.device != "cpu" and resources.get("GPU", 0.0) > 0:
            return max(1, int(resources["GPU"] * self.packs_per_gpu + 1e-9))
        return max(1, int(resources.get("CPU", 0.0) / self.cpus + 1e-9))

    def _resources(self, device: str) -> tuple[dict, str]:
        """(Ray resource request, the device the task trains on) for work on `device`."""
        if device == "auto":
            device = "cuda" if self._cluster_gpus() > 0 else "cpu"
        if device == "cuda":
            return {"num_gpus": 1.0 / self.packs_per_gpu, "num_cpus": 0}, "cuda"
        return {"num_cpus": self.cpus}, "cpu"

    def start_runs(self, claims: dict[int, str], config: dict) -> RayTask:
        device = self.device if self.device != "auto" else (config or {}).get("device", "auto")
        resources, device = self._resources(device)
        name = f"spherelab-runs-{next(iter(claims))}"
        ref = self._run_pack.options(name=name, **resources).remote(self.url, claims, device, self.threads,
                                                                     self.artifacts)
        return RayTask(ref, name)

    def start_jobs(self, claims: dict[int, str]) -> RayTask:
        resources, device = self._resources(self.device)
        name = f"spherelab-jobs-{next(iter(claims))}"
        ref = self._job_batch.options(name=name, **resources).remote(self.url, claims, device, self.threads,
                                                                      self.artifacts)
        return RayTask(ref, name)

    @staticmethod
    def where(task: RayTask) -> str:
        return f"Ray task {task.name} ({task.ref.task_id().hex()[:12]})"

    def _outcome(self, task: RayTask):
        """The task's exit code, or the exception Ray raised for it."""
        try:
            return self.ray.get(task.ref, timeout=0)
        except self.ray.exceptions.RayError as exc:
            return exc

    def exit_code(self, task: RayTask) -> str:
        outcome = self._outcome(task)
        return type(outcome).__name__ if isinstance(outcome, BaseException) else str(outcome)

    def exit_cause(self, task: RayTask) -> tuple[str, str]:
        """(status, reason) for runs its task left live: a node that went away leaves them resumable,
        a crash or an error in the task fails them (as a local process killed or crashing would)."""
        errors = self.ray.exceptions
        outcome = self._outcome(task)
        if not isinstance(outcome, BaseException):
            return exit_cause(outcome)            # the codes of a local process
        first = (str(outcome).strip().splitlines() or [""])[0][:300]
        if isinstance(outcome, errors.TaskCancelledError):
            return "interrupted", "its Ray task was cancelled (the worker stopped)"
        if isinstance(outcome, (errors.NodeDiedError, errors.LocalRayletDiedError, errors.OwnerDiedError,
                                errors.ObjectLostError, errors.RaySystemError)):
            return "interrupted", f"the Ray node it trained on went away ({type(outcome).__name__}: {first})"
        if isinstance(outcome, errors.OutOfMemoryError):
            return "failed", f"Ray's memory monitor killed its task: out of memory ({first})"
        if isinstance(outcome, errors.WorkerCrashedError):
            return "failed", f"its Ray worker process died (a crash, the out-of-memory killer, or kill -9): {first}"
        return "failed", f"its Ray task ended with {type(outcome).__name__}: {first}"

    def close(self) -> None:
        if self.owns_ray and self.ray.is_initialized():
            self.ray.shutdown()
