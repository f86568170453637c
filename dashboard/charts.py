"""Plotly figure builders: pure functions from DataFrames to Figures (no Streamlit, no store).

Axis titles and legends use the metric keys of SPEC §6, so a chart reads like the exported data.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from engine import registry

PALETTE = qualitative.Plotly + qualitative.Dark2
REGIME_COLORS = {"convergence": "#1b9e4b", "chaotic_equilibrium": "#f28e00", "divergence": "#d62728",
                 "undetermined": "#8c8c8c"}
SPIKE_COLOR = "rgba(214, 39, 40, 0.55)"
X_TITLES = {"step": "step", "epoch": "epoch", "wall_time": "wall_time (s)"}


def run_color(run_id: int) -> str:
    """Stable colour per run: the run id hashed into the palette, so run 7 has the same colour on
    every page and in every session (consecutive ids, e.g. one sweep, get different colours)."""
    return PALETTE[int(run_id) % len(PALETTE)]


def _finite(values) -> np.ndarray:
    """inf cannot be drawn (or sent as JSON): it becomes a gap like nan."""
    values = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(values), values, np.nan)


def scale(values, log: bool) -> dict:
    """Axis settings for these values. A series that is constant up to float noise (si_norm and elr
    on the sphere) gets a range of ±1% around its value, so the noise is not blown up into wiggles."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values) & ((values > 0) if log else True)]
    axis = log_axis(values) if log else {"type": "linear"}
    if values.size and np.ptp(values) <= 1e-5 * np.abs(values).max():
        middle = float(values.mean())
        if log:
            axis = {"type": "log", "range": [math.log10(middle) - 0.005, math.log10(middle) + 0.005]}
        elif middle:
            axis["range"] = [middle - 0.01 * abs(middle), middle + 0.01 * abs(middle)]
    return axis


def log_axis(values) -> dict:
    """A log axis whose labels stay readable in a short panel: over two or more decades only the
    powers of ten are labelled, over one to two decades 1-2-5, below that Plotly's own choice."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values) & (values > 0)]
    span = float(np.log10(values.max() / values.min())) if values.size else 0.0
    ticks = {"dtick": 1} if span >= 2 else {"dtick": "D2"} if span >= 1 else {}
    return {"type": "log", **ticks}


def _series(frame: pd.DataFrame, key: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
    """(x, values) where the key was logged; empty if it never was."""
    if key not in frame:
        return np.array([]), np.array([])
    points = frame[[x, key]].dropna()
    return points[x].to_numpy(), _finite(points[key])


def _grid(keys: list[str], cols: int, shared_x: bool, row_height: int, titles: bool = True):
    rows = max(1, math.ceil(len(keys) / cols))
    fig = make_subplots(rows=rows, cols=cols, shared_xaxes=shared_x, subplot_titles=keys if titles else None,
                        vertical_spacing=min(0.12, 0.3 / rows), horizontal_spacing=0.08)
    fig.update_layout(height=max(320, row_height * rows), margin=dict(l=10, r=10, t=40, b=10))
    return fig, [(i // cols + 1, i % cols + 1) for i in range(len(keys))]


def overlay(raw: pd.DataFrame, smoothed: pd.DataFrame | None, keys: list[str], names: dict[int, str], *,
            x: str = "step", log_x: bool = False, log_y: bool = False) -> go.Figure:
    """Compare runs: one panel per metric key, one colour per run. With smoothing the raw curve is
    drawn faintly behind the smoothed one. Inputs are long frames (run_id, key, step, epoch,
    wall_time, value) as the store's read_metrics_many returns them."""
    fig, cells = _grid(keys, 1, True, 280, titles=False)
    front = smoothed if smoothed is not None else raw
    raw_series, front_series = _by_series(raw), _by_series(front)
    empty = raw.iloc[0:0]
    for (row, col), key in zip(cells, keys):
        for run_id, name in names.items():
            color, first = run_color(run_id), key == keys[0]
            if smoothed is not None:
                points = raw_series.get((run_id, key), empty)
                fig.add_trace(go.Scatter(x=points[x], y=_finite(points["value"]), mode="lines", opacity=0.25,
                                         line=dict(color=color, width=1), legendgroup=str(run_id),
                                         showlegend=False, hoverinfo="skip"), row=row, col=col)
            points = front_series.get((run_id, key), empty)
            fig.add_trace(go.Scatter(x=points[x], y=_finite(points["value"]), mode="lines", name=name,
                                     line=dict(color=color, width=1.8), legendgroup=str(run_id),
                                     showlegend=first, hovertemplate=f"{name}<br>{x} %{{x}}<br>{key} %{{y:.4g}}"
                                     "<extra></extra>"), row=row, col=col)
        values = front.loc[front["key"] == key, "value"]
        fig.update_yaxes(title_text=key, **scale(values, log_y), row=row, col=col)
    fig.update_xaxes(**scale(front[x], log_x))
    fig.update_xaxes(title_text=X_TITLES.get(x, x), row=len(keys), col=1)
    fig.update_layout(legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0), hovermode="closest")
    return fig


def _by_series(long: pd.DataFrame) -> dict:
    return {(int(run_id), key): group for (run_id, key), group in long.groupby(["run_id", "key"], sort=False)}


def run_curves(frame: pd.DataFrame, keys: list[str], *, run_id: int, spikes=(), rate_changes=(),
               cols: int = 2) -> go.Figure:
    """One run's metrics against step, a panel per key (log scale for keys that span decades),
    with loss spikes as red dashed lines and ELR/LR changes as grey dotted ones across all panels."""
    fig, cells = _grid(keys, cols, False, 240)
    color = run_color(run_id)
    for (row, col), key in zip(cells, keys):
        steps, values = _series(frame, key)
        fig.add_trace(go.Scatter(x=steps, y=values, mode="lines",
                                 name=key, line=dict(color=color, width=1.6), showlegend=False,
                                 hovertemplate=f"step %{{x}}<br>{key} %{{y:.4g}}<extra></extra>"), row=row, col=col)
        fig.update_yaxes(**scale(values, registry.is_log(key)), row=row, col=col)
    # the axis title only under the lowest panel of each column: elsewhere it would hit the next title
    for row, col in cells[-cols:]:
        fig.update_xaxes(title_text="step", row=row, col=col)
    _mark_steps(fig, spikes, rate_changes)
    # the same uirevision across refreshes keeps the user's zoom while live data arrives
    fig.update_layout(uirevision=str(run_id))
    return fig


def _mark_steps(fig: go.Figure, spikes, rate_changes) -> None:
    for step in spikes:
        fig.add_vline(x=step, row="all", col="all", line=dict(color=SPIKE_COLOR, dash="dash", width=1))
    for step, value in rate_changes:
        fig.add_vline(x=step, row="all", col="all", line=dict(color="#666", dash="dot", width=1),
                      label=dict(text=f"→ {value:.3g}" if value is not None else "", textposition="end",
                                 textangle=0, xanchor="left", yanchor="top", font=dict(size=10)))


def regime_map(summary: pd.DataFrame, boundaries: list[float], rate_key: str) -> go.Figure:
    """Tail means against the swept rate (log axis), coloured by regime, with the estimated
    boundaries as dashed lines. customdata carries the run id, so a selected point names its run."""
    panels = [("train_loss", True), ("test_acc", False), ("eff_grad_norm", True)]
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=[f"tail mean {key}" for key, _ in panels])
    for row, (key, log) in enumerate(panels, start=1):
        for regime, color in REGIME_COLORS.items():
            points = summary[summary["regime"] == regime]
            if points.empty:
                continue
            fig.add_trace(go.Scatter(
                x=points["rate"], y=_finite(points[key]), mode="markers", name=regime, legendgroup=regime,
                showlegend=row == 1, marker=dict(color=color, size=11, line=dict(color="white", width=1)),
                customdata=points["run_id"], text=points["name"],
                hovertemplate=f"%{{text}}<br>{rate_key} %{{x:.3g}}<br>{key} %{{y:.4g}}<br>run #%{{customdata}}"
                              "<extra>" + regime + "</extra>"), row=row, col=1)
        fig.update_yaxes(title_text=key, **scale(summary[key], log), row=row, col=1)
    fig.update_xaxes(**scale(summary["rate"], True))
    fig.update_xaxes(title_text=rate_key, row=3, col=1)
    for boundary in boundaries:
        line = dict(color="#444", dash="dash", width=1.2)
        fig.add_vline(x=boundary, row=1, col=1, line=line,
                      label=dict(text=f"{boundary:.2g}", textposition="end", textangle=0, yanchor="bottom",
                                 font=dict(size=11)))
        fig.add_vline(x=boundary, row=2, col=1, line=line)
        fig.add_vline(x=boundary, row=3, col=1, line=line)
    fig.update_layout(height=760, margin=dict(l=10, r=10, t=40, b=10), clickmode="event+select",
                      legend=dict(orientation="h", yanchor="bottom", y=1.04, x=0))
    return fig


def periodic(frame: pd.DataFrame, spikes: list[int], period: int | None) -> go.Figure:
    """train_loss, si_norm and elr on one shared step axis: spikes in the loss line up with jumps in
    the norm and drops in the ELR."""
    panels = [("train_loss", True, "#1f77b4"), ("si_norm", False, "#2ca02c"), ("elr", True, "#9467bd")]
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.05)
    for row, (key, log, color) in enumerate(panels, start=1):
        steps, values = _series(frame, key)
        fig.add_trace(go.Scatter(x=steps, y=values, mode="lines", name=key, showlegend=False,
                                 line=dict(width=1.5, color=color),
                                 hovertemplate=f"step %{{x}}<br>{key} %{{y:.4g}}<extra></extra>"), row=row, col=1)
        fig.update_yaxes(title_text=key, **scale(values, log), row=row, col=1)
    _mark_steps(fig, spikes, [])
    fig.update_xaxes(title_text="step", row=3, col=1)
    title = f"{len(spikes)} loss spike(s)" + (f", period ≈ {period} steps" if period else "") if spikes else None
    fig.update_layout(height=700, title=title, margin=dict(l=10, r=10, t=40 if spikes else 10, b=10))
    return fig


def sharpness(frame: pd.DataFrame) -> go.Figure:
    """sharpness (λmax·ρ²) against the sharpness_threshold line 2(1+μ)/elr it cannot stay above."""
    fig, drawn = go.Figure(), []
    for key, style in (("sharpness", dict(width=2, color="#1f77b4")),
                       ("sharpness_threshold", dict(width=1.5, dash="dash", color="#d62728"))):
        steps, values = _series(frame, key)
        drawn.append(values)
        fig.add_trace(go.Scatter(x=steps, y=values, mode="lines+markers", name=key,
                                 line=style, marker=dict(size=4)))
    fig.update_yaxes(title_text="sharpness", **log_axis(np.concatenate(drawn)))
    fig.update_xaxes(title_text="step")
    fig.update_layout(height=380, margin=dict(l=10, r=10, t=30, b=10),
                      legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0))
    return fig
