"""E3 — silencing one head and the cosine similarity between token representations (seed 002).

Zero one head's output before the W_O mix — TL ``blocks.l.attn.hook_z[:, :, head] = 0`` ↔ a forward
pre-hook on HF ``h[l].attn.c_proj`` zeroing that head's d_head slice. At every layer, take the residual
stream (``blocks.l.hook_resid_post``) of the M tokens, compute the cosine similarity of every pair and
keep the M(M−1)/2 unique pairs (upper triangle without the diagonal). Compare clean vs silenced with a
paired t-test per layer (the same token pairs in both runs), significant below the Bonferroni threshold
0.05 / n_layers.

Seed (GPT-2 medium, layer 3): similarity falls in early layers and rises toward 1 late; the silenced
run differs little at the silenced layer and consistently by layers 20–24 ("ripple effect").
Needs raw weights: processed weights centre the residual stream, which changes cosine similarities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from plotly.subplots import make_subplots
from scipy import stats
from torch import Tensor

from tl_patching.edits import act_name, zero
from tl_patching.experiments.spec import Experiment, Option
from tl_patching.forward import Forward
from tl_patching.plotting import COLOURS, index_axis, rgba, titled
from tl_patching.prompts import PIZZA_SENTENCE, start_token_setting, to_tokens
from tl_patching.report.words import Claim, at_layers
from tl_patching.results import Result, RunInfo

DEFAULT_TEXT = PIZZA_SENTENCE


@dataclass
class E3Result(Result):
    layer: int  # silenced layer
    head: int  # silenced head
    n_pairs: int  # M(M−1)/2
    clean_pairs: Float[Tensor, "layer pair"]  # cosine similarity of every unique token pair
    silenced_pairs: Float[Tensor, "layer pair"]
    t_statistic: Float[Tensor, " layer"]  # paired t (silenced − clean); 0 where the runs are identical
    p_value: Float[Tensor, " layer"]  # 1 where the runs are identical
    threshold: float  # Bonferroni 0.05 / n_layers
    significant: list[bool]

    def reading(self) -> str:
        sig = [l for l, s in enumerate(self.significant) if s]
        mean = self.clean_pairs.mean(1)
        return (
            f"clean mean similarity {mean[0]:.2f} (layer 0) → min {mean.min():.2f} (layer {int(mean.argmin())}) → "
            f"{mean[-1]:.2f} (last layer); silencing head {self.head} of layer {self.layer} differs significantly (p < "
            f"{self.threshold:.4f}) "
            + (f"at layer{'s' if len(sig) > 1 else ''} {', '.join(map(str, sig))}" if sig else "at no layer")
        )


def unique_pair_similarities(resid: Float[Tensor, "pos d_model"]) -> Float[Tensor, " pair"]:
    """Cosine similarity of each of the M(M−1)/2 unordered token pairs (i < j)."""
    unit = torch.nn.functional.normalize(resid, dim=-1)
    sims = unit @ unit.T
    i, j = torch.triu_indices(len(resid), len(resid), offset=1)
    return sims[i, j]


def paired_t_test(clean: Tensor, silenced: Tensor) -> tuple[float, float]:
    """(t, p) of scipy's paired t-test; (0, 1) when the two runs are identical (no variance to test)."""
    diff = (silenced - clean).double()
    if diff.abs().max() == 0:
        return 0.0, 1.0
    test = stats.ttest_rel(silenced.double().numpy(), clean.double().numpy())
    return float(test.statistic), float(test.pvalue)


def bonferroni(p_values: list[float], alpha: float = 0.05) -> tuple[float, list[bool]]:
    """(threshold alpha / n_tests, which p-values fall below it)."""
    threshold = alpha / len(p_values)
    return threshold, [p < threshold for p in p_values]


def default_layer(n_layers: int) -> int:
    """The seed's layer 3 on 24-layer GPT-2 medium; n_layers / 8 otherwise."""
    return 3 if n_layers == 24 else round(n_layers / 8)


def run(
    forward: Forward,
    text: str = DEFAULT_TEXT,
    layer: int | None = None,
    head: int = 0,
    prepend_bos: bool | None = None,
    alpha: float = 0.05,
) -> E3Result:
    """Clean vs head-silenced cosine similarities per layer. BOS is off by default, as in the seed's HF
    tokenisation (and because BOS's large norm dominates every similarity with it)."""
    if forward.weight_mode != "raw":
        raise ValueError(
            "E3 needs raw weights: weight processing centres the residual stream, which changes cosine "
            "similarities. Load with tl_patching.load_model(name, weights='raw') (TransformerLens: "
            "HookedTransformer.from_pretrained_no_processing)"
        )
    cfg = forward.cfg
    layer = default_layer(cfg.n_layers) if layer is None else layer
    if not 0 <= layer < cfg.n_layers:
        raise IndexError(f"layer {layer} out of range: the model has {cfg.n_layers} layers (0..{cfg.n_layers - 1})")
    if not 0 <= head < cfg.n_heads:
        raise IndexError(f"head {head} out of range: the model has {cfg.n_heads} heads (0..{cfg.n_heads - 1})")
    edit = zero(act_name("z", layer), head=head)
    prepend_bos = start_token_setting(forward.model, prepend_bos)  # None: the model's own convention
    tokens = to_tokens(forward.model, text, prepend_bos=prepend_bos)
    if tokens.shape[1] < 3:
        raise ValueError(f"E3 needs a text of at least 3 tokens, got {tokens.shape[1]}")
    resid = [act_name("resid_post", l) for l in range(cfg.n_layers)]
    clean = forward.run(tokens, cache=resid, cache_device="cpu")[1]  # statistics on the CPU, in float32
    silenced = forward.run(tokens, [edit], cache=resid, cache_device="cpu")[1]
    clean_pairs = torch.stack([unique_pair_similarities(clean[n][0].float()) for n in resid])
    silenced_pairs = torch.stack([unique_pair_similarities(silenced[n][0].float()) for n in resid])
    tests = [paired_t_test(c, s) for c, s in zip(clean_pairs, silenced_pairs)]
    threshold, significant = bonferroni([p for _, p in tests], alpha)  # one test per layer
    return E3Result(
        info=RunInfo.of(forward, tokens, prepend_bos, text=text, alpha=alpha),
        layer=layer,
        head=head,
        n_pairs=clean_pairs.shape[1],
        clean_pairs=clean_pairs,
        silenced_pairs=silenced_pairs,
        t_statistic=torch.tensor([t for t, _ in tests]),
        p_value=torch.tensor([p for _, p in tests], dtype=torch.float64),
        threshold=threshold,
        significant=significant,
    )


def data_note(r: E3Result) -> str:
    return f"Silenced: head {r.head} of layer {r.layer}."


# --- the finding in words (the report's paragraph and its claims against the seed) ---


def finding(r) -> tuple[str, list[Claim]]:
    L = len(r.clean_pairs)
    clean, silenced = r.clean_pairs.mean(1), r.silenced_pairs.mean(1)
    m = round((1 + math.sqrt(1 + 8 * r.n_pairs)) / 2)
    lo = int(clean.argmin())
    sig = [l for l, s in enumerate(r.significant) if s]
    diff = silenced - clean
    big = int(diff.abs().argmax())
    alpha = r.info.settings.get("alpha", 0.05)  # E3's family-wise level (a run option)
    text = (
        f"On the sentence ({m} tokens) every pair of token vectors is compared: M(M−1)/2 = {r.n_pairs} pairs for M = "
        f"{m} tokens. The clean mean cosine similarity is {float(clean[0]):.2f} at layer 0, lowest "
        f"({float(clean[lo]):.2f}) at layer {lo}, and {float(clean[-1]):.2f} at the last layer ({L - 1}). Silencing "
        f"head {r.head} of layer {r.layer} changes the mean similarity by up to {abs(float(diff[big])):.3f} (at layer "
        f"{big}, {'lower' if float(diff[big]) < 0 else 'higher'}); a paired t-test over the same pairs, significant "
        f"below the Bonferroni threshold {alpha:g}/{L} = {r.threshold:.4g}, finds a difference {at_layers(sig)}"
        + (f" and none {at_layers([l for l in range(L) if l not in sig])}" if sig and len(sig) < L else "")
        + "."
    )
    falls = float(clean[: max(1, L // 2) + 1].min()) < float(clean[0]) - 0.02
    rises = float(clean[-1]) - float(clean.min()) > 0.1
    shape_verdict = "agrees" if falls and rises else "partly" if falls or rises else "differs"
    claims = [
        Claim(
            "similarity falls in early layers and rises toward 1 late",
            shape_verdict,
            f"here it {'falls' if falls else 'does not fall'} early and {'rises' if rises else 'does not rise again'} "
            f"late ({float(clean[0]):.2f} → {float(clean.min()):.2f} → {float(clean[-1]):.2f})."
            + (
                ""
                if rises or L >= 24
                else f" The seed's rise was over the last layers of a 24-layer model; this one "
                f"has {L} layers in all, so it has no such late stretch."
            ),
        )
    ]
    at_silenced, at_end = r.layer in sig, (L - 1) in sig
    ripple = (not at_silenced) and at_end
    why = [f"significant {at_layers(sig)}"]
    if at_silenced:
        why.append(
            f"hook_resid_post of layer {r.layer} already contains the head's output, so silencing it shows at once"
            + (
                f"; with {r.info.n_heads} heads per layer one head is a large share of that layer's attention "
                "(GPT-2 medium: 1 of 16)"
                if r.info.n_heads < 16
                else ""
            )
        )
    if not at_end:
        why.append(
            "the effect fades before the last layer instead of spreading"
            + (f"; with {L} layers there is little depth to ripple through" if L < 24 else "")
        )
    claims.append(
        Claim(
            "silencing differs little at the silenced layer and consistently in the last layers (a ripple effect)",
            "agrees" if ripple else "partly" if at_end or not at_silenced else "differs",
            "; ".join(why) + ".",
        )
    )
    return text, claims


# --- figures ---


def figures(r: E3Result) -> dict[str, go.Figure]:
    L = len(r.clean_pairs)
    layers = np.arange(L)
    m = round((1 + math.sqrt(1 + 8 * r.n_pairs)) / 2)  # n_pairs = M(M−1)/2
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        row_heights=[0.6, 0.4],
        vertical_spacing=0.1,
        subplot_titles=(
            f"cosine similarity of token pairs: mean over all {r.n_pairs} pairs of the {m} tokens; "
            "band: middle 50% of pairs",
            "paired t-test, silenced vs clean, per layer: −log10 p (significant above the dashed Bonferroni line)",
        ),
    )
    for name, pairs in (("clean", r.clean_pairs), ("silenced", r.silenced_pairs)):
        colour = COLOURS[name]
        q = np.quantile(pairs.numpy(), [0.25, 0.75], axis=1)
        fig.add_trace(
            go.Scatter(
                x=np.r_[layers, layers[::-1]],
                y=np.r_[q[1], q[0][::-1]],
                mode="lines",
                fill="toself",
                fillcolor=rgba(colour, 0.18),
                line=dict(width=0),
                name=f"{name}: 25th–75th percentile of pairs",
                legendgroup=name,
                hoverinfo="skip",
            ),
            row=1,
            col=1,
        )
        fig.add_trace(
            go.Scatter(
                x=layers,
                y=pairs.mean(1).numpy(),
                name=f"{name}: mean",
                mode="lines+markers",
                line=dict(color=colour, width=2.5),
                legendgroup=name,
            ),
            row=1,
            col=1,
        )
    neglog = -np.log10(np.clip(r.p_value.numpy(), 1e-300, 1))
    sig = np.array(r.significant, dtype=bool)
    for label, mask, colour in (("significant", sig, "crimson"), ("not significant", ~sig, "lightgrey")):
        fig.add_trace(go.Bar(x=layers[mask], y=neglog[mask], marker_color=colour, name=f"layer {label}"), row=2, col=1)
    fig.add_trace(
        go.Scatter(
            x=[-0.5, L - 0.5],
            y=[-np.log10(r.threshold)] * 2,
            mode="lines",
            line=dict(dash="dash", color="black"),
            name=f"Bonferroni threshold p = 0.05/{L} = {r.threshold:.4g}",
        ),
        row=2,
        col=1,
    )
    for row in (1, 2):
        fig.add_vline(x=r.layer, line_dash="dot", line_color="grey", row=row, col=1)
    fig.add_annotation(
        x=r.layer,
        y=1,
        yref="y domain",
        text=f"head {r.head} silenced here",
        showarrow=False,
        xanchor="left",
        xshift=4,
        font=dict(size=11, color="grey"),
        row=1,
        col=1,
    )
    n_sig = int(sig.sum())
    fig.update_layout(
        title=titled(
            f"E3 ({r.info.model_name}): silencing head {r.head} of layer {r.layer}: "
            "cosine similarity between token vectors",
            f"hook_resid_post at every layer; {n_sig} of {L} layers differ significantly (paired t-test over the "
            f"{r.n_pairs} token pairs)",
        ),
        height=760,
        legend=dict(orientation="h", y=-0.12),
    )
    fig.update_xaxes(**{k: v for k, v in index_axis(L, "").items() if k != "title"})
    fig.update_xaxes(title_text="layer (hook_resid_post)", row=2, col=1)
    fig.update_yaxes(title_text="cosine similarity", row=1, col=1)
    fig.update_yaxes(title_text="−log10 p", row=2, col=1)
    return {"e3_cosine_similarity": fig}


EXPERIMENT = Experiment(
    key="e3",
    title="E3 — silencing one head: cosine similarity between token vectors",
    seed="seed 002",
    seed_model="GPT-2 medium",
    inputs="text",
    order=3,
    options=(
        Option("--layer", "int", "silenced layer (default: 3 on 24-layer models, the seed; else n_layers/8)"),
        Option("--head", "int", "silenced head (default 0)"),
    ),
    run=run,
    result=E3Result,
    figures=figures,
    finding=finding,
    data_note=data_note,
)
