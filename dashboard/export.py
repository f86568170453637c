"""Figure downloads: PNG and SVG when kaleido (Plotly's static image engine) is importable and finds
a Chrome or Chromium to drive, else a self-contained interactive HTML file (Plotly's JavaScript
inlined, so it opens offline).

Pages pass figure_bytes as a deferred download (a callable): the file is only made when clicked.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass

import plotly.graph_objects as go


@dataclass(frozen=True)
class FigureFormat:
    label: str
    extension: str
    mime: str


STATIC = [FigureFormat("PNG", "png", "image/png"), FigureFormat("SVG", "svg", "image/svg+xml")]
HTML = FigureFormat("HTML", "html", "text/html")


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def static_images_available() -> bool:
    has_browser = bool(os.environ.get("BROWSER_PATH")) or any(shutil.which(name) for name in BROWSERS)
    return has_browser and importlib.util.find_spec("kaleido") is not None


def figure_formats() -> list[FigureFormat]:
    return STATIC if static_images_available() else [HTML]


def figure_bytes(fig: go.Figure, fmt: FigureFormat) -> bytes:
    if fmt.extension == "html":
        return fig.to_html(include_plotlyjs=True, full_html=True).encode()
    return fig.to_image(format=fmt.extension, scale=2 if fmt.extension == "png" else 1)
