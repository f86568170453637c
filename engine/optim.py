"""The two update rules (README, "The science in one page"), row-wise over a pack's [K, P] weights, and the rate schedules.

sphere: w <- w - lr*v, then w <- w * rho0/|w|, with lr = ELR * rho0^2 (v: momentum buffer of g)
lrwd:   w <- w - lr*v, v = mu*v + g + wd*w  (PyTorch SGD convention; the ELR is measured)

Each member has its own rate, weight decay, momentum and mode, so one pack can mix them; each row
gets exactly what a run alone would compute (one rounding per op, as `w.add_(d, alpha=-lr)`).
"""
from __future__ import annotations

import math

import torch


def schedule_factor(schedule: str, step: int, total_steps: int) -> float:
    """Multiplier on the base rate. cosine: half-cosine to 0 over the run; step: x0.1 at 50% and 75%."""
    if schedule == "constant" or total_steps <= 0:
        return 1.0
    frac = min(max(step, 0) / total_steps, 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    if schedule == "step":
        return 0.1 ** ((frac >= 0.5) + (frac >= 0.75))
    raise ValueError(f"unknown schedule {schedule!r}")


class PackUpdate:
    """The per-member constants of the update rule, as [K] tensors for the members in the pack."""

    def __init__(self, members, device):
        self.wd = torch.tensor([m.cfg.wd for m in members], device=device)[:, None]
        self.mu = torch.tensor([m.cfg.momentum for m in members], device=device)[:, None]
        self.sphere = torch.tensor([m.sphere for m in members], device=device)
        self.rho0 = torch.tensor([m.rho0 for m in members], device=device)
        self.any_wd = any(m.cfg.wd for m in members)
        self.sphere_rows = "all" if all(m.sphere for m in members) else "some" if any(m.sphere for m in members) \
            else None

    @torch.no_grad()
    def step(self, W: torch.Tensor, G: torch.Tensor, buf: torch.Tensor | None, neg_lr: torch.Tensor) -> None:
        """One step; neg_lr is [K, 1], minus each member's learning rate."""
        d = G + self.wd * W if self.any_wd else G
        if buf is not None:
            d = buf.mul_(self.mu).add_(d)
        W.addcmul_(d, neg_lr)
        if self.sphere_rows:
            # reciprocal * rho0 is what `rho0 / w.norm()` computes for a Python float rho0
            scale = torch.linalg.vector_norm(W, dim=1).reciprocal_().mul_(self.rho0)
            if self.sphere_rows == "some":
                scale = torch.where(self.sphere, scale, 1.0)
            W.mul_(scale[:, None])
