"""What a model's weights have been through, read from the model itself (its cfg and weights), never from a label.

Two weight modes, named for what they hold:

- ``"raw"``: the checkpoint's weights as they are (no norm folding, no centring, no value-bias folding). Every
  activation equals the one a raw HuggingFace hook sees: the mode for cross-checks against HF and for geometry
  (cosine similarity).
- ``"processed"``: what TransformerLens's ``from_pretrained`` does (see `tl_patching.models`). Log-probabilities
  equal HF's; activations do not.

`weight_processing` says which of TL's processings the model shows, `weight_mode` sums it up.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import torch

from tl_patching import lens
from tl_patching.lens import HookedTransformer

WeightMode = Literal["raw", "processed"]
WEIGHT_MODES: tuple[str, ...] = ("raw", "processed")

__all__ = ["WeightMode", "WEIGHT_MODES", "weight_processing", "weight_mode"]


def _params(model: HookedTransformer, *suffixes: str) -> list[torch.Tensor]:
    """The model's weights whose HookedTransformer names end with ``suffixes`` (``"attn.W_O"``, …)."""
    if lens.is_bridge(model):
        return [t for suffix in suffixes if (t := _bridge_weight(model, suffix)) is not None]
    return [p for k, p in model.state_dict().items() if k.endswith(suffixes)]


def _bridge_weight(model, suffix: str) -> torch.Tensor | None:
    """A bridge's weight under its HookedTransformer name, stacked over layers (None where the model has none: a
    bridge raises for the biases of a bias-free model)."""
    try:
        return getattr(model, suffix.split(".")[-1].lstrip("_"))
    except (AttributeError, NotImplementedError, KeyError):
        return None


def _norms_folded(model) -> bool:
    """A bridge keeps its norm modules after TL's folding, with identity weights: 1 (Gemma's 1 + w: 0), bias 0."""
    identity = 0.0 if getattr(model.cfg, "rmsnorm_uses_offset", False) else 1.0
    norms = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in ("ln1", "ln2", "ln_final")]
    weights = [getattr(m, "weight", None) for m in norms]
    if not norms or any(w is None for w in weights):
        return False
    biases = [b for m in norms if (b := getattr(m, "bias", None)) is not None]
    return all(bool((w == identity).all()) for w in weights) and all(not b.any() for b in biases)


def _centred(tensors: list[torch.Tensor]) -> bool:
    """Every tensor has mean ≈ 0 along its last axis (to float32 rounding of its own size)."""
    return bool(tensors) and all(
        t.float().mean(-1).abs().max().item() <= 1e-5 * max(t.float().abs().max().item(), 1e-30) for t in tensors
    )


def weight_processing(model: HookedTransformer) -> dict[str, bool]:
    """Which of TransformerLens's weight processings the model's own cfg and weights show.

    - ``ln_folded``: cfg.normalization_type is LNPre/RMSPre (norm weights folded into the next weights); on a
      `TransformerBridge`, which keeps its norm modules, every ln1/ln2/ln_final weight is the identity.
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
        "ln_folded": _norms_folded(model) if lens.is_bridge(model) else cfg.normalization_type in ("LNPre", "RMSPre"),
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


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer (name, shape, dtype, bytes): two checkpoints of the same shape and
    name differ here. Hashing GPT-2 large's weights takes seconds: `tl_patching.forward.Forward.weights_fingerprint`
    keeps the result while the weights stay unchanged."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        t = p.detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weights_version(model: torch.nn.Module) -> tuple:
    """Which tensors the model holds and how often each was changed in place: equal while no weight changes."""
    return tuple((name, t.data_ptr(), t._version) for name, t in sorted(model.state_dict().items()))
