"""Loading GPT-2 models as `HookedTransformer`, with the weight processing chosen explicitly.

Two weight modes, named for what they hold:

- ``"raw"``: the checkpoint's weights as they are (no LayerNorm folding, no centring,
  no value-bias folding). Every activation equals the one a raw HuggingFace hook sees,
  so this is the mode for cross-checks against HF and for geometry (cosine similarity).
- ``"processed"``: TransformerLens's defaults (``fold_ln``, ``center_writing_weights``,
  ``center_unembed``, ``fold_value_biases``). Log-probabilities and logit differences
  equal HF's; ``hook_resid_*`` is mean-centred and ``hook_z`` lacks b_V.

Every model, hub name or local directory, goes through one path: an HF
``GPT2LMHeadModel`` is loaded (cache first, hub only if reachable) and its weights
are converted with TransformerLens's own ``convert_gpt2_weights``.
"""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase

WeightMode = Literal["raw", "processed"]
WEIGHT_MODES: tuple[str, ...] = ("raw", "processed")
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
SHIPPED_MODEL_DIR = Path(__file__).parent / "assets" / "ioi-gpt2"
SHIPPED_MODEL_NAME = "shipped"


class ModelNotFoundError(FileNotFoundError):
    """A model could be found neither in a local directory, nor in the HF cache, nor on a reachable hub."""


def hooked_config(hf_config: GPT2Config, weights: WeightMode, device: str | torch.device = "cpu") -> HookedTransformerConfig:
    """The `HookedTransformerConfig` equivalent of an HF GPT-2 config (mirrors TL's own conversion)."""
    return HookedTransformerConfig(
        d_model=hf_config.n_embd,
        d_head=hf_config.n_embd // hf_config.n_head,
        n_heads=hf_config.n_head,
        d_mlp=hf_config.n_inner or 4 * hf_config.n_embd,
        n_layers=hf_config.n_layer,
        n_ctx=hf_config.n_positions,
        eps=hf_config.layer_norm_epsilon,
        d_vocab=hf_config.vocab_size,
        act_fn=hf_config.activation_function,
        use_attn_scale=getattr(hf_config, "scale_attn_weights", True),
        scale_attn_by_inverse_layer_idx=hf_config.scale_attn_by_inverse_layer_idx,
        # With LN folded into the next weights only the normalisation is left: TL calls that LNPre.
        normalization_type="LNPre" if weights == "processed" else "LN",
        original_architecture="GPT2LMHeadModel",
        model_name=getattr(hf_config, "_name_or_path", "") or "gpt2-like",
        default_prepend_bos=True,
        device=str(device),
    )


def hooked_from_hf(
    hf_model: GPT2LMHeadModel,
    tokenizer: PreTrainedTokenizerBase | None = None,
    weights: WeightMode = "raw",
    device: str | torch.device = "cpu",
    name: str | None = None,
) -> HookedTransformer:
    """The `HookedTransformer` holding the very same weights as ``hf_model``.

    The result carries ``model.weight_mode`` ("raw" or "processed") so results and caches can say which.
    """
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {WEIGHT_MODES}, got {weights!r}")
    cfg = hooked_config(hf_model.config, weights, device)
    if tokenizer is not None and not tokenizer.init_kwargs.get("name_or_path"):
        # Built in memory: TL would try to reload it from disk with add_bos_token=True. Marked as
        # already set, TL keeps it, sees that it adds no BOS itself, and prepends BOS in to_tokens.
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.init_kwargs.update(name_or_path="in-memory", add_bos_token=True)
    if name:
        cfg.model_name = name
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    processed = weights == "processed"
    model.load_and_process_state_dict(
        convert_gpt2_weights(hf_model, cfg),
        fold_ln=processed,
        center_writing_weights=processed,
        center_unembed=processed,
        fold_value_biases=processed,
        refactor_factored_attn_matrices=False,
    )
    return model.to(device).eval()


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """One quick connection attempt, instead of huggingface_hub's five retries (~30 s offline)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def load_hf(name_or_path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT2LMHeadModel, PreTrainedTokenizerBase]:
    """HF ``GPT2LMHeadModel`` (eager attention, so attention probabilities can be read) and its tokenizer.

    ``name_or_path``: a local HF-format directory (config.json, weights, tokenizer files), ``"shipped"``
    for the project's own model, or a hub name such as ``"gpt2-medium"``. A directory never touches
    the network; a hub name is taken from the local HF cache first and from the hub only if it answers.
    """
    source = SHIPPED_MODEL_DIR if str(name_or_path) == SHIPPED_MODEL_NAME else name_or_path
    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a directory but has no config.json: not an HF-format model")
        attempts = [dict(local_files_only=True)]
    elif path.suffix or os.sep in str(source):
        raise ModelNotFoundError(f"no model directory at {path}")
    else:
        attempts = [dict(local_files_only=True)] + ([dict()] if _hub_reachable() else [])
    errors = []
    for kwargs in attempts:
        try:
            hf_model = GPT2LMHeadModel.from_pretrained(str(source), attn_implementation="eager", **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(str(source), **kwargs)
            return hf_model.to(device).eval(), tokenizer
        except OSError as e:
            errors.append(str(e).splitlines()[0])
    raise ModelNotFoundError(
        f"could not load {str(source)!r}: not in the local HF cache"
        + ("" if len(attempts) > 1 else " and the model hub is unreachable (or HF_HUB_OFFLINE is set)")
        + ". Pass a local HF-format directory (config.json, model.safetensors, tokenizer files), "
        f"or {SHIPPED_MODEL_NAME!r} for the shipped model. Details: " + " | ".join(errors)
    )


def display_name(name_or_path: str | os.PathLike) -> str:
    """A hub name as given; a directory by its last component."""
    path = Path(str(name_or_path))
    return path.name if path.is_dir() else str(name_or_path)


def load_model(
    name_or_path: str | os.PathLike = SHIPPED_MODEL_NAME,
    weights: WeightMode = "raw",
    device: str | torch.device = "cpu",
) -> HookedTransformer:
    """A GPT-2-family `HookedTransformer` by hub name or local directory, in the given weight mode."""
    hf_model, tokenizer = load_hf(name_or_path, device="cpu")  # the HF copy is dropped: keep it off the GPU
    return hooked_from_hf(hf_model, tokenizer, weights=weights, device=device, name=display_name(name_or_path))


def load_pair(
    name_or_path: str | os.PathLike = SHIPPED_MODEL_NAME, weights: WeightMode = "raw", device: str | torch.device = "cpu"
) -> tuple[GPT2LMHeadModel, HookedTransformer]:
    """The HF model and the `HookedTransformer` with the same weights, for cross-checks."""
    hf_model, tokenizer = load_hf(name_or_path, device=device)
    return hf_model, hooked_from_hf(hf_model, tokenizer, weights=weights, device=device, name=display_name(name_or_path))


def random_gpt2(
    n_layers: int = 3,
    n_heads: int = 4,
    d_head: int = 8,
    d_vocab: int = 64,
    n_ctx: int = 64,
    d_mlp: int | None = None,
    seed: int = 0,
    weight_std: float = 0.2,
    tokenizer: PreTrainedTokenizerBase | None = None,
    weights: WeightMode = "raw",
) -> tuple[GPT2LMHeadModel, HookedTransformer]:
    """A randomly initialised GPT-2 as (HF model, `HookedTransformer` with the very same weights).

    Unlike HF's init (std 0.02, LayerNorm at identity) every parameter is drawn with ``weight_std``
    and LayerNorm weights around 1 with spread: that makes heads distinguishable and weight
    processing non-trivial, so equivalence tests can fail.
    """
    if tokenizer is not None:
        d_vocab = len(tokenizer)
    config = GPT2Config(
        vocab_size=d_vocab, n_positions=n_ctx, n_embd=n_heads * d_head, n_layer=n_layers, n_head=n_heads,
        n_inner=d_mlp, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0,
    )
    config._attn_implementation = "eager"
    generator = torch.Generator().manual_seed(seed)
    hf_model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * weight_std
            is_ln_weight = ".ln_" in name and name.endswith("weight")  # ln_1, ln_2, ln_f
            param.copy_(1.0 + noise if is_ln_weight else noise)
    return hf_model, hooked_from_hf(hf_model, tokenizer, weights=weights, name=f"random-gpt2-L{n_layers}H{n_heads}")


def weight_mode(model: HookedTransformer) -> str:
    """"processed" if LayerNorm was folded into the weights (TL's cfg says LNPre/RMSPre), else "raw"."""
    return "processed" if model.cfg.normalization_type in ("LNPre", "RMSPre") else "raw"
