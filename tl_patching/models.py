"""Loading models as TransformerLens models (a `HookedTransformer` on TransformerLens 3, a `TransformerBridge` on 4),
exactly or not at all.

Families (see `tl_patching.families`): GPT-2, GPT-NeoX (Pythia), Llama (SmolLM2, Llama 3), Mistral,
Qwen2, Qwen3, Gemma 2, Gemma 3 (text). On TransformerLens 4 also any other architecture its bridge boots (the
TransformerLens side only: docs/transformerlens4.md); anything else raises `UnsupportedArchitectureError` naming it.

Two weight modes (`tl_patching.provenance`), named for what they hold:

- ``"raw"``: the checkpoint's weights as they are (no norm folding, no centring, no value-bias
  folding). Every activation equals the one a raw HuggingFace hook sees: the mode for cross-checks
  against HF and for geometry (cosine similarity).
- ``"processed"``: what TransformerLens's ``from_pretrained`` does for that family: fold the
  LayerNorm/RMSNorm weights into the next linear maps, centre the writing weights (LayerNorm
  families only; TL skips it under RMSNorm), centre the unembedding (not under a final logit
  soft cap, which is not shift-invariant: Gemma 2), fold the value biases. Log-probabilities equal HF's.

Every model goes through one path: an HF ``AutoModelForCausalLM`` is loaded (`tl_patching.checkpoints`:
eager attention, float32, every weight accounted for), then

- on TransformerLens 3, a `HookedTransformerConfig` is built from its config by the family's row and the weights
  go through TransformerLens's own conversion for that family;
- on TransformerLens 4, a `TransformerBridge` wraps a copy of the HF model (the bridge changes the model it wraps
  in place; the caller's stays a plain HF model, for the HF mirror) in compatibility mode: no processing for
  ``"raw"``, TransformerLens's folding and centring for ``"processed"``. Any architecture the bridge supports
  loads (the HF mirror and E1 know the families of `tl_patching.families`, and refuse others by name);

and then a probe input is run through both: the load is refused (`ModelMismatchError`) unless TL's logits
(raw) or log-probs (processed) equal HF's within `PROBE_TOLERANCE`.

What a model's weights have been through is read from the model itself: `tl_patching.provenance`.
"""

from __future__ import annotations

import copy
import os
import re

import torch
from transformer_lens.utilities.activation_functions import softcap_enabled
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tl_patching import lens
from tl_patching.checkpoints import SHIPPED_MODEL_NAME, display_name, load_hf
from tl_patching.families import SUPPORTED_ARCHITECTURES, UnsupportedArchitectureError, family_of
from tl_patching.lens import HookedTransformer
from tl_patching.provenance import WEIGHT_MODES, WeightMode, weight_mode

# Probe check: max |TL − HF| over a probe input, relative to the size of HF's logits:
#   raw:       max|Δ logits|    ≤ PROBE_TOLERANCE · max(1, max|HF logits|)
#   processed: max|Δ log-probs| ≤ PROBE_TOLERANCE · max(1, max|HF logits|)
# float32 discrepancies measured on every family are ≤ 1.7e-6 relative (tiny random models, 3 seeds)
# and 1.2e-6 on SmolLM2-135M (see docs/models.md). 1e-4 leaves room for deeper models we cannot test
# here (float32 error grows with depth and activation size) while every wrong config detail the
# tests try (a rotary base, window, scale, soft cap, norm, QK-norm, pairing) is off by ≥ 2e-2.
PROBE_TOLERANCE = 1e-4
PROBE_LENGTH = 16

__all__ = [
    "IncompleteCheckpointError",
    "ModelMismatchError",
    "hooked_config",
    "hooked_from_hf",
    "verify_against_hf",
    "load_model",
    "load_pair",
    "probe_tokens",
    "PROBE_TOLERANCE",
]


class IncompleteCheckpointError(ValueError):
    """The checkpoint's weights do not fill the model exactly (missing, unexpected or mis-shaped weights)."""


class ModelMismatchError(RuntimeError):
    """The HookedTransformer does not reproduce the HF model on the probe input."""


# ---- config and weights ------------------------------------------------------------------------------------


def hooked_config(hf_config, device: str | torch.device = "cpu"):
    """The `HookedTransformerConfig` equivalent of an HF config of a supported family (raw, unfolded; TL 3)."""
    from transformer_lens import HookedTransformerConfig

    family = family_of(hf_config)
    fields = family.hooked_config(hf_config)
    fields.update(
        original_architecture=family.architecture,
        model_name=getattr(hf_config, "_name_or_path", "") or f"{family.name}-like",
        device=str(device),
        dtype=torch.float32,
        init_weights=False,
    )
    return HookedTransformerConfig(**fields)


def _processing_flags(cfg, processed: bool) -> dict[str, bool]:
    """The flags TransformerLens's own ``from_pretrained`` uses for this family (or none, raw)."""
    return dict(
        fold_ln=processed,
        center_writing_weights=processed,  # TL applies it under LayerNorm only (not RMSNorm / final_rms)
        center_unembed=processed and not softcap_enabled(cfg.output_logits_soft_cap),
        fold_value_biases=processed,
        refactor_factored_attn_matrices=False,
    )


def _tokenizer_for_tl(tokenizer: PreTrainedTokenizerBase | None) -> PreTrainedTokenizerBase | None:
    """The tokenizer as it is, for TL to keep: TL 3.x would otherwise reload it from disk with add_bos_token=True
    (a tokenizer built in memory has no disk to reload from; GPT-2's and Pythia's would then add a start token
    their own never adds). tl_patching tokenises itself (`tl_patching.prompts.to_tokens`), following the model's
    convention recorded in ``cfg.default_prepend_bos``."""
    if tokenizer is None:
        return None
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.init_kwargs.update(
        name_or_path=tokenizer.init_kwargs.get("name_or_path") or "in-memory", add_bos_token=True
    )
    return tokenizer


_FOLDED_NORM_KEY = re.compile(r"(blocks\.\d+\.ln[12]|ln_final)\.[wb]")


def _use_folded_norms(model: HookedTransformer) -> None:
    """The norm modules (and cfg) TL puts in after folding: LayerNorm -> LayerNormPre, RMSNorm -> RMSNormPre,
    which normalise only (their weights now live in the next linear maps)."""
    from transformer_lens.components import LayerNormPre, RMSNormPre

    pre = {"LN": ("LNPre", LayerNormPre), "RMS": ("RMSPre", RMSNormPre)}.get(model.cfg.normalization_type)
    if pre is None:  # LNPre / RMSPre: already folded, nothing to swap (as in TL)
        return
    model.cfg.normalization_type, norm = pre
    model.ln_final = norm(model.cfg)
    for block in model.blocks:
        block.ln1, block.ln2 = norm(model.cfg), norm(model.cfg)
        if model.cfg.is_layer_norm_activation():
            block.mlp.ln = norm(model.cfg)


def _load_weights(model: HookedTransformer, state: dict[str, torch.Tensor], flags: dict[str, bool]) -> None:
    """TL 3.9's ``load_and_process_state_dict`` step by step, with its public parts: fill the missing keys,
    swap in the folded norm modules, process the state dict (`ProcessWeights.process_weights`, what TL's
    method calls), then load it in one ``load_state_dict`` call (TL makes one per key, each walking the
    whole module tree: most of a SmolLM2 load). Its missing and unexpected keys are checked: nothing of
    the converted state may be dropped except the norm weights that folding has moved into the next weights."""
    from transformer_lens.weight_processing import ProcessWeights

    state = model.fill_missing_keys(state)
    if flags["fold_ln"]:
        _use_folded_norms(model)
    state = ProcessWeights.process_weights(state, model.cfg, **flags)
    result = model.load_state_dict(state, strict=False)
    if flags["fold_ln"]:
        model.setup()  # the hook points of the new norm modules
    unexpected = [k for k in result.unexpected_keys if not (flags["fold_ln"] and _FOLDED_NORM_KEY.fullmatch(k))]
    if result.missing_keys or unexpected:
        raise IncompleteCheckpointError(
            f"{model.cfg.model_name}: TransformerLens's conversion does not fill the model exactly: "
            f"missing {result.missing_keys[:5]}, unexpected {unexpected[:5]}"
        )


def hooked_from_hf(
    hf_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None = None,
    weights: WeightMode = "raw",
    device: str | torch.device = "cpu",
    name: str | None = None,
    verify: bool = True,
) -> HookedTransformer:
    """The TransformerLens model holding the very same weights as ``hf_model``: a `HookedTransformer` (TL 3, any
    family of `tl_patching.families`) or a `TransformerBridge` around a copy of it (TL 4, any architecture it boots).

    With ``verify`` (the default) a probe input is run through both and `ModelMismatchError` is raised
    unless TL's logits (raw) / log-probs (processed) equal HF's within `PROBE_TOLERANCE` (relative to
    max(1, max|HF logit|)). The weight mode is not stored on the model: read it back with `weight_mode`.
    """
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {WEIGHT_MODES}, got {weights!r}")
    if lens.MAJOR < 4:
        hooked_config(hf_model.config)  # what the family's row cannot represent is refused by name first
    dtypes = {p.dtype for p in hf_model.parameters()}
    if dtypes != {torch.float32}:  # TL's model is float32: a half-precision HF model computes something else
        raise NotImplementedError(
            f"dtype {', '.join(sorted(map(str, dtypes)))}: tl_patching converts float32 models "
            "(load with dtype=torch.float32, cast the TransformerLens model afterwards)"
        )
    if lens.MAJOR >= 4:
        _check_bridgeable(hf_model)
    build = _bridge if lens.MAJOR >= 4 else _hooked_transformer
    model = build(hf_model, _tokenizer_for_tl(tokenizer), weights, name)
    if tokenizer is not None:  # the model's own start-token convention: what its tokenizer does
        from tl_patching.prompts import adds_start_token

        model.cfg.default_prepend_bos = adds_start_token(tokenizer)
    model = (model.to(device) if lens.is_bridge(model) else model.to(device, print_details=False)).eval()
    if verify:
        verify_against_hf(hf_model, model)
    return model


def _hooked_transformer(hf_model, tokenizer, weights: WeightMode, name: str | None) -> HookedTransformer:
    """TransformerLens 3: the family's config row and TL's own weight conversion and processing."""
    family = family_of(hf_model.config)
    if type(hf_model).__name__ != family.architecture:
        raise UnsupportedArchitectureError(
            f"{type(hf_model).__name__} is not {family.architecture}: supported are "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    cfg = hooked_config(hf_model.config, device="cpu")
    if name:
        cfg.model_name = name
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    with torch.no_grad():  # TL's processing is out of place and loading copies: hf_model is left as it was
        _load_weights(model, family.convert_weights(hf_model, cfg), _processing_flags(cfg, weights == "processed"))
    return model


# Config values TransformerLens 4's bridge computes differently from the HF model it wraps (its attention is its own),
# found by tests/test_config_fields.py on transformer-lens 4.3: refused by name (the probe check would also catch
# them, without the name). (architecture or None for every one, field, is the value refused?, what it means)
BRIDGE_REFUSED = [
    (None, "is_causal", lambda v: v is False, "bidirectional attention (is_causal=False): the bridge masks causally"),
    ("GPT2LMHeadModel", "scale_attn_weights", lambda v: v is False, "unscaled scores (scale_attn_weights=False)"),
    (
        "Gemma3ForCausalLM",
        "attn_logit_softcapping",
        lambda v: v is not None,
        "attn_logit_softcapping: transformers' Gemma 3 never applies it, the bridge does",
    ),
]


def _check_bridgeable(hf_model) -> None:
    architecture, config = type(hf_model).__name__, hf_model.config
    for arch, field, refused, what in BRIDGE_REFUSED:
        if arch in (None, architecture) and hasattr(config, field) and refused(getattr(config, field)):
            raise NotImplementedError(f"{architecture}: {what}; TransformerLens {lens.TL_VERSION}'s bridge differs")


def _bridge(hf_model, tokenizer, weights: WeightMode, name: str | None) -> HookedTransformer:
    """TransformerLens 4: a `TransformerBridge` around a copy of ``hf_model`` in compatibility mode (HookedTransformer's
    hook names and shapes), TL's folding and centring applied to the copy for ``"processed"``."""
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES as BRIDGED

    # TransformerLens 4's public way to wrap a model already loaded (``transformer_lens.model_bridge.sources``
    # exports it); ``TransformerBridge.boot_transformers(hf_model=…)`` would fetch a tokenizer from the hub by name.
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    architecture = type(hf_model).__name__
    if architecture not in BRIDGED:
        raise UnsupportedArchitectureError(
            f"{architecture}: TransformerLens {lens.TL_VERSION}'s bridge does not support it"
        )
    wrapped = copy.deepcopy(hf_model)  # the bridge replaces submodules of the model it wraps, in place
    try:
        bridge = build_bridge_from_module(
            wrapped, architecture, hf_config=wrapped.config, tokenizer=tokenizer, model_name=name or architecture
        )
        with torch.no_grad():
            bridge.enable_compatibility_mode(no_processing=weights == "raw")
    except Exception as e:  # measured: NeoX without attention biases, DeepSeek's per-layer geometry, CodeGen
        raise NotImplementedError(
            f"{architecture}: TransformerLens {lens.TL_VERSION}'s TransformerBridge cannot run this config: "
            f"{_first_words(e)}"
        ) from e
    bridge.cfg.original_architecture = architecture  # HookedTransformer's field, left None by the bridge
    return bridge


def probe_tokens(d_vocab: int, n_ctx: int, length: int = PROBE_LENGTH) -> torch.Tensor:
    """A fixed probe input [1, length] spread over the vocabulary (no tokenizer needed)."""
    n = min(length, n_ctx)
    return (torch.arange(n) * 7919 + 13).remainder(d_vocab)[None]


def _first_words(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def verify_against_hf(hf_model: PreTrainedModel, model: HookedTransformer, tokens: torch.Tensor | None = None) -> float:
    """Max |TL − HF| on ``tokens`` (logits for a raw model, log-probs for a processed one), relative to
    max(1, max|HF logit|); raises `ModelMismatchError` above `PROBE_TOLERANCE`. Returns the measured value."""
    if tokens is None:
        tokens = probe_tokens(model.cfg.d_vocab, model.cfg.n_ctx)
    mode = weight_mode(model)
    crashes = (RuntimeError, TypeError, AssertionError, IndexError, ValueError)
    with torch.no_grad():
        try:
            hf_logits = hf_model(tokens.to(hf_model.device)).logits.float().cpu()
        except crashes as e:
            raise NotImplementedError(f"the HF model itself fails on the probe input: {_first_words(e)}") from e
        try:
            tl_logits = model(tokens.to(model.cfg.device)).float().cpu()
        except crashes as e:
            # Measured on a bridge (TL 4.3): NeoX with head_dim set, where HF's modules run: a refusal naming the
            # TransformerLens model, not a traceback from inside it.
            what = "TransformerBridge" if lens.is_bridge(model) else "HookedTransformer"
            raise NotImplementedError(
                f"{lens.architecture(model)}: TransformerLens {lens.TL_VERSION}'s {what} cannot run this config: "
                f"{_first_words(e)}"
            ) from e
    if mode == "raw":
        diff = (tl_logits - hf_logits).abs().max().item()
    else:
        diff = (tl_logits.log_softmax(-1) - hf_logits.log_softmax(-1)).abs().max().item()
    relative = diff / max(1.0, hf_logits.abs().max().item())
    if not relative <= PROBE_TOLERANCE:  # also catches NaN
        what = "logits" if mode == "raw" else "log-probs"
        raise ModelMismatchError(
            f"{model.cfg.model_name} ({lens.architecture(model)}, {mode}): TransformerLens {what} differ from "
            f"HF's by {diff:.3g} (relative {relative:.3g} > {PROBE_TOLERANCE:g}) on the probe input"
        )
    return relative


# ---- by name or path ---------------------------------------------------------------------------------------


def load_model(
    name_or_path: str | os.PathLike = SHIPPED_MODEL_NAME,
    weights: WeightMode = "raw",
    device: str | torch.device = "cpu",
) -> HookedTransformer:
    """A `HookedTransformer` of any supported family by hub name, directory or GGUF file, verified against HF."""
    hf_model, tokenizer = load_hf(name_or_path, device="cpu")  # the HF copy is dropped: keep it off the GPU
    return hooked_from_hf(hf_model, tokenizer, weights=weights, device=device, name=display_name(name_or_path))


def load_pair(
    name_or_path: str | os.PathLike = SHIPPED_MODEL_NAME,
    weights: WeightMode = "raw",
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, HookedTransformer]:
    """The HF model and the `HookedTransformer` with the same weights, for cross-checks."""
    hf_model, tokenizer = load_hf(name_or_path, device=device)
    return hf_model, hooked_from_hf(
        hf_model, tokenizer, weights=weights, device=device, name=display_name(name_or_path)
    )
