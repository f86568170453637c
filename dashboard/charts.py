"""Plotly figure builders: pure functions from DataFrames to Figures (no Streamlit, no store).

Axis titles, panel titles and legends use the labels and units of engine/registry.py ("train loss (nats)"),
hover texts the label with the stored key beside it ("train loss · train_loss"), so a chart reads in
words and still names the exported data's columns; accuracies and errors (unit "%") read as percentages.
Every user-controlled string (run names) goes through plain.html: Plotly renders HTML in labels.
Log axes carry explicit tick values and texts (log_axis), so a tick never reads as a bare mantissa
("2" for 0.02), on screen and in exported files alike.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from engine import registry

from .plain import html

# Run colours avoid the regime colours below (green, orange, red, purple, grey), so a curve's
# colour is never read as its regime, and stand out on white (contrast 3:1 or more: the olive and
# pale pinks of Plotly's defaults were hard to follow on a projector), and differ from each other
# (CIELAB distance 25 or more, and no second teal: two teals, two browns and two dark blues read as one
# colour on screen).
PALETTE = ("#1f77b4", "#c2409e", "#0097a7", "#8c564b", "#827717", "#3949ab", "#263238", "#9c84f0",
           "#682048", "#d87884")
REGIME_COLORS = {"convergence": "#1b9e4b", "chaotic_equilibrium": "#f28e00", "divergence": "#d62728",
                 "periodic": "#7b2cbf", "undetermined": "#8c8c8c"}
UNKNOWN_REGIME_COLOR = "#8c8c8c"
SPIKE_COLOR = "rgba(214, 39, 40, 0.55)"
INDEX_X = registry.INDEX_COLUMNS
LEGEND = dict(orientation="h", yanchor="bottom", y=1.02, x=0, xanchor="left")
# A grid of panels overlaying more runs than this has no legend (17 names beside it squeezed the
# panels to a third of the page): a curve's hover names its run, and Live's table lists them.
LEGEND_MAX_RUNS = 8
LABEL_GAP_PX = 17      # the least vertical distance between two end-of-curve regime labels
LABEL_ROOM = 0.25      # room to the right of the curves for their labels, as a fraction of the x range
# room above the plot for the legend, so neither it nor a title sits under the toolbar
MARGIN = dict(l=10, r=10, t=60, b=10)


def run_color(run_id: int) -> str:
    """Stable colour per run: the run id hashed into the palette, so run 7 has the same colour on
    every page and in every session (consecutive ids, e.g. one sweep, get different colours)."""
    return PALETTE[int(run_id) % len(PALETTE)]


def run_colors(run_ids) -> dict[int, str]:
    """Each run's colour on one chart: its stable run_color, unless a run drawn before it on the
    chart already has that one (ids ten apart, #1 and #11), then the next colour free there."""
    colors: dict[int, str] = {}
    for run_id in run_ids:
        color = run_color(run_id)
        used = set(colors.values())
        if color in used and len(used) < len(PALETTE):
            start = PALETTE.index(color)
            color = next(c for c in PALETTE[start:] + PALETTE[:start] if c not in used)
        colors[run_id] = color
    return colors


def regime_color(regime: str | None) -> str:
    return REGIME_COLORS.get(regime or "undetermined", UNKNOWN_REGIME_COLOR)


def _finite(values) -> np.ndarray:
    """inf cannot be drawn (or sent as JSON): it becomes a gap like nan."""
    values = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(values), values, np.nan)


# ---- axes ---------------------------------------------------------------------------------------
def tick_text(value: float) -> str:
    """A tick label that reads as the number itself: 0.02, 500, 2e-5, 1e6."""
    text = f"{value:.6g}"
    return re.sub(r"e\+?(-?)0*(\d)", r"e\1\2", text)


# (mantissas, the fewest ticks that label the range well enough), tried in order
LOG_TICK_LADDER = (((1,), 3), ((1, 3), 4), ((1, 2, 5), 3), (tuple(range(1, 10)), 2))


# Labels on a log axis within a decade: at most about this many over the range, so that at the top of
# a decade (0.7, 0.8, 0.9, 1 lie 0.05 decade apart) they do not overlap in a short panel.
MOST_LABELS = 6
NICENESS = {1: 0, 5: 1, 2: 2, 3: 3}    # which mantissas to keep first when there are too many


def _spread(values: list[float], gap: float) -> list[float]:
    """The values no closer than `gap` decades to each other, keeping the nicest mantissas first
    (1, then 5, 2, 3, then the others from the bottom)."""
    def rank(v: float) -> tuple[int, float]:
        mantissa = round(v / 10 ** math.floor(math.log10(v) + 1e-9))
        return NICENESS.get(mantissa, len(NICENESS)), v
    kept: list[float] = []
    for v in sorted(values, key=rank):
        if all(abs(math.log10(v / k)) >= gap * (1 - 1e-9) for k in kept):
            kept.append(v)
    return sorted(kept)


def log_ticks(lo: float, hi: float, most: int = 8) -> list[float]:
    """Tick values for a log axis over [lo, hi]: decades when there are three or more, else 1-3
    (0.03, 0.1, 0.3, …) when that gives four or more, else 1-2-5, else every mantissa, else (a range
    narrower than one mantissa step) evenly spaced values. Two decades alone would leave up to a
    decade of data at either end without a label (a tail loss of 0.013 under a lowest tick of 0.1)."""
    k0, k1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    for mantissas, enough in LOG_TICK_LADDER:
        values = [float(f"{m * 10.0 ** k:.12g}") for k in range(k0, k1 + 1) for m in mantissas]
        values = [v for v in values if lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9)]
        if len(values) >= enough:
            if mantissas == (1,):
                return values[::math.ceil(len(values) / most)]
            if len(mantissas) == 9:      # every mantissa: crowded at the top of each decade
                return _spread(values, math.log10(hi / lo) / MOST_LABELS)
            return values
    step = 10.0 ** math.floor(math.log10((hi - lo) / 4))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (m * step) <= 5)
    first = math.ceil(lo / step)
    return [float(f"{i * step:.12g}") for i in range(first, int(math.floor(hi / step)) + 1)]


def log_axis(values, lo: float | None = None, hi: float | None = None) -> dict:
    """A log axis with explicit ticks over the positive finite values (or [lo, hi])."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values) & (values > 0)]
    if lo is None:
        if not values.size:
            return {"type": "log"}
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        lo, hi = lo / 1.5, hi * 1.5
    ticks = log_ticks(lo, hi)
    return {"type": "log", "tickvals": ticks, "ticktext": [tick_text(v) for v in ticks]}


def scale(values, log: bool) -> dict:
    """Axis settings for these values. A series that is constant up to float noise (si_norm and elr
    on the sphere) gets a range of ±1% around its value, so the noise is not blown up into wiggles."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values) & ((values > 0) if log else True)]
    axis = log_axis(values) if log else {"type": "linear"}
    if values.size and np.ptp(values) <= 1e-5 * np.abs(values).max():
        middle = float(values.mean())
        if log:
            low, high = math.log10(middle) - 0.005, math.log10(middle) + 0.005
            axis = {**log_axis([], 10 ** low, 10 ** high), "range": [low, high]}
        elif middle:
            axis["range"] = [middle - 0.01 * abs(middle), middle + 0.01 * abs(middle)]
    return axis


def metric_axis(values, key: str, log: bool) -> dict:
    """A metric's axis (y, or x in a phase diagram): scale() of its values, titled with its label and
    unit; a fraction's ticks as percentages (a log axis keeps its explicit tick texts)."""
    axis = {**scale(values, log), "title_text": registry.axis_title(key)}
    if registry.is_percent(key) and axis["type"] == "linear":
        axis["tickformat"] = ".0%"
    return axis


def hover(key: str, axis: str = "y", fmt: str | None = None) -> str:
    """A key's line in a hover template: "train loss · train_loss %{y:.4g}" (percentages for fractions)."""
    return f"{html(registry.hover_name(key))} %{{{axis}:{fmt or registry.hover_format(key)}}}"


def _grid(keys: list[str], cols: int, shared_x: bool | str, row_height: int, titles: bool = True,
          gap: float = 0.1):
    """A grid of panels (titled with the keys' labels); shared_x True (within columns) or "all" shows x
    ticks on the lowest row only. gap: the space between columns, as a fraction of the width."""
    rows = max(1, math.ceil(len(keys) / cols))
    fig = make_subplots(rows=rows, cols=cols, shared_xaxes=shared_x,
                        subplot_titles=[registry.axis_title(k) for k in keys] if titles else None,
                        vertical_spacing=min(0.12, 0.3 / rows), horizontal_spacing=gap)
    fig.update_layout(height=max(320, row_height * rows), margin=MARGIN)
    return fig, [(i // cols + 1, i % cols + 1) for i in range(len(keys))]


def _x_titles(fig: go.Figure, cells: list[tuple[int, int]], cols: int, title: str) -> None:
    """The x title and tick labels under the lowest panel of each column (with an odd number of
    panels, the last column's lowest panel is not on the grid's bottom row: a shared axis would hide
    its ticks), and the title only there: elsewhere it would hit the next panel's title."""
    for row, col in cells[-cols:]:
        fig.update_xaxes(title_text=title, showticklabels=True, row=row, col=col)


def _series(frame: pd.DataFrame, key: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
    """(x, values) where the key was logged; empty if it never was."""
    if key not in frame:
        return np.array([]), np.array([])
    points = frame[[x, key]].dropna()
    return points[x].to_numpy(), _finite(points[key])


# ---- overlays of runs ---------------------------------------------------------------------------
def overlay(front: pd.DataFrame, keys: list[str], names: dict[int, str], *, x: str = "step",
            log_x: bool = False, log_keys=(), faint: pd.DataFrame | None = None,
            regimes: dict[int, str] | None = None, row_height: int = 280, cols: int = 1,
            forks: dict[int, str] | None = None) -> go.Figure:
    """One panel per metric key, one colour per run (or per seed group).

    front, faint: long frames (run_id, key, step, x, value; optionally lo and hi for a mean ± std
    band) as series.with_x makes them. `faint` (the raw curves behind smoothed ones) is drawn thin
    and pale. x is "step", "epoch", "wall_time" or a metric key: then each panel is a phase diagram
    (the key against that metric at the same steps) with each run's start point marked. regimes
    (run id -> label) adds the regime to the legend and writes it at the end of each curve.
    A fork drawn with its ancestors (front rows with `lead` true, `source` the ancestor's id, as
    data.compare_frames makes them) continues a dotted, paler line in its own colour up to where it
    branched, marked with a diamond; forks (run id -> "branched from #P at epoch E") says so on hover."""
    regimes, forks = regimes or {}, forks or {}
    # the first panel's regime labels run past its right edge: into a wider gap between columns,
    # or into a wider right margin
    fig, cells = _grid(keys, cols, x in INDEX_X, row_height, titles=cols > 1, gap=0.16 if regimes else 0.1)
    phase = x not in INDEX_X
    legend = cols == 1 or len(names) <= LEGEND_MAX_RUNS
    front_series, faint_series = _by_series(front), _by_series(faint)
    colors = run_colors(names)
    ends = []   # (regime, x, y) where each labelled curve of the first panel ends
    started = set()   # panels whose start marker says "start"
    for (row, col), key in zip(cells, keys):
        for run_id, name in names.items():
            color, first = colors[run_id], key == keys[0]
            label = html(name) + (f" · {regimes[run_id].replace('_', ' ')}" if run_id in regimes else "")
            points = faint_series.get((run_id, key))
            if points is not None:
                fig.add_trace(go.Scatter(x=points["x"], y=_finite(points["value"]), mode="lines", opacity=0.25,
                                         line=dict(color=color, width=1), legendgroup=str(run_id),
                                         showlegend=False, hoverinfo="skip"), row=row, col=col)
            points = front_series.get((run_id, key))
            if points is None:
                continue
            whole = points
            if "lead" in points and points["lead"].any():
                lead = points["lead"].to_numpy(dtype=bool)
                points = points[~lead]
                _lead(fig, whole[lead], points, color, run_id, name, key, x, row, col)
            if points.empty:
                continue
            if run_id in forks:
                _mark_fork(fig, points, color, forks[run_id], row, col)
            if "lo" in points:
                _band(fig, points, color, run_id, row, col)
            fig.add_trace(go.Scatter(
                x=points["x"], y=_finite(points["value"]), mode="lines+markers" if phase else "lines",
                name=label, line=dict(color=color, width=1.8), marker=dict(size=3), legendgroup=str(run_id),
                showlegend=first and legend, customdata=points["step"],
                hovertemplate=f"{html(name)}<br>{hover(x, 'x')}<br>{hover(key)}<br>step %{{customdata}}"
                              "<extra></extra>"), row=row, col=col)
            if phase:   # "start" written once per panel: the runs of a sweep start side by side
                _mark_start(fig, whole, color, row, col, label=(row, col) not in started)
                started.add((row, col))
            if run_id in regimes and first:
                finite = points[np.isfinite(points["x"]) & np.isfinite(points["value"])]
                if not finite.empty:
                    ends.append((regimes[run_id], float(finite["x"].iloc[-1]), float(finite["value"].iloc[-1])))
        values = front.loc[front["key"] == key, "value"] if not front.empty else []
        axis = metric_axis(values, key, key in log_keys)
        fig.update_yaxes(**axis, row=row, col=col)
        if key == keys[0] and ends:
            _label_regimes(fig, ends, axis, values, row_height - 50)
    xs = front["x"] if not front.empty else []
    axis = metric_axis(xs, x, log_x)
    x_title = axis.pop("title_text")
    fig.update_xaxes(**axis)
    if regimes and not log_x and len(xs) and not phase:
        # room to the right of the curves for their regime labels
        low, high = float(np.nanmin(xs)), float(np.nanmax(xs))
        fig.update_xaxes(range=[low, high + LABEL_ROOM * (high - low or 1)])
    _x_titles(fig, cells, cols, x_title)
    # a grid has panel titles where a legend on top would go: there the legend goes to the right
    where = LEGEND if cols == 1 else dict(orientation="v", x=1.01, xanchor="left", y=1, yanchor="top")
    fig.update_layout(legend=where, showlegend=legend, hovermode="closest", uirevision="overlay")
    if ends and cols == 1:
        fig.update_layout(margin=dict(MARGIN, r=40))
    return fig


def regime_labels(ends: list[tuple[str, float, float]], *, log: bool, span: tuple[float, float],
                  panel_px: float) -> list[tuple[str, str, float, float]]:
    """(regime, text, x, y) of the labels written where the curves end: one per regime, at the median
    end of its runs ("convergence (7)" for seven runs), moved apart vertically so that no label covers
    another (a 16-run sweep stacked seven "convergence" on one spot). span: the y axis's extent in
    axis units (log10 on a log axis); panel_px: the panel's height in pixels."""
    groups: dict[str, list[tuple[float, float]]] = {}
    for regime, x, y in ends:
        if math.isfinite(x) and math.isfinite(y) and (y > 0 or not log):
            groups.setdefault(regime, []).append((x, math.log10(y) if log else y))
    labels = sorted(([regime, regime.replace("_", " ") + (f" ({len(points)})" if len(points) > 1 else ""),
                      max(x for x, _ in points), float(np.median([y for _, y in points]))]
                     for regime, points in groups.items()), key=lambda label: label[3])
    gap = (span[1] - span[0]) * LABEL_GAP_PX / max(panel_px, 1.0)
    for below, label in zip(labels, labels[1:]):
        label[3] = max(label[3], below[3] + gap)
    if labels and labels[-1][3] > span[1]:   # pushed over the top: come down from there
        labels[-1][3] = max(span[1], labels[0][3])
        for above, label in zip(labels[::-1], labels[-2::-1]):
            label[3] = min(label[3], above[3] - gap)
    return [(regime, text, x, 10 ** y if log else y) for regime, text, x, y in labels]


def _label_regimes(fig: go.Figure, ends, axis: dict, values, panel_px: float) -> None:
    """The regime labels of the first panel (row 1, col 1), each in its regime's colour."""
    log = axis.get("type") == "log"
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values) & ((values > 0) if log else True)]
    if "range" in axis:
        span = tuple(axis["range"])
    elif values.size:
        span = (math.log10(values.min()), math.log10(values.max())) if log else (values.min(), values.max())
    else:
        return
    for regime, text, x, y in regime_labels(ends, log=log, span=span, panel_px=panel_px):
        fig.add_trace(go.Scatter(x=[x], y=[y], mode="text", text=[text], textposition="middle right",
                                 textfont=dict(color=regime_color(regime), size=13), showlegend=False,
                                 hoverinfo="skip", cliponaxis=False), row=1, col=1)


def _by_series(long: pd.DataFrame | None) -> dict:
    if long is None or long.empty:
        return {}
    return {(int(run_id), key): group for (run_id, key), group in long.groupby(["run_id", "key"], sort=False)}


def _band(fig: go.Figure, points: pd.DataFrame, color: str, run_id: int, row: int, col: int) -> None:
    """mean ± std of a seed group: the upper edge, then the lower one filled up to it."""
    fill = "rgba({}, {}, {}, 0.18)".format(*(int(color[i:i + 2], 16) for i in (1, 3, 5)))
    for edge, fill_mode in (("hi", None), ("lo", "tonexty")):
        fig.add_trace(go.Scatter(x=points["x"], y=_finite(points[edge]), mode="lines", line=dict(width=0),
                                 fill=fill_mode, fillcolor=fill, legendgroup=str(run_id), showlegend=False,
                                 hoverinfo="skip"), row=row, col=col)


LEAD_LINE = dict(width=1.6, dash="dot")


def _lead(fig: go.Figure, lead: pd.DataFrame, own: pd.DataFrame, color: str, run_id: int, name: str, key: str,
          x: str, row: int, col: int) -> None:
    """A fork's ancestors up to where it branched: dotted and paler, in the fork's colour, joined to
    its own first point so the two read as one curve."""
    joined = pd.concat([lead, own.iloc[:1]]) if not own.empty else lead
    source = joined["source"].fillna(-1).astype(int).to_numpy() if "source" in joined else np.full(len(joined), -1)
    fig.add_trace(go.Scatter(
        x=joined["x"], y=_finite(joined["value"]), mode="lines", line=dict(color=color, **LEAD_LINE), opacity=0.6,
        legendgroup=str(run_id), showlegend=False, customdata=np.stack([joined["step"].to_numpy(), source], axis=-1),
        hovertemplate=f"{html(name)}, before it branched: run #%{{customdata[1]}}<br>{hover(x, 'x')}<br>"
                      f"{hover(key)}<br>step %{{customdata[0]}}<extra></extra>"), row=row, col=col)


def _mark_fork(fig: go.Figure, own: pd.DataFrame, color: str, text: str, row: int, col: int) -> None:
    """A filled diamond where a fork starts (its first point), saying where it branched from on hover."""
    finite = own[np.isfinite(own["x"]) & np.isfinite(own["value"])]
    if finite.empty:
        return
    first = finite.iloc[0]
    fig.add_trace(go.Scatter(x=[first["x"]], y=[first["value"]], mode="markers", showlegend=False,
                             marker=dict(symbol="diamond", size=11, color=color, line=dict(color="white", width=1)),
                             hovertemplate=f"{html(text)}<br>step {int(first['step'])}<extra></extra>"),
                  row=row, col=col)


def _mark_start(fig: go.Figure, points: pd.DataFrame, color: str, row: int, col: int, label: bool = True) -> None:
    """An open circle at the run's first point; the word "start" beside the first circle of a panel
    only (a sweep's runs start side by side: one word per run piled up)."""
    finite = points[np.isfinite(points["x"]) & np.isfinite(points["value"])]
    if finite.empty:
        return
    start = finite.iloc[0]
    fig.add_trace(go.Scatter(x=[start["x"]], y=[start["value"]], mode="markers+text" if label else "markers",
                             text=["start"] if label else None, textposition="top center",
                             textfont=dict(color="#444", size=12),
                             marker=dict(symbol="circle-open", size=13, color=color, line=dict(width=2.5)),
                             showlegend=False, hoverinfo="skip"), row=row, col=col)


# ---- one run ------------------------------------------------------------------------------------
def run_curves(frame: pd.DataFrame, keys: list[str], *, run_id: int, spikes=(), rate_changes=(),
               cols: int = 2, kept=()) -> go.Figure:
    """One run's metrics against step, a panel per key (log scale for keys that span decades),
    with loss spikes as red dashed lines and ELR/LR changes as grey dotted ones across all panels.
    kept: (step, epoch) of each kept checkpoint, marked on every curve (a run can be branched or
    averaged there)."""
    # one step axis for all panels: aligned, with tick labels only under the lowest (over a lower
    # panel's title they overlapped it)
    fig, cells = _grid(keys, cols, "all", 240)
    color = run_color(run_id)
    for (row, col), key in zip(cells, keys):
        steps, values = _series(frame, key)
        fig.add_trace(go.Scatter(x=steps, y=values, mode="lines",
                                 name=registry.label(key), line=dict(color=color, width=1.6), showlegend=False,
                                 hovertemplate=f"step %{{x}}<br>{hover(key)}<extra></extra>"), row=row, col=col)
        _mark_kept(fig, steps, values, kept, registry.is_log(key), row, col, legend=(row, col) == cells[0])
        # the panel's title names the metric and its unit: no y title beside it
        axis = metric_axis(values, key, registry.is_log(key))
        del axis["title_text"]
        fig.update_yaxes(**axis, row=row, col=col)
    _x_titles(fig, cells, cols, "step")
    _mark_steps(fig, spikes, rate_changes)
    if kept:
        fig.update_layout(legend=dict(LEGEND, y=1.06), showlegend=True)
    # the same uirevision across refreshes keeps the user's zoom while live data arrives
    fig.update_layout(uirevision=str(run_id))
    return fig


KEPT_MARKER = dict(symbol="diamond-open", size=8, color="#37474f", line=dict(width=1.5))


def kept_points(steps, values, kept, log: bool) -> tuple[list[int], list[int], np.ndarray]:
    """(steps, epochs, values) where the curve passes each kept checkpoint's step: the logged points
    joined as drawn (straight on the axis's scale), so a marker sits on the line. Kept steps outside
    the logged range (not logged yet) are left out."""
    steps, values = np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values) & ((values > 0) if log else True)
    steps, values = steps[finite], values[finite]
    inside = [(s, e) for s, e in kept if steps.size and steps[0] <= s <= steps[-1]]
    if not inside:
        return [], [], np.array([])
    at = np.array([s for s, _ in inside], dtype=np.float64)
    drawn = np.log10(values) if log else values
    ys = np.interp(at, steps, drawn)
    return [s for s, _ in inside], [e for _, e in inside], 10 ** ys if log else ys


def _mark_kept(fig: go.Figure, steps, values, kept, log: bool, row: int, col: int, legend: bool) -> None:
    xs, epochs, ys = kept_points(steps, values, kept, log)
    if not xs:
        return
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", marker=KEPT_MARKER, customdata=epochs,
                             name="kept checkpoint (branch or average from here)", legendgroup="kept",
                             showlegend=legend,
                             hovertemplate="kept checkpoint<br>epoch %{customdata}<br>step %{x}<extra></extra>"),
                  row=row, col=col)


def _mark_steps(fig: go.Figure, spikes, rate_changes) -> None:
    for step in spikes:
        fig.add_vline(x=step, row="all", col="all", line=dict(color=SPIKE_COLOR, dash="dash", width=1))
    for step, value in rate_changes:
        fig.add_vline(x=step, row="all", col="all", line=dict(color="#666", dash="dot", width=1),
                      label=dict(text=f"→ {value:.3g}" if value is not None else "", textposition="end",
                                 textangle=0, xanchor="left", yanchor="top", font=dict(size=10)))


# ---- sweeps -------------------------------------------------------------------------------------
def regime_map(per_rate: pd.DataFrame, runs: pd.DataFrame, boundaries: list[dict], rate_key: str) -> go.Figure:
    """Tail means against the swept rate (log axis). per_rate: one row per rate with the majority
    regime, the label agreement across seeds and mean/std of each panel's metric (error bars: ±1 std
    over seeds); runs: one row per run (small markers, each in its own regime's colour, when there
    are seeds). Boundaries are intervals (shaded) with an estimate (dashed). customdata is a run id,
    so a selected point names its run."""
    keys = registry.REGIME_MAP_KEYS
    fig = make_subplots(rows=len(keys), cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=[f"tail mean of the {registry.label(key)}" for key in keys])
    seeded = bool((per_rate["n"] > 1).any()) if not per_rate.empty else False
    rate = hover(rate_key, "x", ".3g")
    for row, key in enumerate(keys, start=1):
        if seeded:
            for regime, points in runs.groupby("regime", sort=False):
                fig.add_trace(go.Scatter(
                    x=points["rate"], y=_finite(points[key]), mode="markers", showlegend=False,
                    marker=dict(color=regime_color(regime), size=6, opacity=0.45), customdata=points["run_id"],
                    hovertemplate=f"run #%{{customdata}} ({html(regime)})<br>{rate}<br>"
                                  f"{hover(key)}<extra></extra>"), row=row, col=1)
        for regime, points in per_rate.groupby("regime", sort=False):
            std = _finite(points[f"{key}_std"])
            fig.add_trace(go.Scatter(
                x=points["rate"], y=_finite(points[f"{key}_mean"]), mode="markers", legendgroup=regime,
                name=regime.replace("_", " "), showlegend=row == 1,
                error_y=dict(type="data", array=np.nan_to_num(std), visible=seeded, color=regime_color(regime)),
                marker=dict(color=regime_color(regime), size=12, line=dict(color="white", width=1)),
                customdata=points["run_id"], text=points["agreement"],
                hovertemplate=f"{rate}<br>{hover(key)}<br>labels agree: %{{text}}"
                              f"<extra>{html(regime)}</extra>"), row=row, col=1)
        values = pd.concat([per_rate[f"{key}_mean"], runs[key]]) if seeded else per_rate[f"{key}_mean"]
        fig.update_yaxes(**metric_axis(values, key, registry.is_log(key)), row=row, col=1)
    fig.update_xaxes(**scale(per_rate["rate"], True))
    fig.update_xaxes(title_text=registry.axis_title(rate_key), row=len(keys), col=1)
    for boundary in boundaries:
        lo, hi, estimate = boundary["lo"], boundary["hi"], boundary["estimate"]
        for row in range(1, len(keys) + 1):
            if lo is not None and hi is not None:
                fig.add_vrect(x0=lo, x1=hi, row=row, col=1, fillcolor="rgba(80, 80, 80, 0.10)", line_width=0)
            if estimate is not None:
                fig.add_vline(x=estimate, row=row, col=1, line=dict(color="#444", dash="dash", width=1.2))
        if estimate is not None:
            # the estimate written at the top of the first panel, on white so it reads over the grid
            fig.add_annotation(x=math.log10(estimate), xref="x", y=1, yref="y domain", yanchor="top",
                               text=f"≈ {tick_text(float(f'{estimate:.2g}'))}", showarrow=False,
                               bgcolor="rgba(255, 255, 255, 0.85)", borderpad=2, font=dict(size=13, color="#333"))
    fig.update_layout(height=760, margin=MARGIN, clickmode="event+select", legend=dict(LEGEND, y=1.04))
    return fig


# ---- periodic behaviour and sharpness -----------------------------------------------------------
def layer_heatmap(frame: pd.DataFrame, family: str = "layer_elr/<layer>", *, run_id: int = 0) -> go.Figure:
    """A per-layer family (layer_elr/<layer>, layer_norm/<layer>) as a heatmap: a row per layer (in the
    model's order as logged, first layer on top), a column per log point, the colour on a log scale with
    its colour bar labelled in the values themselves. Where the ELR of one layer runs away from the
    others, or every layer's jumps at a spike, it shows at a glance."""
    keys = registry.members(list(frame.columns), family)
    layers = [k.split("/", 1)[1] for k in keys]
    values = frame[keys].to_numpy(float).T if keys else np.zeros((0, len(frame)))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(np.isfinite(values) & (values > 0), np.log10(values), np.nan)
    finite = z[np.isfinite(z)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    ticks = [t for t in log_ticks(10 ** lo, 10 ** hi, most=6)] if finite.size else []
    name = registry.label(family)
    fig = go.Figure(go.Heatmap(
        x=frame["step"].to_numpy(), y=layers, z=z, customdata=values, colorscale="Viridis",
        zmin=lo, zmax=hi if hi > lo else lo + 1e-9,
        colorbar=dict(title=dict(text=name, side="right"), tickvals=[math.log10(t) for t in ticks],
                      ticktext=[tick_text(t) for t in ticks]),
        hovertemplate=f"layer %{{y}}<br>step %{{x}}<br>{html(name)} %{{customdata:.4g}}<extra></extra>"))
    fig.update_yaxes(title_text="layer", autorange="reversed", type="category")
    fig.update_xaxes(title_text="step")
    fig.update_layout(height=max(260, 60 + 22 * len(layers)), margin=MARGIN, uirevision=f"heatmap-{run_id}",
                      title=f"{name} per layer (colour: log scale)")
    return fig


def periodic(frame: pd.DataFrame, spikes: list[int], period: int | None) -> go.Figure:
    """train_loss, si_norm and elr on one shared step axis: spikes in the loss line up with jumps in
    the norm and drops in the ELR."""
    panels = [("train_loss", "#1f77b4"), ("si_norm", "#00838f"), ("elr", "#3949ab")]
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.05)
    for row, (key, color) in enumerate(panels, start=1):
        steps, values = _series(frame, key)
        fig.add_trace(go.Scatter(x=steps, y=values, mode="lines", name=registry.label(key), showlegend=False,
                                 line=dict(width=1.5, color=color),
                                 hovertemplate=f"step %{{x}}<br>{hover(key)}<extra></extra>"), row=row, col=1)
        fig.update_yaxes(**metric_axis(values, key, registry.is_log(key)), row=row, col=1)
    _mark_steps(fig, spikes, [])
    fig.update_xaxes(title_text="step", row=3, col=1)
    title = f"{len(spikes)} loss spike(s)" + (f", period ≈ {period} steps" if period else "") if spikes else None
    fig.update_layout(height=700, title=title, margin=MARGIN, uirevision="periodic")
    return fig


def sharpness(long: pd.DataFrame, names: dict[int, str]) -> go.Figure:
    """Each run's sharpness (λmax·ρ², solid) against its own stability line 2(1+μ)/elr (dashed), in
    the run's colour: a chaotic run's sharpness is pushed up to its line and hovers around it."""
    fig = go.Figure()
    series = _by_series(long)
    colors = run_colors(names)
    for run_id, name in names.items():
        color = colors[run_id]
        for key, style, suffix in (("sharpness", dict(width=2), ""),
                                   ("sharpness_threshold", dict(width=1.5, dash="dash"),
                                    f" · {registry.label('sharpness_threshold')}")):
            points = series.get((run_id, key))
            if points is None:
                continue
            fig.add_trace(go.Scatter(x=points["step"], y=_finite(points["value"]),
                                     mode="lines+markers" if key == "sharpness" else "lines",
                                     name=html(name) + suffix, legendgroup=str(run_id), line=dict(color=color, **style),
                                     marker=dict(size=4),
                                     hovertemplate=f"{html(name)}<br>step %{{x}}<br>{hover(key)}<extra></extra>"))
    fig.update_yaxes(title_text=f"{registry.axis_title('sharpness')}  (dashed: {registry.label('sharpness_threshold')})",
                     **log_axis(long["value"] if not long.empty else []))
    fig.update_xaxes(title_text="step")
    fig.update_layout(height=420, margin=MARGIN, legend=LEGEND, uirevision="sharpness")
    return fig


# ---- solutions: the path between two of them ------------------------------------------------------
# (panel title, y axis name, the keys drawn: one unit per panel, the registry's)
GEOMETRY_PANELS = (("loss along the path", "loss", ("train_loss", "test_loss")),
                   ("error (1 − accuracy) along the path", "error", ("train_err", "test_err")))
SPLIT_COLORS = {"train": "#1f77b4", "test": "#c2409e"}


def straight_line(alphas, values) -> np.ndarray:
    """The straight line between a path's two ends, at each α: (1−α)·value(0) + α·value(1)."""
    a, v = np.asarray(alphas, dtype=np.float64), np.asarray(values, dtype=np.float64)
    line = v[0] + (a - a[0]) / ((a[-1] - a[0]) or 1.0) * (v[-1] - v[0])
    line[[0, -1]] = v[[0, -1]]   # the ends exactly, not up to rounding
    return line


def barrier_point(alphas, values) -> tuple[float, float, float, float]:
    """(α, value, the straight line's value there, excess) where the path rises furthest above the
    straight line between its ends: the barrier is the excess (0 when it never rises above it: then
    α is an end)."""
    a, v = np.asarray(alphas, dtype=np.float64), np.asarray(values, dtype=np.float64)
    line = straight_line(a, v)
    excess = np.where(np.isfinite(v), v - line, -np.inf)
    i = int(np.argmax(excess))
    noise = 1e-9 * float(np.nanmax(np.abs(v))) if np.isfinite(v).any() else 0.0   # rounding, not a bump
    return float(a[i]), float(v[i]), float(line[i]), float(excess[i]) if excess[i] > noise else 0.0


def barrier_text(key: str, value: float) -> str:
    """A barrier as the page writes it: errors in percentage points, losses as numbers, none as 0."""
    if value == 0:
        return "0"
    return f"{value:.2%}" if registry.is_percent(key) else f"{value:.3g}"


def geometry(result: dict, label_a: str, label_b: str) -> go.Figure:
    """The linear path between two solutions (a geometry job's result): loss and error, train and
    test, against α (0 = A, 1 = B); each curve's straight line between its ends dashed in its colour;
    where a curve rises above that line the most (its barrier) a bar from the line up to the curve
    and an arrow with the barrier's value. label_a, label_b: what A and B are (plain text)."""
    alphas = np.asarray(result["alphas"], dtype=np.float64)
    # a curve that never rises above its straight line has no barrier to point at: its panel's title says so
    flat = {key: barrier_point(alphas, _finite(result[key]))[3] == 0 for _, _, keys in GEOMETRY_PANELS for key in keys}
    # on a second line: beside the title it ran past the right edge of a half-width panel
    titles = [title + (f"<br><span style='font-size:12px'>no barrier: "
                       f"{', '.join(registry.label(k) for k in keys if flat[k])}</span>"
                       if any(flat[k] for k in keys) else "")
              for title, _, keys in GEOMETRY_PANELS]
    fig = make_subplots(rows=1, cols=2, subplot_titles=titles, horizontal_spacing=0.09)
    for col, (_, quantity, keys) in enumerate(GEOMETRY_PANELS, start=1):
        raised = 0   # barrier labels drawn in this panel: the next one goes higher
        for key in keys:
            color = SPLIT_COLORS[key.split("_")[0]]
            values = _finite(result[key])
            percent = registry.is_percent(key)
            name = registry.label(key)
            fig.add_trace(go.Scatter(x=alphas, y=values, mode="lines+markers", name=name, legendgroup=key,
                                     line=dict(color=color, width=2), marker=dict(size=5, color=color),
                                     hovertemplate=f"α %{{x:.2f}}<br>{hover(key, fmt='.2%' if percent else None)}"
                                                   "<extra></extra>"), row=1, col=col)
            line = straight_line(alphas, values)
            fig.add_trace(go.Scatter(x=[alphas[0], alphas[-1]], y=[line[0], line[-1]], mode="lines",
                                     line=dict(color=color, width=1.3, dash="dash"), legendgroup=key,
                                     showlegend=False, hoverinfo="skip", name=f"{name} straight line"),
                          row=1, col=col)
            at, top, base, excess = barrier_point(alphas, values)
            if excess == 0:
                continue
            text = f"{name} barrier {barrier_text(key, excess)}"
            fig.add_trace(go.Scatter(x=[at, at], y=[base, top], mode="lines", line=dict(color=color, width=3),
                                     legendgroup=key, showlegend=False, name=f"{name} barrier",
                                     hovertemplate=f"{text}<br>at α {at:.2f}<extra></extra>"), row=1, col=col)
            fig.add_annotation(x=at, y=top, xref=f"x{col if col > 1 else ''}", yref=f"y{col if col > 1 else ''}",
                               text=text, showarrow=True, arrowhead=2, arrowcolor=color, ax=0, ay=-34 - 22 * raised,
                               font=dict(color=color, size=12), bgcolor="rgba(255, 255, 255, 0.85)")
            raised += 1
        fig.update_yaxes(title_text=f"{quantity} ({registry.unit(keys[0])})",
                         tickformat=".1%" if registry.is_percent(keys[0]) else None, row=1, col=col)
    fig.update_xaxes(title_text="α along the straight path from A to B", range=[-0.03, 1.03],
                     tickvals=[0, 0.25, 0.5, 0.75, 1], ticktext=["0 · A", "0.25", "0.5", "0.75", "1 · B"])
    fig.update_layout(height=440, margin=dict(MARGIN, t=110), legend=dict(LEGEND, y=1.16), hovermode="closest",
                      title=dict(text=f"A = {html(label_a)}<br>B = {html(label_b)}", font=dict(size=13),
                                 x=0, xanchor="left", y=0.98, yanchor="top"))
    return fig


# ---- files --------------------------------------------------------------------------------------
def for_export(fig: go.Figure, width: int = 1200) -> go.Figure:
    """A copy sized for a file: fixed width, room for tick labels and titles (automargin), white."""
    out = go.Figure(fig)
    out.update_xaxes(automargin=True, title_standoff=12)
    out.update_yaxes(automargin=True, title_standoff=12)
    out.update_layout(width=width, height=fig.layout.height or 500, template="plotly_white",
                      margin=dict(l=90, r=40, t=90, b=70))
    return out
