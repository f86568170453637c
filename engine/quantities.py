"""The measured quantities (README, "Metrics"): one small class per quantity, each with its own schedule.

A quantity never sees the training loop. It is handed a `Measuring` (below): the narrow, documented
object with everything a measurement may use. At a log point the loop (engine/trainer.py) walks
QUANTITIES in order: each one says when it is due for a member (`every`) and fills in its named
values for the due members, computed row-wise over them at once. A quantity that reads another's
value names it in `requires`; the order of QUANTITIES must put the provider first (checked at import).

A per-step quantity (an average over the steps since the last log point) also names the sums it
keeps in `sums` and computes them from the step's by-products (`StepProducts`) in `per_step`; the
loop adds them up on the device, by name, and `Measuring.step_means()` hands back their means.

Adding a metric: its class here (added to QUANTITIES) and its entry in engine/registry.py, nothing
else (README, "Adding a metric"). Every key a quantity logs is declared in the registry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

import torch

from . import registry
from .hessian import hutchinson_trace, lanczos_top

if TYPE_CHECKING:
    from .config import RunConfig
    from .data import Dataset


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


@dataclass(frozen=True)
class StepProducts:
    """The by-products of one optimizer step, one row per member in the step ([K] or [K, P] tensors):
    what a per-step quantity computes its sums from."""
    loss: torch.Tensor         # [K] mean mini-batch loss, BN in train mode
    acc: torch.Tensor          # [K] mini-batch accuracy
    grad: torch.Tensor         # [K, P] gradient of the mini-batch loss w.r.t. the SI parameters
    grad_norm: torch.Tensor    # [K] its norm
    rho: torch.Tensor          # [K] SI norm before the step
    u_before: torch.Tensor     # [K, P] direction of the SI parameters before the step (unit rows)
    w_after: torch.Tensor      # [K, P] SI parameters after the step


class Source(Protocol):
    """What the loop lends a Measuring (engine/trainer.Trainer implements it). Quantities never call
    it: they use Measuring's methods."""
    device: torch.device
    data: "Dataset"
    layer_names: list[str]
    sizes: list[int]
    numel: int

    def weights(self, rows: torch.Tensor) -> torch.Tensor: ...
    def initial_weights(self, rows: torch.Tensor) -> torch.Tensor: ...
    def take_step_means(self, members: list, rows: torch.Tensor) -> list[dict[str, float] | None]: ...
    def probe_loss(self, members: list, rows: torch.Tensor) -> torch.Tensor: ...
    def probe_hvp(self, members: list, rows: torch.Tensor) -> Callable: ...
    def evaluate(self, rows: torch.Tensor, x_all: torch.Tensor, y_all: torch.Tensor) -> torch.Tensor: ...
    def eval_logits(self, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor: ...


class Measuring:
    """What a quantity measures with, for the members measured together at one log point (one row each,
    in the order of `configs`). The whole interface between a quantity and the loop:

    - `configs`, `lrs`: each member's RunConfig and the learning rate it applies at this step;
      `start`: this is the first point of their traces (step 0, or where a fork begins);
    - `weights()`, `initial_weights()`: [n, P] SI parameters now and at initialisation (copies);
      `layer_names`, `layer_sizes`, `numel`, `device`, `data` (the Dataset: splits, probe sets);
    - the evaluator: `evaluate("test" | "val")`, `probe_loss()`, `probe_hvp()`, `eval_logits(x)`;
    - `step_means()`: per member the means of the per-step sums since its last log point, by name
      (None for a member with no step summed); the first call of a log point consumes them;
    - `values`: one dict per member, filled in by the quantities (and read by those that `require` a key);
    - `carried(name)` / `carry(name, i, value)`: state a quantity keeps for a member between its
      measurements and in checkpoints (the sharpness warm start); `note(key, value)`: a diagnostic for
      the caller (Trainer.diagnostics).
    """

    def __init__(self, source: Source, members: list, rows: torch.Tensor, start: bool, *,
                 values: list[dict] | None = None, _shared: dict | None = None):
        self._source, self._members, self.rows, self.start = source, members, rows, start
        self.configs: list["RunConfig"] = [m.cfg for m in members]
        self.lrs: list[float] = [m.lr() for m in members]
        self.values: list[dict] = values if values is not None else [{} for _ in members]
        self.device, self.data, self.numel = source.device, source.data, source.numel
        self.layer_names, self.layer_sizes = source.layer_names, source.sizes
        # shared by the subsets of one log point: step means taken once, state carried, notes
        self._shared = _shared if _shared is not None else {"means": {}, "carry": {}, "notes": {}}

    def __len__(self) -> int:
        return len(self._members)

    def subset(self, positions: list[int]) -> "Measuring":
        if len(positions) == len(self._members):
            return self
        return Measuring(self._source, [self._members[i] for i in positions], self.rows[positions], self.start,
                         values=[self.values[i] for i in positions], _shared=self._shared)

    # ---- parameters
    def weights(self) -> torch.Tensor:
        return self._source.weights(self.rows)

    def initial_weights(self) -> torch.Tensor:
        return self._source.initial_weights(self.rows)

    # ---- the evaluator
    def evaluate(self, split: str) -> torch.Tensor:
        """[n, 2]: mean loss and accuracy on a whole split ("test" or "val"), BN in eval mode."""
        x, y = {"test": (self.data.x_test, self.data.y_test), "val": (self.data.x_val, self.data.y_val)}[split]
        return self._source.evaluate(self.rows, x, y)

    def probe_loss(self) -> torch.Tensor:
        """[n, 2]: mean loss and accuracy on each member's fixed probe, BN on batch statistics."""
        return self._source.probe_loss(self._members, self.rows)

    def probe_hvp(self) -> Callable:
        """The Hessian-vector product of each member's probe loss (engine/hessian.hvp_operator)."""
        return self._source.probe_hvp(self._members, self.rows)

    def eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        """[b, n, C]: the members' logits on inputs x [b, ...], BN in eval mode (running statistics)."""
        return self._source.eval_logits(self.rows, x)

    # ---- per-step sums, carried state, notes
    def step_means(self) -> list[dict[str, float] | None]:
        means = self._shared["means"]
        missing = [i for i, m in enumerate(self._members) if id(m) not in means]
        if missing:
            taken = self._source.take_step_means([self._members[i] for i in missing], self.rows[missing])
            means.update({id(self._members[i]): t for i, t in zip(missing, taken)})
        return [means[id(m)] for m in self._members]

    def carried(self, name: str) -> list:
        return [self._shared["carry"].get((id(m), name), m.carried.get(name)) for m in self._members]

    def carry(self, name: str, i: int, value) -> None:
        self._shared["carry"][(id(self._members[i]), name)] = value

    def note(self, key: str, value) -> None:
        self._shared["notes"][key] = value

    def outcome(self) -> tuple[dict, dict]:
        """For the loop: ({(member, quantity name): carried state}, notes)."""
        by_id = {id(m): m for m in self._members}
        return ({(by_id[mid], name): v for (mid, name), v in self._shared["carry"].items() if mid in by_id},
                self._shared["notes"])


class Quantity:
    name: str                       # its schedule's name in a checkpoint
    keys: tuple[str, ...]           # registry keys it logs
    requires: tuple[str, ...] = ()  # keys it reads from quantities measured before it
    at_fork_start = True            # measured at a fork's first point (False: it carries state, e.g. a warm start)
    sums: tuple[str, ...] = ()      # a per-step quantity: the names of the sums per_step() returns
    carry_key: str | None = None    # the checkpoint key of the state it carries for a member (Measuring.carry)

    def every(self, cfg: "RunConfig", steps_per_epoch: int) -> int:
        """Steps between measurements (0: off); 1 means every log point. A per-step quantity (one with
        `sums`) is measured at every log point: its sums are taken there whether it reads them or not."""
        return 1

    def per_step(self, step: StepProducts) -> dict[str, torch.Tensor]:
        """A per-step quantity: {sum name: [K] tensor} for one step, every name of `sums`, no host sync."""
        raise NotImplementedError

    def measure(self, point: Measuring) -> None:
        raise NotImplementedError


class StepAverages(Quantity):
    """Per-step quantities averaged over the steps since the last log point (the loop sums them on the
    device). At a trace's first point: the untrained (or fork-start) level on the probe, BN statistics
    untouched."""
    name = "averages"
    keys = ("train_loss", "train_acc", "grad_norm", "eff_grad_norm", "angular_update")
    sums = keys

    def per_step(self, step: StepProducts) -> dict[str, torch.Tensor]:
        return {"train_loss": step.loss.detach(), "train_acc": step.acc, "grad_norm": step.grad_norm,
                "eff_grad_norm": step.grad_norm * step.rho,
                "angular_update": angular_update(step.u_before, step.w_after)}

    def measure(self, point: Measuring) -> None:
        if point.start:
            table = point.probe_loss().tolist()
            for values, (loss, acc) in zip(point.values, table):
                values.update(train_loss=loss, train_acc=acc)
            return
        for values, means in zip(point.values, point.step_means()):
            if means is not None:
                values.update({k: means[k] for k in self.sums})


def angular_update(u_before: torch.Tensor, w_after: torch.Tensor) -> torch.Tensor:
    """Per row, the angle between u_before (unit) and the direction of w_after, as 2*asin(|u' - u|/2):
    exact for tiny angles, where the arccos of a float32 cosine reads 0 (the whole convergence regime)."""
    norm = torch.linalg.vector_norm
    chord = norm(w_after / norm(w_after, dim=1, keepdim=True) - u_before, dim=1)
    return chord.mul_(0.5).clamp_(max=1.0).asin_().mul_(2)


class Norms(Quantity):
    """si_norm, per-layer norms and ELRs, lr, elr and cos_to_init."""
    name = "norms"
    keys = ("si_norm", "layer_norm/<layer>", "lr", "elr", "layer_elr/<layer>", "cos_to_init")

    @torch.no_grad()
    def measure(self, point: Measuring) -> None:
        W, W0 = point.weights(), point.initial_weights()
        rho = W.norm(dim=1)
        # per-member dot products: a row-wise sum would round differently from a run alone
        dots = torch.stack([torch.dot(W[i], W0[i]) for i in range(len(W))])
        cos = dots / (rho * W0.norm(dim=1))
        layers = torch.stack([p.norm(dim=1) for p in W.split(point.layer_sizes, dim=1)], 1)
        table = torch.cat([rho[:, None], cos[:, None], layers], 1).to(torch.float64).tolist()
        for lr, values, row in zip(point.lrs, point.values, table):
            rho_f, cos_f, layer_f = row[0], row[1], row[2:]
            values.update(si_norm=rho_f, lr=lr, elr=lr / rho_f ** 2 if rho_f else float("inf"), cos_to_init=cos_f)
            for name, n in zip(point.layer_names, layer_f):
                values[f"layer_norm/{name}"] = n
                values[f"layer_elr/{name}"] = lr / n ** 2 if n else float("inf")


class TestEval(Quantity):
    """test_loss, test_acc on the whole held-out split, BN in eval mode (running statistics)."""
    name = "test"
    keys = ("test_loss", "test_acc")

    def every(self, cfg, steps_per_epoch):
        return cfg.eval_every or steps_per_epoch

    def measure(self, point: Measuring) -> None:
        for values, (loss, acc) in zip(point.values, point.evaluate("test").tolist()):
            values.update(test_loss=loss, test_acc=acc)


class ValEval(Quantity):
    """val_loss, val_acc on the validation split (RunConfig.validation), like the test evaluation and
    at the same steps."""
    name = "val"
    keys = ("val_loss", "val_acc")

    def every(self, cfg, steps_per_epoch):
        return TestEval().every(cfg, steps_per_epoch) if cfg.validation else 0

    def measure(self, point: Measuring) -> None:
        for values, (loss, acc) in zip(point.values, point.evaluate("val").tolist()):
            values.update(val_loss=loss, val_acc=acc)


class FeatureAccuracy(Quantity):
    """feature_acc/<k>: accuracy on the probe set where only feature k carries the label (the ticks
    toy): how much the network relies on each feature. At the test evaluations."""
    name = "features"
    keys = ("feature_acc/<k>",)

    def every(self, cfg, steps_per_epoch):
        return TestEval().every(cfg, steps_per_epoch) if cfg.dataset == "ticks" else 0

    def measure(self, point: Measuring) -> None:
        table = feature_accuracy(point.eval_logits, len(point), point.data.feature_x, point.data.feature_y).tolist()
        for values, row in zip(point.values, table):
            values.update({f"feature_acc/{k}": acc for k, acc in enumerate(row)})


@torch.no_grad()
def feature_accuracy(logits_of: Callable[[torch.Tensor], torch.Tensor], members: int, x: torch.Tensor,
                     y: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """[K, F]: each member's accuracy on each feature's probe set (x [F, N, ...], y [F, N]); logits_of(x)
    gives the K members' logits [b, K, C] on inputs x [b, ...], BN in eval mode."""
    features, n = y.shape
    flat_x, flat_y = x.reshape(features * n, *x.shape[2:]), y.reshape(-1)
    correct = []
    for i in range(0, len(flat_y), chunk):
        logits = logits_of(flat_x[i:i + chunk])                                  # [b, K, C]
        correct.append(logits.argmax(-1) == flat_y[i:i + chunk, None])
    return torch.cat(correct).T.reshape(members, features, n).double().mean(2)


class Sharpness(Quantity):
    """Top Hessian eigenvalue on the member's fixed probe, reported at unit norm (lambda_max * rho^2),
    and the stability line 2(1+mu)/elr. Lanczos is warm-started from the member's previous top
    eigenvector (carried between measurements and in checkpoints), so after the first measurement it
    usually needs a handful of products."""
    name = "sharpness"
    keys = ("sharpness", "sharpness_threshold")
    requires = ("elr",)
    at_fork_start = False
    carry_key = "sharpness_vec"

    def __init__(self, iters: int | None = None):
        self.iters = iters              # Lanczos iterations at most (None: the config's --lanczos-iters)

    def every(self, cfg, steps_per_epoch):
        return cfg.sharpness_every

    def measure(self, point: Measuring) -> None:
        cfgs, dev, P = point.configs, point.device, point.numel
        starts = []
        for cfg, v0 in zip(cfgs, point.carried(self.name)):
            if v0 is None or not torch.isfinite(v0).all() or v0.norm() == 0:
                v0 = torch.randn(P, generator=torch.Generator(device=dev).manual_seed(cfg.seed), device=dev)
            starts.append(v0)
        thetas, vecs, matvecs = lanczos_top(point.probe_hvp(), torch.stack(starts), iters=self.iters or cfgs[0].lanczos_iters,
                                            tol=cfgs[0].lanczos_tol)
        point.note("lanczos_matvecs", matvecs)
        rho2 = (point.weights().norm(dim=1) ** 2).tolist()
        for i, (cfg, values) in enumerate(zip(cfgs, point.values)):
            point.carry(self.name, i, vecs[i])
            elr = values["elr"]
            values.update(sharpness=thetas[i] * rho2[i],
                          sharpness_threshold=2 * (1 + cfg.momentum) / elr if elr > 0 else float("inf"))


class HessianTrace(Quantity):
    """Hutchinson estimate of the Hessian trace on the probe, at unit norm, per SI parameter."""
    name = "trace"
    keys = ("hessian_trace",)
    at_fork_start = False

    def every(self, cfg, steps_per_epoch):
        return cfg.sharpness_every if cfg.trace_samples else 0

    def measure(self, point: Measuring) -> None:
        gens = [torch.Generator(device=point.device).manual_seed(cfg.seed) for cfg in point.configs]
        traces = hutchinson_trace(point.probe_hvp(), len(point), point.numel, point.configs[0].trace_samples, gens)
        rho2 = (point.weights().norm(dim=1) ** 2).tolist()
        for values, trace, r2 in zip(point.values, traces, rho2):
            values["hessian_trace"] = trace * r2 / point.numel


QUANTITIES: tuple[Quantity, ...] = (StepAverages(), Norms(), TestEval(), ValEval(), FeatureAccuracy(), Sharpness(), HessianTrace())


def check_quantities(quantities) -> None:
    """Every key is in the registry, and every required key is provided by an earlier quantity."""
    provided: set[str] = set()
    for q in quantities:
        if q.sums and (type(q).every is not Quantity.every or set(q.sums) & {s for p in quantities if p is not q
                                                                              for s in p.sums}):
            raise RuntimeError(f"{type(q).__name__} sums per step: it is measured at every log point (no `every` "
                               "of its own) and its sums' names are its own")
        unknown = [k for k in q.keys if not registry.is_known(k)]
        if unknown:
            raise RuntimeError(f"{type(q).__name__} logs keys missing from engine/registry.py: {unknown}")
        missing = [k for k in q.requires if k not in provided]
        if missing:
            raise RuntimeError(f"{type(q).__name__} needs {missing} from a quantity listed before it")
        provided.update(q.keys)


check_quantities(QUANTITIES)
