"""Figures of a learning-rate study: pure functions of engine.study.report's dict (no
Streamlit, no store), so the Study page and Teach draw the same charts and tests can build them from a
hand-made report.

Every chart has the PLR (pre-training ELR) on a log x axis with the project's explicit ticks
(charts.log_axis), the regime of each PLR's pre-training shaded behind it in the regime colours, and
the estimated boundaries as vertical lines: convergence | chaotic (1|2), 2A | 2B, chaotic | divergence
(2|3).
"""
from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from engine import registry

from . import charts
from .plain import html

# Series colours: none of them a regime colour (the bands behind the points carry those).
PRETRAIN_COLOR = "#263238"
AVERAGE_COLOR = "#c2409e"
FINETUNE_COLORS = ("#1f77b4", "#0097a7", "#3949ab", "#8c564b", "#827717", "#0d47a1")
BEST_COLOR = "#ffc107"
BAND_ALPHA = 0.13
BOUNDARIES = (("convergence_chaotic", "1 | 2"), ("2A_2B", "2A | 2B"), ("chaotic_divergence", "2 | 3"))
# (report key, the quantity it measures: the registry's label and unit), top to bottom
GEOMETRY_PANELS = (("angle", "angle"), ("barrier_test_err", "test_err"), ("barrier_train_loss", "train_loss"))
ACCURACY_KEY = "test_acc"     # what the accuracy chart shows (the report's *_test_acc)
FEATURE_FAMILY = "feature_acc/<k>"
FEATURE_PREFIX = FEATURE_FAMILY.split("<")[0]      # "feature_acc/": a feature's key is this and its index
MARGIN = dict(l=10, r=10, t=90, b=10)


def panel_name(key: str, quantity: str) -> str:
    """"angle", "test error barrier", "train loss barrier"."""
    return registry.label(quantity) + (" barrier" if key.startswith("barrier_") else "")


def panel_title(key: str, quantity: str) -> str:
    """"angle (rad)", "test error barrier (%)", "train loss barrier (nats)"."""
    unit = registry.unit(quantity)
    return f"{panel_name(key, quantity)} ({unit})" if unit else panel_name(key, quantity)


def plrs(report: dict) -> list[float]:
    return sorted(row["pretrain_elr"] for row in report["rows"])


def kind_label(kind: str, report: dict | None = None) -> str:
    """'pretrain' -> 'pre-trained', 'finetune@0.001' -> 'fine-tuned at FLR 0.001', 'average' -> 'average (SWA of K)'."""
    if kind == "pretrain":
        return "pre-trained"
    if kind.startswith("finetune@"):
        return f"fine-tuned at FLR {kind.split('@', 1)[1]}"
    k = (report or {}).get("spec", {}).get("average")
    return f"average (SWA of last {k})" if k else "average (SWA)"


def kind_phrase(kind: str, report: dict | None = None) -> str:
    """The model in a sentence: 'the pre-trained model', 'the model fine-tuned at FLR 0.001', 'the
    average of its last 5 checkpoints (SWA)'."""
    if kind == "pretrain":
        return "the pre-trained model"
    if kind.startswith("finetune@"):
        return f"the model fine-tuned at FLR {kind.split('@', 1)[1]}"
    k = (report or {}).get("spec", {}).get("average")
    return f"the average of its last {k} checkpoints (SWA)" if k else "the average of its last checkpoints (SWA)"


def series(report: dict) -> list[tuple[str, str, str]]:
    """(kind, legend label, colour) of each accuracy series: pre-training, each FLR, the average."""
    flrs = [f"{f:g}" for f in report.get("spec", {}).get("finetune_elrs", [])] or \
        sorted({flr for row in report["rows"] for flr in row["finetune_test_acc"]}, key=float)
    out = [("pretrain", kind_label("pretrain"), PRETRAIN_COLOR)]
    out += [(f"finetune@{flr}", kind_label(f"finetune@{flr}"), FINETUNE_COLORS[i % len(FINETUNE_COLORS)])
            for i, flr in enumerate(flrs)]
    out.append(("average", kind_label("average", report), AVERAGE_COLOR))
    return out


def accuracy_of(row: dict, kind: str) -> dict | None:
    if kind == "pretrain":
        return row["pretrain_test_acc"]
    if kind == "average":
        return row["average_test_acc"]
    return row["finetune_test_acc"].get(kind.split("@", 1)[1])


def band_edges(values: list[float]) -> list[tuple[float, float, float]]:
    """(value, left, right) for each PLR: a band from the geometric midpoint with its left neighbour to
    the one with its right neighbour; the outer bands reach as far out as they reach in."""
    values = sorted(values)
    if not values:
        return []
    if len(values) == 1:
        return [(values[0], values[0] / 2, values[0] * 2)]
    mids = [math.sqrt(a * b) for a, b in zip(values, values[1:])]
    lefts = [values[0] ** 2 / mids[0], *mids]
    rights = [*mids, values[-1] ** 2 / mids[-1]]
    return list(zip(values, lefts, rights))


def x_axis(report: dict) -> dict:
    """The PLR axis: log, explicit ticks, spanning the outermost bands."""
    edges = band_edges(plrs(report))
    if not edges:
        return {"type": "log"}
    lo, hi = edges[0][1], edges[-1][2]
    axis = charts.log_axis(plrs(report), lo, hi) if len(edges) > 1 else charts.log_axis(plrs(report))
    return {**axis, "range": [math.log10(lo), math.log10(hi)], "title_text": "PLR (pre-training ELR)"}


def _rgba(color: str, alpha: float) -> str:
    return "rgba({}, {}, {}, {})".format(*(int(color[i:i + 2], 16) for i in (1, 3, 5)), alpha)


def add_regime_context(fig: go.Figure, report: dict, rows: int = 1, label_row: int = 1) -> None:
    """Each PLR's band in its pre-training regime's colour (none while unlabelled), "2A"/"2B" written
    in the bands of chaotic PLRs that have a sub-regime, and the boundaries as vertical lines labelled
    at the top of the first panel (staggered so that close boundaries do not overwrite each other)."""
    by_plr = {row["pretrain_elr"]: row for row in report["rows"]}
    for plr, left, right in band_edges(list(by_plr)):
        row = by_plr[plr]
        if not row.get("regime"):
            continue
        for r in range(1, rows + 1):
            fig.add_vrect(x0=left, x1=right, row=r, col=1, line_width=0, layer="below",
                          fillcolor=_rgba(charts.regime_color(row["regime"]), BAND_ALPHA))
        if row.get("subregime"):
            fig.add_annotation(x=math.log10(plr), xref="x", y=0.02, yref="y domain" if label_row == 1 else
                               f"y{label_row} domain", yanchor="bottom", text=f"<b>{row['subregime']}</b>",
                               showarrow=False, font=dict(size=13, color="#9a5a00"))
    shown = 0
    for key, label in BOUNDARIES:
        value = (report.get("boundaries") or {}).get(key)
        if not value:
            continue
        dash = "dot" if key == "2A_2B" else "dash"
        for r in range(1, rows + 1):
            fig.add_vline(x=value, row=r, col=1, line=dict(color="#444", dash=dash, width=1.3))
        fig.add_annotation(x=math.log10(value), xref="x", y=1 - 0.09 * shown, yref="y domain", yanchor="top",
                           text=f"{label} ≈ {charts.tick_text(float(f'{value:.2g}'))}", showarrow=False,
                           bgcolor="rgba(255, 255, 255, 0.85)", borderpad=2, font=dict(size=12, color="#333"))
        shown += 1


def regime_legend(fig: go.Figure, report: dict) -> None:
    """Legend entries for the regime bands that appear (a square in the band's colour)."""
    seen = [r for r in charts.REGIME_COLORS if any(row.get("regime") == r for row in report["rows"])]
    for regime in seen:
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=f"band: {regime.replace('_', ' ')}",
                                 marker=dict(symbol="square", size=12, color=_rgba(charts.regime_color(regime), 0.35)),
                                 hoverinfo="skip"))


def accuracy(report: dict) -> go.Figure:
    """Test accuracy against the PLR: pre-trained, fine-tuned at each FLR and averaged models, mean ±
    std over runs (error bars), over the regime bands and boundaries; the best model starred and
    annotated with its PLR's ratio to the convergence threshold."""
    fig = make_subplots(rows=1, cols=1)
    rows = sorted(report["rows"], key=lambda r: r["pretrain_elr"])
    values = []
    for kind, label, color in series(report):
        stats = [accuracy_of(row, kind) for row in rows]
        xs = [row["pretrain_elr"] for row, s in zip(rows, stats) if s]
        means = [s["mean"] for s in stats if s]
        stds = [s["std"] for s in stats if s]
        ns = [s["n"] for s in stats if s]
        values += means
        fig.add_trace(go.Scatter(
            x=xs, y=means, mode="lines+markers", name=html(label), line=dict(color=color, width=2),
            marker=dict(color=color, size=8, symbol="circle" if kind != "average" else "diamond"),
            error_y=dict(type="data", array=stds, visible=True, color=color, thickness=1.3, width=4),
            customdata=np.stack([stds, ns], axis=-1) if xs else None,
            hovertemplate=f"{html(label)}<br>PLR %{{x:.3g}}<br>{charts.hover(ACCURACY_KEY, fmt='.2%')} ± "
                          f"%{{customdata[0]:.2%}} (%{{customdata[1]}} seed(s))<extra></extra>"))
    best = report.get("best")
    if best:
        mean = best["test_acc"]["mean"]
        ratio = best.get("ratio_to_convergence_threshold")
        where = f"{ratio:.2g}× the convergence threshold" if ratio else "no convergence threshold in this grid"
        text = (f"best: {html(kind_label(best['kind'], report))}, {mean:.1%}<br>"
                f"PLR {charts.tick_text(best['pretrain_elr'])} = {where}")
        fig.add_trace(go.Scatter(x=[best["pretrain_elr"]], y=[mean], mode="markers", name="best model",
                                 marker=dict(symbol="star", size=20, color=BEST_COLOR, line=dict(color="#333", width=1.2)),
                                 hovertemplate=text.replace("<br>", " · ") + "<extra></extra>"))
        # above the star: the best point is the highest, so the space above it is free of curves
        fig.add_annotation(x=math.log10(best["pretrain_elr"]), y=mean, text=text, showarrow=True, arrowhead=2,
                           ax=0, ay=-48, align="center", bgcolor="rgba(255, 255, 255, 0.9)", bordercolor="#999",
                           borderpad=3, font=dict(size=12, color="#222"))
    add_regime_context(fig, report)
    regime_legend(fig, report)
    fig.update_xaxes(**x_axis(report))
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    # room above the highest point for the best model's label and the boundaries' labels
    fig.update_yaxes(title_text=f"{registry.axis_title(ACCURACY_KEY)}, mean ± std over runs", tickformat=".0%",
                     range=[max(0.0, lo - 0.06), min(1.05, hi + 0.06 + 0.35 * (hi - lo + 0.05))])
    fig.update_layout(height=520, margin=MARGIN, legend=dict(charts.LEGEND, y=1.03), hovermode="closest",
                      uirevision="study-accuracy")
    return fig


def geometry_pairs(report: dict) -> list[str]:
    """The geometry pairs measured anywhere in the study, as 'A vs B', in the order first seen."""
    names = []
    for row in report["rows"]:
        for g in row["geometry"]:
            name = " vs ".join(g["pair"])
            if name not in names:
                names.append(name)
    return names


def geometry(report: dict) -> go.Figure:
    """Angle and the test-error and train-loss barriers between each pair of a PLR's solutions, against
    the PLR (mean ± std over seeds), one colour per pair, over the same bands and boundaries."""
    fig = make_subplots(rows=len(GEOMETRY_PANELS), cols=1, shared_xaxes=True, vertical_spacing=0.07,
                        subplot_titles=[panel_title(*panel) for panel in GEOMETRY_PANELS])
    rows = sorted(report["rows"], key=lambda r: r["pretrain_elr"])
    colors = (*FINETUNE_COLORS, AVERAGE_COLOR, PRETRAIN_COLOR)
    for i, pair in enumerate(geometry_pairs(report)):
        color = colors[i % len(colors)]
        points = [(row["pretrain_elr"], g) for row in rows for g in row["geometry"] if " vs ".join(g["pair"]) == pair]
        for panel, (key, quantity) in enumerate(GEOMETRY_PANELS, start=1):
            have = [(x, g[key]) for x, g in points if g.get(key)]
            fmt = ".2%" if registry.is_percent(quantity) else ".4g"
            fig.add_trace(go.Scatter(
                x=[x for x, _ in have], y=[s["mean"] for _, s in have], mode="lines+markers", name=html(pair),
                legendgroup=pair, showlegend=panel == 1, line=dict(color=color, width=2), marker=dict(color=color, size=7),
                error_y=dict(type="data", array=[s["std"] for _, s in have], visible=True, color=color, width=3),
                hovertemplate=f"{html(pair)}<br>PLR %{{x:.3g}}<br>{panel_name(key, quantity)} · {key}: "
                              f"%{{y:{fmt}}}<extra></extra>"),
                row=panel, col=1)
    add_regime_context(fig, report, rows=len(GEOMETRY_PANELS))
    axis = x_axis(report)
    title = axis.pop("title_text", None)
    fig.update_xaxes(**axis)
    fig.update_xaxes(title_text=title, row=len(GEOMETRY_PANELS), col=1)
    for panel, (_, quantity) in enumerate(GEOMETRY_PANELS, start=1):
        # a barrier is in its quantity's unit
        fig.update_yaxes(title_text=registry.axis_title(quantity),
                         tickformat=".1%" if registry.is_percent(quantity) else None, row=panel, col=1)
    fig.update_layout(height=720, margin=MARGIN, legend=dict(charts.LEGEND, y=1.06), hovermode="closest",
                      uirevision="study-geometry")
    return fig


def feature_kinds(report: dict) -> list[str]:
    """The models with feature accuracies somewhere in the study: pre-trained, each FLR, the average."""
    kinds = [kind for kind, _, _ in series(report)]
    return [k for k in kinds if any((row.get("feature_acc") or {}).get(k) for row in report["rows"])]


def feature_count(report: dict) -> int:
    """How many features the study's models were probed on: the length of its feature-accuracy vectors
    (the engine stores one entry per feature_acc/<k> the runs logged); 0 when there are none yet."""
    return max((len(v) for row in report["rows"] for v in (row.get("feature_acc") or {}).values() if v), default=0)


def features(report: dict) -> go.Figure | None:
    """Per-feature test accuracy (ticks only): one heatmap per model kind, PLR (rows, smallest at the
    bottom) by feature 0…N−1 (N: the length of the report's vectors, what the runs logged; ticks has 16),
    one colour scale from 0.5 (chance on two classes) to the largest value seen (at least 0.75, at most
    1). None when the study has no feature accuracies (its dataset is not ticks, or nothing has finished)."""
    kinds = feature_kinds(report)
    if not kinds:
        return None
    rows = sorted(report["rows"], key=lambda r: r["pretrain_elr"])
    fig = make_subplots(rows=1, cols=len(kinds), shared_yaxes=True, horizontal_spacing=0.03,
                        subplot_titles=[html(kind_label(k, report)) for k in kinds])
    labels = [charts.tick_text(row["pretrain_elr"]) for row in rows]
    count = feature_count(report)
    grids = {kind: [row["feature_acc"].get(kind) or [None] * count for row in rows] for kind in kinds}
    seen = [v for z in grids.values() for line in z for v in line if v is not None]
    # the top of the scale follows the data (a toy's features reach ~0.75): a few bright cells must stand out
    top = min(1.0, max(0.75, math.ceil(max(seen, default=0.75) * 20) / 20))
    for col, kind in enumerate(kinds, start=1):
        z = grids[kind]
        fig.add_trace(go.Heatmap(z=z, x=list(range(count)), y=labels, zmin=0.5, zmax=top, colorscale="Viridis",
                                 showscale=col == len(kinds),
                                 colorbar=dict(title=registry.axis_title(FEATURE_FAMILY), tickformat=".0%"),
                                 hovertemplate=f"{html(kind_label(kind, report))}<br>PLR %{{y}}<br>"
                                               f"{registry.label(FEATURE_FAMILY)} · {FEATURE_PREFIX}%{{x}}: "
                                               "%{z:.1%}<extra></extra>"), row=1, col=col)
        fig.update_xaxes(title_text="feature", tickvals=list(range(0, count, 5)), row=1, col=col)
    fig.update_yaxes(type="category")          # every panel: numeric-looking labels would make a linear axis
    fig.update_yaxes(title_text="PLR", row=1, col=1)
    fig.update_layout(height=max(320, 60 + 34 * len(rows)), margin=dict(MARGIN, t=50))
    return fig


GAIN_COLOR = "#1f77b4"
VERDICT_COLORS = {"win": "#2e7d32", "loss": "#c62828", "not separated": "#616161"}


def gains(report: dict) -> go.Figure | None:
    """The paired comparison: one point per (data seed, seed) pair, its best 2A model's test accuracy
    minus its best converged model's (percentage points), grouped by data seed, beside the mean gain
    with its bootstrap 95% interval; a line at 0. None while no pair has both."""
    pairs, gain = report.get("pairs") or [], report.get("gain")
    if not pairs or not gain:
        return None
    fig = go.Figure()
    data_seeds = sorted({p["data_seed"] for p in pairs})
    for ds in data_seeds:
        mine = [p for p in pairs if p["data_seed"] == ds]
        label = f"data seed {ds}"
        fig.add_trace(go.Box(
            x=[label] * len(mine), y=[p["gain"] * 100 for p in mine], name=label, boxpoints="all", pointpos=0,
            jitter=0.35, fillcolor="rgba(0,0,0,0)", line=dict(color="rgba(31,119,180,0.35)"),
            marker=dict(color=GAIN_COLOR, size=9, opacity=0.85), showlegend=False,
            customdata=[[p["seed"], html(kind_label(p["best_2A"]["kind"], report)),
                         charts.tick_text(p["best_2A"]["pretrain_elr"]),
                         html(kind_label(p["best_converged"]["kind"], report)),
                         charts.tick_text(p["best_converged"]["pretrain_elr"])] for p in mine],
            hovertemplate=f"{label}, seed %{{customdata[0]}}<br>gain %{{y:+.1f}} pt<br>2A: %{{customdata[1]}} at PLR "
                          "%{customdata[2]}<br>converged: %{customdata[3]} at PLR %{customdata[4]}<extra></extra>"))
    low, high = gain["ci95"]
    verdict = report.get("verdict") or "not separated"
    color = VERDICT_COLORS.get(verdict, "#616161")
    fig.add_trace(go.Scatter(
        x=["mean (95% CI)"], y=[gain["mean"] * 100], mode="markers", name="mean gain, bootstrap 95% interval",
        marker=dict(symbol="diamond", size=14, color=color),
        error_y=dict(type="data", symmetric=False, array=[(high - gain["mean"]) * 100],
                     arrayminus=[(gain["mean"] - low) * 100], color=color, thickness=2.5, width=10),
        hovertemplate=f"mean %{{y:+.2f}} pt<br>95% interval {low * 100:+.2f} to {high * 100:+.2f} pt<br>"
                      f"{gain['fraction_positive']:.0%} of {gain['n']} pairs gain<extra></extra>"))
    fig.add_hline(y=0, line=dict(color="#444", dash="dash", width=1.2))
    fig.update_yaxes(title_text="gain in test accuracy (percentage points)", zeroline=False)
    fig.update_layout(height=520, margin=dict(MARGIN, t=60), showlegend=False, uirevision="study-gains",
                      title=dict(text=f"{verdict} · {gain['n']} pair{'s' * (gain['n'] != 1)}, {gain['fraction_positive']:.0%} gain",
                                 font=dict(size=14, color=color)))
    return fig
