"""E2 — editing attention, MLP neurons and hidden states, with the downstream effect layer by layer (seed 004).

Four interventions, each an `Edit`:

1. zero the key of one head at one layer — TL ``blocks.l.attn.hook_k[:, :, head] = 0``; HF: columns
   d_model + head·d_head … of the fused ``c_attn`` output (768+128 … 768+191 for GPT-2 small, head 2). Under
   grouped-query attention a head has no key of its own: the key/value head it reads is zeroed (``hook_k`` is
   indexed by key/value head; HF: that head's slice of ``k_proj``), which changes every head of its group;
2. replace the even MLP neurons (0, 2, 4, …) after GELU by seeded Gaussian noise of mean 10 —
   ``blocks.l.mlp.hook_post[..., ::2]`` ↔ output of ``h[l].mlp.act``;
3. and 4. scale the output of one block by 0.1 and by 10 — ``blocks.l.hook_resid_post`` ↔ output of ``h[l]``.

Effect: the standard deviation of the residual stream (``hook_resid_post``, over positions and d_model)
per layer, clean vs edited, and the change in the top-k next-token predictions at the final position.
Seed (GPT-2 small, block 9): at ×0.1 the spread collapses at that layer and recovers later; at ×10 it
explodes and the last layer compresses it. The last layer here is ``blocks.{L-1}.hook_resid_post``,
*before* ``ln_final`` (HF's ``hidden_states[-1]`` is after it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor, nn

from tl_patching import lens
from tl_patching.backends import hf
from tl_patching.backends.hf_maps import hook_map_of
from tl_patching.edits import Edit, act_name, gaussian_noise, scale, zero
from tl_patching.experiments.spec import Experiment, Option
from tl_patching.forward import Forward
from tl_patching.plotting import COLOURS, index_axis, log_axis, rgba, titled
from tl_patching.prompts import start_token_setting, to_tokens, token_strings
from tl_patching.report.words import Claim, listing
from tl_patching.results import Result, RunInfo

DEFAULT_TEXT = "Sam and Sally went to the park. Sam gave a gift to"


@dataclass
class Intervention:
    label: str
    resid_std: Float[Tensor, " layer"]  # std of hook_resid_post per layer, edited run
    top_tokens: list[str]  # top-k next tokens, edited run
    top_probs: list[float]
    clean_top1_prob: float  # probability the edited run gives the clean run's top token
    kl_from_clean: float  # KL(clean ‖ edited) of the next-token distribution, nats


@dataclass
class E2Result(Result):
    layer: int
    head: int
    clean_resid_std: Float[Tensor, " layer"]
    clean_top_tokens: list[str]
    clean_top_probs: list[float]
    interventions: list[Intervention] = field(default_factory=list)
    block_output_structure: dict[str, str] = field(default_factory=dict)

    def reading(self) -> str:
        last = len(self.clean_resid_std) - 1
        parts = [
            f"{iv.label}: std at layer {self.layer} "
            f"{self.clean_resid_std[self.layer]:.2f}→{iv.resid_std[self.layer]:.2f}, last layer "
            f"{self.clean_resid_std[last]:.2f}→{iv.resid_std[last]:.2f}, top-1 "
            f"{self.clean_top_tokens[0]!r}→{iv.top_tokens[0]!r}"
            for iv in self.interventions
        ]
        return "; ".join(parts)


def default_layer(n_layers: int) -> int:
    """The seed's block 9 on 12-layer GPT-2 small; three quarters of the depth otherwise."""
    return 9 if n_layers == 12 else round(0.75 * (n_layers - 1))


def interventions(cfg, layer: int, head: int, noise_mean: float, seed: int) -> dict[str, list[Edit]]:
    """The seed's four edits, checked against the model's sizes before anything runs."""
    if not 0 <= layer < cfg.n_layers:
        raise IndexError(f"layer {layer} out of range: the model has {cfg.n_layers} layers (0..{cfg.n_layers - 1})")
    if not 0 <= head < cfg.n_heads:
        raise IndexError(f"head {head} out of range: the model has {cfg.n_heads} heads (0..{cfg.n_heads - 1})")
    return {
        key_label(cfg, layer, head): [zero(act_name("k", layer), head=lens.kv_head_of(cfg, head))],
        f"even MLP neurons → N({noise_mean:g}, 1), layer {layer}": [
            gaussian_noise(act_name("post", layer), mean=noise_mean, std=1.0, seed=seed, neurons=slice(0, None, 2))
        ],
        f"block {layer} output × 0.1": [scale(act_name("resid_post", layer), 0.1)],
        f"block {layer} output × 10": [scale(act_name("resid_post", layer), 10.0)],
    }


def key_label(cfg, layer: int, head: int) -> str:
    """What the first edit zeroes, in words. Under grouped-query attention there is no key of one query head: head
    ``head`` reads a key/value head shared by its group, and zeroing it changes every head of that group."""
    group = lens.kv_group(cfg)
    if group == 1:
        return f"zero key of head {head}, layer {layer}"
    kv = lens.kv_head_of(cfg, head)
    return (
        f"zero key of head {head} (key/value head {kv}, shared by query heads {kv * group}–{kv * group + group - 1}), "
        f"layer {layer}"
    )


def block_output_structure(hf_model: nn.Module, tokens: Tensor) -> dict[str, str]:
    """What block 0 of the HF model returns in the installed transformers, with and without ``output_attentions``.

    The seeds index ``output[0]`` / ``output[1:]``; transformers 5 returns a plain tensor.
    """
    block = hf_model.get_submodule(hook_map_of(hf_model).sites["hook_resid_post"].module.format(l=0))
    seen: dict[str, str] = {}

    def describe(output) -> str:
        if isinstance(output, tuple):
            parts = ", ".join("None" if o is None else f"Tensor{tuple(o.shape)}" for o in output)
            return f"tuple of {len(output)}: ({parts})"
        return f"Tensor{tuple(output.shape)}"

    for flag in (False, True):
        with hf.same_hooks(hf_model), torch.no_grad():  # transformers keeps the recorders output_attentions installs
            block.register_forward_hook(
                lambda m, a, out, flag=flag: seen.__setitem__(f"output_attentions={flag}", describe(out))
            )
            hf_model(tokens, output_attentions=flag)
    return seen


def run(
    forward: Forward,
    text: str = DEFAULT_TEXT,
    layer: int | None = None,
    head: int = 2,
    noise_mean: float = 10.0,
    seed: int = 0,
    top_k: int = 5,
    prepend_bos: bool | None = None,
) -> E2Result:
    """Run the four interventions through the forward's backend; the residual spread per layer and top-k tokens."""
    cfg = forward.cfg
    layer = default_layer(cfg.n_layers) if layer is None else layer
    edits = interventions(cfg, layer, head, noise_mean, seed)
    prepend_bos = start_token_setting(forward.model, prepend_bos)  # None: the model's own convention
    tokens = to_tokens(forward.model, text, prepend_bos=prepend_bos)
    resid = [act_name("resid_post", l) for l in range(cfg.n_layers)]

    def spread_and_probs(e: list[Edit]) -> tuple[Tensor, Tensor]:
        logits, cache = forward.run(tokens, e, resid, cache_device="cpu")  # statistics on the CPU, in float32
        return torch.stack([cache[n].float().std() for n in resid]), logits[0, -1].float().cpu().log_softmax(-1)

    clean_std, clean_logp = spread_and_probs([])
    clean_top = clean_logp.topk(top_k)
    result = E2Result(
        info=RunInfo.of(forward, tokens, prepend_bos, seed=seed, text=text, noise_mean=noise_mean),
        layer=layer,
        head=head,
        clean_resid_std=clean_std,
        clean_top_tokens=token_strings(forward.model, clean_top.indices),
        clean_top_probs=clean_top.values.exp().tolist(),
        block_output_structure=block_output_structure(forward.hf_model, tokens) if forward.hf_model is not None else {},
    )
    for label, e in edits.items():
        std, logp = spread_and_probs(e)
        top = logp.topk(top_k)
        result.interventions.append(
            Intervention(
                label,
                std,
                token_strings(forward.model, top.indices),
                top.values.exp().tolist(),
                clean_top1_prob=float(logp[clean_top.indices[0]].exp()),
                kl_from_clean=float((clean_logp.exp() * (clean_logp - logp)).sum()),
            )
        )
    return result


def data_note(r: E2Result) -> str:
    return f"Edits at layer {r.layer} (head {r.head} for the key)."


def conclusion(r: E2Result) -> str | None:
    """How much of a scaled block output the later blocks restore, at the last layer."""
    last = len(r.clean_resid_std) - 1
    scaled = [
        (iv.label.rsplit(" ", 1)[-1], float(iv.resid_std[last] / r.clean_resid_std[last]))
        for iv in r.interventions
        if "output ×" in iv.label
    ]
    if not scaled or r.layer >= last:
        return None
    return (
        f"After block {r.layer}'s output is scaled, the spread of the residual stream at the last layer is "
        + listing(
            [
                f"×{end:.2f} of clean after ×{factor} ("
                + (
                    "partly restored by the later blocks"
                    if abs(math.log(end)) < 0.5 * abs(math.log(float(factor)))
                    else "not restored"
                )
                + ")"
                for factor, end in scaled
            ]
        )
        + " (E2)."
    )


# --- the finding in words (the report's paragraph and its claims against the seed) ---


def finding(r) -> tuple[str, list[Claim]]:
    L, l = len(r.clean_resid_std), r.layer
    last = L - 1
    clean = r.clean_resid_std
    sentences, by_factor = [], {}
    for iv in r.interventions:
        at, end = float(iv.resid_std[l] / clean[l]), float(iv.resid_std[last] / clean[last])
        top = (
            f"the next-token prediction stays {r.clean_top_tokens[0]!r}"
            if iv.top_tokens[0] == r.clean_top_tokens[0]
            else f"the next-token prediction changes from {r.clean_top_tokens[0]!r} to {iv.top_tokens[0]!r}"
        )
        sentences.append(
            f"{iv.label[0].upper() + iv.label[1:]}: the spread at layer {l} goes from {float(clean[l]):.2f} to "
            f"{float(iv.resid_std[l]):.2f} (×{at:.2f}), at the last layer ({last}) from {float(clean[last]):.2f} to "
            f"{float(iv.resid_std[last]):.2f} (×{end:.2f}); {top} (KL(clean‖edited) = {iv.kl_from_clean:.3f} nats)."
        )
        for factor in (0.1, 10.0):
            if iv.label.endswith(f"× {factor:g}"):
                by_factor[factor] = (at, end)
    text = (
        "The spread is the standard deviation of hook_resid_post (over positions and d_model, before the final layer "
        f"norm) per layer; every edit is at layer {l} of {L}. " + " ".join(sentences)
    )
    after = last - l
    where = (
        f"Here the spread is measured before ln_final; HF's hidden_states[-1], which the seed's hooks may have read, "
        f'is after the final layer norm, which rescales every position to unit variance and so "compresses" any spread '
        f"by itself. Only {after} block{'s' if after != 1 else ''} follow{'s' if after == 1 else ''} "
        "the edit in this model."
    )
    claims = []
    if after == 0:
        claims.append(
            Claim(
                "at ×0.1 the spread collapses at the edited layer and recovers later; at ×10 it explodes and the "
                "last layer compresses it",
                "not tested",
                "the edit is at the last layer: nothing follows it.",
            )
        )
        return text, claims
    if 0.1 in by_factor:
        at, end = by_factor[0.1]
        recovers = abs(math.log(end)) < 0.5 * abs(math.log(at))
        claims.append(
            Claim(
                "at ×0.1 the spread collapses at the edited layer and recovers later",
                "agrees" if recovers else "differs",
                f"it falls to ×{at:.2f} of clean at layer {l} and is at ×{end:.2f} by the last layer"
                + (" — much closer to clean." if recovers else f" — no recovery. {where}"),
            )
        )
    if 10.0 in by_factor:
        at, end = by_factor[10.0]
        compresses = abs(math.log(end)) < 0.5 * abs(math.log(at))
        claims.append(
            Claim(
                "at ×10 the spread explodes and the last layer compresses it",
                "agrees" if compresses else "partly",
                f"it rises to ×{at:.1f} of clean at layer {l} and is still ×{end:.1f} at the last layer"
                + (". " if compresses else ": it explodes, but is not compressed. ")
                + where,
            )
        )
    return text, claims


# --- figures ---


def figures(r: E2Result) -> dict[str, go.Figure]:
    L = len(r.clean_resid_std)
    layers = list(range(L))
    figs = {}
    for i, iv in enumerate(r.interventions):
        fig = go.Figure(
            [
                go.Scatter(
                    x=layers,
                    y=r.clean_resid_std.numpy(),
                    name="clean run (wide, under: visible where the runs agree)",
                    mode="lines+markers",
                    line=dict(color=rgba(COLOURS["clean"], 0.55), width=7),
                    marker=dict(size=11),
                ),
                go.Scatter(
                    x=layers,
                    y=iv.resid_std.numpy(),
                    name="edited run",
                    mode="lines+markers",
                    line=dict(color=COLOURS["edited"], width=2),
                ),
            ]
        )
        fig.add_vline(x=r.layer, line_dash="dot", line_color="grey", annotation_text=f"edited layer {r.layer}")
        fig.update_layout(
            title=titled(
                f"E2 ({r.info.model_name}): {iv.label}: standard deviation of the residual stream per layer",
                f"std of hook_resid_post over positions and d_model (before ln_final); next token: clean top-1 "
                f"{r.clean_top_tokens[0]!r} → edited {iv.top_tokens[0]!r}; "
                f"KL(clean‖edited) = {iv.kl_from_clean:.3f} nats",
            ),
            xaxis=index_axis(L, "layer (block output)"),
            yaxis=log_axis(
                "standard deviation (activation units, log scale)",
                np.r_[r.clean_resid_std.numpy(), iv.resid_std.numpy()],
            ),
        )
        figs[f"e2_{i + 1}_resid_std"] = fig
    return figs


EXPERIMENT = Experiment(
    key="e2",
    title="E2 — editing a key, MLP neurons and a block's output",
    seed="seed 004",
    seed_model="GPT-2 small",
    inputs="text",
    order=2,
    options=(
        Option("--layer", "int", "the edited layer (default: 9 on 12-layer models, the seed; else 3/4 of the depth)"),
        Option("--head", "int", "the head whose key is zeroed (default 2, the seed's)"),
        Option("--noise-mean", "float", "mean of the Gaussian noise put into the even MLP neurons (default 10)"),
        Option("--seed", "int", "seed of the noise draw (default 0)"),
    ),
    run=run,
    result=E2Result,
    figures=figures,
    finding=finding,
    data_note=data_note,
    conclusion=conclusion,
)
