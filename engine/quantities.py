"""The measured quantities (README, "Metrics"): one small class per quantity, each with its own schedule.

The loop (engine/trainer.py) accumulates the per-step sums itself (no host sync per step) and, at a
log point, walks QUANTITIES in order: each one says when it is due for a member (`every`) and fills
in its named values for the due members, computed row-wise over them at once. Adding a quantity is
one new class here. A quantity that reads another's value names it in `requires`; the order of
QUANTITIES must put the provider first (checked at import).

Every key a quantity logs is declared in the metric registry (engine/registry.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import registry
from .hessian import hutchinson_trace, hvp_operator, lanczos_top
from .packnet import member_losses

if TYPE_CHECKING:
    from .trainer import Member, Trainer


class Schedule:
    """Due at a member's first log point, at the first log point at or after each multiple of `every`,
    and at the last step (0 = never)."""

    def __init__(self, every: int, last: int | None = None):
        self.every, self.last = every, last

    def due(self, step: int, final: bool = False) -> bool:
        if not self.every:
            return False
        if self.last is None or final:
            return self.last != step
        return step // self.every > self.last // self.every


@dataclass
class LogPoint:
    """The members measured together at one log point: their rows in the pack tensors and the value
    dicts being filled (one per member, shared with the loop)."""
    trainer: "Trainer"
    members: list["Member"]
    rows: torch.Tensor
    values: list[dict]
    start: bool          # the first point of these members' traces (step 0, or where a fork begins)

    def subset(self, positions: list[int]) -> "LogPoint":
        if len(positions) == len(self.members):
            return self
        return LogPoint(self.trainer, [self.members[i] for i in positions], self.rows[positions],
                        [self.values[i] for i in positions], self.start)


class Quantity:
    name: str                       # its schedule's name in a checkpoint
    keys: tuple[str, ...]           # registry keys it logs
    requires: tuple[str, ...] = ()  # keys it reads from quantities measured before it
    at_fork_start = True            # measured at a fork's first point (False: it carries state, e.g. a warm start)

    def every(self, member: "Member") -> int:
        """Steps between measurements (0: off); 1 means every log point."""
        return 1

    def measure(self, point: LogPoint) -> None:
        raise NotImplementedError


class StepAverages(Quantity):
    """Per-step quantities averaged over the steps since the last log point (the loop sums them on the
    device). At a trace's first point: the untrained (or fork-start) level on the probe, BN statistics
    untouched."""
    name = "averages"
    keys = ("train_loss", "train_acc", "grad_norm", "eff_grad_norm", "angular_update")
    SUMMED = keys                   # the order of the loop's per-step sums

    def measure(self, point: LogPoint) -> None:
        trainer = point.trainer
        if point.start:
            table = trainer.probe_loss(point.members, point.rows).tolist()
            for values, (loss, acc) in zip(point.values, table):
                values.update(train_loss=loss, train_acc=acc)
            return
        counts = torch.tensor([max(m.count, 1) for m in point.members], device=trainer.device,
                              dtype=torch.float64)
        table = (trainer.SUMS[point.rows] / counts[:, None]).tolist()
        trainer.SUMS[point.rows] = 0.0
        for m, values, row in zip(point.members, point.values, table):
            if m.count:
                values.update(zip(self.SUMMED, row))
            m.count = 0


class Norms(Quantity):
    """si_norm, per-layer norms and ELRs, lr, elr and cos_to_init."""
    name = "norms"
    keys = ("si_norm", "layer_norm/<layer>", "lr", "elr", "layer_elr/<layer>", "cos_to_init")

    @torch.no_grad()
    def measure(self, point: LogPoint) -> None:
        trainer = point.trainer
        W, W0 = trainer.W[point.rows], trainer.W0[point.rows]
        rho = W.norm(dim=1)
        # per-member dot products: a row-wise sum would round differently from a run alone
        dots = torch.stack([torch.dot(W[i], W0[i]) for i in range(len(W))])
        cos = dots / (rho * W0.norm(dim=1))
        layers = torch.stack([p.norm(dim=1) for p in W.split(trainer.sizes, dim=1)], 1)
        table = torch.cat([rho[:, None], cos[:, None], layers], 1).to(torch.float64).tolist()
        for m, values, row in zip(point.members, point.values, table):
            rho_f, cos_f, layer_f = row[0], row[1], row[2:]
            lr = m.lr()
            values.update(si_norm=rho_f, lr=lr, elr=lr / rho_f ** 2 if rho_f else float("inf"), cos_to_init=cos_f)
            for name, n in zip(trainer.layer_names, layer_f):
                values[f"layer_norm/{name}"] = n
                values[f"layer_elr/{name}"] = lr / n ** 2 if n else float("inf")


class TestEval(Quantity):
    """test_loss, test_acc on the whole held-out split, BN in eval mode (running statistics)."""
    name = "test"
    keys = ("test_loss", "test_acc")

    def every(self, member: "Member") -> int:
        return member.cfg.eval_every or member.steps_per_epoch

    def measure(self, point: LogPoint) -> None:
        trainer = point.trainer
        table = trainer.evaluate(point.rows, trainer.data.x_test, trainer.data.y_test).tolist()
        for values, (loss, acc) in zip(point.values, table):
            values.update(test_loss=loss, test_acc=acc)


class ValEval(Quantity):
    """val_loss, val_acc on the validation split (RunConfig.validation), like the test evaluation and
    at the same steps."""
    name = "val"
    keys = ("val_loss", "val_acc")

    def every(self, member: "Member") -> int:
        return TestEval().every(member) if member.cfg.validation else 0

    def measure(self, point: LogPoint) -> None:
        trainer = point.trainer
        table = trainer.evaluate(point.rows, trainer.data.x_val, trainer.data.y_val).tolist()
        for values, (loss, acc) in zip(point.values, table):
            values.update(val_loss=loss, val_acc=acc)


class FeatureAccuracy(Quantity):
    """feature_acc/<k>: accuracy on the probe set where only feature k carries the label (the ticks
    toy): how much the network relies on each feature. At the test evaluations."""
    name = "features"
    keys = ("feature_acc/<k>",)

    def every(self, member: "Member") -> int:
        return TestEval().every(member) if member.cfg.dataset == "ticks" else 0

    def measure(self, point: LogPoint) -> None:
        trainer = point.trainer
        table = feature_accuracy(trainer.net, trainer.W[point.rows], trainer._stats(point.rows),
                                 trainer.data.feature_x, trainer.data.feature_y).tolist()
        for values, row in zip(point.values, table):
            values.update({f"feature_acc/{k}": acc for k, acc in enumerate(row)})


@torch.no_grad()
def feature_accuracy(net, W: torch.Tensor, stats, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """[K, F]: each member's accuracy on each feature's probe set (x [F, N, ...], y [F, N]), BN in eval mode."""
    features, n = y.shape
    flat_x, flat_y = x.reshape(features * n, *x.shape[2:]), y.reshape(-1)
    correct = []
    for i in range(0, len(flat_y), chunk):
        logits = net(W, flat_x[i:i + chunk], mode="eval", stats=stats)           # [b, K, C]
        correct.append(logits.argmax(-1) == flat_y[i:i + chunk, None])
    return torch.cat(correct).T.reshape(len(W), features, n).double().mean(2)


class Sharpness(Quantity):
    """Top Hessian eigenvalue on the member's fixed probe, reported at unit norm (lambda_max * rho^2),
    and the stability line 2(1+mu)/elr. Lanczos is warm-started from the member's previous top
    eigenvector, so after the first measurement it usually needs a handful of products."""
    name = "sharpness"
    keys = ("sharpness", "sharpness_threshold")
    requires = ("elr",)
    at_fork_start = False

    def every(self, member: "Member") -> int:
        return member.cfg.sharpness_every

    def measure(self, point: LogPoint) -> None:
        trainer, members = point.trainer, point.members
        cfg, dev, P = members[0].cfg, trainer.device, trainer.numel
        starts = []
        for m in members:
            v0 = m.sharp_vec
            if v0 is None or not torch.isfinite(v0).all() or v0.norm() == 0:
                v0 = torch.randn(P, generator=torch.Generator(device=dev).manual_seed(m.cfg.seed), device=dev)
            starts.append(v0)
        matvec = trainer.probe_hvp(members, point.rows)
        thetas, vecs, trainer.lanczos_matvecs = lanczos_top(matvec, torch.stack(starts), iters=cfg.lanczos_iters,
                                                            tol=cfg.lanczos_tol)
        rho2 = (trainer.W[point.rows].norm(dim=1) ** 2).tolist()
        for i, (m, values) in enumerate(zip(members, point.values)):
            m.sharp_vec = vecs[i]
            elr = values["elr"]
            values.update(sharpness=thetas[i] * rho2[i],
                          sharpness_threshold=2 * (1 + m.cfg.momentum) / elr if elr > 0 else float("inf"))


class HessianTrace(Quantity):
    """Hutchinson estimate of the Hessian trace on the probe, at unit norm, per SI parameter."""
    name = "trace"
    keys = ("hessian_trace",)
    at_fork_start = False

    def every(self, member: "Member") -> int:
        return member.cfg.sharpness_every if member.cfg.trace_samples else 0

    def measure(self, point: LogPoint) -> None:
        trainer, members = point.trainer, point.members
        gens = [torch.Generator(device=trainer.device).manual_seed(m.cfg.seed) for m in members]
        traces = hutchinson_trace(trainer.probe_hvp(members, point.rows), len(members), trainer.numel,
                                  members[0].cfg.trace_samples, gens)
        rho2 = (trainer.W[point.rows].norm(dim=1) ** 2).tolist()
        for values, trace, r2 in zip(point.values, traces, rho2):
            values["hessian_trace"] = trace * r2 / trainer.numel


QUANTITIES: tuple[Quantity, ...] = (StepAverages(), Norms(), TestEval(), ValEval(), FeatureAccuracy(), Sharpness(), HessianTrace())


def check_quantities(quantities) -> None:
    """Every key is in the registry, and every required key is provided by an earlier quantity."""
    provided: set[str] = set()
    for q in quantities:
        unknown = [k for k in q.keys if not registry.is_known(k)]
        if unknown:
            raise RuntimeError(f"{type(q).__name__} logs keys missing from engine/registry.py: {unknown}")
        missing = [k for k in q.requires if k not in provided]
        if missing:
            raise RuntimeError(f"{type(q).__name__} needs {missing} from a quantity listed before it")
        provided.update(q.keys)


check_quantities(QUANTITIES)
