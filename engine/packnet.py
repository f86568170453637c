"""The vectorised network: one SI model's layers running K members at once (K >= 1).

A single run is a pack of one: every run trains through this network (engine/trainer.py).

- The K flat SI vectors are the rows of one [K, P] tensor W (row k is member k's weights, in the
  order of `models.si_parameters`). Each call splits W by layer: a conv layer becomes one conv with
  K*C_out filters and groups=K, a linear layer one batched matmul. With K = 1, or in the input layer
  when all members read one shared batch, the layer is a plain dense conv / GEMM.
- Activations are [B, K*C, ...]: every BatchNorm becomes one F.batch_norm over K*C channels, the very
  same per-channel computation, with running statistics stored as [K, C] rows and updated in place; a
  LayerNorm (mlp_si's option) normalises each member's C features of each sample.
- The frozen head is shared: [B, K, F] @ W_head^T gives logits [B, K, classes]. Per-member losses
  are summed, and one backward gives every member its own gradient as the rows of a [K, P] tensor
  (the members' graphs are disjoint, so d(sum)/dW_k = dL_k/dW_k).

Whether the members read one shared batch ([B, ...]) or their own ([B, K, ...]) is the caller's
explicit `per_member_input` flag. BatchNorm runs in one of four modes: "train" (batch statistics,
running statistics updated), "probe" (batch statistics, running statistics not touched: sharpness
and the start-point loss can never change the model), "eval" (running statistics) and "recompute"
(batch statistics, running statistics replaced by a cumulative average: BN recalibration).

torch.func.vmap was measured against grouped layers on the CPU: as fast for the step, but it cannot
update BatchNorm running statistics in place.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .models import si_layer_names, si_parameters

BN_TYPES = nn.modules.batchnorm._BatchNorm
BN_MODES = ("train", "probe", "eval", "recompute")


class _Call:
    """What one forward call tells every layer: its weight pieces, K, the input layout, BN mode and stats."""
    __slots__ = ("pieces", "k", "per_member_input", "mode", "stats", "momentum")

    def __init__(self):
        self.pieces, self.k, self.per_member_input = (), 1, False
        self.mode, self.stats, self.momentum = "train", None, None


class _PackedSI(nn.Module):
    """An SI conv/linear layer for K members; its weight is piece `index` of W's split."""

    def __init__(self, layer: nn.Module, index: int, reads_input: bool, call: _Call):
        super().__init__()
        self.conv = isinstance(layer, nn.Conv2d)
        self.shape = tuple(layer.weight.shape)
        self.index, self.reads_input, self.call = index, reads_input, call
        if self.conv:
            if layer.groups != 1 or layer.bias is not None:
                raise ValueError("packing needs bias-free, ungrouped convolutions")
            self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation
        self.channels_last = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        call = self.call
        k, piece = call.k, call.pieces[self.index]
        dense = k == 1 or (self.reads_input and not call.per_member_input)
        if self.conv:
            w = piece.reshape(k * self.shape[0], *self.shape[1:])
            if self.channels_last:
                w = w.contiguous(memory_format=torch.channels_last)
                x = x.contiguous(memory_format=torch.channels_last)
            return F.conv2d(x, w, None, self.stride, self.padding, self.dilation, 1 if dense else k)
        if dense:
            return F.linear(x, piece.reshape(k * self.shape[0], self.shape[1]))
        b, out_f, in_f = x.shape[0], self.shape[0], self.shape[1]
        out = torch.bmm(x.view(b, k, in_f).transpose(0, 1), piece.view(k, out_f, in_f).transpose(1, 2))
        return out.transpose(0, 1).reshape(b, k * out_f)


class _PackedBN(nn.Module):
    """BatchNorm over K*C channels; running statistics are rows of [K, C] tensors passed per call."""

    def __init__(self, bn: BN_TYPES, index: int, call: _Call):
        super().__init__()
        if bn.affine or not bn.track_running_stats or bn.momentum is None:
            raise ValueError("packing needs affine-free BatchNorm with running statistics and a momentum")
        self.eps, self.momentum, self.index, self.call = bn.eps, bn.momentum, index, call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        call = self.call
        if call.mode == "probe":
            return F.batch_norm(x, None, None, None, None, True, 0.0, self.eps)
        mean, var = call.stats[self.index]
        if call.mode == "eval":
            return F.batch_norm(x, mean, var, None, None, False, 0.0, self.eps)
        momentum = self.momentum if call.mode == "train" else call.momentum
        return F.batch_norm(x, mean, var, None, None, True, momentum, self.eps)


class _PackedLN(nn.Module):
    """LayerNorm (no affine) per sample and per member: [B, K*C] normalised over each member's C."""

    def __init__(self, ln: nn.LayerNorm, call: _Call):
        super().__init__()
        if ln.elementwise_affine or len(ln.normalized_shape) != 1:
            raise ValueError("packing needs affine-free LayerNorm over the last dimension")
        self.width, self.eps, self.call = ln.normalized_shape[0], ln.eps, call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        return F.layer_norm(x.view(b, -1, self.width), (self.width,), None, None, self.eps).view(b, -1)


class _PackedHead(nn.Module):
    """The frozen head, shared by all members: [B, K*F] -> [B, K, classes]."""

    def __init__(self, head: nn.Linear):
        super().__init__()
        self.in_features = head.in_features
        self.register_buffer("weight", head.weight.detach().clone())
        self.register_buffer("bias", None if head.bias is None else head.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.reshape(x.shape[0], -1, self.in_features), self.weight, self.bias)


class PackedNet(nn.Module):
    """A copy of one SI model whose layers run K members at once (K is read from W per call).

    The first SI layer (in registration order) is the one that reads the network input: true of
    every model in models.py (tests/test_models.py checks it)."""

    def __init__(self, template: nn.Module, *, channels_last: bool = False):
        super().__init__()
        body = copy.deepcopy(template)
        self.call = _Call()
        self.layer_names = si_layer_names(template)
        self.bn_names = [n for n, m in template.named_modules() if isinstance(m, BN_TYPES)]
        self.sizes = [p.numel() for p in si_parameters(template)]
        self.input_dims = None            # set by the trainer: dims of one sample
        for name, module in list(body.named_modules()):
            for child_name, child in list(module.named_children()):
                path = f"{name}.{child_name}" if name else child_name
                if path in self.layer_names:
                    index = self.layer_names.index(path)
                    new = _PackedSI(child, index, index == 0, self.call)
                    new.channels_last = channels_last and new.conv
                elif isinstance(child, BN_TYPES):
                    new = _PackedBN(child, self.bn_names.index(path), self.call)
                elif isinstance(child, nn.LayerNorm):
                    new = _PackedLN(child, self.call)
                elif isinstance(child, nn.Linear) and not child.weight.requires_grad:
                    new = _PackedHead(child)
                elif isinstance(child, (nn.Conv2d, nn.Linear)):
                    raise ValueError(f"cannot pack layer {path}: not an SI weight nor the frozen head")
                else:
                    continue
                setattr(module, child_name, new)
        self.body = body

    def forward(self, W: torch.Tensor, x: torch.Tensor, *, mode: str = "train", stats=None,
                per_member_input: bool = False, momentum: float | None = None) -> torch.Tensor:
        """Logits [B, K, classes] of the K = len(W) members.

        x: [B, ...] read by every member, or with per_member_input [B, K, ...] (member k's batch at
        [:, k]). stats: per BN layer (mean, var), each flat over K*C, for modes train/eval/recompute.
        momentum: the running-average factor of mode "recompute" (1/n for the n-th batch)."""
        if per_member_input:
            x = x.reshape(x.shape[0], -1, *x.shape[3:])
        call = self.call
        call.pieces, call.k, call.per_member_input = W.split(self.sizes, dim=1), W.shape[0], per_member_input
        call.mode, call.stats, call.momentum = mode, stats, momentum
        try:
            return self.body(x)
        finally:
            call.pieces, call.stats = (), None


def member_losses(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean"):
    """Per-member cross-entropy [K] and accuracy (mean) or correct counts (sum) [K] of logits [B, K, C];
    y is [B] (shared) or [B, K] (per member). Member-major layout, so each member's reduction runs over
    its own contiguous row exactly as in a pack of one: a member's numbers do not depend on the pack."""
    b, k, c = logits.shape
    by_member = logits.transpose(0, 1).reshape(k * b, c)
    targets = (y.expand(k, b) if y.dim() == 1 else y.t()).reshape(k * b)
    losses = F.cross_entropy(by_member, targets, reduction="none").view(k, b)
    correct = (by_member.argmax(1) == targets).view(k, b)
    if reduction == "mean":
        return losses.mean(1), correct.float().mean(1)
    return losses.sum(1), correct.sum(1)
