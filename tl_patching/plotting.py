"""Figures: the shared look of every experiment's plotly figures, and how they are saved (interactive HTML that
opens offline, plus a PNG where a browser is available). Each experiment draws its own figures in its module.

HTML files share one local ``plotly.min.js`` in their folder (no CDN, no network) and are byte-for-byte
the same on a rerun: the plotly div id is the figure's name and every number is rounded to
`results.SIGNIFICANT_DIGITS` significant digits. PNG export goes through kaleido, which needs a
Chrome/Chromium (Debian: ``apt-get install -y chromium``); without one it is skipped with one message
on its own line, and a PNG left from an earlier run is deleted so that it cannot contradict the new HTML.

Colour conventions: diverging heatmaps are centred at 0 with blue = negative and red = positive
(plotly's ``RdBu`` runs red → blue from low to high, so they use ``RdBu_r``); every title states the
quantity and its unit (logit differences in nats).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from tqdm.auto import tqdm

from tl_patching.results import round_sig

DIVERGING = "RdBu_r"  # low (negative) = blue, high (positive) = red
NEGATIVE_COLOUR, POSITIVE_COLOUR = "blue", "red"  # the words the titles use for DIVERGING's two ends
MAX_CELLS_WITH_VALUES = 400  # heatmaps with more cells show values on hover only
WIDTH, HEIGHT = 1000, 600  # PNG size (pixels) unless a figure sets its own height
COLOURS = {"clean": "#1f77b4", "silenced": "#d62728", "edited": "#d62728", "rise": "#d62728", "fall": "#1f77b4"}


def titled(head: str, sub: str) -> str:
    """A headline and a smaller subtitle (which may hold ``<br>`` for a second line)."""
    return f"{head}<br><sup>{sub}</sup>"


def int_ticks(n: int) -> list[int]:
    """Integer tick positions 0 … n−1 for a layer or head axis: every one up to 20, then every 2nd, 5th, 10th…"""
    step = next(s for s in (1, 2, 5, 10, 20, 50, 100, 1000) if n / s <= 20)
    return list(range(0, n, step))


def index_axis(n: int, title: str) -> dict:
    return dict(title=title, tickmode="array", tickvals=int_ticks(n), range=[-0.5, n - 0.5])


def log_axis(title: str, values) -> dict:
    """A log axis labelled at 1, 2, 5 × 10^k (plotly's default labels minor ticks 2…9 without their decade)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    lo, hi = (math.floor(math.log10(v.min())), math.ceil(math.log10(v.max()))) if v.size else (0, 1)
    ticks = [m * 10.0**k for k in range(lo, hi + 1) for m in (1, 2, 5)]
    return dict(title=title, type="log", tickmode="array", tickvals=ticks, ticktext=[f"{t:g}" for t in ticks])


def rgba(colour: str, alpha: float) -> str:
    r, g, b = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def reference_line(
    fig: go.Figure, y: float, text: str, colour: str, dash: str | None = "dash", log: bool = False
) -> None:
    """A horizontal line across the plot, labelled in the right margin (never on top of the data)."""
    fig.add_hline(y=y, line_dash=dash, line_color=colour)
    fig.add_annotation(
        x=1,
        xref="paper",
        xanchor="left",
        xshift=6,
        y=math.log10(y) if log else y,
        yref="y",
        text=text,
        showarrow=False,
        font=dict(size=11, color=colour),
    )
    fig.update_layout(margin=dict(r=170))


def _stabilise(fig: go.Figure) -> None:
    """Round every float the figure stores, so that a rerun differing in the 7th digit writes the same HTML."""
    for trace in fig.data:
        for path in ("x", "y", "z", "base", "customdata", "error_y.array", "error_y.arrayminus"):
            try:
                value = trace[path]
            except (KeyError, ValueError):
                continue
            if value is not None and not isinstance(value, str) and np.asarray(value).dtype.kind == "f":
                trace[path] = round_sig(value)
    for shape in fig.layout.shapes:
        for key in ("x0", "x1", "y0", "y1"):
            if isinstance(shape[key], float):
                shape[key] = round_sig(shape[key])


def _export_failure(e: BaseException) -> str:
    """The first sentence of the exception and of the one that caused it (kaleido's own message starts with blank
    lines; the cause says which browser path was tried)."""
    parts = []
    while e is not None and len(parts) < 2:
        line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        sentence = line.split(". ")[0].rstrip(".")[:150]
        parts.append(f"{type(e).__name__}: {sentence}" if sentence else type(e).__name__)
        e = e.__cause__ or e.__context__
    return "; caused by ".join(parts)


@contextlib.contextmanager
def _browser_logs_quiet():
    """kaleido's browser driver logs what it recovers from (seen: "JSONError decoding message. Ignoring" with two
    tracebacks, the PNG written all the same) through Python's last-resort handler onto stderr; a failure that matters
    raises, and is noted once by `save`."""
    loggers = [logging.getLogger(name) for name in ("choreographer", "kaleido")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


class PngExport:
    """Whether a run writes PNGs, and whether PNG export already failed in it (then the run's other figures skip it:
    one note on its own line, not one per figure). One per run, passed to every `save`."""

    def __init__(self, wanted: bool = True):
        self.wanted = wanted
        self.failed = False


def save(fig: go.Figure, out_dir: Path, name: str, png: bool | PngExport = True) -> list[Path]:
    """Write ``name.html`` (and ``name.png`` if ``png`` and a browser is available); returns the files written.

    Without a PNG, an older ``name.png`` in ``out_dir`` is deleted: it would show the previous run's figure.
    """
    png = PngExport(png) if isinstance(png, bool) else png
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.update_layout(template="plotly_white", font=dict(size=13))
    if fig.layout.legend.orientation is None:
        fig.update_layout(legend=dict(orientation="h", y=-0.18))
    _stabilise(fig)
    html = out_dir / f"{name}.html"
    fig.write_html(html, include_plotlyjs="directory", div_id=name)
    written = [html]
    image = out_dir / f"{name}.png"
    if png.wanted and not png.failed:
        try:
            with _browser_logs_quiet():
                fig.write_image(image, width=WIDTH, height=fig.layout.height or HEIGHT, scale=1)
            written.append(image)
        except Exception as e:  # kaleido raises several types when no browser is found
            png.failed = True
            tqdm.write(  # one line, like every other step of a run
                f"note: static PNG export skipped ({_export_failure(e)}); interactive HTML is written and old PNGs "
                "are removed; install Chromium (apt-get install -y chromium) for PNGs",
                file=sys.stderr,
            )
    if image not in written:
        image.unlink(missing_ok=True)
    return written


def heatmap(
    z,
    head: str,
    sub: str,
    colorbar: str,
    x_title="head",
    y_title="layer",
    centre: float | None = 0.0,
    zrange: tuple[float, float] | None = None,
    colorscale: str = DIVERGING,
    fmt: str = ".2f",
) -> go.Figure:
    """Layer × head heatmap: integer ticks, values in the cells (small maps), colour scale centred at ``centre``."""
    z = np.asarray(z, dtype=float)
    if zrange is None:
        half = float(np.abs(z - centre).max()) or 1.0
        zrange = (centre - half, centre + half)
    cells = z.size <= MAX_CELLS_WITH_VALUES
    fig = go.Figure(
        go.Heatmap(
            z=z,
            colorscale=colorscale,
            zmin=zrange[0],
            zmax=zrange[1],
            zmid=centre,
            colorbar=dict(title=colorbar),
            texttemplate=f"%{{z:{fmt}}}" if cells else None,
            textfont=dict(size=14 if z.size <= 64 else 10),
            hovertemplate=f"{y_title} %{{y}}, {x_title} %{{x}}: %{{z:.3f}}<extra></extra>",
        )
    )
    fig.update_layout(
        title=titled(head, sub),
        xaxis=index_axis(z.shape[1], x_title),
        yaxis={**index_axis(z.shape[0], y_title), "range": [z.shape[0] - 0.5, -0.5]},
    )  # layer 0 on top
    return fig
