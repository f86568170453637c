"""Which weights of a user's model are scale-invariant (SI), found by tracing, never declared.

A weight is SI when f(a w) = f(w) for every a > 0: every path from its layer's output reaches a
normalisation (BatchNorm, LayerNorm, GroupNorm, InstanceNorm) before any operation that would stop its
scale from cancelling there: a bias of that layer or of a later one, a nonlinearity that is not
positively homogeneous (tanh, sigmoid, GELU, ...), an unknown operation, or the model's output. An
affine normalisation absorbs the scale too (its learned scale and shift act on the normalised values);
its own weight and bias are not SI and are reported apart. Operations that only rescale or rearrange pass the scale
on: bias-free conv/linear layers, ReLU, max and average pooling, dropout, reshapes, sums.

Weights are judged jointly, as the engine's networks are SI jointly: the residual sum of a
pre-activation ResNet adds the stream (scaled with the earlier weights) to a block's output (scaled
with the block's), so it is scale-free when all of them scale together. A sum of one scaled and one
unscaled input breaks it, and the weights behind it leave the group; the propagation repeats until
the group no longer changes.
"""
from __future__ import annotations

import operator

import torch
from torch import nn

NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
WEIGHTED = (nn.Linear, nn.modules.conv._ConvNd)
# scale-equivariant modules (f(a x) = a f(x) for a > 0)
PASS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity,
                nn.Flatten, nn.Unflatten)
PASS_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.leaky_relu, torch.flatten,
                  torch.nn.functional.max_pool2d, torch.nn.functional.avg_pool2d,
                  torch.nn.functional.adaptive_avg_pool2d, torch.nn.functional.dropout, torch.reshape,
                  torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze, operator.getitem, operator.neg}
PASS_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
                "relu", "relu_", "mean", "sum", "expand", "clone", "detach", "neg", "__getitem__", "chunk", "split"}
SUMS = {operator.add, operator.sub, torch.add, torch.sub, torch.cat, torch.stack, operator.iadd, "add", "add_",
        "sub", "sub_"}
SCALES = {operator.mul, torch.mul, "mul", "mul_", operator.truediv, torch.div, "div", "div_"}


class Detection:
    """si: {parameter name: parameter} of the SI weights; others: the trainable rest; method: how found."""

    def __init__(self, si: dict, others: dict, method: str):
        self.si, self.others, self.method = si, others, method

    @property
    def layer_names(self) -> list[str]:
        return [name.removesuffix(".weight") for name in self.si]


def detect_si(model: nn.Module, example=None, si_params=None) -> Detection:
    """The SI weights of `model` (trainable parameters only). si_params (parameters or names) overrides
    detection. Tracing uses torch.fx; a model fx cannot trace falls back to forward hooks on `example`
    (a batch the model accepts)."""
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if si_params is not None:
        wanted = {id(p) if isinstance(p, torch.Tensor) else None for p in si_params}
        names = {p for p in si_params if isinstance(p, str)}
        unknown = sorted(names - set(trainable))
        if unknown:
            raise ValueError(f"si_params names {unknown} are not trainable parameters of the model: "
                             f"use names from model.named_parameters(), e.g. {next(iter(trainable), '')!r}")
        si = {n: p for n, p in trainable.items() if n in names or id(p) in wanted}
        if len(si) != len(names) + len([p for p in si_params if isinstance(p, torch.Tensor)]):
            raise ValueError("si_params holds a tensor that is not a trainable parameter of the model: "
                             "pass the model's own parameters (or their names)")
        return Detection(si, {n: p for n, p in trainable.items() if n not in si}, "given")
    try:
        found, method = _by_fx(model), "torch.fx"
    except Exception:               # noqa: BLE001 - any tracing failure: fall back to hooks
        if example is None:
            raise ValueError("torch.fx cannot trace this model, and finding its SI weights with forward hooks "
                             "needs a batch: pass probe=(x, y) to track, or si_params=[...] to name them") from None
        found, method = _by_hooks(model, example), "forward hooks"
    si = {n: p for n, p in trainable.items() if n in found}
    return Detection(si, {n: p for n, p in trainable.items() if n not in si}, method)


def _candidates(model: nn.Module) -> dict[str, str]:
    """module path -> weight name, for trainable conv/linear weights."""
    return {path: (f"{path}.weight" if path else "weight") for path, m in model.named_modules()
            if isinstance(m, WEIGHTED) and m.weight.requires_grad}


def _by_fx(model: nn.Module) -> set[str]:
    import torch.fx as fx
    graph = fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    group = set(_candidates(model))
    while True:
        blamed = _propagate(graph, modules, group)
        if not blamed & group:
            return {_candidates(model)[path] for path in group}
        group -= blamed


def _propagate(graph, modules, group: set[str]) -> set[str]:
    """Scale every weight in `group` by a together: each node's degree (its output scales as a**degree;
    None: not homogeneous) and the weights behind it. Returns the weights whose scale reaches a place
    where it does not cancel."""
    degree: dict = {}
    behind: dict = {}
    blamed: set[str] = set()

    def args_of(node):
        return [a for a in node.all_input_nodes]

    def spoil(node, nodes):
        for a in nodes:
            blamed.update(behind.get(a, ()))
        degree[node], behind[node] = None, set()

    for node in graph.nodes:
        inputs = args_of(node)
        scaled = [a for a in inputs if degree.get(a) != 0]
        if node.op in ("placeholder", "get_attr"):
            degree[node], behind[node] = 0, set()
            continue
        if node.op == "output":
            spoil(node, scaled)
            continue
        if node.op == "call_module" and node.target in group:
            if modules[node.target].bias is not None:     # its own bias does not scale with it
                degree[node], behind[node] = None, set()
                blamed.add(node.target)
                blamed.update(*(behind.get(a, ()) for a in scaled))
                continue
            if any(degree.get(a) is None for a in scaled):   # broken upstream: settled once that weight leaves
                spoil(node, scaled)
                continue
            degree[node] = (degree[scaled[0]] if scaled else 0) + 1
            behind[node] = (set(behind[scaled[0]]) if scaled else set()) | {node.target}
            continue
        if not scaled:                   # nothing scaled reaches it: scale-free whatever it does
            degree[node], behind[node] = 0, set()
            continue
        if any(degree.get(a) is None for a in scaled):
            spoil(node, scaled)
            continue
        if node.op == "call_module":
            module = modules[node.target]
            if isinstance(module, NORMS):
                # the scale cancels in the normalisation; an affine scale and shift after it act on the
                # normalised values, so they do not bring it back (they are non-SI parameters themselves)
                degree[node], behind[node] = 0, set()
            elif isinstance(module, WEIGHTED):
                if module.bias is not None:
                    spoil(node, scaled)
                else:                    # a frozen (or excluded) bias-free layer passes the scale on
                    degree[node], behind[node] = degree[scaled[0]], set(behind[scaled[0]])
            elif isinstance(module, PASS_MODULES) and len(scaled) == 1:
                degree[node], behind[node] = degree[scaled[0]], set(behind[scaled[0]])
            else:
                spoil(node, scaled)
            continue
        target = node.target
        if (node.op == "call_method" and target in PASS_METHODS
                or node.op == "call_function" and target in PASS_FUNCTIONS):
            if len(scaled) == 1 and inputs and inputs[0] is scaled[0]:
                degree[node], behind[node] = degree[scaled[0]], set(behind[scaled[0]])
            else:
                spoil(node, scaled)
        elif target in SUMS:
            degrees = {degree[a] for a in inputs}
            if len(degrees) == 1:
                degree[node] = degrees.pop()
                behind[node] = set().union(*(behind[a] for a in inputs))
            else:       # the weights behind only some of the terms break it; those behind all of them do not
                sets = [set(behind[a]) for a in inputs]
                blamed.update(set().union(*sets) - set.intersection(*sets) or set().union(*sets))
                degree[node], behind[node] = None, set()
        elif target in SCALES:
            if len(inputs) == 1 or (target in (operator.mul, torch.mul, "mul", "mul_")):
                degree[node] = sum(degree[a] for a in inputs)
                behind[node] = set().union(*(behind[a] for a in inputs))
            else:
                spoil(node, scaled)
        else:
            spoil(node, scaled)
    return blamed


def _by_hooks(model: nn.Module, example) -> set[str]:
    """Without a graph: a trainable bias-free conv/linear whose output tensor goes straight into a
    normalisation module, and into no other module. Operations between modules are invisible
    to hooks, so this only recognises the plain pattern (weight -> norm); si_params= names the rest."""
    producers: dict[int, str] = {}
    consumers: dict[int, list] = {}
    candidates = _candidates(model)
    handles = []
    alive = []          # the tensors seen, kept so their ids stay theirs

    def hook(path):
        def record(module, inputs, output):
            alive.append((inputs, output))
            for x in inputs:
                if isinstance(x, torch.Tensor):
                    consumers.setdefault(id(x), []).append(module)
            if path in candidates and isinstance(output, torch.Tensor):
                producers[id(output)] = path
        return record

    for path, m in model.named_modules():
        if not list(m.children()):
            handles.append(m.register_forward_hook(hook(path)))
    was_training = model.training
    keep = [(b, b.running_mean.clone(), b.running_var.clone(), b.num_batches_tracked.clone())
            for b in model.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm) and b.track_running_stats]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            outputs = [model(example)]
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        for b, mean, var, count in keep:
            b.running_mean.copy_(mean), b.running_var.copy_(var), b.num_batches_tracked.copy_(count)
    del outputs, alive
    found = set()
    for tensor_id, path in producers.items():
        used = consumers.get(tensor_id, [])
        module = dict(model.named_modules())[path]
        if module.bias is None and len(used) == 1 and isinstance(used[0], NORMS):
            found.add(candidates[path])
    return found
