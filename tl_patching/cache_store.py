"""Activation caches on disk: safetensors with a JSON header, loaded back as ``{hook name: tensor}``.

One file per cache. The header (stored in the safetensors metadata) records the model name, weight
mode, sizes and a SHA-256 fingerprint of its weights, the exact token ids, the BOS choice, dtype, hook names, package versions and a SHA-256
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
import weakref
from collections.abc import Mapping, Sequence
from importlib.metadata import version
from pathlib import Path

import torch
from jaxtyping import Int
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig

from tl_patching.models import weight_mode

FORMAT = "tl_patching.cache/1"


class CacheMismatchError(ValueError):
    """A saved cache used against a different model, weight mode or tokens."""


class CorruptCacheError(ValueError):
    """A cache file that is truncated, altered, or not a tl_patching cache."""


# model -> (which tensors, at which in-place version, were hashed; their digest): hashing GPT-2 large's weights
# takes seconds, and a main job saves and loads its donor cache against the same unchanged model several times.
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def weights_fingerprint(model: HookedTransformer) -> str:
    """SHA-256 over every parameter and buffer (name, shape, dtype, bytes): two checkpoints of the same shape and
    name differ here. Recomputed whenever a tensor was replaced or changed in place since the last call."""
    state = sorted(model.state_dict().items())
    key = tuple((name, t.data_ptr(), t._version) for name, t in state)
    known = _FINGERPRINTS.get(model)
    if known is not None and known[0] == key:
        return known[1]
    h = hashlib.sha256()
    for name, p in state:
        t = p.detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    _FINGERPRINTS[model] = (key, h.hexdigest())
    return h.hexdigest()


def _model_identity(model: HookedTransformer) -> dict:
    cfg = model.cfg
    return {
        "model_name": cfg.model_name, "weight_mode": weight_mode(model),
        "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "d_model": cfg.d_model, "d_vocab": cfg.d_vocab,
        "weights_sha256": weights_fingerprint(model),
    }


def _digest(t: Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def save_cache(
    path: str | Path, cache: Mapping[str, Tensor], model: HookedTransformer,
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
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot save the cache to {path}: the folder {path.parent} does not exist")
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
) -> dict[str, Tensor]:
    """Load a saved cache as ``{hook name: tensor}``, verified against its checksums and, if given, against
    ``model`` (name, sizes, weight mode and a fingerprint of the weights) and ``tokens``."""
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
    return {n: tensors[n].to(device) for n in header["hook_names"]}


def cached_run(
    path: str | Path, forward, tokens: Int[Tensor, "batch pos"], names: Sequence[str], prepend_bos: bool
) -> dict[str, Tensor]:
    """The activations ``names`` of ``tokens``: loaded from ``path`` if it exists (checked against the model and
    tokens), else computed through ``forward`` and saved there for the next run."""
    path = Path(path)
    if not path.exists():
        _, acts = forward.run(tokens, cache=names)
        save_cache(path, acts, forward.model, tokens, prepend_bos)
    cache = load_cache(path, forward.model, tokens)
    missing = [n for n in names if n not in cache]
    if missing:
        raise CacheMismatchError(f"{path} holds no {missing[0]!r} (and {len(missing) - 1} more of the {len(names)} needed)")
    return cache


def bytes_per_token(cfg: HookedTransformerConfig, name: str, pos: int = 1, dtype_bytes: int = 4) -> int:
    """Bytes one token costs in a cache for hook ``name`` (e.g. ``"blocks.0.attn.hook_z"``) at sequence length ``pos``."""
    suffix = name.split(".")[-1]
    widths = {
        "hook_q": cfg.n_heads * cfg.d_head, "hook_k": cfg.n_heads * cfg.d_head, "hook_v": cfg.n_heads * cfg.d_head,
        "hook_z": cfg.n_heads * cfg.d_head, "hook_pre": cfg.d_mlp, "hook_post": cfg.d_mlp,
        "hook_attn_scores": cfg.n_heads * pos, "hook_pattern": cfg.n_heads * pos,
    }
    return widths.get(suffix, cfg.d_model) * dtype_bytes
