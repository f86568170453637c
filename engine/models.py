"""Scale-invariant (SI) networks: every trained weight feeds an affine-free BatchNorm, the head is frozen.

Scaling all trainable weights by alpha > 0 leaves the output unchanged (up to BatchNorm's eps), so
the whole trainable vector lives on a sphere whose radius only sets the step size (README, "The science in one page", "Models and data").

Layer names (`si_layer_names`, used as `layer_norm/<layer>` metric keys) are the module paths of
the trained weights, without the trailing ".weight":
  mlp_si       fc0, fc1, ...
  convnet_si   conv0, conv1, conv2, conv3
  resnet18_si  conv0, layer1.0.conv1, layer1.0.conv2, ..., layer2.0.shortcut.conv, ...
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from engine.config import IMAGE_DATASETS, RunConfig, ConfigError

# The frozen head is drawn from its own generator with this seed, never from the run seed, so every
# run of a sweep (any seed, any rate) is trained against the very same classifier.
HEAD_SEED = 1234
IMAGE_SHAPE = (3, 32, 32)


# ---- building blocks -------------------------------------------------------------------------

def _bn(dim: int, channels: int) -> nn.Module:
    # affine=False: a learned scale/shift would break scale invariance and add non-SI parameters.
    return nn.BatchNorm2d(channels, affine=False) if dim == 2 else nn.BatchNorm1d(channels, affine=False)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _frozen_head(in_features: int, num_classes: int, init_scale: float, head_seed: int,
                 bias: bool) -> nn.Linear:
    """Random linear classifier with Frobenius norm init_scale, drawn from a fixed generator, frozen.

    The bias (convnet_si only) comes from the same generator with PyTorch's default Linear bias
    init, U(-1/sqrt(in), 1/sqrt(in)), and is not rescaled: it stays small next to the weight.
    """
    generator = torch.Generator().manual_seed(head_seed)
    head = nn.Linear(in_features, num_classes, bias=bias)
    with torch.no_grad():
        weight = torch.randn(num_classes, in_features, generator=generator)
        head.weight.copy_(weight * (init_scale / weight.norm()))
        if bias:
            bound = 1.0 / math.sqrt(in_features)
            head.bias.copy_(torch.rand(num_classes, generator=generator) * 2 * bound - bound)
    head.requires_grad_(False)
    return head


# ---- models ----------------------------------------------------------------------------------

def mlp_si(in_features: int, num_classes: int, width: int = 64, depth: int = 3,
           init_scale: float = 10.0, head_seed: int = HEAD_SEED, norm: str = "batch") -> nn.Sequential:
    """flatten, depth x [Linear(no bias) - BN1d(affine=False) - ReLU], frozen Linear head (no bias).

    norm="layer": LayerNorm (no affine, per sample) instead of BatchNorm — each layer's weights stay SI,
    there are no running statistics, and it is what the large-LR paper's ticks toy uses."""
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    features = in_features
    for i in range(depth):
        layers[f"fc{i}"] = nn.Linear(features, width, bias=False)
        layers[f"bn{i}" if norm == "batch" else f"ln{i}"] = (
            _bn(1, width) if norm == "batch" else nn.LayerNorm(width, elementwise_affine=False))
        layers[f"relu{i}"] = nn.ReLU()
        features = width
    layers["head"] = _frozen_head(width, num_classes, init_scale, head_seed, bias=False)
    return nn.Sequential(layers)


def convnet_si(num_classes: int, width: int = 32, init_scale: float = 10.0,
               head_seed: int = HEAD_SEED) -> nn.Sequential:
    """ConvNetSI for 3x32x32 inputs (README, "Models and data").

    conv0(3->c)-BN-ReLU, then conv1..conv3 (c->2c->4c->8c) each -BN-ReLU-MaxPool2 (32->16->8->4),
    MaxPool4 (4->1), flatten, frozen Linear(8c, classes) with a frozen bias.
    At c=32: 864 + 18,432 + 73,728 + 294,912 = 387,936 SI parameters.
    """
    c = width
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv0=_conv3x3(3, c), bn0=_bn(2, c), relu0=nn.ReLU())
    channels = c
    for i in (1, 2, 3):
        layers[f"conv{i}"] = _conv3x3(channels, 2 * channels)
        layers[f"bn{i}"] = _bn(2, 2 * channels)
        layers[f"relu{i}"] = nn.ReLU()
        layers[f"pool{i}"] = nn.MaxPool2d(2)
        channels *= 2
    layers["pool_final"] = nn.MaxPool2d(4)
    layers["flatten"] = nn.Flatten()
    layers["head"] = _frozen_head(channels, num_classes, init_scale, head_seed, bias=True)
    return nn.Sequential(layers)


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus a shortcut: identity, or BN -> conv1x1 when the shape changes.

    Not SI layer by layer (the residual sum mixes scales), but jointly: scaling every weight by alpha
    scales the residual stream by alpha, and each BN that reads the stream removes it again.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.bn1 = _bn(2, in_channels)
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn2 = _bn(2, out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(OrderedDict(
                bn=_bn(2, in_channels),
                conv=nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(torch.relu(self.bn1(x)))
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + (x if self.shortcut is None else self.shortcut(x))


class ResNet18SI(nn.Module):
    """Pre-activation ResNet-18 for 3x32x32 inputs with every BN affine-free and a frozen head.

    Arrangement (yields exactly 2,790,240 SI parameters at c=32):
      conv0: stem conv3x3 3->c, no BN after it (the first block's bn1 normalises the stream)   864
      layer1: 2 blocks c->c, stride 1, identity shortcuts                                    36,864
      layer2: blocks c->2c (stride 2, shortcut BN->conv1x1) and 2c->2c                       131,072
      layer3: blocks 2c->4c (stride 2, shortcut) and 4c->4c                                  524,288
      layer4: blocks 4c->8c (stride 2, shortcut) and 8c->8c                                2,097,152
      final BN-ReLU, AvgPool4 (4x4 -> 1x1), flatten, frozen Linear(8c, classes, no bias).
    """

    def __init__(self, num_classes: int, width: int = 32, init_scale: float = 10.0,
                 head_seed: int = HEAD_SEED):
        super().__init__()
        c = width
        self.conv0 = _conv3x3(3, c)
        stages, channels = [], c
        for i, out_channels in enumerate((c, 2 * c, 4 * c, 8 * c)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(PreActBlock(channels, out_channels, stride),
                                        PreActBlock(out_channels, out_channels, 1)))
            channels = out_channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn_final = _bn(2, channels)
        self.pool = nn.AvgPool2d(4)
        self.head = _frozen_head(channels, num_classes, init_scale, head_seed, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv0(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = self.pool(torch.relu(self.bn_final(out)))
        return self.head(out.flatten(1))


def resnet18_si(num_classes: int, width: int = 32, init_scale: float = 10.0,
                head_seed: int = HEAD_SEED) -> ResNet18SI:
    return ResNet18SI(num_classes, width, init_scale, head_seed)


# ---- the SI group ----------------------------------------------------------------------------

def si_parameters(model: nn.Module) -> list[nn.Parameter]:
    """All trainable parameters (the SI group), in registration order."""
    return [p for p in model.parameters() if p.requires_grad]


def si_layer_names(model: nn.Module) -> list[str]:
    """Short names matching si_parameters one to one: the module path, e.g. 'conv0', 'layer1.0.conv1'."""
    return [name.removesuffix(".weight") for name, p in model.named_parameters() if p.requires_grad]


def _check_scale_invariant(model: nn.Module) -> None:
    """Every trainable tensor must be a bias-free conv/linear weight and every BN affine-free."""
    si_weights = {id(m.weight) for m in model.modules()
                  if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is None}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in si_weights:
            raise RuntimeError(f"{name} is trainable but not a bias-free conv/linear weight: model is not SI")
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            raise RuntimeError(f"BatchNorm {name} is affine: model is not SI")
        if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            raise RuntimeError(f"LayerNorm {name} is affine: model is not SI")


def build_model(cfg: RunConfig, input_shape: tuple, num_classes: int, seed: int | None = None) -> nn.Module:
    """The model cfg names, on the CPU (the caller moves it).

    With seed, the SI weights are redrawn from a local generator with PyTorch's default init
    (kaiming_uniform, a=sqrt(5)), so the result does not depend on the global RNG. Without seed,
    they come from the global RNG as seeded by the caller (torch.manual_seed).
    """
    input_shape = tuple(input_shape)
    width = cfg.model_width
    if cfg.model == "mlp_si":
        model = mlp_si(math.prod(input_shape), num_classes, width, cfg.depth, cfg.init_scale, norm=cfg.norm)
    elif cfg.model in ("convnet_si", "resnet18_si"):
        if input_shape != IMAGE_SHAPE:
            shape_text = "x".join(map(str, input_shape))
            raise ConfigError(
                f"model {cfg.model} needs 3x32x32 images but dataset {cfg.dataset} has shape {shape_text}: "
                f"use convnet_si or resnet18_si with {', '.join(IMAGE_DATASETS)} or synthetic 3x32x32, "
                "or mlp_si with any dataset")
        build = convnet_si if cfg.model == "convnet_si" else resnet18_si
        model = build(num_classes, width, cfg.init_scale)
    else:
        raise ConfigError(f"unknown model {cfg.model!r}: choose mlp_si, convnet_si or resnet18_si")
    _check_scale_invariant(model)
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for weight in si_parameters(model):
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    return model
