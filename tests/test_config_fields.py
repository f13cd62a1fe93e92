"""Every HF config field that can change what a family's model computes, one table row per value tried.

Each row is one of
- FOLLOWS: `random_pair(family, **{field: value})` loads (the probe check passes), TL's logits equal HF's to
  ≤ 1e-4 relative on 32 tokens (longer than every window tried), and HF's logits differ from the family's
  default tiny config, so the row cannot pass without exercising the field;
- NO_EFFECT: the same equality, and HF's logits do not change (≤ 1e-4 relative): transformers 5.24's modeling
  code ignores the field for a float32 forward in eval mode (dropouts, `pretraining_tp`, RoPE's
  `partial_rotary_factor` where the default RoPE rotates the whole head, Mistral's `layer_types`, ...);
- REFUSED: loading raises `NotImplementedError` / `UnsupportedArchitectureError` whose message names the field.

Two meta-tests keep the table complete: every config attribute the family converter reads
(`Family.hooked_config`), and every one HF's modeling code reads while it builds the model and runs a forward,
is a field of some row of that family or in a short allow-list of fields that do not affect the computation.
docs/models.md ("Config fields") summarises the table.
"""

import copy
import fnmatch

import pytest
import torch
import transformers

from tl_patching import lens
from tl_patching.families import FAMILIES, UnsupportedArchitectureError
from tl_patching.testing import random_config as _tiny_config
from tl_patching.testing import random_pair

FOLLOWS, NO_EFFECT, REFUSED = "follows", "no effect", "refused"
REL_TOL = 1e-4  # relative to max(1, max|HF logit|), as the probe check
TOKENS = (torch.arange(32)[None] * 7) % 48  # 32 positions (windows are 4 or 8); ids < every vocabulary tried

RMS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"]
DEFAULT_THETA = {"qwen2": 1e6, "qwen3": 1e6}  # the tiny configs' rope θ (others: 10 000)
LAYER_TYPES = {"gemma2": ["sliding_attention", "full_attention"], "gemma3": ["sliding_attention", "full_attention"]}


def rope(family, rope_type, **params):
    return dict(rope_type=rope_type, rope_theta=DEFAULT_THETA.get(family, 1e4), **params)


LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)
YARN = dict(factor=4.0, original_max_position_embeddings=16)
LONGROPE = dict(
    factor=4.0, short_factor=[1.0, 1.5, 2.0, 3.0], long_factor=[1.0] * 4, original_max_position_embeddings=16
)


def row(family, field, value, expect, *, id=None, match=None, **extra):
    """One table row: ``{field: value, **extra}`` override the family's tiny HF config; a refusal's message must
    contain ``match`` (default: the field's name). ``sliding_window`` reaches the config through random_pair's own
    argument of that name (the tiny configs of Mistral, Qwen2/3 and Gemma use it)."""
    overrides = {field: value, **extra}
    tag = id or f"{value}".replace(" ", "")
    return pytest.param(family, field, overrides, expect, match or field, id=f"{family}-{field}-{tag}")


FIELDS = [
    # ---- every family -------------------------------------------------------------------------------------
    *[row(f, "is_causal", False, REFUSED) for f in FAMILIES],  # transformers' mask builder goes bidirectional
    *[row(f, "dtype", torch.bfloat16, REFUSED) for f in FAMILIES],
    *[row(f, "tie_word_embeddings", f not in ("gpt2", "gemma2", "gemma3"), FOLLOWS) for f in FAMILIES],
    *[row(f, "vocab_size", 48, FOLLOWS) for f in FAMILIES],
    # ---- GPT-2 ----------------------------------------------------------------------------------------------
    row("gpt2", "n_embd", 48, FOLLOWS),
    row("gpt2", "n_head", 2, FOLLOWS),
    row("gpt2", "n_layer", 3, FOLLOWS),
    row("gpt2", "n_inner", 24, FOLLOWS),
    row("gpt2", "n_positions", 40, FOLLOWS),
    row("gpt2", "layer_norm_epsilon", 0.1, FOLLOWS),
    row("gpt2", "activation_function", "relu", FOLLOWS),
    row("gpt2", "activation_function", "swish", FOLLOWS),  # = silu under another name
    row("gpt2", "activation_function", "quick_gelu", REFUSED),
    row("gpt2", "scale_attn_weights", False, FOLLOWS),
    row("gpt2", "scale_attn_by_inverse_layer_idx", True, FOLLOWS),
    row("gpt2", "reorder_and_upcast_attn", True, NO_EFFECT),  # float32 already: only the rounding moves (2e-6)
    row("gpt2", "add_cross_attention", True, REFUSED),
    row("gpt2", "attn_pdrop", 0.5, NO_EFFECT),
    row("gpt2", "resid_pdrop", 0.5, NO_EFFECT),
    row("gpt2", "embd_pdrop", 0.5, NO_EFFECT),
    # ---- GPT-NeoX (tiny: partial_rotary_factor 0.5, rope θ 10 000) -------------------------------------------
    row("neox", "hidden_size", 48, FOLLOWS),
    row("neox", "num_attention_heads", 2, FOLLOWS),
    row("neox", "num_hidden_layers", 3, FOLLOWS),
    row("neox", "intermediate_size", 48, FOLLOWS),
    row("neox", "layer_norm_eps", 0.1, FOLLOWS),
    row("neox", "hidden_act", "relu", FOLLOWS),
    row("neox", "hidden_act", "quick_gelu", REFUSED),
    row("neox", "use_parallel_residual", False, FOLLOWS),
    row("neox", "attention_bias", False, REFUSED),
    row("neox", "max_position_embeddings", 40, NO_EFFECT),  # TL's n_ctx; the logits of 32 tokens do not depend on it
    row(
        "neox",
        "rope_parameters",
        rope("neox", "default", partial_rotary_factor=0.5) | {"rope_theta": 100.0},
        FOLLOWS,
        id="theta100",
    ),
    row("neox", "rope_parameters", rope("neox", "default", partial_rotary_factor=1.0), FOLLOWS, id="partial1"),
    row(
        "neox",
        "rope_parameters",
        rope("neox", "default", partial_rotary_factor=0.7),
        REFUSED,
        id="partial0.7",
        match="partial_rotary_factor 0.7",
    ),  # int(8 · 0.7) = 5 rotary dimensions: odd
    row("neox", "rope_parameters", rope("neox", "linear", partial_rotary_factor=0.5, factor=4.0), FOLLOWS, id="linear"),
    row("neox", "rope_parameters", rope("neox", "llama3", partial_rotary_factor=0.5, **LLAMA3), FOLLOWS, id="llama3"),
    row("neox", "rope_parameters", rope("neox", "yarn", partial_rotary_factor=0.5, **YARN), FOLLOWS, id="yarn"),
    row(
        "neox",
        "rope_parameters",
        rope("neox", "dynamic", partial_rotary_factor=0.5, factor=4.0),
        NO_EFFECT,
        id="dynamic",
    ),  # rescales only past max_position_embeddings
    row(
        "neox",
        "rope_parameters",
        rope("neox", "longrope", partial_rotary_factor=0.5, **LONGROPE)
        | {"short_factor": [1.0, 1.5], "long_factor": [1.0, 1.0]},
        REFUSED,
        id="longrope",
        match="rope_type 'longrope'",
    ),
    # config.json's older names, folded into rope_parameters by GPTNeoXConfig
    row("neox", "rotary_pct", 1.0, FOLLOWS, rope_parameters=None, rotary_emb_base=10000.0),
    row("neox", "rotary_emb_base", 100.0, FOLLOWS, rope_parameters=None, rotary_pct=0.5),
    row("neox", "rope_theta", 100.0, NO_EFFECT, rope_parameters=None, rotary_pct=0.5),  # rotary_emb_base wins
    row("neox", "partial_rotary_factor", 1.0, NO_EFFECT, rope_parameters=None, rotary_pct=0.5),  # rotary_pct wins
    row(
        "neox",
        "original_max_position_embeddings",
        8,
        FOLLOWS,  # outranks rope_parameters' own
        rope_parameters=rope("neox", "yarn", partial_rotary_factor=0.5, **YARN),
    ),
    row("neox", "head_dim", 16, FOLLOWS),  # not a NeoX field, but its rotary embedding reads it: 8 rotary dims
    row("neox", "attention_dropout", 0.5, NO_EFFECT),
    row("neox", "hidden_dropout", 0.5, NO_EFFECT),
    # never windowed; layer_types would only label per-type RoPE parameters (HF's cache builder wants a window
    # for a sliding layer: the rows run without one)
    row("neox", "layer_types", ["full_attention", "sliding_attention"], NO_EFFECT, use_cache=False),
    # ---- Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3: the shared shape -------------------------------------
    *[row(f, "hidden_size", 48, FOLLOWS) for f in RMS],  # 4 heads of head_dim 8: hidden_size ≠ heads · head_dim
    *[row(f, "head_dim", 12, FOLLOWS) for f in RMS],
    *[row(f, "num_attention_heads", 2, FOLLOWS) for f in RMS],
    *[row(f, "num_key_value_heads", 1, FOLLOWS) for f in RMS],
    *[row(f, "num_key_value_heads", 4, FOLLOWS) for f in RMS],  # no grouping
    *[
        row(
            f,
            "num_hidden_layers",
            3,
            FOLLOWS,
            **({"layer_types": LAYER_TYPES[f] + ["sliding_attention"]} if f in LAYER_TYPES else {}),
        )
        for f in RMS
    ],
    *[row(f, "intermediate_size", 48, FOLLOWS) for f in RMS],
    *[row(f, "rms_norm_eps", 0.5, FOLLOWS) for f in RMS],
    *[row(f, "max_position_embeddings", 40, NO_EFFECT) for f in RMS],
    *[row(f, "attention_dropout", 0.5, NO_EFFECT) for f in RMS],
    *[
        row(f, "rope_parameters", rope(f, "default") | {"rope_theta": 100.0}, FOLLOWS, id="theta100")
        for f in RMS
        if f != "gemma3"
    ],
    # older top-level names, folded into rope_parameters by the config (which outranks them when it has a value)
    *[row(f, "rope_theta", 100.0, FOLLOWS, rope_parameters=None) for f in RMS if f != "gemma3"],
    *[
        row(f, "original_max_position_embeddings", 8, FOLLOWS, rope_parameters=rope(f, "yarn", **YARN))
        for f in RMS
        if f != "gemma3"
    ],
    *[row(f, "rope_parameters", rope(f, "dynamic", factor=4.0), NO_EFFECT, id="dynamic") for f in RMS if f != "gemma3"],
    *[row(f, "rope_parameters", rope(f, "llama3", **LLAMA3), FOLLOWS, id="llama3") for f in RMS if f != "gemma3"],
    *[row(f, "rope_parameters", rope(f, "yarn", **YARN), FOLLOWS, id="yarn") for f in RMS if f != "gemma3"],
    *[
        row(f, "rope_parameters", rope(f, "longrope", **LONGROPE), REFUSED, id="longrope", match="rope_type 'longrope'")
        for f in RMS
        if f != "gemma3"
    ],
    # The default RoPE of these families rotates the whole head whatever partial_rotary_factor says; their
    # scaled RoPEs would rotate a part and fail to broadcast in HF itself.
    *[row(f, "partial_rotary_factor", 0.5, NO_EFFECT) for f in RMS],
    *[
        row(
            f,
            "rope_parameters",
            rope(f, "linear", factor=4.0, partial_rotary_factor=0.5),
            REFUSED,
            id="linear-partial",
            match="partial_rotary_factor",
        )
        for f in RMS
        if f != "gemma3"
    ],
    # ---- Llama ----------------------------------------------------------------------------------------------
    row("llama", "hidden_act", "gelu", FOLLOWS),
    row("llama", "hidden_act", "gelu_python", FOLLOWS),  # = gelu under another name
    row("llama", "hidden_act", "xielu", REFUSED),  # HF's xIELU has learned parameters
    row("llama", "rope_parameters", rope("llama", "linear", factor=4.0), FOLLOWS, id="linear"),
    row(
        "llama",
        "rope_parameters",
        rope("llama", "yarn", **YARN, attention_factor=1.5, beta_fast=8.0, beta_slow=2.0),
        FOLLOWS,
        id="yarn-attention-factor-betas",
    ),
    row(
        "llama",
        "rope_parameters",
        rope("llama", "yarn", **YARN, mscale=2.0, mscale_all_dim=1.0),
        FOLLOWS,
        id="yarn-mscale",
    ),
    row("llama", "rope_parameters", rope("llama", "yarn", **YARN, truncate=False), FOLLOWS, id="yarn-no-truncate"),
    row("llama", "attention_bias", True, REFUSED),
    row("llama", "mlp_bias", True, REFUSED),
    row("llama", "pretraining_tp", 2, NO_EFFECT),  # transformers 5 no longer reads it
    row("llama", "layer_types", ["full_attention", "sliding_attention"], NO_EFFECT, use_cache=False),  # as NeoX
    # ---- Mistral: sliding_window on every layer ----------------------------------------------------------------
    row("mistral", "sliding_window", 8, FOLLOWS),
    row("mistral", "sliding_window", None, FOLLOWS),
    row("mistral", "layer_types", ["full_attention", "sliding_attention"], NO_EFFECT),  # MistralModel ignores it
    row("mistral", "hidden_act", "gelu", FOLLOWS),
    row("mistral", "hidden_act", "quick_gelu", REFUSED),
    row(
        "mistral",
        "rope_parameters",
        rope("mistral", "linear", factor=4.0),
        REFUSED,
        id="linear-on-windows",
        match="rope_parameters rope_type 'linear' on sliding-window layers",
    ),  # TL scales global layers only
    row(
        "mistral",
        "rope_parameters",
        rope("mistral", "linear", factor=4.0),
        FOLLOWS,
        id="linear-no-window",
        sliding_window=None,
    ),
    row("mistral", "attention_bias", True, NO_EFFECT),  # not a Mistral field: its projections have no bias
    # ---- Qwen2 / Qwen3: sliding layers from use_sliding_window and max_window_layers (or layer_types) -----------
    *[
        r
        for f in ("qwen2", "qwen3")
        for r in (
            row(f, "use_sliding_window", True, FOLLOWS, max_window_layers=0),
            row(f, "max_window_layers", 1, FOLLOWS, use_sliding_window=True),
            row(f, "sliding_window", 8, FOLLOWS, use_sliding_window=True, max_window_layers=0),
            row(f, "layer_types", ["sliding_attention", "full_attention"], FOLLOWS, use_sliding_window=True),
            # HF's config drops the window unless use_sliding_window; its forward would then fail on these layers
            row(
                f,
                "layer_types",
                ["sliding_attention", "full_attention"],
                REFUSED,
                id="no-window",
                match="sliding_window",
            ),
            row(f, "hidden_act", "gelu", FOLLOWS),
            row(f, "hidden_act", "quick_gelu", REFUSED),
            row(f, "rope_parameters", rope(f, "linear", factor=4.0), FOLLOWS, id="linear"),
            row(
                f,
                "rope_parameters",
                rope(f, "linear", factor=4.0),
                REFUSED,
                id="linear-on-windows",
                match="rope_parameters rope_type 'linear' on sliding-window layers",
                use_sliding_window=True,
                max_window_layers=1,
            ),
            row(
                f,
                "rope_parameters",
                rope(f, "yarn", **YARN),
                FOLLOWS,
                id="yarn-with-windows",
                use_sliding_window=True,
                max_window_layers=1,
            ),  # TL's yarn covers local layers too, as HF's single parameter set does
        )
    ],
    row("qwen2", "attention_bias", True, NO_EFFECT),  # Qwen2's q/k/v always have biases, o_proj never
    row("qwen3", "attention_bias", True, REFUSED),
    # ---- Gemma 2 / Gemma 3 --------------------------------------------------------------------------------------
    *[
        r
        for f in ("gemma2", "gemma3")
        for r in (
            row(f, "query_pre_attn_scalar", 32, FOLLOWS),
            row(f, "final_logit_softcapping", 2.0, FOLLOWS),  # binds: |logits| reach 2
            row(f, "sliding_window", 8, FOLLOWS),
            row(f, "layer_types", ["full_attention", "sliding_attention"], FOLLOWS),
            row(f, "layer_types", ["full_attention", "full_attention"], FOLLOWS),
            row(f, "hidden_activation", "silu", FOLLOWS),
            row(f, "hidden_activation", "quick_gelu", REFUSED),
            row(f, "attention_bias", True, REFUSED),
            row(f, "use_bidirectional_attention", True, REFUSED),
        )
    ],
    row("gemma2", "attn_logit_softcapping", 1.5, FOLLOWS),  # tiny default 3.0 already binds
    row("gemma2", "attn_logit_softcapping", None, FOLLOWS),
    row("gemma2", "final_logit_softcapping", None, FOLLOWS),
    row(
        "gemma2",
        "rope_parameters",
        rope("gemma2", "linear", factor=4.0),
        REFUSED,
        id="linear",
        match="rope_parameters rope_type 'linear' on sliding-window layers",
    ),
    # transformers 5.24's Gemma 3 stores attn_logit_softcapping but never passes it to its attention
    row("gemma3", "attn_logit_softcapping", 1.5, NO_EFFECT),
    # Gemma 3: one RoPE parameter set per layer type (tiny: local θ 10 000, global θ 1 000 000)
    row(
        "gemma3",
        "rope_parameters",
        {
            "sliding_attention": rope("gemma3", "default") | {"rope_theta": 100.0},
            "full_attention": rope("gemma3", "default") | {"rope_theta": 1e6},
        },
        FOLLOWS,
        id="local-theta100",
    ),
    row(
        "gemma3",
        "rope_parameters",
        {
            "sliding_attention": rope("gemma3", "default"),
            "full_attention": rope("gemma3", "default") | {"rope_theta": 1e3},
        },
        FOLLOWS,
        id="global-theta1000",
    ),
    row(
        "gemma3",
        "rope_parameters",
        {
            "sliding_attention": rope("gemma3", "default"),
            "full_attention": rope("gemma3", "linear", factor=8.0) | {"rope_theta": 1e6},
        },
        FOLLOWS,
        id="global-linear",
    ),
    row(
        "gemma3",
        "rope_parameters",
        {
            "sliding_attention": rope("gemma3", "default"),
            "full_attention": rope("gemma3", "yarn", **YARN) | {"rope_theta": 1e6},
        },
        FOLLOWS,
        id="global-yarn",
    ),  # TL: yarn_global_attn_only
    row(
        "gemma3",
        "rope_parameters",
        {
            "sliding_attention": rope("gemma3", "yarn", **YARN),
            "full_attention": rope("gemma3", "yarn", **YARN) | {"rope_theta": 1e6},
        },
        FOLLOWS,
        id="yarn-both",
    ),
    row(
        "gemma3",
        "rope_parameters",
        {
            "sliding_attention": rope("gemma3", "default"),
            "full_attention": rope("gemma3", "dynamic", factor=4.0) | {"rope_theta": 1e6},
        },
        NO_EFFECT,
        id="global-dynamic",
    ),
    row(
        "gemma3",
        "rope_parameters",
        {
            "sliding_attention": rope("gemma3", "default"),
            "full_attention": rope("gemma3", "llama3", **LLAMA3) | {"rope_theta": 1e6},
        },
        REFUSED,
        id="global-llama3",
        match="rope_parameters rope_type 'default' on sliding-window layers",
    ),
    row(
        "gemma3",
        "rope_parameters",
        {
            "sliding_attention": rope("gemma3", "linear", factor=2.0),
            "full_attention": rope("gemma3", "default") | {"rope_theta": 1e6},
        },
        REFUSED,
        id="local-linear",
        match="rope_parameters rope_type 'linear' on sliding-window layers",
    ),
    row(
        "gemma3",
        "rope_parameters",
        {
            "sliding_attention": rope("gemma3", "longrope", **LONGROPE),
            "full_attention": rope("gemma3", "default") | {"rope_theta": 1e6},
        },
        REFUSED,
        id="local-longrope",
        match="rope_type 'longrope'",
    ),
    # config.json's older names, folded into rope_parameters / layer_types by Gemma3TextConfig
    row("gemma3", "rope_local_base_freq", 100.0, FOLLOWS, rope_parameters=None, rope_theta=1e6),
    row("gemma3", "rope_theta", 1e3, FOLLOWS, rope_parameters=None, rope_local_base_freq=1e4),
    row("gemma3", "sliding_window_pattern", 3, FOLLOWS, layer_types=None),  # 2 layers: both sliding
]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max(1, max |b|), as the probe check measures."""
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


_default_logits: dict[str, torch.Tensor] = {}


def default_hf_logits(family: str) -> torch.Tensor:
    if family not in _default_logits:
        hf, _ = random_pair(family)
        with torch.no_grad():
            _default_logits[family] = hf(TOKENS).logits
    return _default_logits[family]


# TransformerLens 4 (a bridge around the HF model): the rows it refuses, and the words the refusal must contain.
# Measured on transformer-lens 4.3; every other row loads and equals HF (a REFUSED row too: HookedTransformer's
# limits are not the bridge's).
BRIDGE_CANNOT = "TransformerBridge cannot run this config"
HF_FAILS = "the HF model itself fails"
BRIDGE_REFUSALS = {  # row id pattern -> the words of the refusal
    "*-is_causal-False": "is_causal=False",
    "*-dtype-*": "dtype",
    "llama-hidden_act-xielu": "dtype",  # HF's xIELU keeps its parameters in bfloat16
    "gpt2-scale_attn_weights-False": "scale_attn_weights",
    "gemma3-attn_logit_softcapping-1.5": "attn_logit_softcapping",
    "neox-attention_bias-False": BRIDGE_CANNOT,
    "neox-head_dim-16": BRIDGE_CANNOT,
    "*-rope_parameters-linear-partial": HF_FAILS,  # HookedTransformer refuses these by name before any forward
    "*-layer_types-no-window": HF_FAILS,
}


def _bridge_refusal(row_id: str) -> str | None:
    """What the bridge's refusal of this row must say (None: it loads), on TransformerLens 4 only."""
    if lens.MAJOR < 4:
        return None
    return next((match for pattern, match in BRIDGE_REFUSALS.items() if fnmatch.fnmatchcase(row_id, pattern)), None)


@pytest.mark.parametrize("family, field, overrides, expect, match", FIELDS)
def test_config_field(family, field, overrides, expect, match, request):
    overrides = copy.deepcopy(overrides)  # HF's config standardises rope_parameters in place
    if expect == REFUSED and lens.MAJOR < 4:
        with pytest.raises((NotImplementedError, UnsupportedArchitectureError), match=match):
            random_pair(family, **overrides)
        return
    refused_by_bridge = _bridge_refusal(request.node.callspec.id.removeprefix(f"tl{lens.MAJOR}-"))
    if refused_by_bridge:
        with pytest.raises((NotImplementedError, UnsupportedArchitectureError), match=refused_by_bridge):
            random_pair(family, **overrides)
        return
    if expect == REFUSED:  # HookedTransformer cannot hold it; a bridge computes with HF's own modules: equal to HF
        hf, tl = random_pair(family, **overrides)
        with torch.no_grad():
            assert _relative(tl(TOKENS), hf(TOKENS).logits) <= REL_TOL
        return
    hf, tl = random_pair(family, **overrides)  # the probe check passed
    with torch.no_grad():
        hf_logits, tl_logits = hf(TOKENS).logits, tl(TOKENS)
    assert _relative(tl_logits, hf_logits) <= REL_TOL
    default = default_hf_logits(family)
    changed = hf_logits.shape != default.shape or _relative(hf_logits, default) > 100 * REL_TOL
    if expect == FOLLOWS:
        assert changed, f"{field}={overrides[field]!r} does not change HF's logits: the row tests nothing"
    else:
        assert hf_logits.shape == default.shape and _relative(hf_logits, default) <= REL_TOL


# ---- the table is complete ------------------------------------------------------------------------------------


def _table_fields(family: str) -> set[str]:
    return {p.values[1] for p in FIELDS if p.values[0] == family}


class _Recorder:
    """Stands for an HF config and records the attribute names read from it."""

    def __init__(self, config, reads: set[str]):
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "_reads", reads)

    def __getattr__(self, name):
        self._reads.add(name)
        return getattr(self._config, name)


# Read by the converter without changing the computation: the family's identity (in messages).
CONVERTER_ALLOWED = {"model_type"}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_field_the_converter_reads_is_in_the_table(family):
    reads: set[str] = set()
    configs = [{}] + [p.values[2] for p in FIELDS if p.values[0] == family and p.values[1] != "dtype"]
    for overrides in configs:  # reads depend on values (a window, a cap, a rope type): try every row's config
        try:
            FAMILIES[family].hooked_config(_Recorder(_tiny_config(family, **copy.deepcopy(overrides)), reads))
        except NotImplementedError:
            pass
    assert reads - _table_fields(family) - CONVERTER_ALLOWED == set()


# Read by HF's modeling code without changing a forward's logits (float32, eval mode, no cache).
HF_ALLOWED = {
    # what to return and how to run, not what to compute
    "return_dict",
    "output_attentions",
    "_output_attentions",
    "output_hidden_states",
    "output_cross_attentions",
    "use_cache",
    "_attn_implementation",
    "_attn_implementation_internal",
    "_experts_implementation",
    "_experts_implementation_internal",
    "is_encoder_decoder",
    "gradient_checkpointing",
    "base_model_tp_plan",
    "base_model_pp_plan",
    "base_model_ep_plan",
    "base_model_fsdp_plan",
    "_name_or_path",
    "name_or_path",
    # initialisation only: every weight is then overwritten (random_pair) or loaded (checkpoints); pad_token_id
    # is nn.Embedding's padding_idx, which zeroes that row at init and stops its gradient
    "initializer_range",
    "pad_token_id",
    # composite-model and quantisation lookups (absent on these decoder-only float configs)
    "text_config",
    "decoder",
    "generator",
    "vision_aspect_ratio",
    "vision_feature_layer",
    "vision_feature_select_strategy",
    "quantization_config",
    "kv_sharing_modes",
    # per-layer overrides: HF refuses to build these families from a heterogeneous config
    "per_layer_config",
    "is_heterogeneous",
    "_heterogeneity_spec",
    # bookkeeping of transformers' RoPE-config mixin (the parameters themselves are in rope_parameters)
    "default_rope_type",
    "_rope_type_labels",
}


def _hf_reads(family: str, overrides: dict) -> set[str]:
    config = _tiny_config(family, **copy.deepcopy(overrides))
    config._attn_implementation = "eager"
    base, reads = type(config), set()

    class Recording(base):
        def __getattribute__(self, name):
            reads.add(name)
            return base.__getattribute__(self, name)

    config.__class__ = Recording
    try:
        model = getattr(transformers, FAMILIES[family].architecture)(config).eval()
        with torch.no_grad():
            model(TOKENS[:, :16], use_cache=False)
    finally:
        config.__class__ = base
    aliases = base.attribute_map  # e.g. GPT-2's hidden_size -> n_embd
    return {
        aliases.get(name, name)
        for name in reads
        if not name.startswith("__") and not callable(getattr(config, name, None))
    }


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_field_the_hf_model_reads_is_in_the_table(family):
    reads: set[str] = set()
    for p in FIELDS:
        if p.values[0] == family and p.values[3] != REFUSED:
            reads |= _hf_reads(family, p.values[2])
    assert reads - _table_fields(family) - HF_ALLOWED == set()
