"""Per-process settings, made once where a process starts training (the worker's run process, the
CLI's `train`/`sweep`, the benchmark, train_traces), never as a side effect of a constructor:

- the device (`--device auto` takes CUDA when present);
- torch threads: mlp_si on a CPU runs on one thread (its tiny matmuls lose more to thread
  hand-offs than they gain: measured 8x slower with two threads on 2 cores); other models get the
  threads their process was given (the worker divides the cores among its run processes);
- TF32 on CUDA for fp32 matmuls and convolutions: on by default (SPHERELAB_TF32=0 turns it off).
"""
from __future__ import annotations

import os

import torch

from .config import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {name!r}: choose auto, cpu or cuda")
    return torch.device(name)


def configure_process(device: torch.device, model: str, threads: int | None = None) -> None:
    """Threads for this process (see the module docstring) and, on CUDA, the TF32 policy."""
    if device.type == "cpu" and model == "mlp_si":
        torch.set_num_threads(1)
    elif threads:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        set_tf32(os.environ.get("SPHERELAB_TF32", "1").strip().lower() not in ("0", "off", "no", "false"))


def set_tf32(on: bool) -> None:
    """TF32 tensor cores for fp32 matmuls and convolutions."""
    precision = "tf32" if on else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision


def tf32_state() -> dict:
    return {"matmul": torch.backends.cuda.matmul.fp32_precision, "conv": torch.backends.cudnn.conv.fp32_precision}
