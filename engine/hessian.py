"""Curvature of each member's loss with respect to its SI weights: Hessian-vector products, Lanczos,
Hutchinson — batched over the K members of a pack (a single run is K = 1).

Everything works on rows of [K, P] tensors (row k: member k, SI parameters in SIGroup order), so the
eigensolver never sees the model. The probe evaluates BatchNorm on each chunk's own batch statistics
(mode "probe": a chunk is one training-sized batch, so the curvature is that of the loss the optimiser
actually sees) without passing running statistics at all: a probe never changes the model.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .packnet import PackedNet, member_losses

# matvec(V [n, P], live: indices of the n members among the K measured) -> H_k v_k rows [n, P]
Matvec = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def hvp_operator(net: PackedNet, W: torch.Tensor, chunks, per_member_input: bool) -> Matvec:
    """H_k v_k for the mean cross-entropy over all chunks (each weighted by its size), every member at
    once: one double backward of the summed loss (the Hessian of a sum of disjoint members is block
    diagonal). Chunks are (x, y) with x [b, ...] shared or [b, K, ...] per member. Autograd keeps no
    graph between calls, so memory stays at one chunk's worth whatever the probe size."""
    total = sum(len(y) for _, y in chunks)

    def matvec(V: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        Wg = W[live].detach().requires_grad_()
        out = torch.zeros_like(V)
        with torch.enable_grad():
            for x, y in chunks:
                if per_member_input:
                    x, y = x[:, live], y[:, live]
                loss, _ = member_losses(net(Wg, x, mode="probe", per_member_input=per_member_input), y)
                G, = torch.autograd.grad(loss.sum() * (len(y) / total), Wg, create_graph=True)
                out += torch.autograd.grad((G * V).sum(), Wg)[0]
        return out

    return matvec


def lanczos_top(matvec: Matvec, starts: torch.Tensor, *, iters: int = 20,
                tol: float = 1e-3) -> tuple[list[float], torch.Tensor, int]:
    """Largest algebraic eigenvalue of each member's Hessian by Lanczos with full reorthogonalisation.

    starts: [K, P] start vectors (a warm start: the previous top eigenvector). A member stops when
    its Ritz residual ||H y - theta y|| = |beta_k s_k| falls below tol * |theta| (or its Krylov space
    is exhausted), or after `iters` products, and then leaves the batch. Returns (theta per member,
    unit Ritz vectors [K, P], batched products used)."""
    k_all, dev, dtype = starts.shape[0], starts.device, starts.dtype
    Q = (starts / starts.norm(dim=1, keepdim=True))[:, None]      # [live, k+1, P]: the live bases
    alphas: list[list[float]] = [[] for _ in range(k_all)]
    betas: list[list[float]] = [[] for _ in range(k_all)]
    done: dict[int, tuple[float, torch.Tensor]] = {}
    live = list(range(k_all))
    used = 0
    for it in range(iters):
        used = it + 1
        q = Q[:, -1]
        w = matvec(q, torch.tensor(live, device=dev))
        with torch.no_grad():
            alpha = (w * q).sum(1)
            for _ in range(2):                  # full reorthogonalisation, twice is enough
                w = w - torch.bmm(torch.bmm(Q, w[:, :, None]).transpose(1, 2), Q)[:, 0]
            beta = w.norm(dim=1)
            keep = []
            for j, (a_j, b_j) in enumerate(torch.stack([alpha, beta], 1).tolist()):
                i = live[j]
                alphas[i].append(a_j)
                theta, s = _top_ritz(alphas[i], betas[i])
                ritz = (Q[j].T.to(torch.float64) @ s.to(dev)).to(dtype)
                converged = (abs(b_j * float(s[-1])) <= tol * max(abs(theta), 1e-30)
                             or b_j < 1e-10 * max(abs(theta), 1.0))
                if not math.isfinite(theta) or converged or it == iters - 1:
                    done[i] = (theta, ritz / ritz.norm() if math.isfinite(theta) else ritz)
                    continue
                betas[i].append(b_j)
                keep.append(j)
            if not keep:
                break
            kj = torch.tensor(keep, device=dev)
            Q = torch.cat([Q[kj], (w[kj] / beta[kj, None])[:, None]], 1)
            live = [live[j] for j in keep]
    thetas = [done[i][0] for i in range(k_all)]
    return thetas, torch.stack([done[i][1] for i in range(k_all)]), used


def _top_ritz(alphas: list[float], betas: list[float]) -> tuple[float, torch.Tensor]:
    """Largest eigenvalue of the Lanczos tridiagonal matrix and its eigenvector (float64)."""
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    evals, evecs = torch.linalg.eigh(T)
    return float(evals[-1]), evecs[:, -1]


def hutchinson_trace(matvec: Matvec, k: int, dim: int, samples: int,
                     generators: list[torch.Generator], dtype=torch.float32) -> list[float]:
    """Unbiased trace estimates mean(z^T H z) over Rademacher vectors z, each member with its own generator."""
    device = generators[0].device
    everyone = torch.arange(k, device=device)
    totals = [0.0] * k
    for _ in range(samples):
        Z = torch.stack([torch.randint(0, 2, (dim,), generator=g, device=device).to(dtype) * 2 - 1
                         for g in generators])
        for i, t in enumerate((Z * matvec(Z, everyone)).sum(1).tolist()):
            totals[i] += t
    return [t / samples for t in totals]
