"""Activation caches on disk: safetensors with a JSON header, loaded back as a TransformerLens `ActivationCache`.

One file per cache. The header (stored in the safetensors metadata) records the model name and weight
mode, its shape, the exact token ids, the BOS choice, dtype, hook names, package versions and a SHA-256
per tensor. Loading against a model or tokens refuses any mismatch with an error naming it; a truncated
or altered file is detected. Writes go to a temporary file that replaces the target only when complete,
so a crash never leaves a half file that later loads. Nothing is unpickled.

Bytes per token per hook (fp32) are ``bytes_per_token(cfg, name, pos)``; see docs/caching.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from importlib.metadata import version
from pathlib import Path

import torch
from jaxtyping import Int
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformer_lens import ActivationCache, HookedTransformer, HookedTransformerConfig

from tl_patching.models import weight_mode

FORMAT = "tl_patching.cache/1"


class CacheMismatchError(ValueError):
    """A saved cache used against a different model, weight mode or tokens."""


class CorruptCacheError(ValueError):
    """A cache file that is truncated, altered, or not a tl_patching cache."""


def _model_identity(model: HookedTransformer) -> dict:
    cfg = model.cfg
    return {
        "model_name": cfg.model_name, "weight_mode": weight_mode(model),
        "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "d_model": cfg.d_model, "d_vocab": cfg.d_vocab,
    }


def _digest(t: Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def save_cache(
    path: str | Path, cache: ActivationCache | Mapping[str, Tensor], model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"], prepend_bos: bool, names: Sequence[str] | None = None,
) -> Path:
    """Save ``cache`` (or only ``names`` of it) for ``tokens`` run through ``model``; returns the path."""
    path = Path(path)
    names = list(names) if names is not None else list(cache.keys())
    missing = [n for n in names if n not in cache.keys()]
    if missing:
        raise KeyError(f"not in the cache: {missing}")
    # clone: TL hands out one tensor as both resid_post[l] and resid_pre[l+1]; safetensors refuses shared memory
    tensors = {n: cache[n].detach().cpu().clone(memory_format=torch.contiguous_format) for n in names}
    header = {
        "format": FORMAT, **_model_identity(model), "token_ids": tokens.tolist(), "prepend_bos": prepend_bos,
        "dtype": {n: str(t.dtype).removeprefix("torch.") for n, t in tensors.items()},
        "hook_names": names, "sha256": {n: _digest(t) for n, t in tensors.items()},
        "versions": {p: version(p) for p in ("torch", "transformer-lens", "transformers", "tl_patching")},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"tl_patching": json.dumps(header)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the whole new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_header(path: str | Path) -> dict:
    """The JSON header of a saved cache, without loading its tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptCacheError(f"{path}: not a readable safetensors file ({e})") from None
    if "tl_patching" not in meta:
        raise CorruptCacheError(f"{path}: a safetensors file without a tl_patching header")
    header = json.loads(meta["tl_patching"])
    if header.get("format") != FORMAT:
        raise CorruptCacheError(f"{path}: unknown cache format {header.get('format')!r}")
    return header


def load_cache(
    path: str | Path, model: HookedTransformer | None = None, tokens: Int[Tensor, "batch pos"] | None = None,
    device: str | torch.device = "cpu",
) -> ActivationCache:
    """Load a saved cache, verified against its checksums and, if given, against ``model`` and ``tokens``."""
    header = read_header(path)
    if model is not None:
        expected = _model_identity(model)
        diffs = [f"{k}: cache has {header.get(k)!r}, model has {v!r}" for k, v in expected.items() if header.get(k) != v]
        if diffs:
            raise CacheMismatchError(f"{path} was made with another model: " + "; ".join(diffs))
    if tokens is not None and header["token_ids"] != tokens.tolist():
        raise CacheMismatchError(
            f"{path} was made for other tokens: cache {len(header['token_ids'])}×{len(header['token_ids'][0])} ids "
            f"{header['token_ids'][0][:8]}…, given {tuple(tokens.shape)} ids {tokens[0, :8].tolist()}…"
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CorruptCacheError(f"{path}: truncated or damaged ({e})") from None
    for name, digest in header["sha256"].items():
        if name not in tensors or _digest(tensors[name]) != digest:
            raise CorruptCacheError(f"{path}: tensor {name!r} does not match its checksum")
    if model is None:
        cfg = HookedTransformerConfig(n_layers=header["n_layers"], n_heads=header["n_heads"], d_model=header["d_model"],
                                      d_head=header["d_model"] // header["n_heads"], n_ctx=1, d_vocab=header["d_vocab"], act_fn="gelu_new")
        model = HookedTransformer(cfg)
    return ActivationCache({n: t.to(device) for n, t in tensors.items()}, model)


def bytes_per_token(cfg: HookedTransformerConfig, name: str, pos: int = 1, dtype_bytes: int = 4) -> int:
    """Bytes one token costs in a cache for hook ``name`` (e.g. ``"blocks.0.attn.hook_z"``) at sequence length ``pos``."""
    suffix = name.split(".")[-1]
    widths = {
        "hook_q": cfg.n_heads * cfg.d_head, "hook_k": cfg.n_heads * cfg.d_head, "hook_v": cfg.n_heads * cfg.d_head,
        "hook_z": cfg.n_heads * cfg.d_head, "hook_pre": cfg.d_mlp, "hook_post": cfg.d_mlp,
        "hook_attn_scores": cfg.n_heads * pos, "hook_pattern": cfg.n_heads * pos,
    }
    return widths.get(suffix, cfg.d_model) * dtype_bytes
