"""Curvature of the loss with respect to the SI group: Hessian-vector products, Lanczos, Hutchinson.

Everything works on flat vectors over the SI parameters (the same order as SIGroup), so the
eigensolver never sees the model. The probe evaluates BatchNorm in train mode on each chunk's own
batch statistics (a chunk is one training-sized batch, so the curvature is that of the loss the
optimiser actually sees), and running statistics are restored afterwards: a probe never changes
the model.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

Matvec = Callable[[torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def preserved_buffers(model: nn.Module):
    """Run BN forward passes in train mode without leaving a trace in running statistics."""
    saved = [b.detach().clone() for b in model.buffers()]
    was_training = model.training
    model.train()
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(model.buffers(), saved):
                b.copy_(s)
        model.train(was_training)


def flat_hvp(model: nn.Module, params: list[torch.Tensor],
             chunks: list[tuple[torch.Tensor, torch.Tensor]]) -> Matvec:
    """v -> H v for the mean cross-entropy over all chunks (each chunk weighted by its size).

    Double backward per chunk: autograd keeps no graph between calls, so memory stays at one
    chunk's worth whatever the probe size.
    """
    total = sum(len(y) for _, y in chunks)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        pieces = _split_like(v, params)
        out = torch.zeros_like(v)
        for x, y in chunks:
            loss = F.cross_entropy(model(x), y) * (len(y) / total)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            dot = sum((g * p).sum() for g, p in zip(grads, pieces))
            hv = torch.autograd.grad(dot, params)
            out += torch.cat([h.reshape(-1) for h in hv])
        return out

    return matvec


def _split_like(v: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    pieces, offset = [], 0
    for p in params:
        n = p.numel()
        pieces.append(v[offset:offset + n].view_as(p))
        offset += n
    return pieces


def lanczos_top(matvec: Matvec, dim: int, *, iters: int = 20, tol: float = 1e-3,
                v0: torch.Tensor | None = None, generator: torch.Generator | None = None,
                device=None, dtype=torch.float32) -> tuple[float, torch.Tensor, int]:
    """Largest algebraic eigenvalue of a symmetric operator by Lanczos with full reorthogonalisation.

    Stops when the Ritz residual ||H y - theta y|| = |beta_k s_k| falls below tol * |theta|, or after
    `iters` matrix-vector products. Returns (theta, unit Ritz vector y, matvecs used). A warm start
    v0 (the previous top eigenvector) usually converges in a few products.
    """
    if v0 is None or not torch.isfinite(v0).all() or v0.norm() == 0:
        v0 = torch.randn(dim, generator=generator, device=device, dtype=dtype)
    q = v0 / v0.norm()
    basis = [q]
    alphas: list[float] = []
    betas: list[float] = []
    theta, ritz = float("nan"), q
    for k in range(iters):
        w = matvec(basis[-1])
        alpha = torch.dot(w, basis[-1])
        alphas.append(float(alpha))
        # Full reorthogonalisation (twice is enough): k <= ~20 vectors, cheap next to an HVP.
        Q = torch.stack(basis)
        for _ in range(2):
            w = w - Q.T @ (Q @ w)
        beta = float(w.norm())
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            T += torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(T)
        theta, s = float(evals[-1]), evecs[:, -1]
        ritz = (Q.T.to(torch.float64) @ s.to(Q.device)).to(dtype)
        if not math.isfinite(theta):
            return theta, ritz, k + 1
        residual = abs(beta * float(s[-1]))
        if residual <= tol * max(abs(theta), 1e-30) or beta < 1e-10 * max(abs(theta), 1.0):
            return theta, ritz / ritz.norm(), k + 1
        betas.append(beta)
        basis.append(w / beta)
    return theta, ritz / ritz.norm(), iters


def hutchinson_trace(matvec: Matvec, dim: int, samples: int, *, generator: torch.Generator | None = None,
                     device=None, dtype=torch.float32) -> float:
    """Unbiased trace estimate mean(z^T H z) over Rademacher vectors z."""
    total = 0.0
    for _ in range(samples):
        z = torch.randint(0, 2, (dim,), generator=generator, device=device).to(dtype) * 2 - 1
        total += float(torch.dot(z, matvec(z)))
    return total / samples
