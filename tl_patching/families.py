"""The model families tl_patching loads, as plain data: one table row per family.

Each row says how to read a HuggingFace config as a TransformerLens `HookedTransformerConfig`
(mirroring ``transformer_lens.loading_from_pretrained.convert_hf_model_config`` for that
architecture, but from the HF config in hand instead of a list of official names), which of
TransformerLens's own weight conversions to use, and how to build a tiny random HF config of the
family for tests. Adding a family is adding a row.

Where TransformerLens 3.9 cannot represent something a config asks for (a RoPE scaling type,
biases the weight conversion drops, a partial rotary on a family that TL rotates fully, an
activation it lacks), the config function raises `NotImplementedError` naming it, so no model is
ever built that silently computes something else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import transformers
from transformer_lens.pretrained import weight_conversions as wc
from transformer_lens.utilities.activation_functions import SUPPORTED_ACTIVATIONS


class UnsupportedArchitectureError(ValueError):
    """The HF architecture is not one of the families tl_patching can load exactly."""


@dataclass(frozen=True)
class Family:
    name: str  # short name used by `random_pair` and in docs
    architecture: str  # the HF class, as in config.json "architectures"
    model_type: str  # config.model_type
    hooked_config: Callable[[Any], dict[str, Any]]  # HF config -> HookedTransformerConfig fields
    convert_weights: Callable[[Any, Any], dict]  # TL's own conversion: (hf_model, cfg) -> TL state dict
    config_class: type  # HF config class, for tiny random models
    tiny_config: Callable[..., dict[str, Any]]  # (n_layers, n_heads, n_kv_heads, d_head, ...) -> config kwargs
    norm_weight_is_offset: bool = False  # Gemma's RMSNorm multiplies by (1 + weight)


def _get(hf_config: Any, name: str, default: Any = None) -> Any:
    value = getattr(hf_config, name, default)
    return default if value is None else value


def _act_fn(name: str) -> str:
    if name not in SUPPORTED_ACTIVATIONS:
        raise NotImplementedError(f"activation {name!r}: TransformerLens 3.9 supports {sorted(SUPPORTED_ACTIVATIONS)}")
    return name


def _d_head(c: Any) -> int:
    return _get(c, "head_dim") or c.hidden_size // c.num_attention_heads


def _attention_windows(c: Any, all_local_if_window: bool = False) -> dict[str, Any]:
    """Sliding-window layers: HF ``layer_types`` ("sliding_attention"/"full_attention") -> TL ``attn_types``.

    Both mask keys with ``key > query - window``: a window of ``sliding_window`` positions including
    the query's own.
    """
    window = _get(c, "sliding_window")
    layer_types = _get(c, "layer_types")
    if layer_types is None:
        kinds = ["sliding_attention" if window and all_local_if_window else "full_attention"] * c.num_hidden_layers
    else:
        kinds = list(layer_types)
    unknown = sorted(set(kinds) - {"sliding_attention", "full_attention"})
    if unknown:
        raise NotImplementedError(f"attention layer types {unknown}: TransformerLens 3.9 has only local and global layers")
    if "sliding_attention" not in kinds:
        return {}
    return dict(
        use_local_attn=True,
        window_size=int(window),
        attn_types=["local" if kind == "sliding_attention" else "global" for kind in kinds],
    )


def _rope(c: Any, local_layers: bool) -> dict[str, Any]:
    """RoPE base(s) and scaling. Gemma 3 keeps one parameter set per layer type (local / global)."""
    params = dict(_get(c, "rope_parameters", {}))
    per_type = "full_attention" in params or "sliding_attention" in params
    global_p = params.get("full_attention", {}) if per_type else params
    local_p = params.get("sliding_attention", global_p) if per_type else params
    out: dict[str, Any] = {"rotary_base": global_p.get("rope_theta", 10000.0)}
    if local_p.get("rope_theta", out["rotary_base"]) != out["rotary_base"]:
        out["rotary_base_local"] = local_p["rope_theta"]
    for p in (global_p, local_p):
        if p.get("partial_rotary_factor", 1.0) != 1.0:
            raise NotImplementedError(f"partial_rotary_factor {p['partial_rotary_factor']} on {c.model_type}")
    local_type = local_p.get("rope_type", "default")
    global_type = global_p.get("rope_type", "default")
    if local_layers and local_type != "default":
        # TL applies no scaling at all on local layers.
        raise NotImplementedError(f"rope_type {local_type!r} on sliding-window layers (TransformerLens scales only global ones)")
    if global_type == "default":
        pass
    elif global_type == "llama3":
        out.update(
            use_NTK_by_parts_rope=True,
            NTK_by_parts_factor=global_p.get("factor", 1.0),
            NTK_by_parts_low_freq_factor=global_p.get("low_freq_factor", 1.0),
            NTK_by_parts_high_freq_factor=global_p.get("high_freq_factor", 4.0),
            NTK_original_ctx_len=global_p.get("original_max_position_embeddings", c.max_position_embeddings),
        )
    elif global_type == "linear":
        out["rotary_scaling_factor"] = global_p.get("factor", 1.0)
    else:
        raise NotImplementedError(f"rope_type {global_type!r}: supported are 'default', 'llama3' and 'linear'")
    return out


def _no_biases(c: Any, *names: str) -> None:
    for name in names:
        if _get(c, name, False):
            raise NotImplementedError(f"{c.model_type} with {name}=True: TransformerLens's weight conversion drops those biases")


def _rms_rotary(c: Any, always_kv_heads: bool, act_name: str = "hidden_act", all_local_if_window: bool = False) -> dict[str, Any]:
    """The shared shape of Llama, Mistral, Qwen2/3 and Gemma: RMSNorm, full RoPE, gated MLP, GQA."""
    d_head = _d_head(c)
    n_kv = c.num_key_value_heads or c.num_attention_heads
    windows = _attention_windows(c, all_local_if_window)
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
        act_fn=_act_fn(getattr(c, act_name)),
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=d_head,
        final_rms=True,
        gated_mlp=True,
        **_rope(c, local_layers="local" in windows.get("attn_types", [])),
        **windows,
    )


# ---- HF config -> HookedTransformerConfig fields, one function per family -------------------------------

def gpt2_config(c: Any) -> dict[str, Any]:
    return dict(
        d_model=c.n_embd, d_head=c.n_embd // c.n_head, n_heads=c.n_head, d_mlp=c.n_inner or 4 * c.n_embd,
        n_layers=c.n_layer, n_ctx=c.n_positions, eps=c.layer_norm_epsilon, d_vocab=c.vocab_size,
        act_fn=_act_fn(c.activation_function), use_attn_scale=_get(c, "scale_attn_weights", True),
        scale_attn_by_inverse_layer_idx=c.scale_attn_by_inverse_layer_idx, normalization_type="LN",
        default_prepend_bos=True,
    )


def neox_config(c: Any) -> dict[str, Any]:
    if not _get(c, "attention_bias", True):
        raise NotImplementedError("GPT-NeoX with attention_bias=False: TransformerLens's conversion expects the biases")
    d_head = c.hidden_size // c.num_attention_heads
    rope = dict(_get(c, "rope_parameters", {}))
    if rope.get("rope_type", "default") != "default":
        raise NotImplementedError(f"rope_type {rope['rope_type']!r} on GPT-NeoX")
    pct = rope.get("partial_rotary_factor", _get(c, "rotary_pct", 1.0))
    return dict(
        d_model=c.hidden_size, d_head=d_head, n_heads=c.num_attention_heads, d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings, eps=c.layer_norm_eps, d_vocab=c.vocab_size,
        act_fn=_act_fn(c.hidden_act), parallel_attn_mlp=_get(c, "use_parallel_residual", True),
        positional_embedding_type="rotary", rotary_dim=round(pct * d_head), rotary_adjacent_pairs=False,
        rotary_base=rope.get("rope_theta", 10000.0), normalization_type="LN", default_prepend_bos=False,
    )


def llama_config(c: Any) -> dict[str, Any]:
    _no_biases(c, "attention_bias", "mlp_bias")
    return dict(_rms_rotary(c, always_kv_heads=False), default_prepend_bos=True)


def mistral_config(c: Any) -> dict[str, Any]:
    # HF Mistral applies `sliding_window` (when set) on every layer.
    return dict(_rms_rotary(c, always_kv_heads=True, all_local_if_window=True), default_prepend_bos=True)


def qwen2_config(c: Any) -> dict[str, Any]:
    # Qwen2 has q/k/v biases (always), no output or MLP bias; TL's conversion reads them.
    return dict(_rms_rotary(c, always_kv_heads=True), default_prepend_bos=False)


def qwen3_config(c: Any) -> dict[str, Any]:
    _no_biases(c, "attention_bias")
    return dict(_rms_rotary(c, always_kv_heads=False), use_qk_norm=True, default_prepend_bos=False)


def _gemma(c: Any) -> dict[str, Any]:
    _no_biases(c, "attention_bias")
    out = _rms_rotary(c, always_kv_heads=True, act_name="hidden_activation")
    # HF scales scores by query_pre_attn_scalar**-0.5 (not d_head**-0.5); TL divides by attn_scale.
    out.update(attn_scale=float(c.query_pre_attn_scalar) ** 0.5, use_normalization_before_and_after=True,
               default_prepend_bos=True)
    # The √d_model embedding scale and the (1 + w) RMSNorm weights live in TL's convert_gemma_weights.
    if _get(c, "attn_logit_softcapping"):
        out["attn_scores_soft_cap"] = float(c.attn_logit_softcapping)
    if _get(c, "final_logit_softcapping"):
        out["output_logits_soft_cap"] = float(c.final_logit_softcapping)
    return out


def gemma2_config(c: Any) -> dict[str, Any]:
    return _gemma(c)


def gemma3_config(c: Any) -> dict[str, Any]:
    return dict(_gemma(c), use_qk_norm=True)


# ---- tiny random configs (tests) ---------------------------------------------------------------------------

def _tiny_gpt2(n_layers, n_heads, n_kv_heads, d_head, d_vocab, n_ctx, d_mlp, window):
    return dict(vocab_size=d_vocab, n_positions=n_ctx, n_embd=n_heads * d_head, n_layer=n_layers, n_head=n_heads,
                n_inner=d_mlp, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                bos_token_id=0, eos_token_id=0)


def _tiny_neox(n_layers, n_heads, n_kv_heads, d_head, d_vocab, n_ctx, d_mlp, window):
    return dict(vocab_size=d_vocab, max_position_embeddings=n_ctx, hidden_size=n_heads * d_head,
                num_hidden_layers=n_layers, num_attention_heads=n_heads, intermediate_size=d_mlp or 4 * n_heads * d_head,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5),
                use_parallel_residual=True, bos_token_id=0, eos_token_id=0)


def _tiny_rms(n_layers, n_heads, n_kv_heads, d_head, d_vocab, n_ctx, d_mlp, window, **extra):
    return dict(vocab_size=d_vocab, max_position_embeddings=n_ctx, hidden_size=n_heads * d_head, head_dim=d_head,
                num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                intermediate_size=d_mlp or 3 * n_heads * d_head, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                **extra)


def _tiny_llama(*args):
    return _tiny_rms(*args, rope_parameters=dict(rope_type="default", rope_theta=10000.0))


def _tiny_mistral(*args):
    return _tiny_rms(*args, sliding_window=args[-1], rope_parameters=dict(rope_type="default", rope_theta=10000.0))


def _tiny_qwen(*args):
    # The window applies only with use_sliding_window=True (then on layers >= max_window_layers).
    return _tiny_rms(*args, sliding_window=args[-1], rope_parameters=dict(rope_type="default", rope_theta=1000000.0))


def _tiny_gemma2(*args):
    n_layers, d_head, window = args[0], args[3], args[-1]
    # Soft caps low enough to bind on a random model, query_pre_attn_scalar ≠ d_head so the scale is tested.
    return _tiny_rms(*args, sliding_window=window, query_pre_attn_scalar=d_head + 4, attn_logit_softcapping=3.0,
                     final_logit_softcapping=4.0, hidden_activation="gelu_pytorch_tanh",
                     layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)],
                     rope_parameters=dict(rope_type="default", rope_theta=10000.0))


def _tiny_gemma3(*args):
    n_layers, d_head, window = args[0], args[3], args[-1]
    return _tiny_rms(*args, sliding_window=window, query_pre_attn_scalar=d_head + 4, hidden_activation="gelu_pytorch_tanh",
                     layer_types=["full_attention" if i % 2 else "sliding_attention" for i in range(n_layers)],
                     rope_parameters={"sliding_attention": dict(rope_type="default", rope_theta=10000.0),
                                      "full_attention": dict(rope_type="default", rope_theta=1000000.0)})


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("gpt2", "GPT2LMHeadModel", "gpt2", gpt2_config, wc.convert_gpt2_weights,
           transformers.GPT2Config, _tiny_gpt2),
    Family("neox", "GPTNeoXForCausalLM", "gpt_neox", neox_config, wc.convert_neox_weights,
           transformers.GPTNeoXConfig, _tiny_neox),
    Family("llama", "LlamaForCausalLM", "llama", llama_config, wc.convert_llama_weights,
           transformers.LlamaConfig, _tiny_llama),
    Family("mistral", "MistralForCausalLM", "mistral", mistral_config, wc.convert_mistral_weights,
           transformers.MistralConfig, _tiny_mistral),
    Family("qwen2", "Qwen2ForCausalLM", "qwen2", qwen2_config, wc.convert_qwen2_weights,
           transformers.Qwen2Config, _tiny_qwen),
    Family("qwen3", "Qwen3ForCausalLM", "qwen3", qwen3_config, wc.convert_qwen3_weights,
           transformers.Qwen3Config, _tiny_qwen),
    Family("gemma2", "Gemma2ForCausalLM", "gemma2", gemma2_config, wc.convert_gemma_weights,
           transformers.Gemma2Config, _tiny_gemma2, norm_weight_is_offset=True),
    Family("gemma3", "Gemma3ForCausalLM", "gemma3_text", gemma3_config, wc.convert_gemma_weights,
           transformers.Gemma3TextConfig, _tiny_gemma3, norm_weight_is_offset=True),
)}

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
