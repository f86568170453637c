"""Analysis jobs on kept checkpoints: an SWA average of one run's checkpoints, or the geometry between
two solutions (engine/solutions.py). They can take minutes on a conv net, so they run in the engine
(the CLI's process, or a worker's job process), never in the dashboard; a job's result is written
once, when it is complete, and a job whose process died goes back to the queue (storage.solutions),
the one being computed at most MAX_JOB_RETRIES times.
"""
from __future__ import annotations

import threading
import traceback

import torch

from storage import ClaimLost, RunNotFound, Store, StoreError

from .config import ConfigError, RunConfig
from .packing import pack_key
from .runner import HEARTBEAT_EVERY_S, load_checkpoint
from .solutions import Evaluator, average, checkpoint_weights, geometry


def checkpoint_key(store: Store, run_id: int, epoch: int) -> str:
    kept = {c.epoch: c for c in store.checkpoints(run_id)}
    if epoch not in kept:
        raise ConfigError(f"run {run_id} has no kept checkpoint at epoch {epoch} (kept: "
                          f"{', '.join(map(str, sorted(kept))) or 'none'})")
    return kept[epoch].path


def load_kept(store: Store, evaluator: Evaluator, run_id: int, epoch: int) -> torch.Tensor:
    """The SI weights of a run's kept checkpoint; a file that cannot be read is a ConfigError naming it."""
    key = checkpoint_key(store, run_id, epoch)
    what = f"run {run_id}'s kept checkpoint at epoch {epoch}"
    state = load_checkpoint(store, key, evaluator.device, what)
    try:
        return checkpoint_weights(state, evaluator.layer_names)
    except (KeyError, TypeError, AttributeError, RuntimeError) as exc:
        raise ConfigError(f"{what} {store.artifacts.describe(key)} is not a checkpoint of this run's model "
                          f"({type(exc).__name__}: {exc})") from None


def run_job(store: Store, job, device: str | None = None) -> dict:
    """Compute a job's result (no store writes): {"run", "epochs", train/test loss and accuracy} for an
    average, {"a", "b", "angle", "alphas", curves, "barrier"} for a geometry."""
    spec = job.spec
    cfg = RunConfig.from_dict(store.get_run(job.run_id).config)
    if device:
        cfg = cfg.replace(device=device)
    evaluator = _evaluator(cfg)
    if job.kind == "average":
        weights = [load_kept(store, evaluator, job.run_id, e) for e in spec["epochs"]]
        [values] = evaluator.evaluate(average(weights)[None])
        return {"run": job.run_id, "epochs": spec["epochs"], **values}
    a, b = spec["a"], spec["b"]
    return {"a": a, "b": b, **geometry(evaluator, solution(store, evaluator, a), solution(store, evaluator, b),
                                       spec["points"])}


_EVALUATORS: dict[str, Evaluator] = {}
KEEP_EVALUATORS = 4


def _evaluator(cfg: RunConfig) -> Evaluator:
    """An Evaluator for cfg's architecture and data, reused by this process's later jobs of runs that
    differ only in what a pack may differ in (rate, seed, ...): a study's hundreds of jobs otherwise
    each made their data (ticks: ~0.3 s of rejection sampling) and network again. The last few kept."""
    key = pack_key(cfg)
    if key not in _EVALUATORS:
        while len(_EVALUATORS) >= KEEP_EVALUATORS:
            _EVALUATORS.pop(next(iter(_EVALUATORS)))
        _EVALUATORS[key] = Evaluator(cfg)
    return _EVALUATORS[key]


def solution(store: Store, evaluator: Evaluator, end: dict) -> torch.Tensor:
    """The weights an end of a geometry names: {"run", "epoch"} a kept checkpoint, {"run", "epochs"} the
    SWA average of several."""
    if "epochs" in end:
        return average([load_kept(store, evaluator, end["run"], e) for e in end["epochs"]])
    return load_kept(store, evaluator, end["run"], end["epoch"])


def execute_job(store: Store, job_id: int, claim: str, device: str | None = None) -> str:
    """Run a claimed job and store its result (or its failure); returns the final status, or "lost" when
    the job was taken from this process meanwhile (requeued, or deleted with its run): then nothing is
    written. Never raises for a failing computation. A thread heartbeats while it computes, so a job
    whose process is killed looks stale and goes back to the queue (storage.solutions)."""
    try:
        store.start_job(job_id, claim=claim)
        job = store.get_job(job_id)
    except (ClaimLost, StoreError):
        return "lost"                  # deleted with its run, or requeued, before its turn came
    beating, lost = threading.Event(), threading.Event()

    def beat():
        while not beating.wait(HEARTBEAT_EVERY_S):
            try:
                store.job_heartbeat(job_id, claim=claim)
            except ClaimLost:
                lost.set()
                return
            except StoreError:
                pass                   # a lock past the store's patience: beat again next time

    heart = threading.Thread(target=beat, name=f"job-{job_id}-heartbeat", daemon=True)
    heart.start()
    try:
        with torch.no_grad():
            result = run_job(store, job, device)
    except ConfigError as exc:
        return _end(store, job_id, claim, str(exc))
    except RunNotFound:                # its run was deleted while it computed: the job went with it
        return _end(store, job_id, claim, "its run was deleted")
    except StoreError as exc:          # a kept checkpoint missing from the artifact root, the root unreachable
        return _end(store, job_id, claim, str(exc))
    except Exception as exc:           # a bug or an OOM fails the job, never the worker
        return _end(store, job_id, claim, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    finally:
        beating.set()
        heart.join()
    try:
        store.finish_job(job_id, result, claim=claim)
    except ClaimLost:
        return "lost"
    return "finished"


def _end(store: Store, job_id: int, claim: str, error: str) -> str:
    """Record the job failed, unless it is no longer this process's (deleted with its run, requeued)."""
    try:
        store.fail_job(job_id, error, claim=claim)
    except ClaimLost:
        return "lost"
    return "failed"
