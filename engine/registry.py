"""The metric registry: every logged key, its label, its meaning, its axis scale, its group and the
modes it applies to. Torch-free, and the single source for:

- the engine (each quantity logs only keys declared here: engine/quantities.py checks it),
- the export column order (`python -m engine export`),
- the dashboard's metric pickers, default panels, axis titles (label and unit), axis types and hover
  names, and the regime map's panels,
- README's metric table (`python -m engine.registry` prints it; tests/test_registry.py checks README).

A family key ends in "/<...>": `layer_norm/<layer>` stands for `layer_norm/fc0`, `layer_norm/fc1`, ...
"""
from __future__ import annotations

from dataclasses import dataclass

MODES = ("sphere", "lrwd")


@dataclass(frozen=True)
class Metric:
    key: str                          # the store key, or a family "prefix/<part>"
    label: str                        # short chart label
    description: str                  # the definition (README's metric table)
    log: bool                         # drawn on a log axis by default (spans decades)
    group: str                        # loss | norms | rates | gradients | curvature | features
    modes: tuple[str, ...] = MODES    # modes in which it moves (si_norm is fixed on the sphere)
    datasets: tuple[str, ...] | None = None    # None: every dataset
    unit: str = ""                    # after the label on an axis: "nats", "rad"; "%": a fraction drawn as a percentage

    @property
    def family(self) -> str | None:
        """"layer_norm/" for the family `layer_norm/<layer>`, None for a plain key."""
        return self.key.split("/")[0] + "/" if "/" in self.key else None


METRICS: tuple[Metric, ...] = (
    Metric("train_loss", "train loss",
           "mean over the mini-batches since the last log point (BN in train mode); at step 0 the untrained "
           "level on the probe", True, "loss", unit="nats"),
    Metric("train_acc", "train accuracy", "mean over the same mini-batches", False, "loss", unit="%"),
    Metric("test_loss", "test loss", "whole held-out split, BN in eval mode, every `--eval-every`", True, "loss",
           unit="nats"),
    Metric("test_acc", "test accuracy", "whole held-out split, BN in eval mode", False, "loss", unit="%"),
    Metric("val_loss", "validation loss",
           "the validation split (runs of a learning-rate study), BN in eval mode, at the test evaluations", True,
           "loss", unit="nats"),
    Metric("val_acc", "validation accuracy", "the validation split, what a study selects on", False, "loss", unit="%"),
    Metric("si_norm", "SI norm ρ", "ρ, total L2 norm of the SI group (fixed at ρ₀ on the sphere)", False, "norms",
           modes=("lrwd",)),
    Metric("layer_norm/<layer>", "layer norm", "L2 norm of each SI tensor", False, "norms"),
    Metric("non_si_norm", "non-SI norm",
           "L2 norm of the trainable parameters outside the SI group (`spherelab.track` on a model that has some)",
           False, "norms"),
    Metric("lr", "learning rate", "current learning rate (sphere: ELR·ρ₀²)", True, "rates"),
    Metric("elr", "effective LR", "lr / si_norm²", True, "rates"),
    Metric("layer_elr/<layer>", "layer ELR", "lr / ‖w_l‖², per SI tensor", True, "rates"),
    Metric("grad_norm", "gradient norm", "‖∇_SI L_B‖, mean over the steps since the last log point", True,
           "gradients"),
    Metric("eff_grad_norm", "effective gradient norm",
           "mean of ‖∇_SI L_B‖·ρ over the same steps (scale-free)", True, "gradients"),
    Metric("angular_update", "angular update",
           "mean angle between w before and after a step, as 2·asin(‖u′ − u‖/2), exact for tiny angles", True,
           "gradients", unit="rad"),
    Metric("cos_to_init", "cosine to init", "cosine between the current and initial SI weights", False, "norms"),
    Metric("sharpness", "sharpness λmax·ρ²",
           "top Hessian eigenvalue of the mean loss w.r.t. the SI group on a fixed probe, at unit norm (λmax·ρ²)",
           True, "curvature"),
    Metric("sharpness_threshold", "2(1+μ)/ELR", "2(1+μ)/elr, the stability line sharpness is compared with", True,
           "curvature"),
    Metric("hessian_trace", "Hessian trace",
           "Hutchinson trace at unit norm, divided by the SI parameter count (`--trace-samples` > 0)", True,
           "curvature"),
    Metric("feature_acc/<k>", "feature accuracy",
           "accuracy on the probe set where only feature k is informative (`ticks` only), at test evaluations",
           False, "features", datasets=("ticks",), unit="%"),
)

_BY_KEY = {m.key: m for m in METRICS}
_BY_FAMILY = {m.family: m for m in METRICS if m.family}

# Quantities charts draw that are not logged metrics: the trace's index columns and what a geometry
# measures along the path between two solutions (engine/solutions.py). They have labels and units, but
# no quantity logs them (is_known is False) and the metric table leaves them out.
DRAWN: tuple[Metric, ...] = (
    Metric("step", "step", "optimiser steps since the start of the run", False, "index"),
    Metric("epoch", "epoch", "passes over the training split", False, "index"),
    Metric("wall_time", "wall time", "seconds of training since the run started", False, "index", unit="s"),
    Metric("train_err", "train error", "1 − train accuracy", False, "path", unit="%"),
    Metric("test_err", "test error", "1 − test accuracy", False, "path", unit="%"),
    Metric("val_err", "validation error", "1 − validation accuracy", False, "path", unit="%"),
    Metric("angle", "angle", "angle between two solutions' SI weight vectors", False, "path", unit="rad"),
)
_DRAWN = {m.key: m for m in DRAWN}

# The regime map's panels, top to bottom: each run's tail mean of these against its swept rate (each
# axis log where is_log says so).
REGIME_MAP_KEYS = ("train_loss", "test_acc", "eff_grad_norm")

# The panels a page opens with, by mode: on the sphere si_norm and elr are flat lines, so the
# norm-free quantities take their place.
DEFAULT_PANELS = {
    "sphere": ("train_loss", "test_acc", "eff_grad_norm", "angular_update"),
    "lrwd": ("train_loss", "si_norm", "elr", "test_acc"),
}
# What the step-by-step keys of the trace are called in exports and charts, before the metrics.
INDEX_COLUMNS = ("step", "epoch", "wall_time")


def spec(key: str) -> Metric | None:
    """The registry entry of a logged key ("layer_norm/fc0" finds `layer_norm/<layer>`); None if unknown."""
    if key in _BY_KEY:
        return _BY_KEY[key]
    if "/" in key:
        return _BY_FAMILY.get(key.split("/")[0] + "/")
    return None


def is_known(key: str) -> bool:
    return spec(key) is not None


def is_log(key: str) -> bool:
    """Default axis scale of a key: log where it spans decades (unknown keys: linear)."""
    entry = spec(key)
    return bool(entry and entry.log)


def _drawn(key: str) -> Metric | None:
    return spec(key) or _DRAWN.get(key)


def log_keys(keys) -> set[str]:
    """The keys drawn on a log axis by default."""
    return {key for key in keys if is_log(key)}


def label(key: str) -> str:
    """What a chart calls a key: "train loss", "layer norm fc0" ("layer norm" for the family
    `layer_norm/<layer>` itself), "wall time"; an unknown key itself."""
    entry = _drawn(key)
    if entry is None:
        return key
    return f"{entry.label} {key.split('/', 1)[1]}" if entry.family and key != entry.key else entry.label


def unit(key: str) -> str:
    """The key's unit ("nats", "rad", "s"; "%" for a fraction drawn as a percentage); "" if it has none."""
    entry = _drawn(key)
    return entry.unit if entry else ""


def is_percent(key: str) -> bool:
    """A fraction (an accuracy, an error) that charts show as a percentage."""
    return unit(key) == "%"


def axis_title(key: str) -> str:
    """An axis title: the label with its unit, "train loss (nats)", "test accuracy (%)", "elr" -> "effective LR"."""
    return f"{label(key)} ({unit(key)})" if unit(key) else label(key)


def hover_name(key: str) -> str:
    """A key in a hover text: its label with the stored key beside it, "train loss · train_loss", so the
    chart reads in words and still names the column of the exported data; the key alone where they agree."""
    return key if label(key) == key else f"{label(key)} · {key}"


def hover_format(key: str) -> str:
    """The d3 format of a key's value in a hover text: percentages for fractions, 4 digits otherwise."""
    return ".1%" if is_percent(key) else ".4g"


def members(keys, family: str) -> list[str]:
    """The keys of a family among `keys`, in order: members(["feature_acc/10", "feature_acc/2", "x"],
    "feature_acc/<k>") -> ["feature_acc/2", "feature_acc/10"]. How many features a run logged is read
    from what it logged, never assumed."""
    prefix = family.split("/")[0] + "/"
    return sorted((k for k in keys if k.startswith(prefix)), key=lambda k: _natural(k[len(prefix):]))


def order(keys) -> list[str]:
    """Keys in registry order (families in place, their members by name; unknown keys last, by name)."""
    rank = {m.key: i for i, m in enumerate(METRICS)}

    def position(key: str) -> tuple:
        entry = spec(key)
        if entry is None:
            return (len(METRICS), key)
        member = key.split("/", 1)[1] if entry.family else ""
        return (rank[entry.key], _natural(member))

    return sorted(keys, key=position)


def _natural(text: str) -> tuple:
    """'fc10' after 'fc2', 'feature_acc/10' after 'feature_acc/2'."""
    import re
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


def keys_for(mode: str | None = None, dataset: str | None = None) -> list[str]:
    """Plain (non-family) keys that apply to a mode and a dataset, in registry order."""
    return [m.key for m in METRICS if not m.family and (mode is None or mode in m.modes)
            and (m.datasets is None or dataset is None or dataset in m.datasets)]


def default_panels(mode: str) -> list[str]:
    return list(DEFAULT_PANELS.get(mode, DEFAULT_PANELS["sphere"]))


def markdown_table() -> str:
    """README's metric table, generated from the registry."""
    lines = ["| key | chart label (unit) | definition |", "|---|---|---|"]
    lines += [f"| `{m.key}` | {axis_title(m.key)} | {m.description} |" for m in METRICS]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
