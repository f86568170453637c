"""The SI parameter group as one flat vector, and the two update rules of SPEC §3.

The SI parameters are re-pointed to views into one contiguous vector, so the norm, the sphere
projection, weight decay and the update are each a single tensor op, with no per-layer Python loop
on the hot path.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class SIGroup:
    """All scale-invariant parameters of a model, viewed as one flat vector `w`."""

    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.sizes = [p.numel() for p in params]
        self.w = torch.cat([p.detach().reshape(-1) for p in params])
        offset = 0
        for p, n in zip(params, self.sizes):
            p.data = self.w[offset:offset + n].view_as(p)
            offset += n

    @property
    def numel(self) -> int:
        return self.w.numel()

    def flat_grad(self, grads) -> torch.Tensor:
        return torch.cat([g.reshape(-1) for g in grads])

    def layer_norms(self) -> torch.Tensor:
        return torch.stack([p.detach().norm() for p in self.params])


def schedule_factor(schedule: str, step: int, total_steps: int) -> float:
    """Multiplier on the base rate. cosine: half-cosine to 0 over the run; step: x0.1 at 50% and 75%."""
    if schedule == "constant" or total_steps <= 0:
        return 1.0
    frac = min(step / total_steps, 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    if schedule == "step":
        return 0.1 ** ((frac >= 0.5) + (frac >= 0.75))
    raise ValueError(f"unknown schedule {schedule!r}")


class SIUpdate:
    """One optimizer step on the flat SI vector.

    sphere: w <- w - lr*v, then w <- w * rho0/|w|, with lr = ELR * rho0^2 (v = momentum buffer of g)
    lrwd:   w <- w - lr*v, v = mu*v + g + wd*w  (PyTorch SGD convention; ELR is measured)
    """

    def __init__(self, group: SIGroup, mode: str, base_rate: float, *, wd: float = 0.0,
                 momentum: float = 0.0, schedule: str = "constant", total_steps: int = 0):
        self.group, self.mode = group, mode
        self.base_rate = base_rate          # ELR on the sphere, LR under lrwd
        self.wd, self.momentum = wd, momentum
        self.schedule, self.total_steps = schedule, total_steps
        self.rho0 = float(group.w.norm())
        self.buf = torch.zeros_like(group.w) if momentum else None

    def lr(self, step: int) -> float:
        """Learning rate applied at this step (sphere: ELR * rho0^2)."""
        rate = self.base_rate * schedule_factor(self.schedule, step, self.total_steps)
        return rate * self.rho0 ** 2 if self.mode == "sphere" else rate

    @torch.no_grad()
    def step(self, g: torch.Tensor, step: int) -> None:
        w, lr = self.group.w, self.lr(step)
        d = g if self.mode == "sphere" or not self.wd else g + self.wd * w
        if self.buf is not None:
            d = self.buf.mul_(self.momentum).add_(d)
        w.add_(d, alpha=-lr)
        if self.mode == "sphere":
            w.mul_(self.rho0 / w.norm())

    def state_dict(self) -> dict:
        return {"base_rate": self.base_rate, "rho0": self.rho0, "buf": self.buf}

    def load_state_dict(self, state: dict) -> None:
        self.base_rate, self.rho0 = state["base_rate"], state["rho0"]
        if self.buf is not None and state["buf"] is not None:
            self.buf.copy_(state["buf"])
