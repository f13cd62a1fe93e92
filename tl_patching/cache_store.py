"""Activation caches on disk: safetensors with a JSON header, loaded back as ``{hook name: tensor}``.

One file per cache. The header (stored in the safetensors metadata) records the model name, weight
mode, sizes and a SHA-256 fingerprint of its weights, the exact token ids, the BOS choice, dtype, hook names, package
versions and a SHA-256 per tensor. Loading against a model or tokens refuses any mismatch with an error naming it
(`CacheMismatchError`), including a tensor whose shape is not the one the model and tokens give; a truncated, altered or
self-contradicting file (a listed tensor missing, an unlisted one present, a dtype or checksum that is not the header's)
raises `CorruptCacheError`. Writes go to a temporary file that replaces the target only when complete, so a crash never
leaves a half file that later loads. Nothing is unpickled.

A donor cache for a dataset of several token lengths (`cached_runs`, what ``--donor-cache`` uses) is one file holding
any number of batches, each with its own token ids, checked the same way, plus each batch's final-position logits.

Each hook's shape comes from the model's config (`hook_shape`); bytes per token per hook are
``bytes_per_token(cfg, name, pos)``; see docs/caching.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from importlib.metadata import version
from pathlib import Path

import torch
from jaxtyping import Int
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from tl_patching.forward import Forward
from tl_patching.lens import HookedTransformer
from tl_patching.provenance import weight_mode, weights_fingerprint

FORMAT = "tl_patching.cache/1"
BATCHES_FORMAT = "tl_patching.cache-batches/1"  # several batches in one file (`cached_runs`)
FINAL_LOGITS = "final_logits"  # beside the hooks in a batch file: the run's logits at the final position [batch, vocab]


class CacheMismatchError(ValueError):
    """A saved cache used against a different model, weight mode or tokens."""


class CorruptCacheError(ValueError):
    """A cache file that is truncated, altered, or not a tl_patching cache."""


def _model_identity(model) -> dict:
    """What a cache records of the model it was made with. ``model``: a `Forward` (whose fingerprint of the weights
    is computed once and kept) or a model."""
    fingerprint = model.weights_fingerprint() if isinstance(model, Forward) else weights_fingerprint(model)
    model = model.model if isinstance(model, Forward) else model
    cfg = model.cfg
    return {
        "model_name": cfg.model_name,
        "weight_mode": weight_mode(model),
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "d_model": cfg.d_model,
        "d_vocab": cfg.d_vocab,
        "weights_sha256": fingerprint,
    }


def _digest(t: Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def save_cache(
    path: str | Path,
    cache: Mapping[str, Tensor],
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    prepend_bos: bool,
    names: Sequence[str] | None = None,
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
        "format": FORMAT,
        **_model_identity(model),
        "token_ids": tokens.tolist(),
        "prepend_bos": prepend_bos,
        "dtype": {n: str(t.dtype).removeprefix("torch.") for n, t in tensors.items()},
        "hook_names": names,
        "sha256": {n: _digest(t) for n, t in tensors.items()},
        "versions": _versions(),
    }
    return _write(path, tensors, header)


def _write(path: Path, tensors: Mapping[str, Tensor], header: dict) -> Path:
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot save the cache to {path}: the folder {path.parent} does not exist")
    tmp, mode = _new_temporary(path)
    try:
        save_file(dict(tensors), tmp, metadata={"tl_patching": json.dumps(header)})
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the whole new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _versions() -> dict[str, str]:
    return {p: version(p) for p in ("torch", "transformer-lens", "transformers", "tl_patching")}


def _new_temporary(path: Path) -> tuple[Path, int]:
    """An empty file next to ``path`` under a fresh name, and the mode the umask gives a new file (0o666 less
    the umask, as for any file the user creates: mkstemp and safetensors both write 0o600 whatever the umask)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.partial"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        mode = os.fstat(fd).st_mode & 0o777  # read back rather than os.umask(), which sets it process-wide
        os.close(fd)
        return tmp, mode
    raise FileExistsError(f"could not create a temporary file next to {path}")


# What a header must hold for a load to check anything; "versions" is information for the reader only.
_MODEL_FIELDS = ("model_name", "weight_mode", "n_layers", "n_heads", "d_model", "d_vocab", "weights_sha256")
_BATCH_FIELDS = ("token_ids", "prepend_bos", "hook_names", "dtype", "sha256")
_HEADER_FIELDS = (*_MODEL_FIELDS, *_BATCH_FIELDS)


def _json_header(path: str | Path) -> dict:
    """The tl_patching header of a safetensors file, as JSON, before any check of its fields."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptCacheError(f"{path}: not a readable safetensors file ({e})") from None
    if "tl_patching" not in meta:
        raise CorruptCacheError(f"{path}: a safetensors file without a tl_patching header")
    try:
        header = json.loads(meta["tl_patching"])
    except json.JSONDecodeError:
        raise CorruptCacheError(f"{path}: its tl_patching header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CorruptCacheError(f"{path}: unknown cache format {header!r} (this version reads {FORMAT!r})")
    return header


def _check_batch_fields(path: str | Path, entry: dict, whose: str = "the header's") -> None:
    """One batch's token ids, hook names, dtypes and checksums are consistent (`CorruptCacheError`)."""
    ids = entry["token_ids"]
    if not (
        isinstance(ids, list)
        and ids
        and all(isinstance(row, list) and len(row) == len(ids[0]) for row in ids)
        and all(isinstance(i, int) for row in ids for i in row)
    ):
        raise CorruptCacheError(f"{path}: {whose} token_ids are not a rectangular batch of integer ids")
    names = entry["hook_names"]
    if not isinstance(names, list) or len(set(names)) != len(names):
        raise CorruptCacheError(f"{path}: {whose} hook_names are not a list of distinct names")
    for field in ("dtype", "sha256"):  # one entry per hook, or a tensor would go unchecked
        if not isinstance(entry[field], dict) or set(entry[field]) != set(names):
            odd = sorted(set(entry[field]) ^ set(names)) if isinstance(entry[field], dict) else entry[field]
            raise CorruptCacheError(f"{path}: {whose} {field} does not list exactly its hook_names (differs on {odd})")


def read_header(path: str | Path) -> dict:
    """The JSON header of a saved cache, without loading its tensors."""
    header = _json_header(path)
    if header.get("format") != FORMAT:
        raise CorruptCacheError(
            f"{path}: unknown cache format {header.get('format')!r} (this version reads {FORMAT!r})"
        )
    missing = [k for k in _HEADER_FIELDS if k not in header]
    if missing:
        raise CorruptCacheError(f"{path}: the header lacks the field {missing[0]!r}")
    _check_batch_fields(path, header)
    return header


def load_cache(
    path: str | Path,
    model: HookedTransformer | None = None,
    tokens: Int[Tensor, "batch pos"] | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Tensor]:
    """Load a saved cache as ``{hook name: tensor}``, verified against its header (hook names, dtypes,
    checksums) and, if given, against ``model`` (name, sizes, weight mode, a fingerprint of the weights and
    each tensor's shape) and ``tokens``."""
    header = read_header(path)
    if model is not None:
        expected = _model_identity(model)
        diffs = [
            f"{k}: cache has {header.get(k)!r}, model has {v!r}" for k, v in expected.items() if header.get(k) != v
        ]
        if diffs:
            raise CacheMismatchError(f"{path} was made with another model: " + "; ".join(diffs))
    if tokens is not None:
        difference = _token_difference(header["token_ids"], tokens)
        if difference:
            raise CacheMismatchError(f"{path} was made for other tokens: {difference}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CorruptCacheError(f"{path}: truncated or damaged ({e})") from None
    _check_against_header(path, header, tensors)
    if model is not None:
        _check_shapes(path, header, tensors, model.model if isinstance(model, Forward) else model)
    return {n: tensors[n].to(device) for n in header["hook_names"]}


def _token_difference(cached: list[list[int]], tokens: Tensor) -> str | None:
    """None if ``tokens`` are the cached ids, else where they first differ, in words."""
    given = tokens.tolist()
    if given == cached:
        return None
    shape = (len(cached), len(cached[0]))
    if tokens.dim() != 2 or tuple(tokens.shape) != shape:
        return (
            f"the cache holds {shape[0]}×{shape[1]} token ids, the tokens given are {'×'.join(map(str, tokens.shape))}"
        )
    row, pos = next((r, p) for r in range(shape[0]) for p in range(shape[1]) if cached[r][p] != given[r][p])
    return (
        f"first difference at row {row}, position {pos}: "
        f"the cache has id {cached[row][pos]}, the tokens given have {given[row][pos]}"
    )


def _check_against_header(path: str | Path, header: dict, tensors: Mapping[str, Tensor]) -> None:
    """The file holds exactly the header's tensors, each of its dtype and checksum (`CorruptCacheError`)."""
    names = header["hook_names"]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise CorruptCacheError(f"{path}: the header lists {missing[0]!r} but the file holds no such tensor")
    unexpected = sorted(set(tensors) - set(names))
    if unexpected:
        raise CorruptCacheError(f"{path}: the file holds a tensor {unexpected[0]!r} that its header does not list")
    for name in names:
        dtype = str(tensors[name].dtype).removeprefix("torch.")
        if dtype != header["dtype"][name]:  # the checksum covers bytes only: int32 bytes read as float32 pass it
            raise CorruptCacheError(f"{path}: tensor {name!r} is {dtype}, its header says {header['dtype'][name]}")
        if _digest(tensors[name]) != header["sha256"][name]:
            raise CorruptCacheError(f"{path}: tensor {name!r} does not match its checksum")


def _check_shapes(
    path: str | Path, header: dict, tensors: Mapping[str, Tensor], model: HookedTransformer, logits: bool = False
) -> None:
    """Each tensor has the shape ``model`` gives its hook for the header's tokens (`CacheMismatchError`); with
    ``logits``, `FINAL_LOGITS` too (a batch file's)."""
    batch, pos = len(header["token_ids"]), len(header["token_ids"][0])
    for name in header["hook_names"]:
        if name == FINAL_LOGITS and logits:
            axes = (("batch", batch), ("d_vocab_out", model.cfg.d_vocab_out))
        elif name not in model.hook_dict:
            raise CacheMismatchError(f"{path} holds {name!r}, which is not a hook of {model.cfg.model_name}")
        else:
            axes = hook_axes(model.cfg, name, batch, pos)
        shape, expected = tuple(tensors[name].shape), tuple(size for _, size in axes)
        if shape == expected:
            continue
        if len(shape) != len(axes):
            detail = f"{len(shape)} axes, not {len(axes)}"
        else:
            detail = "; ".join(
                f"{axis} is {got} in the cache, {want} here" for (axis, want), got in zip(axes, shape) if got != want
            )
        raise CacheMismatchError(
            f"{path}: tensor {name!r} has shape {shape}, but {model.cfg.model_name} and the cache's {batch}×{pos} "
            f"tokens give {expected} [{', '.join(a for a, _ in axes)}]: {detail}"
        )


def cached_run(
    path: str | Path, forward, tokens: Int[Tensor, "batch pos"], names: Sequence[str], prepend_bos: bool
) -> dict[str, Tensor]:
    """The activations ``names`` of ``tokens``: loaded from ``path`` if it exists (checked against the model and
    tokens), else computed through ``forward`` and saved there for the next run."""
    path = Path(path)
    if not path.exists():
        _, acts = forward.run(tokens, cache=names)
        save_cache(path, acts, forward, tokens, prepend_bos)
    cache = load_cache(path, forward, tokens)
    missing = [n for n in names if n not in cache]
    if missing:
        raise CacheMismatchError(
            f"{path} holds no {missing[0]!r} (and {len(missing) - 1} more of the {len(names)} needed)"
        )
    return cache


# --- several batches in one file (a dataset of several token lengths) ---


def _read_batches(path: Path) -> tuple[dict, list[dict]]:
    """A batch file's header and its batches, each with ``keys``: hook name -> the tensor's name in the file. A
    one-batch file (`save_cache`) reads as a batch file of one batch."""
    header = _json_header(path)
    if header.get("format") == FORMAT:
        header = read_header(path)
        return header, [{**{k: header[k] for k in _BATCH_FIELDS}, "keys": {n: n for n in header["hook_names"]}}]
    if header.get("format") != BATCHES_FORMAT:
        raise CorruptCacheError(
            f"{path}: unknown cache format {header.get('format')!r} (this version reads {BATCHES_FORMAT!r} and "
            f"{FORMAT!r})"
        )
    missing = [k for k in (*_MODEL_FIELDS, "batches") if k not in header]
    if missing:
        raise CorruptCacheError(f"{path}: the header lacks the field {missing[0]!r}")
    if not isinstance(header["batches"], list):
        raise CorruptCacheError(f"{path}: the header's batches are not a list")
    for i, entry in enumerate(header["batches"]):
        lacking = [k for k in _BATCH_FIELDS if not isinstance(entry, dict) or k not in entry]
        if lacking:
            raise CorruptCacheError(f"{path}: batch {i} of the header lacks the field {lacking[0]!r}")
        _check_batch_fields(path, entry, f"batch {i}'s")
    return header, [{**e, "keys": {n: f"{i}/{n}" for n in e["hook_names"]}} for i, e in enumerate(header["batches"])]


def _load_batches(path: Path, forward) -> list[dict]:
    """Every batch of a batch file, checked against ``forward``'s model, with its tensors (on the CPU)."""
    header, batches = _read_batches(path)
    diffs = [
        f"{k}: cache has {header.get(k)!r}, model has {v!r}"
        for k, v in _model_identity(forward).items()
        if header.get(k) != v
    ]
    if diffs:
        raise CacheMismatchError(f"{path} was made with another model: " + "; ".join(diffs))
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CorruptCacheError(f"{path}: truncated or damaged ({e})") from None
    unexpected = sorted(set(tensors) - {k for b in batches for k in b["keys"].values()})
    if unexpected:
        raise CorruptCacheError(f"{path}: the file holds a tensor {unexpected[0]!r} that its header does not list")
    for i, b in enumerate(batches):
        b["tensors"] = {n: tensors[k] for n, k in b["keys"].items() if k in tensors}
        try:
            _check_against_header(path, b, b["tensors"])
            _check_shapes(path, b, b["tensors"], forward.model, logits=True)
        except (CorruptCacheError, CacheMismatchError) as e:
            raise type(e)(f"{e} (batch {i} of {len(batches)}, {len(b['token_ids'][0])} tokens long)") from None
    return batches


def _save_batches(path: Path, forward, batches: list[dict]) -> None:
    tensors = {f"{i}/{n}": t for i, b in enumerate(batches) for n, t in b["tensors"].items()}
    entries = [
        {
            "token_ids": b["token_ids"],
            "prepend_bos": b["prepend_bos"],
            "hook_names": list(b["tensors"]),
            "dtype": {n: str(t.dtype).removeprefix("torch.") for n, t in b["tensors"].items()},
            "sha256": {n: _digest(t) for n, t in b["tensors"].items()},
        }
        for b in batches
    ]
    header = {"format": BATCHES_FORMAT, **_model_identity(forward), "batches": entries, "versions": _versions()}
    _write(path, tensors, header)


def cached_runs(
    path: str | Path, forward, batches: Sequence[tuple[Int[Tensor, "batch pos"], bool]], names: Sequence[str]
) -> tuple[list[dict[str, Tensor]], int]:
    """The activations ``names`` and the final position's logits (`FINAL_LOGITS`) of each ``(tokens, prepend_bos)``
    batch, from one file that holds any number of batches: taken from the file where it holds them, else computed
    through ``forward`` and added to it (one atomic rewrite). The file is checked against the model (name, sizes,
    weight mode, weights fingerprint: `CacheMismatchError` otherwise) and each batch against its token ids; a batch
    of other tokens is a new batch, never a mismatch. Returns one cache per batch (on the CPU) and how many batches
    were computed (0: nothing was run)."""
    path = Path(path)
    stored = _load_batches(path, forward) if path.exists() else []
    wanted = [*names, FINAL_LOGITS]
    caches, computed = [], 0
    for tokens, prepend_bos in batches:
        ids = tokens.tolist()
        entry = next((b for b in stored if b["token_ids"] == ids and b["prepend_bos"] == prepend_bos), None)
        if entry is None or any(n not in entry["tensors"] for n in wanted):
            logits, acts = forward.run(tokens, cache=list(names))
            # clone: TL hands out one tensor as both resid_post[l] and resid_pre[l+1]; safetensors refuses shared memory
            fresh = {n: acts[n] for n in names} | {FINAL_LOGITS: logits[:, -1]}
            fresh = {n: t.detach().cpu().clone(memory_format=torch.contiguous_format) for n, t in fresh.items()}
            if entry is None:
                entry = {"token_ids": ids, "prepend_bos": prepend_bos, "tensors": {}}
                stored.append(entry)
            entry["tensors"].update(fresh)
            computed += 1
        caches.append({n: entry["tensors"][n] for n in wanted})
    if computed:
        _save_batches(path, forward, stored)
    return caches, computed


# The axes of each hook's activation, named by what sizes them: batch and pos are the tokens', the rest the
# config's fields ("kv_heads": n_key_value_heads on a grouped-query model, n_heads otherwise; "a*b": one
# axis of that product). Keys are hook names without "blocks.{layer}.".
_AXES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        (
            "hook_embed",
            "hook_pos_embed",
            "hook_resid_pre",
            "hook_resid_mid",
            "hook_resid_post",
            "hook_attn_out",
            "hook_mlp_in",
            "hook_mlp_out",
            "unembed.hook_in",
            "ln1.hook_normalized",
            "ln2.hook_normalized",
            "ln1_post.hook_normalized",
            "ln2_post.hook_normalized",
            "ln_final.hook_normalized",
        ),
        ("batch", "pos", "d_model"),
    ),
    **dict.fromkeys(
        ("ln1.hook_scale", "ln2.hook_scale", "ln1_post.hook_scale", "ln2_post.hook_scale", "ln_final.hook_scale"),
        ("batch", "pos", "1"),
    ),
    **dict.fromkeys(("attn.hook_q", "attn.hook_rot_q", "attn.hook_z"), ("batch", "pos", "n_heads", "d_head")),
    **dict.fromkeys(("attn.hook_k", "attn.hook_rot_k", "attn.hook_v"), ("batch", "pos", "kv_heads", "d_head")),
    **dict.fromkeys(("attn.hook_attn_scores", "attn.hook_pattern"), ("batch", "n_heads", "pos", "pos")),
    **dict.fromkeys(("attn.hook_result", "hook_attn_in", "hook_q_input"), ("batch", "pos", "n_heads", "d_model")),
    **dict.fromkeys(("hook_k_input", "hook_v_input"), ("batch", "pos", "kv_heads", "d_model")),
    **dict.fromkeys(("mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post"), ("batch", "pos", "d_mlp")),
    "unembed.hook_out": ("batch", "pos", "d_vocab"),
    # QK-norm (Qwen3, Gemma 3) normalises each head's vector alone: TL flattens batch, pos and heads into one axis
    "attn.q_norm.hook_normalized": ("batch*pos*n_heads", "d_head"),
    "attn.q_norm.hook_scale": ("batch*pos*n_heads", "1"),
    "attn.k_norm.hook_normalized": ("batch*pos*kv_heads", "d_head"),
    "attn.k_norm.hook_scale": ("batch*pos*kv_heads", "1"),
}


def hook_axes(cfg, name: str, batch: int, pos: int) -> tuple[tuple[str, int], ...]:
    """``(axis name, size)`` of each axis of hook ``name``'s activation on ``batch`` × ``pos`` tokens, from the
    config alone, e.g. ``blocks.0.attn.hook_z`` → batch, pos, n_heads, d_head. Raises ValueError for a hook
    name it does not know."""
    key = re.sub(r"^blocks\.\d+\.", "", name)
    if key not in _AXES:
        raise ValueError(
            f"no known shape for the hook {name!r}: tl_patching stores HookedTransformer's hook names (on a "
            "TransformerBridge, read them with Forward(model).run(tokens, cache=names), not its own aliases)"
        )
    axes = _AXES[key]
    flag = lambda name: getattr(cfg, name, False)  # noqa: E731  (a bridge's cfg (TL 4) lacks some of TL 3's flags)
    grouped = cfg.n_key_value_heads is not None and not flag("ungroup_grouped_query_attention")
    if key.startswith("ln1.") and (flag("use_split_qkv_input") or flag("use_attn_in")):
        # ln1 then normalises per-head copies of the input; the last call, hence the cache, is the value input's
        axes = axes[:2] + ("kv_heads" if flag("use_split_qkv_input") else "n_heads",) + axes[2:]
    size = {
        "batch": batch,
        "pos": pos,
        "n_heads": cfg.n_heads,
        "d_head": cfg.d_head,
        "d_model": cfg.d_model,
        "d_mlp": cfg.d_mlp,
        "d_vocab": cfg.d_vocab,
        "1": 1,
        "kv_heads": cfg.n_key_value_heads if grouped else cfg.n_heads,
    }
    kv_name = "n_key_value_heads" if grouped else "n_heads"
    return tuple(
        (axis.replace("kv_heads", kv_name), math.prod(size[part] for part in axis.split("*"))) for axis in axes
    )


def hook_shape(cfg, name: str, batch: int, pos: int) -> tuple[int, ...]:
    """The shape of hook ``name``'s activation on ``batch`` × ``pos`` tokens (see `hook_axes`)."""
    return tuple(size for _, size in hook_axes(cfg, name, batch, pos))


def bytes_per_token(cfg, name: str, pos: int = 1, dtype_bytes: int = 4) -> int:
    """Bytes one token costs in a cache for hook ``name`` (e.g. ``"blocks.0.attn.hook_z"``) at sequence length
    ``pos``."""
    return math.prod(hook_shape(cfg, name, 1, pos)) // pos * dtype_bytes
