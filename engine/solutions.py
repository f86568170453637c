"""Solutions a run reached and what lies between them (README, "Branch, average, compare solutions"): weight vectors evaluated with
recomputed BatchNorm statistics, SWA averages of kept checkpoints, and the linear path between two
solutions with its barriers.

Any number of weight vectors of one architecture are evaluated at once, as the rows of a [K, P]
tensor through the network every run trains with (engine/packnet.py):
- BatchNorm recalibration: running statistics reset, the training set passed through in train mode
  in batches of the run's batch size, in order, with a cumulative average (momentum 1/n for the n-th
  batch: PyTorch's momentum=None); weights untouched;
- train loss and accuracy: the training set in the same batches, BN on each batch's own statistics
  (the loss the optimiser sees); test loss and accuracy: the test split, BN in eval mode on the
  recomputed statistics; val loss and accuracy likewise on the validation split, where the run has
  one (RunConfig.validation: what a learning-rate study selects on).
"""
from __future__ import annotations


import torch

from .config import RunConfig
from .data import Dataset, load_dataset
from .models import build_model, si_layer_names
from .packnet import BN_TYPES, PackedNet, member_losses
from .quantities import feature_accuracy
from .runtime import resolve_device

METRICS = ("train_loss", "train_acc", "test_loss", "test_acc")


def checkpoint_weights(state: dict, layer_names: list[str]) -> torch.Tensor:
    """The flat SI weight vector [P] of a checkpoint (Trainer.member_state's format)."""
    return torch.cat([state["model"][f"{name}.weight"].reshape(-1) for name in layer_names])


class Evaluator:
    """Evaluates SI weight vectors of the architecture and data of `cfg` (K at once, in groups of
    `group` members to bound memory)."""

    def __init__(self, cfg: RunConfig, *, data: Dataset | None = None, device: torch.device | None = None,
                 group: int | None = None):
        self.cfg = cfg
        self.device = device or resolve_device(cfg.device)
        self.data = data if data is not None else load_dataset(cfg, self.device)
        template = build_model(cfg, self.data.input_shape, self.data.num_classes).to(self.device)
        self.layer_names = si_layer_names(template)
        self.bn_channels = [m.num_features for m in template.modules() if isinstance(m, BN_TYPES)]
        self.net = PackedNet(template).to(self.device)
        # members evaluated at once: 8 bounds memory for conv nets on a CPU; a small network (a ticks
        # mlp_si: 2k weights) takes a whole 21-point path in one group, half the CPU time of three
        self.group = group or (32 if self.device.type == "cuda" or cfg.parameter_count < 100_000 else 8)

    def _train_batches(self):
        """The training set in order, in batches of the run's size (a last batch of one sample is left
        out: BatchNorm has no variance to normalise it by). A network without BatchNorm (LayerNorm
        mlp_si) gives every sample the same output in any batch: chunks of 1024 then, all samples in."""
        n, b = self.data.train_size, self.cfg.batch
        if not self.bn_channels:
            b = max(b, 1024)
        for start in range(0, n, b):
            if n - start >= 2 or not self.bn_channels:
                yield self.data.x_train[start:start + b], self.data.y_train[start:start + b]

    @torch.no_grad()
    def recompute_bn(self, W: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Running statistics of W's members, recomputed on the training set (flat over K*C, as the
        network takes them)."""
        k = len(W)
        stats = [(torch.zeros(k * c, device=self.device), torch.ones(k * c, device=self.device))
                 for c in self.bn_channels]
        if not stats:
            return stats                  # no BatchNorm: nothing to recompute
        for n, (x, _) in enumerate(self._train_batches(), start=1):
            self.net(W, x, mode="recompute", stats=stats, momentum=1.0 / n)
        return stats

    @torch.no_grad()
    def evaluate(self, W: torch.Tensor, features: bool = True) -> list[dict]:
        """Per row of W: train_loss, train_acc (BN on batch statistics), test_loss, test_acc (BN in eval
        mode on statistics recomputed on the training set), val_loss, val_acc where the run has a
        validation split, and on the ticks toy (with features) feature_acc/<k>."""
        out = []
        for start in range(0, len(W), self.group):
            out += self._evaluate(W[start:start + self.group], features)
        return out

    def _evaluate(self, W: torch.Tensor, features: bool) -> list[dict]:
        stats = self.recompute_bn(W)
        train = torch.zeros(len(W), 2, dtype=torch.float64, device=self.device)
        seen = 0
        for x, y in self._train_batches():
            loss, correct = member_losses(self.net(W, x, mode="probe"), y, "sum")
            train += torch.stack([loss, correct], 1).double()
            seen += len(y)
        parts, keys = [train / seen, self._held_out(W, stats, self.data.x_test, self.data.y_test)], METRICS
        if self.data.x_val is not None:
            parts.append(self._held_out(W, stats, self.data.x_val, self.data.y_val))
            keys += ("val_loss", "val_acc")
        rows = [dict(zip(keys, row)) for row in torch.cat(parts, 1).tolist()]
        if features and self.data.feature_x is not None:      # the ticks toy: which features the solution relies on
            features = feature_accuracy(lambda x: self.net(W, x, mode="eval", stats=stats), len(W),
                                        self.data.feature_x, self.data.feature_y).tolist()
            for row, accs in zip(rows, features):
                row.update({f"feature_acc/{k}": acc for k, acc in enumerate(accs)})
        return rows


    def _held_out(self, W: torch.Tensor, stats, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[K, 2]: mean loss and accuracy on a held-out split, BN in eval mode on `stats`."""
        total = torch.zeros(len(W), 2, dtype=torch.float64, device=self.device)
        for i in range(0, len(y), 1024):
            loss, correct = member_losses(self.net(W, x[i:i + 1024], mode="eval", stats=stats), y[i:i + 1024], "sum")
            total += torch.stack([loss, correct], 1).double()
        return total / len(y)


def average(weights: list[torch.Tensor]) -> torch.Tensor:
    """The arithmetic mean of SI weight vectors (SWA), not projected back to the sphere: the network
    is scale-invariant, so only the direction matters (and BN statistics are recomputed anyway)."""
    return torch.stack(weights).mean(0)


def angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Angular distance arccos(<a, b> / |a||b|), computed as 2 asin(|u - v| / 2) in float64: exact for
    tiny angles, where the arccos of a rounded cosine reads 0."""
    u, v = a.double() / a.double().norm(), b.double() / b.double().norm()
    return float(2 * torch.asin(torch.clamp((u - v).norm() / 2, max=1.0)))


def path(a: torch.Tensor, b: torch.Tensor, points: int) -> tuple[list[float], torch.Tensor]:
    """w(alpha) = (1 - alpha) a + alpha b at `points` alphas in [0, 1], each projected back to the
    sphere radius (1 - alpha)|a| + alpha|b| (|a| = |b| for runs on one sphere)."""
    alphas = torch.linspace(0.0, 1.0, points, dtype=torch.float64, device=a.device)
    al = alphas[:, None].to(a.dtype)
    W = (1 - al) * a + al * b
    radius = (1 - al) * a.norm() + al * b.norm()
    return alphas.tolist(), W * (radius / W.norm(dim=1, keepdim=True))


def barrier(values: list[float], alphas: list[float]) -> float:
    """max over alpha of value(alpha) - ((1 - alpha) value(0) + alpha value(1)): how far the path rises
    above the straight line between its ends (>= 0 up to noise; ~0 means one basin)."""
    first, last = values[0], values[-1]
    return max(v - ((1 - t) * first + t * last) for v, t in zip(values, alphas))


def geometry(evaluator: Evaluator, a: torch.Tensor, b: torch.Tensor, points: int = 21) -> dict:
    """Angle, the linear path's train/test (and, where the run has one, validation) loss and error at
    each alpha, and the barrier of each (no feature accuracies: 16 probe sets per point would cost more
    than the rest of the path)."""
    alphas, W = path(a, b, points)
    rows = evaluator.evaluate(W, features=False)
    curves = {"train_loss": [r["train_loss"] for r in rows], "train_err": [1 - r["train_acc"] for r in rows],
              "test_loss": [r["test_loss"] for r in rows], "test_err": [1 - r["test_acc"] for r in rows]}
    if "val_acc" in rows[0]:
        curves |= {"val_loss": [r["val_loss"] for r in rows], "val_err": [1 - r["val_acc"] for r in rows]}
    return {"angle": angle(a, b), "alphas": alphas, **curves,
            "barrier": {key: barrier(values, alphas) for key, values in curves.items()}}

