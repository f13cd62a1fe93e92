"""E1 — attention-head isolation and the distribution of raw attention scores (seed 003).

Per head, the raw score of query i for key j is Q_i·K_jᵀ·scale before softmax; the causal mask sets
future keys to −inf, so the first token can only attend to itself (probability 1, by construction).
The seed found raw scores over visible positions shifted strongly negative rather than centred on
zero, and proposed per-layer kernel density estimates stacked by depth instead of scatter plots.

The scores are computed from Q and K as the attention uses them — after rotary embeddings and QK-norm
on families that have them (``hook_rot_q``/``hook_rot_k`` there, ``hook_q``/``hook_k`` on GPT-2), each
key/value head shared by its query heads on grouped-query models, with the family's scale and
soft-cap — and must equal ``hook_attn_scores``, the scores the model really applied (an error if not).
HF counterpart on GPT-2: the fused output of ``transformer.h[l].attn.c_attn`` split into Q, K, V.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import einops
import numpy as np
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from plotly.colors import sample_colorscale
from scipy.stats import gaussian_kde
from torch import Tensor

from tl_patching import lens
from tl_patching.edits import act_name
from tl_patching.experiments.spec import Experiment
from tl_patching.forward import Forward
from tl_patching.plotting import HEIGHT, NEGATIVE_COLOUR, POSITIVE_COLOUR, heatmap, titled
from tl_patching.prompts import start_token_setting, to_tokens
from tl_patching.report.words import SHIPPED_NAME, Claim
from tl_patching.results import Result, RunInfo

DEFAULT_TEXT = "Sam and Sally went to the park. Sam gave a gift to Sally"


@dataclass
class E1Result(Result):
    mean_score: Float[Tensor, "layer head"]  # mean raw score over visible (query, key) pairs
    frac_negative: Float[Tensor, "layer head"]  # fraction of visible raw scores < 0
    first_token_self_attention: Float[Tensor, "layer head"]  # pattern[0, 0] (must be 1)
    kde_grid: Float[Tensor, " grid"]
    kde_density: Float[Tensor, "layer grid"]  # density of all heads' visible raw scores per layer
    max_diff_split_vs_hook: float  # max |scores from Q·K − hook_attn_scores| / max |score|, visible positions
    score_formula: str = (
        "Q·Kᵀ/√d_head"  # the raw score as this family computes it (`score_formula`); results saved before it: GPT-2's
    )

    def reading(self) -> str:
        layers = self.mean_score.mean(-1)
        self_attention = (
            "is 1 in every head"
            if torch.allclose(self.first_token_self_attention, torch.tensor(1.0))
            else (f"ranges {self.first_token_self_attention.min():.4f}–{self.first_token_self_attention.max():.4f}")
        )
        return (
            f"mean raw score {self.mean_score.mean():.2f} over all heads ({self.frac_negative.mean():.0%} of visible "
            f"scores below 0; layer means from {layers.min():.2f} to {layers.max():.2f}); scores from the split Q and "
            f"K equal hook_attn_scores to {self.max_diff_split_vs_hook:.1e}; the first token's self-attention "
            f"{self_attention}, as the causal mask requires (a check, not a finding)"
        )


SPLIT_CHECK_TOLERANCE = 1e-4  # scores from Q·K vs hook_attn_scores, relative to the largest |score|


def qk_scores(cfg, q: Tensor, k: Tensor, layer: int) -> Float[Tensor, "batch head query_pos key_pos"]:
    """Raw scores from Q ``[batch, pos, head, d_head]`` and K (``n_key_value_heads`` heads on GQA models) as TL's
    attention computes them: Q·Kᵀ / attn_scale, soft-capped where the family does, future (and out-of-window)
    keys −inf."""
    if k.shape[2] != q.shape[2]:  # grouped-query: each key head serves n_heads / n_kv_heads query heads
        k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    scale = (cfg.attn_scale if cfg.use_attn_scale else 1.0) * (layer + 1 if cfg.scale_attn_by_inverse_layer_idx else 1)
    scores = einops.einsum(q, k, "b q h d, b k h d -> b h q k") / scale
    if cfg.attn_scores_soft_cap > 0:
        scores = cfg.attn_scores_soft_cap * torch.tanh(scores / cfg.attn_scores_soft_cap)
    n = scores.shape[-1]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    hidden = j > i
    window = cfg.window_size if cfg.attn_types is not None and cfg.attn_types[layer] == "local" else None
    if window is not None:
        hidden |= i - j >= window
    return scores.masked_fill(hidden, float("-inf"))


def score_formula(cfg) -> str:
    """The raw score `qk_scores` computes, in symbols, for the report and the figures' axes: the scale is 1/√d_head
    on most families, 1/√query_pre_attn_scalar on Gemma, also 1/(layer+1) under GPT-2's
    scale_attn_by_inverse_layer_idx; soft-capping (Gemma 2) wraps it in c·tanh(s/c)."""
    if not cfg.use_attn_scale:
        scale = ""
    elif "Gemma" in (cfg.original_architecture or ""):  # HF: query_pre_attn_scalar**-0.5, which need not be d_head's
        scale = "√query_pre_attn_scalar"
    elif np.isclose(cfg.attn_scale, np.sqrt(cfg.d_head)):
        scale = "√d_head"
    else:
        scale = f"{cfg.attn_scale:.4g}"
    if cfg.scale_attn_by_inverse_layer_idx:
        scale = f"({scale}·(layer+1))" if scale else "(layer+1)"
    formula = f"Q·Kᵀ/{scale}" if scale else "Q·Kᵀ"
    cap = cfg.attn_scores_soft_cap
    return f"{cap:g}·tanh(({formula})/{cap:g})" if cap > 0 else formula


def qk_names(cfg, layer: int) -> tuple[str, str]:
    """The hooks holding Q and K as the attention uses them: after rotation (and QK-norm) on rotary models."""
    rotary = cfg.positional_embedding_type == "rotary"
    return (
        (act_name("rot_q", layer), act_name("rot_k", layer)) if rotary else (act_name("q", layer), act_name("k", layer))
    )


def rotated_by_hf(model, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Q and K ``[batch, pos, head, d_head]`` before rotation, rotated as the HF model rotates them: its own rotary
    embedding and ``apply_rotary_pos_emb`` (partial rotary included), on the bridge's plain HF twin. For a bridge
    that never fires hook_rot_q/hook_rot_k (NeoX: the rotation happens inside the HF module)."""
    hf = lens.plain_hf(model)
    apply = sys.modules[type(hf).__module__].apply_rotary_pos_emb
    cos, sin = hf.base_model.rotary_emb(q, position_ids=torch.arange(q.shape[1])[None])
    return apply(q, k, cos, sin, unsqueeze_dim=2)


def raw_scores(forward: Forward, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(scores from Q·K, hook_attn_scores, hook_pattern), each ``[layer, batch, head, q, k]``."""
    from tl_patching.backends.tl import silent_hooks

    L = forward.cfg.n_layers
    attention = lens.attention_config(forward.model)  # a bridge's cfg leaves the scale and windows unset
    qk = [qk_names(attention, l) for l in range(L)]
    rotate_here = forward.backend == "tl" and qk[0][0] in silent_hooks(forward.model)
    if rotate_here:
        qk = [(act_name("q", l), act_name("k", l)) for l in range(L)]
    names = [n for l in range(L) for n in (*qk[l], act_name("attn_scores", l), act_name("pattern", l))]
    _, cache = forward.run(tokens, cache=names, cache_device="cpu")  # statistics on the CPU, in float32
    cache = {n: a.float() for n, a in cache.items()}
    pairs = [tuple(cache[n] for n in qk[l]) for l in range(L)]
    if rotate_here:
        pairs = [rotated_by_hf(forward.model, q, k) for q, k in pairs]
    split = torch.stack([qk_scores(attention, *pairs[l], l) for l in range(L)])
    by = lambda kind: torch.stack([cache[act_name(kind, l)] for l in range(L)])  # noqa: E731
    return split, by("attn_scores"), by("pattern")


def run(
    forward: Forward, text: str = DEFAULT_TEXT, prepend_bos: bool | None = None, grid_points: int = 200
) -> E1Result:
    """Raw-score statistics per layer × head, from Q and K at the hook points (the seed's method)."""
    prepend_bos = start_token_setting(forward.model, prepend_bos)  # None: the model's own convention
    tokens = to_tokens(forward.model, text, prepend_bos=prepend_bos)
    split, hooked, pattern = raw_scores(forward, tokens)
    visible = torch.isfinite(hooked)  # [layer, batch, head, q, k]: the mask the model applied (causal, windows)
    if not torch.equal(torch.isfinite(split), visible):
        raise ArithmeticError("E1: the attention mask computed here differs from the one the model applied")
    difference = float((split[visible] - hooked[visible]).abs().max() / hooked[visible].abs().max())
    tolerance = max(
        SPLIT_CHECK_TOLERANCE, 4 * torch.finfo(forward.cfg.dtype).eps
    )  # the model rounds its scores in bf16/fp16
    if difference > tolerance:
        raise ArithmeticError(
            f"E1: scores from Q·K differ from hook_attn_scores by {difference:.1e} (relative): "
            "this model's attention is not Q·Kᵀ/scale as computed here"
        )
    n_visible = visible.sum((1, 3, 4))  # [layer, head]
    scores = split.masked_fill(~visible, 0.0)
    per_layer = [split[l][visible[l]].numpy() for l in range(len(split))]
    grid = np.linspace(min(v.min() for v in per_layer), max(v.max() for v in per_layer), grid_points)
    density = np.stack([gaussian_kde(v)(grid) for v in per_layer])
    return E1Result(
        info=RunInfo.of(forward, tokens, prepend_bos, text=text),
        mean_score=scores.sum((1, 3, 4)) / n_visible,
        frac_negative=((split < 0) & visible).sum((1, 3, 4)) / n_visible,
        first_token_self_attention=pattern[:, 0, :, 0, 0],
        kde_grid=torch.tensor(grid, dtype=torch.float32),
        kde_density=torch.tensor(density, dtype=torch.float32),
        max_diff_split_vs_hook=difference,
        score_formula=score_formula(lens.attention_config(forward.model)),
    )


# --- the finding in words (the report's paragraph and its claims against the seed) ---


def finding(r) -> tuple[str, list[Claim]]:
    L, H = r.mean_score.shape
    layer_means = r.mean_score.mean(-1)
    lo, hi = int(layer_means.argmin()), int(layer_means.argmax())
    flat = r.mean_score.flatten()
    hmin, hmax = int(flat.argmin()), int(flat.argmax())
    mean, frac = float(r.mean_score.mean()), float(r.frac_negative.mean())
    self_attention = float(r.first_token_self_attention.min())
    text = (
        f"Over the visible (query, key) pairs of the sentence, the mean raw score {r.score_formula} of all {L * H} "
        f"heads is {mean:.2f}, and {frac:.0%} of the scores are below zero. Layer means run from "
        f"{float(layer_means[lo]):.2f} (layer {lo}) to {float(layer_means[hi]):.2f} (layer {hi}); single heads from "
        f"{float(flat[hmin]):.2f} (layer {hmin // H}, head {hmin % H}) to {float(flat[hmax]):.2f} (layer {hmax // H}, "
        f"head {hmax % H}). The density plot shows each layer's distribution on one scale. The first token attends to "
        f"itself with probability {self_attention:.4f} in every head: the causal mask leaves it nothing else to attend "
        "to, so this is true by construction (a check of the hooks, not a finding). Scores computed from the split Q "
        f"and K equal TransformerLens's hook_attn_scores to {r.max_diff_split_vs_hook:.1e}."
    )
    if mean < 0 and frac >= 0.6:
        verdict, because = "agrees", f"the scores are shifted below zero ({frac:.0%} negative)."
    elif mean < 0:
        verdict, because = (
            "partly",
            (
                f"the mean is below zero but only slightly: {frac:.0%} of the scores are negative, close to "
                "the 50% of a distribution centred on zero."
            ),
        )
    else:
        verdict, because = "differs", f"the scores are not shifted negative (mean {mean:.2f}, {frac:.0%} negative)."
    if verdict != "agrees":
        because += (
            " Softmax is unchanged when a constant is added to all of one query's scores, so training does not fix "
            "their overall level; whether it drifts negative depends on the weights and their training"
            + (
                ", and this model's training is far shorter and on far less varied text than GPT-2's."
                if r.info.model_name == SHIPPED_NAME
                else "."
            )
        )
    return text, [
        Claim(
            "raw scores over visible positions are shifted strongly negative rather than centred on zero",
            verdict,
            because,
        )
    ]


# --- figures ---


def figures(r: E1Result) -> dict[str, go.Figure]:
    model = r.info.model_name
    n_tokens = len(r.info.token_ids[0])
    mean = heatmap(
        r.mean_score,
        f"E1 ({model}): mean raw attention score {r.score_formula} per head (pre-softmax)",
        f"averaged over the visible (query, key) pairs of {n_tokens} tokens; overall mean "
        f"{float(r.mean_score.mean()):.2f}; {NEGATIVE_COLOUR} = below 0, {POSITIVE_COLOUR} = above 0",
        "mean raw score",
    )
    frac = heatmap(
        r.frac_negative,
        f"E1 ({model}): fraction of visible raw attention scores below 0, per head",
        f"0.5 = centred on zero; {NEGATIVE_COLOUR} = mostly negative (above 0.5), {POSITIVE_COLOUR} = mostly positive",
        "fraction < 0",
        centre=0.5,
        zrange=(0.0, 1.0),
        colorscale="RdBu",
    )
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
        fig.add_trace(
            go.Scatter(
                x=grid,
                y=np.full_like(grid, base),
                mode="lines",
                line=dict(width=0.5, color="lightgrey"),
                showlegend=False,
                hoverinfo="skip",
            )
        )
        fig.add_trace(
            go.Scatter(
                x=grid,
                y=density[l] + base,
                mode="lines",
                fill="tonexty",
                name=f"layer {l}",
                line=dict(width=1.5, color=colours[l]),
                fillcolor=colours[l].replace("rgb", "rgba").replace(")", ", 0.45)"),
                customdata=density[l],
                hovertemplate=f"layer {l}: score %{{x:.2f}}, density %{{customdata:.3f}}<extra></extra>",
            )
        )
        top = float(np.interp(mean_by_layer[l], grid, density[l]))
        fig.add_trace(
            go.Scatter(
                x=[mean_by_layer[l]] * 2,
                y=[base, base + top],
                mode="lines",
                line=dict(color="black", width=2),
                showlegend=False,
                hovertemplate=f"layer {l} mean: {mean_by_layer[l]:.2f}<extra></extra>",
            )
        )
    fig.add_vline(x=0, line_dash="dash", line_color="grey")
    # Density scale bar: a round density value drawn at the right edge, in the same units as every row.
    bar = (
        next(v for v in (1, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001) if v <= 0.9 * row)
        if row > 0.001
        else row
    )
    fig.add_shape(type="line", xref="paper", x0=1.02, x1=1.02, y0=0, y1=bar, line=dict(color="black", width=3))
    fig.add_annotation(
        xref="paper",
        x=1.02,
        y=bar / 2,
        text=f"density<br>{bar:g} per<br>score unit",
        showarrow=False,
        xanchor="left",
        xshift=6,
        font=dict(size=11),
    )
    fig.update_layout(
        title=titled(
            f"E1 ({r.info.model_name}): distribution of raw attention scores per layer (KDE over all heads)",
            "each layer's density rises from its own baseline, all on one scale (bar on the right); "
            "dashed line = 0, black tick = the layer's mean",
        ),
        xaxis=dict(title=f"raw attention score {r.score_formula} (pre-softmax, visible positions)"),
        margin=dict(r=110),
        yaxis=dict(
            title="layer (baseline of each density)",
            tickmode="array",
            tickvals=[(L - 1 - l) * row for l in range(L)],
            ticktext=[str(l) for l in range(L)],
            range=[-0.05 * row, L * row],
            showgrid=False,
            zeroline=False,
        ),
        showlegend=False,
        height=max(HEIGHT, 150 + 45 * L),
    )
    return fig


EXPERIMENT = Experiment(
    key="e1",
    title="E1 — raw attention scores per head and their distribution per layer",
    seed="seed 003",
    seed_model="GPT-2 small",
    inputs="text",
    order=1,
    run=run,
    result=E1Result,
    figures=figures,
    finding=finding,
)
