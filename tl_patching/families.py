"""The model families tl_patching loads, as plain data: one table row per family.

Each row says how to read a HuggingFace config as a TransformerLens `HookedTransformerConfig`
(mirroring ``transformer_lens.loading_from_pretrained.convert_hf_model_config`` for that
architecture, but from the HF config in hand instead of a list of official names) and which of
TransformerLens's own weight conversions to use. Adding a family is adding a row (and a tiny random
config for the tests, `tl_patching.testing`).

Each row reads a config the way transformers 5.24's modeling code for that family reads it (Mistral
ignores `layer_types`, Llama never windows, the default RoPE of the RMSNorm families rotates the whole
head whatever `partial_rotary_factor` says, Gemma 3 never applies `attn_logit_softcapping`). Where
TransformerLens 3.9 cannot represent something a config asks for (a RoPE scaling it cannot apply to the
same layers, biases the weight conversion drops, bidirectional or cross-attention, an activation it
lacks or whose learned parameters it drops), the config function raises `NotImplementedError` naming
the field, so no model is ever built that silently computes something else. tests/test_config_fields.py
holds one row per field and value; docs/models.md ("Config fields") the summary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformer_lens.utilities.activation_functions import SUPPORTED_ACTIVATIONS


class UnsupportedArchitectureError(ValueError):
    """The HF architecture is not one of the families tl_patching can load exactly."""


@dataclass(frozen=True)
class tl_conversion:  # lower case: used like the function it stands for
    """TransformerLens 3's own weight conversion of a family (``transformer_lens.pretrained.weight_conversions``),
    imported when first called: TransformerLens 4 has no such module (its bridge wraps the HF weights as they are)."""

    name: str

    def __call__(self, hf_model: Any, cfg: Any) -> dict:
        from transformer_lens.pretrained import weight_conversions

        return getattr(weight_conversions, self.name)(hf_model, cfg)


@dataclass(frozen=True)
class Family:
    name: str  # short name used by `random_pair` and in docs
    architecture: str  # the HF class, as in config.json "architectures"
    model_type: str  # config.model_type
    hooked_config: Callable[[Any], dict[str, Any]]  # HF config -> HookedTransformerConfig fields
    convert_weights: Callable[[Any, Any], dict]  # TL's own conversion: (hf_model, cfg) -> TL state dict
    norm_weight_is_offset: bool = False  # Gemma's RMSNorm multiplies by (1 + weight)


def _get(hf_config: Any, name: str, default: Any = None) -> Any:
    value = getattr(hf_config, name, default)
    return default if value is None else value


def _causal(c: Any) -> None:
    # transformers' mask builder turns every family bidirectional when config.is_causal is False.
    if getattr(c, "is_causal", True) is False:
        raise NotImplementedError(f"{c.model_type} with is_causal=False: TransformerLens attends causally only")


# HF activation names for functions TransformerLens has under another name (the same formula).
_ACT_ALIASES = {"swish": "silu", "gelu_python": "gelu", "gelu_accurate": "gelu_new", "gelu_python_tanh": "gelu_new"}


def _act_fn(c: Any, field: str) -> str:
    name = getattr(c, field)
    if name == "xielu":
        raise NotImplementedError(
            f"{field}='xielu': HF's xIELU learns alpha_p/alpha_n per model, TransformerLens's is fixed"
        )
    tl_name = _ACT_ALIASES.get(name, name)
    if tl_name not in SUPPORTED_ACTIVATIONS:
        raise NotImplementedError(f"{field}={name!r}: TransformerLens 3.9 supports {sorted(SUPPORTED_ACTIVATIONS)}")
    return tl_name


def _d_head(c: Any) -> int:
    return _get(c, "head_dim") or c.hidden_size // c.num_attention_heads


def _layer_kinds(c: Any, windows: str) -> list[str]:
    """Each layer's HF attention kind ("full_attention" / "sliding_attention"), as the family's modeling code
    decides it: ``windows`` is "none" (Llama: never windowed), "every" (Mistral: every layer when
    ``sliding_window`` is set; its ``layer_types`` is ignored) or "layer_types" (Qwen2/3, Gemma 2/3)."""
    n = c.num_hidden_layers
    if windows == "none":
        return ["full_attention"] * n
    if windows == "every":
        return ["sliding_attention" if _get(c, "sliding_window") else "full_attention"] * n
    kinds = list(_get(c, "layer_types", ["full_attention"] * n))
    unknown = sorted(set(kinds) - {"sliding_attention", "full_attention"})
    if unknown:
        raise NotImplementedError(f"layer_types {unknown}: TransformerLens 3.9 has only local and global layers")
    return kinds


def _attention_windows(c: Any, kinds: list[str]) -> dict[str, Any]:
    """Sliding-window layers -> TL ``attn_types``. Both mask keys with ``key > query - window``: a window of
    ``sliding_window`` positions including the query's own."""
    if "sliding_attention" not in kinds:
        return {}
    window = _get(c, "sliding_window")
    if not window:
        raise NotImplementedError("layer_types has sliding_attention layers but sliding_window is not set")
    return dict(
        use_local_attn=True,
        window_size=int(window),
        attn_types=["local" if kind == "sliding_attention" else "global" for kind in kinds],
    )


def _mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _rope_scaling(c: Any, p: dict) -> dict[str, Any]:
    """One HF RoPE parameter set -> the TL fields of its frequency scaling ({} for none), computed as
    transformers 5.24's ``modeling_rope_utils`` does."""
    kind = p.get("rope_type", "default")
    if kind in ("default", "dynamic"):
        # "dynamic" rescales only for positions past max_position_embeddings (TL's n_ctx, beyond which TL runs nothing).
        return {}
    if kind == "linear":
        return dict(rotary_scaling_factor=float(p["factor"]))
    original = p.get("original_max_position_embeddings", c.max_position_embeddings)
    if kind == "llama3":
        return dict(
            use_NTK_by_parts_rope=True,
            NTK_by_parts_factor=p["factor"],
            NTK_by_parts_low_freq_factor=p["low_freq_factor"],
            NTK_by_parts_high_freq_factor=p["high_freq_factor"],
            NTK_original_ctx_len=original,
        )
    if kind == "yarn":
        factor = p.get("factor") or c.max_position_embeddings / original
        attention_factor = p.get("attention_factor")
        if attention_factor is None:
            mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
            attention_factor = (
                _mscale(factor, mscale) / _mscale(factor, mscale_all_dim)
                if mscale and mscale_all_dim
                else _mscale(factor)
            )
        return dict(
            use_yarn_rope=True,
            yarn_factor=float(factor),
            yarn_attention_factor=float(attention_factor),
            yarn_beta_fast=float(p.get("beta_fast") or 32),
            yarn_beta_slow=float(p.get("beta_slow") or 1),
            yarn_original_max_position_embeddings=int(original),
            # HF reads `truncate` from the top-level dict, even when the parameters are per layer type.
            yarn_truncate=bool(_get(c, "rope_parameters", {}).get("truncate", True)),
        )
    raise NotImplementedError(
        f"rope_parameters rope_type {kind!r}: TransformerLens 3.9 has default, dynamic "
        "(within n_ctx), linear, llama3 and yarn"
    )


def _rope(c: Any, kinds: list[str], rotates_whole_head: bool = True) -> dict[str, Any]:
    """RoPE base(s) and scaling for the layer kinds present. Gemma 3 keeps one parameter set per layer type
    (local / global), the other families one for all layers.

    TL scales each kind of layer its own way: `rotary_scaling_factor` (linear) on global layers only,
    NTK-by-parts (llama3) on all, yarn on all or (``yarn_global_attn_only``) on global ones; a combination
    it cannot reproduce is refused. ``rotates_whole_head``: the family's default RoPE rotates the whole head
    whatever ``partial_rotary_factor`` says (all but NeoX in transformers 5.24); its scaled ones would
    rotate a part and then fail to broadcast, so a partial factor is refused there.
    """
    params = dict(_get(c, "rope_parameters", {}))
    per_type = "full_attention" in params or "sliding_attention" in params
    present = sorted(set(kinds), key=lambda k: k != "full_attention")  # global first: it sets TL's rotary_base
    hf = {k: (params.get(k) or {}) if per_type else params for k in present}
    for p in hf.values():
        factor = p.get("partial_rotary_factor", 1.0)
        if rotates_whole_head and factor != 1.0 and p.get("rope_type", "default") != "default":
            raise NotImplementedError(
                f"partial_rotary_factor {factor} with rope_type {p.get('rope_type')!r} on "
                f"{c.model_type}: HF's own rotary embedding cannot run it"
            )
    scaling = {k: _rope_scaling(c, p) for k, p in hf.items()}
    lead = present[0]
    out: dict[str, Any] = {"rotary_base": hf[lead].get("rope_theta", 10000.0), **scaling[lead]}
    if "sliding_attention" in hf:
        local_theta = hf["sliding_attention"].get("rope_theta", out["rotary_base"])
        if local_theta != out["rotary_base"]:
            out["rotary_base_local"] = local_theta
        if out.get("use_yarn_rope") and lead == "full_attention" and not scaling["sliding_attention"]:
            out["yarn_global_attn_only"] = True
        # What TL applies on local layers, compared with what HF asks for there.
        tl_local = {} if "rotary_scaling_factor" in out or out.get("yarn_global_attn_only") else scaling[lead]
        if scaling["sliding_attention"] != tl_local:
            kind = hf["sliding_attention"].get("rope_type", "default")
            also = (
                ""
                if lead == "sliding_attention"
                else (f" (and {hf[lead].get('rope_type', 'default')!r} on full-attention ones)")
            )
            raise NotImplementedError(
                f"rope_parameters rope_type {kind!r} on sliding-window layers{also}: TransformerLens applies linear "
                "scaling to global layers only, llama3 to every layer, yarn to every layer or to global ones only"
            )
    return out


def _no_biases(c: Any, *names: str) -> None:
    for name in names:
        if _get(c, name, False):
            raise NotImplementedError(
                f"{c.model_type} with {name}=True: TransformerLens's weight conversion drops those biases"
            )


def _rms_rotary(c: Any, always_kv_heads: bool, windows: str, act_name: str = "hidden_act") -> dict[str, Any]:
    """The shared shape of Llama, Mistral, Qwen2/3 and Gemma: RMSNorm, full RoPE, gated MLP, GQA."""
    _causal(c)
    d_head = _d_head(c)
    n_kv = c.num_key_value_heads or c.num_attention_heads
    kinds = _layer_kinds(c, windows)
    return dict(
        d_model=c.hidden_size,
        d_head=d_head,
        n_heads=c.num_attention_heads,
        # TL's Llama/Qwen3 conversions expect None when there is no grouping; Mistral/Qwen2/Gemma always
        # write grouped (_W_K) keys.
        n_key_value_heads=n_kv if (always_kv_heads or n_kv != c.num_attention_heads) else None,
        d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers,
        n_ctx=c.max_position_embeddings,
        eps=c.rms_norm_eps,
        d_vocab=c.vocab_size,
        act_fn=_act_fn(c, act_name),
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=d_head,
        final_rms=True,
        gated_mlp=True,
        **_rope(c, kinds),
        **_attention_windows(c, kinds),
    )


# ---- HF config -> HookedTransformerConfig fields, one function per family -------------------------------


def gpt2_config(c: Any) -> dict[str, Any]:
    _causal(c)
    if _get(c, "add_cross_attention", False):
        raise NotImplementedError(
            "GPT-2 with add_cross_attention=True: its cross-attention layers (and their "
            "weights) have no TransformerLens counterpart"
        )
    # reorder_and_upcast_attn only upcasts q·k to float32 (and folds the scale into it): the same function
    # for the float32 models tl_patching converts (measured: 2e-6).
    return dict(
        d_model=c.n_embd,
        d_head=c.n_embd // c.n_head,
        n_heads=c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd,
        n_layers=c.n_layer,
        n_ctx=c.n_positions,
        eps=c.layer_norm_epsilon,
        d_vocab=c.vocab_size,
        act_fn=_act_fn(c, "activation_function"),
        use_attn_scale=_get(c, "scale_attn_weights", True),
        scale_attn_by_inverse_layer_idx=c.scale_attn_by_inverse_layer_idx,
        normalization_type="LN",
        default_prepend_bos=True,
    )


def neox_config(c: Any) -> dict[str, Any]:
    _causal(c)
    if not _get(c, "attention_bias", True):
        raise NotImplementedError("GPT-NeoX with attention_bias=False: TransformerLens's conversion expects the biases")
    d_head = c.hidden_size // c.num_attention_heads
    # HF's NeoX rotates the first int(head_dim · partial_rotary_factor) dimensions, head_dim read the way its
    # rotary embedding reads it (a stray config.head_dim counts); an odd count gets frequencies TL cannot make.
    factor = dict(_get(c, "rope_parameters", {})).get("partial_rotary_factor", 1.0)
    rotary_dim = int((_get(c, "head_dim") or d_head) * factor)
    if rotary_dim % 2 or not 0 < rotary_dim <= d_head:
        raise NotImplementedError(
            f"GPT-NeoX with partial_rotary_factor {factor} (head_dim {_get(c, 'head_dim') or d_head}): {rotary_dim} "
            f"rotary dimensions, TransformerLens needs an even number ≤ d_head {d_head}"
        )
    return dict(
        d_model=c.hidden_size,
        d_head=d_head,
        n_heads=c.num_attention_heads,
        d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers,
        n_ctx=c.max_position_embeddings,
        eps=c.layer_norm_eps,
        d_vocab=c.vocab_size,
        act_fn=_act_fn(c, "hidden_act"),
        parallel_attn_mlp=_get(c, "use_parallel_residual", True),
        positional_embedding_type="rotary",
        rotary_dim=rotary_dim,
        rotary_adjacent_pairs=False,
        normalization_type="LN",
        default_prepend_bos=False,
        **_rope(c, ["full_attention"], rotates_whole_head=False),
    )


def llama_config(c: Any) -> dict[str, Any]:
    _no_biases(c, "attention_bias", "mlp_bias")
    # HF's Llama masks causally only: `sliding_window` / `layer_types` in its config are never read.
    return dict(_rms_rotary(c, always_kv_heads=False, windows="none"), default_prepend_bos=True)


def mistral_config(c: Any) -> dict[str, Any]:
    # HF Mistral applies `sliding_window` (when set) on every layer and ignores `layer_types`.
    return dict(_rms_rotary(c, always_kv_heads=True, windows="every"), default_prepend_bos=True)


def qwen2_config(c: Any) -> dict[str, Any]:
    # Qwen2 has q/k/v biases (always), no output or MLP bias; TL's conversion reads them. Its config turns
    # use_sliding_window / max_window_layers into layer_types.
    return dict(_rms_rotary(c, always_kv_heads=True, windows="layer_types"), default_prepend_bos=False)


def qwen3_config(c: Any) -> dict[str, Any]:
    _no_biases(c, "attention_bias")
    return dict(
        _rms_rotary(c, always_kv_heads=False, windows="layer_types"), use_qk_norm=True, default_prepend_bos=False
    )


def _gemma(c: Any, attn_softcap: bool) -> dict[str, Any]:
    _no_biases(c, "attention_bias")
    if _get(c, "use_bidirectional_attention", False):
        # Gemma 3 unmasks every full layer and the whole window; Gemma 2's eager attention ignores the flag
        # while its flash attention honours it. TL attends causally only.
        raise NotImplementedError(
            f"{c.model_type} with use_bidirectional_attention=True: TransformerLens attends causally only"
        )
    out = _rms_rotary(c, always_kv_heads=True, windows="layer_types", act_name="hidden_activation")
    # HF scales scores by query_pre_attn_scalar**-0.5 (not d_head**-0.5); TL divides by attn_scale.
    out.update(
        attn_scale=float(c.query_pre_attn_scalar) ** 0.5,
        use_normalization_before_and_after=True,
        default_prepend_bos=True,
    )
    # The √d_model embedding scale and the (1 + w) RMSNorm weights live in TL's convert_gemma_weights.
    if attn_softcap and _get(c, "attn_logit_softcapping"):
        out["attn_scores_soft_cap"] = float(c.attn_logit_softcapping)
    if _get(c, "final_logit_softcapping"):
        out["output_logits_soft_cap"] = float(c.final_logit_softcapping)
    return out


def gemma2_config(c: Any) -> dict[str, Any]:
    return _gemma(c, attn_softcap=True)


def gemma3_config(c: Any) -> dict[str, Any]:
    # transformers 5.24's Gemma 3 stores attn_logit_softcapping but never passes it to its attention: no cap.
    return dict(_gemma(c, attn_softcap=False), use_qk_norm=True)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("gpt2", "GPT2LMHeadModel", "gpt2", gpt2_config, tl_conversion("convert_gpt2_weights")),
        Family("neox", "GPTNeoXForCausalLM", "gpt_neox", neox_config, tl_conversion("convert_neox_weights")),
        Family("llama", "LlamaForCausalLM", "llama", llama_config, tl_conversion("convert_llama_weights")),
        Family("mistral", "MistralForCausalLM", "mistral", mistral_config, tl_conversion("convert_mistral_weights")),
        Family("qwen2", "Qwen2ForCausalLM", "qwen2", qwen2_config, tl_conversion("convert_qwen2_weights")),
        Family("qwen3", "Qwen3ForCausalLM", "qwen3", qwen3_config, tl_conversion("convert_qwen3_weights")),
        Family(
            "gemma2",
            "Gemma2ForCausalLM",
            "gemma2",
            gemma2_config,
            tl_conversion("convert_gemma_weights"),
            norm_weight_is_offset=True,
        ),
        Family(
            "gemma3",
            "Gemma3ForCausalLM",
            "gemma3_text",
            gemma3_config,
            tl_conversion("convert_gemma_weights"),
            norm_weight_is_offset=True,
        ),
    )
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(f.architecture for f in FAMILIES.values())


def family_of(hf_config: Any) -> Family:
    """The family of an HF config (by its ``architectures`` entry, else its ``model_type``), or a refusal by name."""
    architectures = list(_get(hf_config, "architectures", []))
    model_type = getattr(hf_config, "model_type", None)
    for family in FAMILIES.values():
        if architectures[:1] == [family.architecture] or (not architectures and model_type == family.model_type):
            return family
    named = architectures[0] if architectures else f"model_type {model_type!r}"
    raise UnsupportedArchitectureError(
        f"architecture {named} is not supported; tl_patching loads exactly: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )
