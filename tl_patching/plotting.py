"""Plotly figures for E1–E5: interactive HTML that opens offline, plus a PNG where a browser is available.

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

import math
import sys
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots
from tqdm.auto import tqdm

from tl_patching.experiments.e1_attention_scores import E1Result
from tl_patching.experiments.e2_activation_editing import E2Result
from tl_patching.experiments.e3_cosine_similarity import E3Result
from tl_patching.experiments.e4_ioi_patching import E4Result
from tl_patching.experiments.e5_head_token_patching import E5Result
from tl_patching.results import round_sig

DIVERGING = "RdBu_r"  # low (negative) = blue, high (positive) = red
NEGATIVE_COLOUR, POSITIVE_COLOUR = "blue", "red"  # the words the titles use for DIVERGING's two ends
MAX_CELLS_WITH_VALUES = 400  # heatmaps with more cells show values on hover only
WIDTH, HEIGHT = 1000, 600  # PNG size (pixels) unless a figure sets its own height
COLOURS = {"clean": "#1f77b4", "silenced": "#d62728", "edited": "#d62728", "rise": "#d62728", "fall": "#1f77b4"}

_png_ok: bool | None = None  # None: not tried yet in this process


def _title(head: str, sub: str) -> str:
    """A headline and a smaller subtitle (which may hold ``<br>`` for a second line)."""
    return f"{head}<br><sup>{sub}</sup>"


def _int_ticks(n: int) -> list[int]:
    """Integer tick positions 0 … n−1 for a layer or head axis: every one up to 20, then every 2nd, 5th, 10th…"""
    step = next(s for s in (1, 2, 5, 10, 20, 50, 100, 1000) if n / s <= 20)
    return list(range(0, n, step))


def _index_axis(n: int, title: str) -> dict:
    return dict(title=title, tickmode="array", tickvals=_int_ticks(n), range=[-0.5, n - 0.5])


def _log_axis(title: str, values) -> dict:
    """A log axis labelled at 1, 2, 5 × 10^k (plotly's default labels minor ticks 2…9 without their decade)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    lo, hi = (math.floor(math.log10(v.min())), math.ceil(math.log10(v.max()))) if v.size else (0, 1)
    ticks = [m * 10.0**k for k in range(lo, hi + 1) for m in (1, 2, 5)]
    return dict(title=title, type="log", tickmode="array", tickvals=ticks, ticktext=[f"{t:g}" for t in ticks])


def _rgba(colour: str, alpha: float) -> str:
    r, g, b = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def _reference_line(fig: go.Figure, y: float, text: str, colour: str, dash: str | None = "dash", log: bool = False) -> None:
    """A horizontal line across the plot, labelled in the right margin (never on top of the data)."""
    fig.add_hline(y=y, line_dash=dash, line_color=colour)
    fig.add_annotation(x=1, xref="paper", xanchor="left", xshift=6, y=math.log10(y) if log else y, yref="y", text=text,
                       showarrow=False, font=dict(size=11, color=colour))
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


def save(fig: go.Figure, out_dir: Path, name: str, png: bool = True) -> list[Path]:
    """Write ``name.html`` (and ``name.png`` if ``png`` and a browser is available); returns the files written.

    Without a PNG, an older ``name.png`` in ``out_dir`` is deleted: it would show the previous run's figure.
    """
    global _png_ok
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.update_layout(template="plotly_white", font=dict(size=13))
    if fig.layout.legend.orientation is None:
        fig.update_layout(legend=dict(orientation="h", y=-0.18))
    _stabilise(fig)
    html = out_dir / f"{name}.html"
    fig.write_html(html, include_plotlyjs="directory", div_id=name)
    written = [html]
    image = out_dir / f"{name}.png"
    if png and _png_ok is not False:
        try:
            fig.write_image(image, width=WIDTH, height=fig.layout.height or HEIGHT, scale=1)
            written.append(image)
            _png_ok = True
        except Exception as e:  # kaleido raises several types when no browser is found
            _png_ok = False
            tqdm.write(f"note: static PNG export skipped ({_export_failure(e)}).\n"
                       "      Interactive HTML is written and old PNGs are removed; install Chromium "
                       "(apt-get install -y chromium) for PNGs.", file=sys.stderr)
    if image not in written:
        image.unlink(missing_ok=True)
    return written


def _heatmap(z, head: str, sub: str, colorbar: str, x_title="head", y_title="layer", centre: float | None = 0.0,
             zrange: tuple[float, float] | None = None, colorscale: str = DIVERGING, fmt: str = ".2f") -> go.Figure:
    """Layer × head heatmap: integer ticks, values in the cells (small maps), colour scale centred at ``centre``."""
    z = np.asarray(z, dtype=float)
    if zrange is None:
        half = float(np.abs(z - centre).max()) or 1.0
        zrange = (centre - half, centre + half)
    cells = z.size <= MAX_CELLS_WITH_VALUES
    fig = go.Figure(go.Heatmap(
        z=z, colorscale=colorscale, zmin=zrange[0], zmax=zrange[1], zmid=centre, colorbar=dict(title=colorbar),
        texttemplate=f"%{{z:{fmt}}}" if cells else None, textfont=dict(size=14 if z.size <= 64 else 10),
        hovertemplate=f"{y_title} %{{y}}, {x_title} %{{x}}: %{{z:.3f}}<extra></extra>",
    ))
    fig.update_layout(title=_title(head, sub), xaxis=_index_axis(z.shape[1], x_title),
                      yaxis={**_index_axis(z.shape[0], y_title), "range": [z.shape[0] - 0.5, -0.5]})  # layer 0 on top
    return fig


def e1_figures(r: E1Result) -> dict[str, go.Figure]:
    model = r.info.model_name
    n_tokens = len(r.info.token_ids[0])
    mean = _heatmap(
        r.mean_score, f"E1 ({model}): mean raw attention score {r.score_formula} per head (pre-softmax)",
        f"averaged over the visible (query, key) pairs of {n_tokens} tokens; overall mean {float(r.mean_score.mean()):.2f}; "
        f"{NEGATIVE_COLOUR} = below 0, {POSITIVE_COLOUR} = above 0", "mean raw score")
    frac = _heatmap(
        r.frac_negative, f"E1 ({model}): fraction of visible raw attention scores below 0, per head",
        f"0.5 = centred on zero; {NEGATIVE_COLOUR} = mostly negative (above 0.5), {POSITIVE_COLOUR} = mostly positive",
        "fraction < 0", centre=0.5, zrange=(0.0, 1.0), colorscale="RdBu")
    return {"e1_mean_raw_score": mean, "e1_fraction_negative": frac, "e1_kde_by_layer": _ridge(r)}


def _ridge(r: E1Result) -> go.Figure:
    """Laminar profile: one KDE per layer on its own baseline (layer 0 on top), rising upward, no overlap."""
    grid, density = r.kde_grid.numpy(), r.kde_density.numpy()
    L = len(density)
    row = 1.1 * float(density.max())  # height of one row: the tallest density fits with a margin
    colours = sample_colorscale("Viridis", [0.85 * l / max(L - 1, 1) for l in range(L)])
    mean_by_layer = r.mean_score.mean(-1).numpy()
    fig = go.Figure()
    for l in range(L):
        base = (L - 1 - l) * row
        fig.add_trace(go.Scatter(x=grid, y=np.full_like(grid, base), mode="lines", line=dict(width=0.5, color="lightgrey"),
                                 showlegend=False, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=grid, y=density[l] + base, mode="lines", fill="tonexty", name=f"layer {l}",
                                 line=dict(width=1.5, color=colours[l]), fillcolor=colours[l].replace("rgb", "rgba").replace(")", ", 0.45)"),
                                 customdata=density[l], hovertemplate=f"layer {l}: score %{{x:.2f}}, density %{{customdata:.3f}}<extra></extra>"))
        top = float(np.interp(mean_by_layer[l], grid, density[l]))
        fig.add_trace(go.Scatter(x=[mean_by_layer[l]] * 2, y=[base, base + top], mode="lines", line=dict(color="black", width=2),
                                 showlegend=False, hovertemplate=f"layer {l} mean: {mean_by_layer[l]:.2f}<extra></extra>"))
    fig.add_vline(x=0, line_dash="dash", line_color="grey")
    # Density scale bar: a round density value drawn at the right edge, in the same units as every row.
    bar = next(v for v in (1, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001) if v <= 0.9 * row) if row > 0.001 else row
    fig.add_shape(type="line", xref="paper", x0=1.02, x1=1.02, y0=0, y1=bar, line=dict(color="black", width=3))
    fig.add_annotation(xref="paper", x=1.02, y=bar / 2, text=f"density<br>{bar:g} per<br>score unit", showarrow=False, xanchor="left",
                       xshift=6, font=dict(size=11))
    fig.update_layout(
        title=_title(f"E1 ({r.info.model_name}): distribution of raw attention scores per layer (KDE over all heads)",
                     "each layer's density rises from its own baseline, all on one scale (bar on the right); "
                     "dashed line = 0, black tick = the layer's mean"),
        xaxis=dict(title=f"raw attention score {r.score_formula} (pre-softmax, visible positions)"), margin=dict(r=110),
        yaxis=dict(title="layer (baseline of each density)", tickmode="array", tickvals=[(L - 1 - l) * row for l in range(L)],
                   ticktext=[str(l) for l in range(L)], range=[-0.05 * row, L * row], showgrid=False, zeroline=False),
        showlegend=False, height=max(HEIGHT, 150 + 45 * L),
    )
    return fig


def e2_figures(r: E2Result) -> dict[str, go.Figure]:
    L = len(r.clean_resid_std)
    layers = list(range(L))
    figs = {}
    for i, iv in enumerate(r.interventions):
        fig = go.Figure([
            go.Scatter(x=layers, y=r.clean_resid_std.numpy(), name="clean run (wide, under: visible where the runs agree)",
                       mode="lines+markers", line=dict(color=_rgba(COLOURS["clean"], 0.55), width=7), marker=dict(size=11)),
            go.Scatter(x=layers, y=iv.resid_std.numpy(), name="edited run", mode="lines+markers", line=dict(color=COLOURS["edited"], width=2)),
        ])
        fig.add_vline(x=r.layer, line_dash="dot", line_color="grey", annotation_text=f"edited layer {r.layer}")
        fig.update_layout(
            title=_title(f"E2 ({r.info.model_name}): {iv.label}: standard deviation of the residual stream per layer",
                         f"std of hook_resid_post over positions and d_model (before ln_final); next token: clean top-1 "
                         f"{r.clean_top_tokens[0]!r} → edited {iv.top_tokens[0]!r}; KL(clean‖edited) = {iv.kl_from_clean:.3f} nats"),
            xaxis=_index_axis(L, "layer (block output)"), yaxis=_log_axis("standard deviation (activation units, log scale)", np.r_[r.clean_resid_std.numpy(), iv.resid_std.numpy()]),
        )
        figs[f"e2_{i + 1}_resid_std"] = fig
    return figs


def e3_figures(r: E3Result) -> dict[str, go.Figure]:
    L = len(r.clean_pairs)
    layers = np.arange(L)
    m = round((1 + math.sqrt(1 + 8 * r.n_pairs)) / 2)  # n_pairs = M(M−1)/2
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.6, 0.4], vertical_spacing=0.1, subplot_titles=(
        f"cosine similarity of token pairs: mean over all {r.n_pairs} pairs of the {m} tokens; band: middle 50% of pairs",
        "paired t-test, silenced vs clean, per layer: −log10 p (significant above the dashed Bonferroni line)"))
    for name, pairs in (("clean", r.clean_pairs), ("silenced", r.silenced_pairs)):
        colour = COLOURS[name]
        q = np.quantile(pairs.numpy(), [0.25, 0.75], axis=1)
        fig.add_trace(go.Scatter(x=np.r_[layers, layers[::-1]], y=np.r_[q[1], q[0][::-1]], mode="lines", fill="toself",
                                 fillcolor=_rgba(colour, 0.18), line=dict(width=0), name=f"{name}: 25th–75th percentile of pairs",
                                 legendgroup=name, hoverinfo="skip"), row=1, col=1)
        fig.add_trace(go.Scatter(x=layers, y=pairs.mean(1).numpy(), name=f"{name}: mean", mode="lines+markers",
                                 line=dict(color=colour, width=2.5), legendgroup=name), row=1, col=1)
    neglog = -np.log10(np.clip(r.p_value.numpy(), 1e-300, 1))
    sig = np.array(r.significant, dtype=bool)
    for label, mask, colour in (("significant", sig, "crimson"), ("not significant", ~sig, "lightgrey")):
        fig.add_trace(go.Bar(x=layers[mask], y=neglog[mask], marker_color=colour, name=f"layer {label}"), row=2, col=1)
    fig.add_trace(go.Scatter(x=[-0.5, L - 0.5], y=[-np.log10(r.threshold)] * 2, mode="lines", line=dict(dash="dash", color="black"),
                             name=f"Bonferroni threshold p = 0.05/{L} = {r.threshold:.4g}"), row=2, col=1)
    for row in (1, 2):
        fig.add_vline(x=r.layer, line_dash="dot", line_color="grey", row=row, col=1)
    fig.add_annotation(x=r.layer, y=1, yref="y domain", text=f"head {r.head} silenced here", showarrow=False, xanchor="left",
                       xshift=4, font=dict(size=11, color="grey"), row=1, col=1)
    n_sig = int(sig.sum())
    fig.update_layout(
        title=_title(f"E3 ({r.info.model_name}): silencing head {r.head} of layer {r.layer}: cosine similarity between token vectors",
                     f"hook_resid_post at every layer; {n_sig} of {L} layers differ significantly (paired t-test over the "
                     f"{r.n_pairs} token pairs)"),
        height=760, legend=dict(orientation="h", y=-0.12),
    )
    fig.update_xaxes(**{k: v for k, v in _index_axis(L, "").items() if k != "title"})
    fig.update_xaxes(title_text="layer (hook_resid_post)", row=2, col=1)
    fig.update_yaxes(title_text="cosine similarity", row=1, col=1)
    fig.update_yaxes(title_text="−log10 p", row=2, col=1)
    return {"e3_cosine_similarity": fig}


E4_CURVES = (  # (field of E4Result, legend label)
    ("heads_patched", "all heads of the layer (hook_z, all positions)"),
    ("resid_s2_patched", "hook_resid_post at the repeated name (S2)"),
    ("resid_final_patched", "hook_resid_post at the final position"),
)


def e4_figures(r: E4Result) -> dict[str, go.Figure]:
    L = r.heads_patched.shape[0]
    layers = list(range(L))
    n = int(r.info.settings.get("n_prompts", len(r.clean)))
    prompts = f"{n} prompt{'s' if n != 1 else ''}"
    fig = go.Figure()
    for which, label in E4_CURVES:
        summaries = getattr(r, which.removesuffix("_patched") + "_summary")
        fig.add_trace(go.Scatter(
            x=layers, y=[s.mean for s in summaries], name=label, mode="lines+markers",
            error_y=dict(type="data", symmetric=False, array=[s.ci_high - s.mean for s in summaries],
                         arrayminus=[s.mean - s.ci_low for s in summaries]),
        ))
    _reference_line(fig, r.clean_summary.mean, f"recipient, unpatched<br>({r.clean_summary.mean:.2f})", "green")
    _reference_line(fig, r.donor_summary.mean, f"donor ({r.donor_summary.mean:.2f})", "red")
    _reference_line(fig, 0.0, "0: indifferent", "black", dash=None)
    fig.update_layout(
        title=_title(f"E4 ({r.info.model_name}, {prompts}): logit difference correct − wrong (nats) after patching one layer from the donor",
                     "mean over prompts; bars: 95% bootstrap CI; below 0 = the answer flipped to the donor's"),
        xaxis=_index_axis(L, "patched layer"), yaxis_title="logit difference (nats)")

    ratio = go.Figure()
    for which, label in E4_CURVES:
        value, low, high = (x.numpy() for x in r.prob_ratio(which, with_ci=True))
        ratio.add_trace(go.Scatter(x=layers, y=value, name=label, mode="lines+markers",
                                   error_y=dict(type="data", symmetric=False, array=high - value, arrayminus=value - low)))
    clean, donor = float(r.prob_ratio("clean")), float(r.prob_ratio("donor"))
    _reference_line(ratio, clean, f"recipient, unpatched<br>({clean:.3g})", "green", log=True)
    _reference_line(ratio, donor, f"donor ({donor:.3g})", "red", log=True)
    _reference_line(ratio, 1.0, "1: P(correct) = P(wrong)", "black", dash=None, log=True)
    ratio.update_layout(
        title=_title(f"E4 ({r.info.model_name}, {prompts}): probability ratio P(correct) / P(wrong) after patching one layer",
                     "exp(mean logit difference) = geometric mean of the per-prompt ratios; bars: 95% bootstrap CI; "
                     "log scale; below 1 = the answer flipped"),
        xaxis=_index_axis(L, "patched layer"), yaxis=dict(title="P(correct) / P(wrong) (log scale)", type="log", exponentformat="power"))
    return {"e4_logit_diff_by_layer": fig, "e4_prob_ratio_by_layer": ratio}


def e5_figures(r: E5Result) -> dict[str, go.Figure]:
    n = len(r.clean)
    heat = _heatmap(
        r.heatmap, f"E5 ({r.info.model_name}): change in logit difference (nats) from patching one head at the final position",
        f"patched − clean, mean over {n} prompt{'s' if n != 1 else ''} (clean {float(r.clean.mean()):.2f} nats); "
        f"{NEGATIVE_COLOUR} = lowers the logit difference (toward the donor's answer), {POSITIVE_COLOUR} = raises it",
        "Δ logit diff (nats)")
    summary = r.layer_summary()
    L = len(summary["mean_abs"])
    layers = list(range(L))
    bars = go.Figure([
        go.Bar(x=layers, y=summary["max"].numpy(), name="largest rise (most positive head)", marker_color=COLOURS["rise"]),
        go.Bar(x=layers, y=summary["min"].numpy(), name="largest fall (most negative head)", marker_color=COLOURS["fall"]),
        go.Scatter(x=layers, y=summary["mean_abs"].numpy(), name="mean |effect| over the layer's heads", mode="lines+markers",
                   line_color="black"),
    ])
    bars.add_hline(y=0, line_color="grey")
    bars.update_layout(
        title=_title(f"E5 ({r.info.model_name}): per-layer summary of single-head, final-position patches",
                     "change in logit difference (nats), patched − clean, heads' means over prompts"),
        xaxis=_index_axis(L, "layer"), yaxis_title="Δ logit difference (nats)", barmode="group")
    return {"e5_head_heatmap": heat, "e5_layer_summary": bars}


def circuit_figures(r) -> dict[str, go.Figure]:
    from tl_patching.circuit import circuit_figure

    return {"circuit_graph": circuit_figure(r)}


FIGURES = {"e1": e1_figures, "e2": e2_figures, "e3": e3_figures, "e4": e4_figures, "e5": e5_figures, "circuit": circuit_figures}
