"""Plotly figures for E1–E5: interactive HTML that opens offline, plus a PNG where a browser is available.

HTML files share one local ``plotly.min.js`` in their folder (no CDN, no network). PNG export goes
through kaleido, which needs a Chrome/Chromium (Debian: ``apt-get install -y chromium``); without one
it is skipped with a single message, never an error.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from tl_patching.experiments.e1_attention_scores import E1Result
from tl_patching.experiments.e2_activation_editing import E2Result
from tl_patching.experiments.e3_cosine_similarity import E3Result
from tl_patching.experiments.e4_ioi_patching import E4Result
from tl_patching.experiments.e5_head_token_patching import E5Result

_png_ok: bool | None = None  # None: not tried yet


def save(fig: go.Figure, out_dir: Path, name: str, png: bool = True) -> list[Path]:
    """Write ``name.html`` (and ``name.png`` if a browser is available); returns the files written."""
    global _png_ok
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.update_layout(template="plotly_white", font=dict(size=13), legend=dict(orientation="h", y=-0.18))
    title = fig.layout.title.text or ""
    if len(title) > 80 and "<br>" not in title and ": " in title:  # long titles: headline + subtitle, readable in a PNG
        head, rest = title.split(": ", 1)
        fig.update_layout(title_text=f"{head}<br><sup>{rest}</sup>")
    fig.for_each_xaxis(lambda axis: axis.update(dtick=1) if "layer" in (axis.title.text or "") else None)
    html = out_dir / f"{name}.html"
    fig.write_html(html, include_plotlyjs="directory")
    written = [html]
    if png and _png_ok is not False:
        try:
            fig.write_image(out_dir / f"{name}.png", width=1000, height=600, scale=1)
            written.append(out_dir / f"{name}.png")
            _png_ok = True
        except Exception as e:  # kaleido raises several types when no browser is found
            _png_ok = False
            print(f"note: static PNG export skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                  "interactive HTML is written. Install Chromium (apt-get install -y chromium) for PNGs.", file=sys.stderr)
    return written


def _heatmap(z, title: str, colorbar: str, x_title="head", y_title="layer", diverging=True) -> go.Figure:
    z = np.asarray(z)
    limit = float(np.abs(z).max()) or 1.0
    fig = go.Figure(go.Heatmap(
        z=z, colorscale="RdBu" if diverging else "Viridis", zmid=0 if diverging else None,
        zmin=-limit if diverging else None, zmax=limit if diverging else None, colorbar=dict(title=colorbar),
        hovertemplate=f"{y_title} %{{y}}, {x_title} %{{x}}: %{{z:.3f}}<extra></extra>",
    ))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, yaxis_autorange="reversed")
    return fig


def e1_figures(r: E1Result) -> dict[str, go.Figure]:
    model = r.info.model_name
    mean = _heatmap(r.mean_score, f"E1 ({model}): mean raw attention score Q·Kᵀ/√d_head over visible positions",
                    "mean raw score")
    frac = _heatmap(r.frac_negative, f"E1 ({model}): fraction of visible raw scores below 0 (0.5 = centred)",
                    "fraction < 0", diverging=False)
    # Laminar profile: one KDE per layer, offset by depth, so the shift of the distribution reads top to bottom.
    grid, density = r.kde_grid.numpy(), r.kde_density.numpy()
    offset = 0.8 * density.max()
    ridge = go.Figure()
    for l in range(len(density) - 1, -1, -1):
        base = l * offset
        ridge.add_trace(go.Scatter(x=grid, y=np.full_like(grid, base), mode="lines", line=dict(width=0), showlegend=False, hoverinfo="skip"))
        ridge.add_trace(go.Scatter(x=grid, y=density[l] + base, mode="lines", fill="tonexty", name=f"layer {l}",
                                   line=dict(width=1), hovertemplate=f"layer {l}: score %{{x:.2f}}<extra></extra>"))
    ridge.add_vline(x=0, line_dash="dash", line_color="grey")
    ridge.update_layout(
        title=f"E1 ({model}): density of raw scores per layer (KDE), stacked by depth; dashed line = 0",
        xaxis_title="raw attention score (pre-softmax, visible positions)", yaxis_title="layer (density offset by depth)",
        yaxis=dict(tickvals=[l * offset for l in range(len(density))], ticktext=[str(l) for l in range(len(density))], autorange="reversed"),
        showlegend=False,
    )
    return {"e1_mean_raw_score": mean, "e1_fraction_negative": frac, "e1_kde_by_layer": ridge}


def e2_figures(r: E2Result) -> dict[str, go.Figure]:
    layers = list(range(len(r.clean_resid_std)))
    figs = {}
    for i, iv in enumerate(r.interventions):
        fig = go.Figure([
            go.Scatter(x=layers, y=r.clean_resid_std.numpy(), name="clean", mode="lines+markers"),
            go.Scatter(x=layers, y=iv.resid_std.numpy(), name="edited", mode="lines+markers"),
        ])
        fig.add_vline(x=r.layer, line_dash="dot", line_color="grey", annotation_text="edited layer")
        fig.update_layout(
            title=f"E2 ({r.info.model_name}): {iv.label} — std of hook_resid_post per layer<br>"
                  f"<sup>top-1 clean {r.clean_top_tokens[0]!r} → edited {iv.top_tokens[0]!r}; KL(clean‖edited) = {iv.kl_from_clean:.3f} nats</sup>",
            xaxis_title="layer (block output, before ln_final)", yaxis_title="standard deviation (log scale)", yaxis_type="log",
        )
        figs[f"e2_{i + 1}_resid_std"] = fig
    return figs


def e3_figures(r: E3Result) -> dict[str, go.Figure]:
    layers = np.arange(len(r.clean_pairs))
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.6, 0.4], vertical_spacing=0.08,
                        subplot_titles=("mean cosine similarity of the M(M−1)/2 token pairs (band: 25–75%)",
                                        "paired t-test, −log10 p (dashed: Bonferroni 0.05/n_layers)"))
    for name, pairs in (("clean", r.clean_pairs), ("silenced", r.silenced_pairs)):
        q = np.quantile(pairs.numpy(), [0.25, 0.75], axis=1)
        fig.add_trace(go.Scatter(x=np.r_[layers, layers[::-1]], y=np.r_[q[1], q[0][::-1]], fill="toself", opacity=0.2,
                                 line=dict(width=0), showlegend=False, hoverinfo="skip", legendgroup=name), row=1, col=1)
        fig.add_trace(go.Scatter(x=layers, y=pairs.mean(1).numpy(), name=name, mode="lines+markers", legendgroup=name), row=1, col=1)
    neglog = -np.log10(np.clip(r.p_value.numpy(), 1e-300, 1))
    fig.add_trace(go.Bar(x=layers, y=neglog, marker_color=["crimson" if s else "lightgrey" for s in r.significant],
                         name="significant (red)", showlegend=False), row=2, col=1)
    fig.add_hline(y=-np.log10(r.threshold), line_dash="dash", row=2, col=1)
    fig.add_vline(x=r.layer, line_dash="dot", line_color="grey")
    fig.update_layout(title=f"E3 ({r.info.model_name}): silencing head {r.head} of layer {r.layer} — token-pair cosine similarity, "
                            f"{sum(r.significant)} of {len(layers)} layers significant", height=700)
    fig.update_xaxes(title_text="layer (hook_resid_post)", row=2, col=1)
    fig.update_yaxes(title_text="cosine similarity", row=1, col=1)
    fig.update_yaxes(title_text="−log10 p", row=2, col=1)
    return {"e3_cosine_similarity": fig}


def e4_figures(r: E4Result) -> dict[str, go.Figure]:
    layers = list(range(r.heads_patched.shape[0]))
    fig = go.Figure()
    for label, which, summaries in (
        ("all heads of the layer (hook_z, all positions)", "heads_patched", r.heads_summary),
        ("hook_resid_post at the repeated name (S2)", "resid_s2_patched", r.resid_s2_summary),
        ("hook_resid_post at the final position", "resid_final_patched", r.resid_final_summary),
    ):
        fig.add_trace(go.Scatter(
            x=layers, y=[s.mean for s in summaries], name=label, mode="lines+markers",
            error_y=dict(type="data", symmetric=False, array=[s.ci_high - s.mean for s in summaries],
                         arrayminus=[s.mean - s.ci_low for s in summaries]),
        ))
    fig.add_hline(y=r.clean_summary.mean, line_dash="dash", line_color="green", annotation_text="recipient (clean)")
    fig.add_hline(y=r.donor_summary.mean, line_dash="dash", line_color="red", annotation_text="donor")
    fig.add_hline(y=0, line_color="grey")
    n = r.info.settings.get("n_prompts", len(r.clean))
    fig.update_layout(title=f"E4 ({r.info.model_name}, {n} prompt{'s' if n > 1 else ''}): logit difference correct − wrong after patching "
                            "from the donor (below 0 = answer flipped; bars: bootstrap 95% CI)",
                      xaxis_title="patched layer", yaxis_title="logit difference (nats)")
    ratio = go.Figure([go.Scatter(x=layers, y=r.prob_ratio(w).numpy(), name=name, mode="lines+markers")
                       for name, w in (("all heads", "heads_patched"), ("resid at S2", "resid_s2_patched"), ("resid at final", "resid_final_patched"))])
    ratio.update_layout(title=f"E4 ({r.info.model_name}): probability ratio P(correct)/P(wrong) after patching (log scale; 1 = indifferent)",
                        xaxis_title="patched layer", yaxis_title="P(correct) / P(wrong)", yaxis_type="log")
    return {"e4_logit_diff_by_layer": fig, "e4_prob_ratio_by_layer": ratio}


def e5_figures(r: E5Result) -> dict[str, go.Figure]:
    heat = _heatmap(r.heatmap, f"E5 ({r.info.model_name}): change in logit difference from patching one head at the final position "
                               f"(clean {r.clean.mean():.2f} nats; red raises, blue lowers)", "Δ logit diff (nats)")
    summary = r.layer_summary()
    layers = list(range(len(summary["mean_abs"])))
    bars = go.Figure([
        go.Bar(x=layers, y=summary["max"].numpy(), name="largest rise"),
        go.Bar(x=layers, y=summary["min"].numpy(), name="largest fall"),
        go.Scatter(x=layers, y=summary["mean_abs"].numpy(), name="mean |effect|", mode="lines+markers"),
    ])
    bars.update_layout(title=f"E5 ({r.info.model_name}): per-layer summary of single-head, final-position patches",
                       xaxis_title="layer", yaxis_title="Δ logit difference (nats)", barmode="overlay")
    return {"e5_head_heatmap": heat, "e5_layer_summary": bars}


FIGURES = {"e1": e1_figures, "e2": e2_figures, "e3": e3_figures, "e4": e4_figures, "e5": e5_figures}
