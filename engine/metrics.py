"""The measured quantities of SPEC §6: one small class per group, each with its own schedule.

The trainer only calls `add` (every step, no host sync) and `measure` (at log points); what is
measured and how lives here, and how it is drawn lives in the dashboard.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .hessian import flat_hvp, hutchinson_trace, lanczos_top, preserved_buffers
from .optim import SIGroup


class Schedule:
    """Due at step 0 and at the first log point at or after each multiple of `every` (0 = never)."""

    def __init__(self, every: int):
        self.every, self.last = every, None

    def due(self, step: int, final: bool = False) -> bool:
        if not self.every:
            return False
        if self.last is None or final:
            return self.last != step
        return step // self.every > self.last // self.every

    def mark(self, step: int) -> None:
        self.last = step


class StepAverages:
    """Per-step quantities averaged over the steps since the last log point, kept on the device."""

    KEYS = ("train_loss", "train_acc", "grad_norm", "eff_grad_norm", "angular_update")

    def __init__(self, device):
        self.sums = torch.zeros(len(self.KEYS), dtype=torch.float64, device=device)
        self.count = 0

    def add(self, loss, acc, grad_norm, rho, angle) -> None:
        self.sums += torch.stack([loss, acc, grad_norm, grad_norm * rho, angle]).to(torch.float64)
        self.count += 1

    def flush(self) -> dict[str, float]:
        if not self.count:
            return {}
        values = (self.sums / self.count).tolist()
        self.sums.zero_()
        self.count = 0
        return dict(zip(self.KEYS, values))

    def state_dict(self) -> dict:
        return {"sums": self.sums.clone(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.sums.copy_(state["sums"])
        self.count = state["count"]


def angular_update(u_before: torch.Tensor, w_after: torch.Tensor) -> torch.Tensor:
    """Angle between directions, as 2*asin(|u' - u|/2): exact for tiny angles where arccos reads 0."""
    chord = (w_after / w_after.norm() - u_before).norm()
    return 2 * torch.asin(torch.clamp(chord / 2, max=1.0))


class NormStats:
    """si_norm, per-layer norms and ELRs, lr, elr and cos_to_init."""

    def __init__(self, group: SIGroup, layer_names: list[str], w0: torch.Tensor):
        self.group, self.layer_names, self.w0 = group, layer_names, w0
        self.w0_norm = w0.norm()

    @torch.no_grad()
    def measure(self, lr: float) -> dict[str, float]:
        w = self.group.w
        rho = w.norm()
        layer = self.group.layer_norms()
        cos = torch.dot(w, self.w0) / (rho * self.w0_norm)
        head = torch.stack([rho, cos]).tolist()
        rho_f, layer_f = head[0], layer.tolist()
        out = {"si_norm": rho_f, "lr": lr, "elr": lr / rho_f ** 2 if rho_f else float("inf"),
               "cos_to_init": head[1]}
        for name, n in zip(self.layer_names, layer_f):
            out[f"layer_norm/{name}"] = n
            out[f"layer_elr/{name}"] = lr / n ** 2 if n else float("inf")
        return out


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1024) -> tuple[float, float]:
    """Mean loss and accuracy over a whole split, BN in eval mode (running statistics)."""
    was_training = model.training
    model.eval()
    loss = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.float64, device=x.device)
    for i in range(0, len(y), chunk):
        logits = model(x[i:i + chunk])
        loss += F.cross_entropy(logits, y[i:i + chunk], reduction="sum").double()
        correct += (logits.argmax(1) == y[i:i + chunk]).sum()
    model.train(was_training)
    total = torch.stack([loss, correct]).div(len(y)).tolist()
    return total[0], total[1]


class TestEval:
    def __init__(self, every: int):
        self.schedule = Schedule(every)

    def measure(self, model, data) -> dict[str, float]:
        loss, acc = evaluate(model, data.x_test, data.y_test)
        return {"test_loss": loss, "test_acc": acc}


class Sharpness:
    """Top Hessian eigenvalue on a fixed probe, reported at unit norm (lambda_max * rho^2).

    Lanczos is warm-started from the previous top eigenvector, so after the first measurement
    it usually needs a handful of Hessian-vector products.
    """

    def __init__(self, every: int, chunks, *, iters: int, tol: float, trace_samples: int, seed: int):
        self.schedule = Schedule(every)
        self.chunks, self.iters, self.tol, self.trace_samples = chunks, iters, tol, trace_samples
        self.vec: torch.Tensor | None = None
        self.seed = seed

    def measure(self, model: nn.Module, group: SIGroup, elr: float, momentum: float) -> dict[str, float]:
        gen = torch.Generator(device=group.w.device).manual_seed(self.seed)
        with preserved_buffers(model):
            matvec = flat_hvp(model, group.params, self.chunks)
            lam, self.vec, used = lanczos_top(matvec, group.numel, iters=self.iters, tol=self.tol,
                                              v0=self.vec, generator=gen, device=group.w.device)
            trace = (hutchinson_trace(matvec, group.numel, self.trace_samples, generator=gen,
                                      device=group.w.device) if self.trace_samples else None)
        rho2 = float(group.w.norm()) ** 2
        out = {"sharpness": lam * rho2,
               "sharpness_threshold": 2 * (1 + momentum) / elr if elr > 0 else float("inf")}
        if trace is not None:
            out["hessian_trace"] = trace * rho2 / group.numel
        return out
