"""Per-family maps from TransformerLens hook names to HF module boundaries, as plain data (after pyvene).

Each family is one table: TL hook suffix → `Site(module path, hook kind, view)`. ``{l}`` in a path is the
layer. A view turns the raw HF tensor at that boundary into TL layout (``read``) and a TL-layout value
back into the raw tensor (``write``); ``write=None`` marks a site that can be read but not edited. A TL
hook with no HF boundary is listed in the family's ``refused`` table with the reason, so asking for it
is an error that says why, never a silently different tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import einops
import torch
from jaxtyping import Float
from torch import Tensor, nn

OUTPUT, INPUT = "output", "input"  # forward hook on the module's output / forward pre-hook on its first input


@dataclass(frozen=True)
class View:
    """How to see a raw HF tensor in TL layout (``read``) and write a TL-layout value back (``write``).

    Both get the HF model and the layer (None outside the blocks) for sizes and norm weights.
    """

    read: Callable[[Tensor, nn.Module, int | None], Tensor]
    write: Callable[[Tensor, Tensor, nn.Module, int | None], Tensor] | None
    label: str = ""  # what the view does, in words (docs/hook_points.md is generated from it)


@dataclass(frozen=True)
class Site:
    module: str  # dotted module path, "{l}" = layer
    kind: str  # OUTPUT or INPUT
    view: View
    element: int = 0  # which element of a tuple output holds the tensor


@dataclass(frozen=True)
class Sum:
    """A TL activation that HF computes only as a sum inside the block, never at a module boundary:
    ``base + added`` (``hook_resid_mid = hook_resid_pre + hook_attn_out``). It is read and written at the
    module of ``added``: the edit sees ``base + added``, and ``added`` is replaced by ``edited − base``, so the
    block's own residual sum gives the edited value. (A pre-hook on the next norm would change only the
    MLP's input: HF adds the MLP output to the residual it kept before that norm.)"""

    base: str  # TL suffix of the first summand (its site: the block input)
    added: str  # TL suffix of the second summand, whose module output is replaced on write


@dataclass(frozen=True)
class HookMap:
    architecture: str
    n_layers: Callable[[object], int]  # HF config -> number of blocks
    sites: dict[str, Site | Sum]  # TL suffix ("hook_embed", or "attn.hook_z" inside block l) -> Site
    refused: dict[str, str] = field(default_factory=dict)  # TL suffix -> why there is no HF boundary
    unsupported: Callable[[object], str | None] = lambda config: None  # a config this map does not describe, and why


# Where each TL hook fires in TransformerLens's forward. Several TL names can sit on one HF module
# (``hook_attn_out`` and ``hook_resid_mid``; ``ln1_post.hook_normalized`` and ``hook_attn_out`` on Gemma): the HF
# backend runs their hooks in this order, as TL does.
NETWORK_ORDER = (
    "hook_embed",
    "hook_pos_embed",
    "hook_resid_pre",
    "ln1.hook_scale",
    "ln1.hook_normalized",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.q_norm.hook_scale",
    "attn.q_norm.hook_normalized",
    "attn.k_norm.hook_scale",
    "attn.k_norm.hook_normalized",
    "attn.hook_rot_q",
    "attn.hook_rot_k",
    "attn.hook_attn_scores",
    "attn.hook_pattern",
    "attn.hook_z",
    "attn.hook_result",
    "ln1_post.hook_scale",
    "ln1_post.hook_normalized",
    "hook_attn_out",
    "hook_resid_mid",
    "ln2.hook_scale",
    "ln2.hook_normalized",
    "mlp.hook_pre",
    "mlp.hook_pre_linear",
    "mlp.hook_post",
    "ln2_post.hook_scale",
    "ln2_post.hook_normalized",
    "hook_mlp_out",
    "hook_resid_post",
    "ln_final.hook_scale",
    "ln_final.hook_normalized",
)
RESID_MID = Sum("hook_resid_pre", "hook_attn_out")


# --- views: a few named functions ---

WHOLE = View(lambda raw, hf, l: raw, lambda raw, new, hf, l: new, "as it is")


def _split(x: Float[Tensor, "batch pos d"], n_heads: int) -> Float[Tensor, "batch pos head d_head"]:
    return einops.rearrange(x, "b p (h dh) -> b p h dh", h=n_heads)


def _merge(x: Float[Tensor, "batch pos head d_head"]) -> Float[Tensor, "batch pos d"]:
    return einops.rearrange(x, "b p h dh -> b p (h dh)")


def heads(n_heads: Callable[[object], int]) -> View:
    """A ``[batch, pos, n_heads·d_head]`` tensor split into heads."""
    return View(
        lambda raw, hf, l: _split(raw, n_heads(hf.config)), lambda raw, new, hf, l: _merge(new), "split into heads"
    )


def fused_qkv(layout: str, which: int, n_heads: Callable[[object], int]) -> View:
    """Q, K or V (``which`` = 0, 1, 2) of a fused QKV projection's output, split into heads. ``layout`` says how
    the columns are ordered: ``"(three h dh)"`` for GPT-2's ``c_attn`` (all of Q, then K, then V),
    ``"(h three dh)"`` for GPT-NeoX's ``query_key_value`` (interleaved per head)."""

    def split(qkv: Tensor, hf) -> Float[Tensor, "batch pos three head d_head"]:
        return einops.rearrange(qkv, f"b p {layout} -> b p three h dh", three=3, h=n_heads(hf.config))

    def write(qkv: Tensor, new: Tensor, hf, l) -> Tensor:
        parts = split(qkv, hf).clone()
        parts[:, :, which] = new
        return einops.rearrange(parts, f"b p three h dh -> b p {layout}")

    return View(lambda qkv, hf, l: split(qkv, hf)[:, :, which], write, f"{'QKV'[which]} of the fused columns {layout}")


def causal_scores(
    q: Float[Tensor, "batch pos head d_head"], k: Float[Tensor, "batch pos head d_head"], scale: float
) -> Float[Tensor, "batch head query_pos key_pos"]:
    """Q·Kᵀ·scale with future keys set to −inf, as TL's ``hook_attn_scores`` holds them."""
    scores = einops.einsum(q, k, "b q h dh, b k h dh -> b h q k") * scale
    n = scores.shape[-1]
    future = torch.triu(torch.ones(n, n, dtype=torch.bool, device=scores.device), diagonal=1)
    return scores.masked_fill(future, float("-inf"))


def _gpt2_scores(qkv: Tensor, hf, l: int) -> Float[Tensor, "batch head query_pos key_pos"]:
    config = hf.config
    q, k = (_split(t, config.n_head) for t in qkv.chunk(3, dim=-1)[:2])
    scale = (q.shape[-1] ** -0.5 if config.scale_attn_weights else 1.0) / (
        l + 1 if config.scale_attn_by_inverse_layer_idx else 1
    )
    return causal_scores(q, k, scale)


# No module boundary holds the scores: computed from Q and K, read only.
GPT2_SCORES = View(_gpt2_scores, None, "Q·Kᵀ·scale computed from it, future keys −inf")


def ln_affine(path: str) -> View:
    """TL's ``hook_normalized`` is before the LayerNorm's affine part, HF's LayerNorm output after it:
    undo/redo w, b."""

    def module(hf, l):
        return hf.get_submodule(path.format(l=l))

    return View(
        lambda out, hf, l: (out - module(hf, l).bias) / module(hf, l).weight,
        lambda out, new, hf, l: new * module(hf, l).weight + module(hf, l).bias,
        "(output − b) / w",
    )


_LN_SCALE = "TL's LayerNorm scale (√(var+eps)) is computed inside HF's LayerNorm forward: no module boundary holds it"


def _refused(out_proj: str, scale_reason: str, norms: tuple[str, ...] = ("ln_final", "ln1", "ln2")) -> dict[str, str]:
    """The TL hook points no family's HF model has a boundary for (they fire only under TL config flags, or
    are computed inside a module), with the reason."""
    return {
        **{f"{n}.hook_scale": scale_reason for n in norms},
        "attn.hook_result": f"per-head outputs after W_O are summed inside {out_proj}; edit attn.hook_z instead",
        "hook_attn_in": "TL computes it only with cfg.use_attn_in",
        "hook_q_input": "TL computes it only with cfg.use_split_qkv_input",
        "hook_k_input": "TL computes it only with cfg.use_split_qkv_input",
        "hook_v_input": "TL computes it only with cfg.use_split_qkv_input",
        "hook_mlp_in": "TL computes it only with cfg.use_hook_mlp_in; read blocks.l.hook_resid_mid",
        "unembed.hook_in": "the input of the unembedding is ln_final's output after its weight; "
        "read ln_final.hook_normalized",
        "unembed.hook_out": "the logits: run() returns them",
    }


GPT2 = HookMap(
    architecture="GPT2LMHeadModel",
    n_layers=lambda c: c.n_layer,
    sites={
        "hook_embed": Site("transformer.wte", OUTPUT, WHOLE),
        "ln_final.hook_normalized": Site("transformer.ln_f", OUTPUT, ln_affine("transformer.ln_f")),
        "hook_resid_pre": Site("transformer.h.{l}", INPUT, WHOLE),
        "ln1.hook_normalized": Site("transformer.h.{l}.ln_1", OUTPUT, ln_affine("transformer.h.{l}.ln_1")),
        "attn.hook_q": Site("transformer.h.{l}.attn.c_attn", OUTPUT, fused_qkv("(three h dh)", 0, lambda c: c.n_head)),
        "attn.hook_k": Site("transformer.h.{l}.attn.c_attn", OUTPUT, fused_qkv("(three h dh)", 1, lambda c: c.n_head)),
        "attn.hook_v": Site("transformer.h.{l}.attn.c_attn", OUTPUT, fused_qkv("(three h dh)", 2, lambda c: c.n_head)),
        "attn.hook_attn_scores": Site("transformer.h.{l}.attn.c_attn", OUTPUT, GPT2_SCORES),
        "attn.hook_pattern": Site(
            "transformer.h.{l}.attn", OUTPUT, View(lambda raw, hf, l: raw, None, "attention probabilities"), element=1
        ),
        "attn.hook_z": Site("transformer.h.{l}.attn.c_proj", INPUT, heads(lambda c: c.n_head)),
        "hook_attn_out": Site("transformer.h.{l}.attn.c_proj", OUTPUT, WHOLE),
        "hook_resid_mid": RESID_MID,
        "ln2.hook_normalized": Site("transformer.h.{l}.ln_2", OUTPUT, ln_affine("transformer.h.{l}.ln_2")),
        "mlp.hook_pre": Site("transformer.h.{l}.mlp.c_fc", OUTPUT, WHOLE),
        "mlp.hook_post": Site("transformer.h.{l}.mlp.act", OUTPUT, WHOLE),
        "hook_mlp_out": Site("transformer.h.{l}.mlp", OUTPUT, WHOLE),
        "hook_resid_post": Site("transformer.h.{l}", OUTPUT, WHOLE),
    },
    refused={
        "hook_pos_embed": "HF's wpe output has one row shared by the batch, TL's is [batch, pos, d_model]; "
        "edit blocks.0.hook_resid_pre instead",
        **_refused("c_proj", _LN_SCALE),
    },
)


def rms_affine(path: str, offset: float = 0.0, head_layout: str | None = None) -> View:
    """TL's RMSNorm ``hook_normalized`` is before the weight, HF's RMSNorm output after it: undo/redo
    ``(offset + w)`` (Gemma's RMSNorm multiplies by 1 + w). ``head_layout``: for a QK-norm, how HF holds the
    heads (``"b p h d"`` in Qwen3, ``"b h p d"`` in Gemma 3); TL flattens them to ``[(batch pos head), d_head]``."""

    def weight(hf, l):
        return offset + hf.get_submodule(path.format(l=l)).weight

    def read(out: Tensor, hf, l) -> Tensor:
        normed = out / weight(hf, l)
        return einops.rearrange(normed, f"{head_layout} -> (b p h) d") if head_layout else normed

    def write(out: Tensor, new: Tensor, hf, l) -> Tensor:
        if head_layout:
            b, p = (out.shape[0], out.shape[head_layout.split().index("p")])
            new = einops.rearrange(new, f"(b p h) d -> {head_layout}", b=b, p=p)
        return new * weight(hf, l)

    w = f"({offset:g} + w)" if offset else "w"
    return View(read, write, f"output / {w}" + (f", heads from {head_layout} to (b p h) d" if head_layout else ""))


def _q_heads(config) -> int:
    return config.num_attention_heads


def _kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


READ_ONLY = View(lambda raw, hf, l: raw, None, "attention probabilities")
_ROTARY = (
    "rotary embeddings are applied inside the attention's forward: no module boundary holds rotated "
    "queries/keys or the scores; read hook_q/hook_k (before rotation) or hook_pattern"
)
_RMS_SCALE = "TL's RMSNorm scale is computed inside HF's RMSNorm forward: no module boundary holds it"


def llama_like(
    architecture: str, sandwich_norms: bool = False, qk_norm: str | None = None, norm_offset: float = 0.0
) -> HookMap:
    """Llama, Mistral, Qwen2/3 and Gemma 2/3: separate q/k/v projections (k and v with the KV heads of
    grouped-query attention), gated MLP whose ``hook_post`` = act(gate)·up is the input of ``down_proj``.

    ``sandwich_norms`` (Gemma 2/3): RMSNorms after attention and after the MLP, so TL's ``hook_attn_out`` /
    ``hook_mlp_out`` are those norms' outputs and ln2 is ``pre_feedforward_layernorm``; ``qk_norm``
    (Qwen3, Gemma 3): RMSNorm on each head's query and key before rotation, applied by HF to heads laid
    out as given; ``norm_offset``: Gemma's RMSNorm multiplies by 1 + w.
    """
    layer = "model.layers.{l}"
    attn = f"{layer}.self_attn"
    ln2 = f"{layer}.pre_feedforward_layernorm" if sandwich_norms else f"{layer}.post_attention_layernorm"
    sites = {
        "hook_embed": Site("model.embed_tokens", OUTPUT, WHOLE),
        "ln_final.hook_normalized": Site("model.norm", OUTPUT, rms_affine("model.norm", norm_offset)),
        "hook_resid_pre": Site(layer, INPUT, WHOLE),
        "ln1.hook_normalized": Site(
            f"{layer}.input_layernorm", OUTPUT, rms_affine(f"{layer}.input_layernorm", norm_offset)
        ),
        "attn.hook_q": Site(f"{attn}.q_proj", OUTPUT, heads(_q_heads)),
        "attn.hook_k": Site(f"{attn}.k_proj", OUTPUT, heads(_kv_heads)),
        "attn.hook_v": Site(f"{attn}.v_proj", OUTPUT, heads(_kv_heads)),
        "attn.hook_pattern": Site(attn, OUTPUT, READ_ONLY, element=1),
        "attn.hook_z": Site(f"{attn}.o_proj", INPUT, heads(_q_heads)),
        "hook_attn_out": Site(
            f"{layer}.post_attention_layernorm" if sandwich_norms else f"{attn}.o_proj", OUTPUT, WHOLE
        ),
        "hook_resid_mid": RESID_MID,
        "ln2.hook_normalized": Site(ln2, OUTPUT, rms_affine(ln2, norm_offset)),
        "mlp.hook_pre": Site(f"{layer}.mlp.gate_proj", OUTPUT, WHOLE),
        "mlp.hook_pre_linear": Site(f"{layer}.mlp.up_proj", OUTPUT, WHOLE),
        "mlp.hook_post": Site(f"{layer}.mlp.down_proj", INPUT, WHOLE),
        "hook_mlp_out": Site(
            f"{layer}.post_feedforward_layernorm" if sandwich_norms else f"{layer}.mlp", OUTPUT, WHOLE
        ),
        "hook_resid_post": Site(layer, OUTPUT, WHOLE),
    }
    if qk_norm:
        for which in ("q", "k"):
            path = f"{attn}.{which}_norm"
            sites[f"attn.{which}_norm.hook_normalized"] = Site(
                path, OUTPUT, rms_affine(path, norm_offset, head_layout=qk_norm)
            )
    refused = {
        "attn.hook_rot_q": _ROTARY,
        "attn.hook_rot_k": _ROTARY,
        "attn.hook_attn_scores": _ROTARY,
        **_refused("o_proj", _RMS_SCALE),
    }
    if qk_norm:
        refused |= {"attn.q_norm.hook_scale": _RMS_SCALE, "attn.k_norm.hook_scale": _RMS_SCALE}
    if sandwich_norms:  # TL names the post-attention / post-MLP norms ln1_post / ln2_post
        for norm, path in (
            ("ln1_post", f"{layer}.post_attention_layernorm"),
            ("ln2_post", f"{layer}.post_feedforward_layernorm"),
        ):
            sites[f"{norm}.hook_normalized"] = Site(path, OUTPUT, rms_affine(path, norm_offset))
            refused[f"{norm}.hook_scale"] = _RMS_SCALE
    return HookMap(architecture, n_layers=lambda c: c.num_hidden_layers, sites=sites, refused=refused)


GPT_NEOX = HookMap(
    architecture="GPTNeoXForCausalLM",
    # Parallel attention and MLP (every Pythia): TL has no hook_resid_mid, and neither has HF a boundary for it.
    unsupported=lambda c: None if c.use_parallel_residual else "GPT-NeoX with use_parallel_residual=False",
    n_layers=lambda c: c.num_hidden_layers,
    sites={
        "hook_embed": Site("gpt_neox.embed_in", OUTPUT, WHOLE),
        "ln_final.hook_normalized": Site("gpt_neox.final_layer_norm", OUTPUT, ln_affine("gpt_neox.final_layer_norm")),
        "hook_resid_pre": Site("gpt_neox.layers.{l}", INPUT, WHOLE),
        "ln1.hook_normalized": Site(
            "gpt_neox.layers.{l}.input_layernorm", OUTPUT, ln_affine("gpt_neox.layers.{l}.input_layernorm")
        ),
        "attn.hook_q": Site(
            "gpt_neox.layers.{l}.attention.query_key_value", OUTPUT, fused_qkv("(h three dh)", 0, _q_heads)
        ),
        "attn.hook_k": Site(
            "gpt_neox.layers.{l}.attention.query_key_value", OUTPUT, fused_qkv("(h three dh)", 1, _q_heads)
        ),
        "attn.hook_v": Site(
            "gpt_neox.layers.{l}.attention.query_key_value", OUTPUT, fused_qkv("(h three dh)", 2, _q_heads)
        ),
        "attn.hook_pattern": Site("gpt_neox.layers.{l}.attention", OUTPUT, READ_ONLY, element=1),
        "attn.hook_z": Site("gpt_neox.layers.{l}.attention.dense", INPUT, heads(_q_heads)),
        "hook_attn_out": Site("gpt_neox.layers.{l}.attention.dense", OUTPUT, WHOLE),
        "ln2.hook_normalized": Site(
            "gpt_neox.layers.{l}.post_attention_layernorm",
            OUTPUT,
            ln_affine("gpt_neox.layers.{l}.post_attention_layernorm"),
        ),
        "mlp.hook_pre": Site("gpt_neox.layers.{l}.mlp.dense_h_to_4h", OUTPUT, WHOLE),
        "mlp.hook_post": Site("gpt_neox.layers.{l}.mlp.act", OUTPUT, WHOLE),
        "hook_mlp_out": Site("gpt_neox.layers.{l}.mlp", OUTPUT, WHOLE),
        "hook_resid_post": Site("gpt_neox.layers.{l}", OUTPUT, WHOLE),
    },
    refused={
        "attn.hook_rot_q": _ROTARY,
        "attn.hook_rot_k": _ROTARY,
        "attn.hook_attn_scores": _ROTARY,
        **_refused("attention.dense", _LN_SCALE),
    },
)

FAMILIES: dict[str, HookMap] = {
    f.architecture: f
    for f in (
        GPT2,
        GPT_NEOX,
        llama_like("LlamaForCausalLM"),
        llama_like("MistralForCausalLM"),
        llama_like("Qwen2ForCausalLM"),
        llama_like("Qwen3ForCausalLM", qk_norm="b p h d"),
        llama_like("Gemma2ForCausalLM", sandwich_norms=True, norm_offset=1.0),
        llama_like("Gemma3ForCausalLM", sandwich_norms=True, qk_norm="b h p d", norm_offset=1.0),
    )
}


def hook_map_of(hf_model: nn.Module) -> HookMap:
    """The map for ``hf_model``'s architecture; `NotImplementedError` naming it if there is none."""
    architecture = type(hf_model).__name__
    if architecture not in FAMILIES:
        raise NotImplementedError(f"no HF hook map for {architecture}; supported: {', '.join(sorted(FAMILIES))}")
    hook_map = FAMILIES[architecture]
    reason = hook_map.unsupported(hf_model.config)
    if reason:
        raise NotImplementedError(f"no HF hook map for {reason}")
    return hook_map


def describe(hook_map: HookMap) -> list[tuple[str, str, str]]:
    """(TL hook, where it is on the HF model and how it is seen, how an edit is written) for every site of a
    family's table, in TransformerLens's order: the table docs/hook_points.md shows."""
    rows = []
    for suffix in sorted(hook_map.sites, key=NETWORK_ORDER.index):
        site = hook_map.sites[suffix]
        if isinstance(site, Sum):
            base, added = hook_map.sites[site.base], hook_map.sites[site.added]
            rows.append(
                (
                    suffix,
                    f"`{base.module}` input + `{added.module}` output",
                    f"as a change of `{added.module}`'s output: edited − {site.base}",
                )
            )
            continue
        where = (
            f"`{site.module}` {'output' if site.kind == OUTPUT else 'input'}"
            + (f"[{site.element}]" if site.element else "")
            + f", {site.view.label}"
        )
        rows.append(
            (
                suffix,
                where,
                "read only: no module boundary holds it"
                if site.view.write is None
                else "replaces the " + ("output" if site.kind == OUTPUT else "input"),
            )
        )
    return rows


def markdown() -> str:
    """Every family's table as Markdown: docs/hook_points.md holds this text (a test keeps the two equal)."""
    out = []
    for architecture, hook_map in FAMILIES.items():
        out.append(f"### {architecture}\n\n| TL hook (in block l) | HF boundary, view | edits |\n|---|---|---|")
        out += [f"| `{suffix}` | {where} | {write} |" for suffix, where, write in describe(hook_map)]
        refused = ", ".join(f"`{s}`" for s in hook_map.refused)
        out.append(f"\nRefused, with the reason in the error: {refused}.\n")
    return "\n".join(out)
