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


@dataclass(frozen=True)
class Site:
    module: str  # dotted module path, "{l}" = layer
    kind: str  # OUTPUT or INPUT
    view: View
    element: int = 0  # which element of a tuple output holds the tensor


@dataclass(frozen=True)
class Family:
    architecture: str
    n_layers: Callable[[object], int]  # HF config -> number of blocks
    sites: dict[str, Site]  # TL suffix ("hook_embed", or "attn.hook_z" inside block l) -> Site
    refused: dict[str, str] = field(default_factory=dict)  # TL suffix -> why there is no HF boundary


# --- views: a few named functions ---

WHOLE = View(lambda raw, hf, l: raw, lambda raw, new, hf, l: new)


def _split(x: Float[Tensor, "batch pos d"], n_heads: int) -> Float[Tensor, "batch pos head d_head"]:
    return einops.rearrange(x, "b p (h dh) -> b p h dh", h=n_heads)


def _merge(x: Float[Tensor, "batch pos head d_head"]) -> Float[Tensor, "batch pos d"]:
    return einops.rearrange(x, "b p h dh -> b p (h dh)")


def heads(n_heads: Callable[[object], int]) -> View:
    """A ``[batch, pos, n_heads·d_head]`` tensor split into heads."""
    return View(lambda raw, hf, l: _split(raw, n_heads(hf.config)), lambda raw, new, hf, l: _merge(new))


def gpt2_fused_qkv(which: int) -> View:
    """Q, K or V: one third of GPT-2's fused ``c_attn`` output (``Conv1D``, order Q, K, V), split into heads."""

    def read(qkv: Float[Tensor, "batch pos 3*d_model"], hf, l) -> Float[Tensor, "batch pos head d_head"]:
        return _split(qkv.chunk(3, dim=-1)[which], hf.config.n_head)

    def write(qkv: Tensor, new: Tensor, hf, l) -> Tensor:
        d = hf.config.n_embd
        out = qkv.clone()
        out[..., which * d : (which + 1) * d] = _merge(new)
        return out

    return View(read, write)


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
    scale = (q.shape[-1] ** -0.5 if config.scale_attn_weights else 1.0) / (l + 1 if config.scale_attn_by_inverse_layer_idx else 1)
    return causal_scores(q, k, scale)


GPT2_SCORES = View(_gpt2_scores, None)  # no module boundary holds the scores: computed from Q, K, read only


def ln_affine(path: str) -> View:
    """TL's ``hook_normalized`` is before the LayerNorm's affine part, HF's LayerNorm output after it: undo/redo w, b."""

    def module(hf, l):
        return hf.get_submodule(path.format(l=l))

    return View(
        lambda out, hf, l: (out - module(hf, l).bias) / module(hf, l).weight,
        lambda out, new, hf, l: new * module(hf, l).weight + module(hf, l).bias,
    )


_LN_SCALE = "TL's LayerNorm scale (√(var+eps)) is computed inside HF's LayerNorm forward: no module boundary holds it"

GPT2 = Family(
    architecture="GPT2LMHeadModel",
    n_layers=lambda c: c.n_layer,
    sites={
        "hook_embed": Site("transformer.wte", OUTPUT, WHOLE),
        "ln_final.hook_normalized": Site("transformer.ln_f", OUTPUT, ln_affine("transformer.ln_f")),
        "hook_resid_pre": Site("transformer.h.{l}", INPUT, WHOLE),
        "ln1.hook_normalized": Site("transformer.h.{l}.ln_1", OUTPUT, ln_affine("transformer.h.{l}.ln_1")),
        "attn.hook_q": Site("transformer.h.{l}.attn.c_attn", OUTPUT, gpt2_fused_qkv(0)),
        "attn.hook_k": Site("transformer.h.{l}.attn.c_attn", OUTPUT, gpt2_fused_qkv(1)),
        "attn.hook_v": Site("transformer.h.{l}.attn.c_attn", OUTPUT, gpt2_fused_qkv(2)),
        "attn.hook_attn_scores": Site("transformer.h.{l}.attn.c_attn", OUTPUT, GPT2_SCORES),
        "attn.hook_pattern": Site("transformer.h.{l}.attn", OUTPUT, View(lambda raw, hf, l: raw, None), element=1),
        "attn.hook_z": Site("transformer.h.{l}.attn.c_proj", INPUT, heads(lambda c: c.n_head)),
        "hook_attn_out": Site("transformer.h.{l}.attn.c_proj", OUTPUT, WHOLE),
        "hook_resid_mid": Site("transformer.h.{l}.ln_2", INPUT, WHOLE),
        "ln2.hook_normalized": Site("transformer.h.{l}.ln_2", OUTPUT, ln_affine("transformer.h.{l}.ln_2")),
        "mlp.hook_pre": Site("transformer.h.{l}.mlp.c_fc", OUTPUT, WHOLE),
        "mlp.hook_post": Site("transformer.h.{l}.mlp.act", OUTPUT, WHOLE),
        "hook_mlp_out": Site("transformer.h.{l}.mlp", OUTPUT, WHOLE),
        "hook_resid_post": Site("transformer.h.{l}", OUTPUT, WHOLE),
    },
    refused={
        "hook_pos_embed": "HF's wpe output has one row shared by the batch, TL's is [batch, pos, d_model]; "
                          "edit blocks.0.hook_resid_pre instead",
        "ln_final.hook_scale": _LN_SCALE,
        "ln1.hook_scale": _LN_SCALE,
        "ln2.hook_scale": _LN_SCALE,
        "attn.hook_result": "per-head outputs after W_O are summed inside c_proj; edit attn.hook_z instead",
        "hook_attn_in": "TL computes it only with cfg.use_attn_in; HF feeds one input to c_attn",
        "hook_q_input": "TL computes it only with cfg.use_split_qkv_input; HF's fused c_attn has one input",
        "hook_k_input": "TL computes it only with cfg.use_split_qkv_input; HF's fused c_attn has one input",
        "hook_v_input": "TL computes it only with cfg.use_split_qkv_input; HF's fused c_attn has one input",
        "hook_mlp_in": "TL computes it only with cfg.use_hook_mlp_in; read blocks.l.hook_resid_mid",
        "unembed.hook_in": "the input of lm_head is ln_final's output after the affine part; read ln_final.hook_normalized",
        "unembed.hook_out": "the logits: run() returns them",
    },
)

FAMILIES: dict[str, Family] = {f.architecture: f for f in (GPT2,)}


def family_of(hf_model: nn.Module) -> Family:
    """The map for ``hf_model``'s architecture; `NotImplementedError` naming it if there is none."""
    architecture = type(hf_model).__name__
    if architecture not in FAMILIES:
        raise NotImplementedError(
            f"no HF hook map for {architecture}; supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[architecture]
