"""The one kind of intervention: rewrite an activation, named by its TransformerLens hook point, at an index.

A patch, a zero-ablation, a scaling and a noise injection are all an `Edit`: a TL hook name, an index
(position, head, neurons) and a rewrite of the selected values. An `Edit` knows nothing of the model
it runs on: `tl_patching.backends.tl` applies it as a TransformerLens hook, `tl_patching.backends.hf`
as a raw PyTorch hook on the HF model, handing it the activation in TL's layout. This module imports
neither backend.

Layouts (TL's, used on both backends):

- ``hook_q``, ``hook_rot_q``, ``hook_z``: ``[batch, pos, head, d_head]``; ``hook_k``, ``hook_v``, ``hook_rot_k``
  the same with ``n_key_value_heads`` heads on grouped-query models (a key/value head is shared by
  ``n_heads / n_key_value_heads`` query heads: ``head`` there indexes the *shared* head)
- ``hook_attn_scores``, ``hook_pattern``: ``[batch, head, query_pos, key_pos]`` (``head`` indexes dim 1)
- ``mlp.hook_pre/post``: ``[batch, pos, d_mlp]``; ``hook_resid_*``, ``hook_*_out``: ``[batch, pos, d_model]``
  (``neurons`` indexes the last dim)
"""

from __future__ import annotations

import contextlib
import difflib
import numbers
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from dataclasses import replace as dataclass_replace

import torch
from jaxtyping import Bool
from torch import Tensor

Index = int | slice | Sequence[int] | Tensor | None
# (whole activation in TL layout, index tuple) -> new values for activation[index] (broadcastable to it)
Rewrite = Callable[[Tensor, tuple], Tensor]

# TransformerLens applies QK-norm (Qwen3, Gemma 3) to queries/keys flattened over batch, position and head.
_FLAT = "[(batch pos head), d_head] in TransformerLens (QK-norm runs on flattened heads)"
HEAD_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_z", "hook_rot_q", "hook_rot_k", "hook_result")
PATTERN_HOOKS = ("hook_attn_scores", "hook_pattern")
KV_HOOKS = ("hook_k", "hook_v", "hook_rot_k")

# act_name's vocabulary, spelled as TransformerLens's utils.get_act_name spells it.
_ATTN_KINDS = ("q", "k", "v", "z", "rot_q", "rot_k", "result", "pattern", "attn_scores")
_MLP_KINDS = ("pre", "post", "mid", "pre_linear")
_ALIASES = {
    "attn": "pattern",
    "attn_logits": "attn_scores",
    "key": "k",
    "query": "q",
    "value": "v",
    "mlp_pre": "pre",
    "mlp_post": "post",
    "mlp_mid": "mid",
}


class HookNameError(KeyError):
    """A hook name the model (or the backend) does not have."""

    def __str__(self) -> str:  # KeyError would print the message with quotes
        return str(self.args[0])


def act_name(kind: str, layer: int | None = None) -> str:
    """Full TL hook name: ``act_name("z", 3) == "blocks.3.attn.hook_z"``, ``act_name("embed") == "hook_embed"``.

    Same spelling as TransformerLens's ``utils.get_act_name`` for the kinds above and the block-level
    ``resid_pre/mid/post``, ``attn_out``, ``mlp_out``; a full name is returned as it is. Whether the model
    has the name (and the layer) is checked by the backend that runs it.
    """
    if "." in kind or kind.startswith("hook_"):
        if layer is not None:
            raise ValueError(f"{kind!r} is already a full hook name; pass no layer")
        return kind
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
        raise TypeError(f"layer must be an int, got {layer!r}")
    kind = _ALIASES.get(kind, kind)
    if layer is None:
        if kind in ("scale", "normalized"):
            return f"ln_final.hook_{kind}"
        if kind in _ATTN_KINDS + _MLP_KINDS:
            raise ValueError(f"{kind!r} is a per-layer hook: pass a layer")
        return f"hook_{kind}"
    part = "attn." if kind in _ATTN_KINDS else "mlp." if kind in _MLP_KINDS else ""
    return f"blocks.{layer}.{part}hook_{kind}"


def hook_suffix(name: str) -> str:
    """``"blocks.3.attn.hook_z" -> "hook_z"``."""
    return name.rsplit(".", 1)[-1]


def layer_of(name: str) -> int | None:
    """``"blocks.3.attn.hook_z" -> 3``; None for a name outside the blocks."""
    match = re.match(r"blocks\.(\d+)\.", name)
    return int(match[1]) if match else None


def check_name(name: str, known: Iterable[str], n_layers: int, what: str = "hook name") -> None:
    """Raise `IndexError` for a layer out of range, else `HookNameError` with the nearest known names.

    Both backends call this with their full list of TL names, so the same bad name gets the same message.
    """
    layer = layer_of(name)
    if layer is not None and layer >= n_layers:
        raise IndexError(f"{name}: layer {layer} out of range, the model has {n_layers} layers (0..{n_layers - 1})")
    known = list(known)
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise HookNameError(f"unknown {what} {name!r}{hint}")


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_index_type(index: Index, what: str, name: str) -> None:
    """`TypeError` unless ``index`` is None, an int, a slice, or ints in a list or an integer tensor: a float or a
    boolean would otherwise be truncated to an int (``pos=[1.5]`` → 1, a mask → positions 0 and 1), silently."""
    if index is None or isinstance(index, slice) or _is_int(index):
        return
    if isinstance(index, Tensor):
        ok = not (index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool)
    elif isinstance(index, (str, bytes, Iterator)) or not isinstance(index, Iterable):  # an iterator: read once
        ok = False
    else:
        ok = all(_is_int(i) for i in index)
    if not ok:
        raise TypeError(
            f"{what} of {name} must be an int, a list or integer tensor of ints, a slice or None, got {index!r}"
        )


def _check_in_range(index: Index, size: int, what: str, name: str, note: str = "") -> None:
    if index is None:
        return
    if isinstance(index, slice):
        # A slice is clamped by Python; one that selects nothing is a mistake, not a no-op.
        if len(range(size)[index]) == 0:
            raise IndexError(f"{what} {index} selects nothing in {name}: size {size}{note}")
        return
    values = [int(index)] if _is_int(index) else [int(i) for i in torch.as_tensor(index).flatten()]
    if not values:
        raise IndexError(f"{what} index of {name} is empty")
    bad = [v for v in values if not -size <= v < size]
    if bad:
        raise IndexError(f"{what} {bad[0]} out of range for {name}: size {size}{note}")


def _outer(values: list[Index], sizes: list[int]) -> tuple:
    """Index tensors selecting every combination of ``values`` (one per axis after the batch axis), so the selected
    slice is ``[batch, *(one axis per non-int value, in axis order)]``: an int removes its axis, a list or a slice
    keeps it, and several lists combine as an outer product (numpy would zip them; a slice between two lists
    would move their axes to the front)."""
    as_tensors = []
    for value, size in zip(values, sizes):
        if value is None:
            value = slice(None)
        if isinstance(value, slice):
            value = range(size)[value]
        as_tensors.append(
            torch.as_tensor(int(value) if _is_int(value) else list(value), dtype=torch.long)
            if not isinstance(value, Tensor)
            else value.long()
        )
    kept = [i for i, t in enumerate(as_tensors) if t.ndim > 0]
    out = list(as_tensors)
    for rank, i in enumerate(kept):
        shape = [1] * len(kept)
        shape[rank] = -1
        out[i] = as_tensors[i].reshape(shape)
    return (slice(None), *out)


@dataclass(frozen=True)
class Edit:
    """Rewrite the activation at TL hook ``name``, at ``pos`` × ``head`` × ``neurons``.

    ``pos`` indexes the (query) position, ``head`` the head axis of head-shaped hooks (on ``hook_k``/``hook_v``
    of a grouped-query model: the key/value head), ``neurons`` the last axis (neurons of ``mlp.hook_post``,
    dimensions of the residual stream, or ``d_head`` components). Each is an int, a list or tensor of ints, a
    slice, or None (all). The selection is every combination: ``pos=[1, 4], head=[0, 2]`` is the four
    (position, head) pairs, and the rewrite sees the selected values as ``[batch, pos, head, neurons]`` in that
    order, an int removing its axis (so noise is drawn, and a replacement broadcast, in that order). ``rows``
    restricts the edit to a range of batch rows (the sweep driver stacks several variants on the batch axis);
    the rewrite then sees only those rows.
    """

    name: str
    rewrite: Rewrite
    pos: Index = None
    head: Index = None
    neurons: Index = None
    rows: slice | None = None

    def __post_init__(self):
        for what in ("pos", "head", "neurons"):
            _check_index_type(getattr(self, what), what, self.name)

    def index(self, activation: Tensor) -> tuple:
        """The index tuple into ``activation`` (TL layout) that this edit selects."""
        suffix = hook_suffix(self.name)
        if self.head is not None and suffix not in HEAD_HOOKS + PATTERN_HOOKS:
            raise ValueError(f"{self.name} has no head axis; `head` applies to {HEAD_HOOKS + PATTERN_HOOKS}")
        if activation.ndim == 2 and self.pos is not None:
            raise ValueError(
                f"{self.name} is {_FLAT}: it has no position axis; only `neurons` can index it "
                "(edit attn.hook_q / hook_k or hook_rot_q / hook_rot_k to address positions and heads)"
            )
        if suffix in PATTERN_HOOKS:  # [batch, head, query_pos, key_pos]
            dims = {"head": 1, "pos": 2, "neurons": 3}
        elif suffix in HEAD_HOOKS:  # [batch, pos, head, d_head]
            dims = {"pos": 1, "head": 2, "neurons": 3}
        else:  # [batch, pos, features]
            dims = {"pos": 1, "neurons": activation.ndim - 1}
        by_dim: list[Index] = [None] * (activation.ndim - 1)
        for what, dim in dims.items():
            value = getattr(self, what)
            note = ""
            if what == "head" and suffix in KV_HOOKS:
                note = " (key/value heads: on a grouped-query model each is shared by several query heads)"
            _check_in_range(value, activation.shape[dim], what, self.name, note)
            by_dim[dim - 1] = value
        return _outer(by_dim, list(activation.shape[1:]))

    def __call__(self, activation: Tensor, hook=None) -> Tensor:
        """Hook function: returns the edited copy of ``activation`` (TL layout)."""
        if self.rows is not None:
            if activation.ndim == 2:
                raise ValueError(
                    f"{self.name} is {_FLAT}: its rows are not prompts, so it cannot be edited per variant"
                )
            if len(range(activation.shape[0])[self.rows]) == 0:
                raise IndexError(f"{self.name}: rows {self.rows} select nothing of a batch of {activation.shape[0]}")
            edited = activation.clone()
            edited[self.rows] = dataclass_replace(self, rows=None)(activation[self.rows])
            return edited
        index = self.index(activation)
        selected = activation[index]
        new = self.rewrite(activation, index)
        if new.shape != selected.shape:
            try:
                new = new.expand(selected.shape)
            except RuntimeError:
                raise ValueError(
                    f"{self.name}: replacement of shape {tuple(new.shape)} does not fit the selected slice "
                    f"{tuple(selected.shape)} of the activation {tuple(activation.shape)}"
                ) from None
        edited = activation.clone()
        edited[index] = new.to(activation.dtype)
        return edited

    def on_rows(self, rows: slice) -> Edit:
        """The same edit applied only to batch rows ``rows``."""
        return dataclass_replace(self, rows=rows)


# --- the rewrites: each a one-liner; an ablation, a scaling, a noise and a patch differ only here ---


def zero(name: str, **where) -> Edit:
    """Set the selected values to 0 (zero-ablation)."""
    return Edit(name, lambda act, i: torch.zeros_like(act[i]), **where)


def scale(name: str, factor: float, **where) -> Edit:
    """Multiply the selected values by ``factor``."""
    return Edit(name, lambda act, i: act[i] * factor, **where)


def replace(name: str, value: Tensor | float, **where) -> Edit:
    """Set the selected values to ``value`` (broadcast to the selected slice; a shape that cannot is an error)."""
    return Edit(name, lambda act, _: torch.as_tensor(value, dtype=act.dtype, device=act.device), **where)


def gaussian_noise(name: str, mean: float = 0.0, std: float = 1.0, seed: int = 0, **where) -> Edit:
    """Replace the selected values by N(mean, std²) noise drawn from a fixed seed (same draw on TL and HF)."""

    def rewrite(act: Tensor, i: tuple) -> Tensor:
        generator = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same numbers on any device
        return (torch.randn(act[i].shape, generator=generator) * std + mean).to(act.device)

    return Edit(name, rewrite, **where)


def donor_activation(name: str, donor) -> Tensor:
    """``donor`` itself if it is a tensor, else ``donor[name]`` (a donor cache); `KeyError` saying how to cache it."""
    if isinstance(donor, Tensor):
        return donor
    if name not in donor:
        raise KeyError(f"the donor cache holds no {name!r}; cache it (cache=[{name!r}]) first")
    return donor[name]


def check_donor(name: str, source: Tensor, recipient: tuple[int, ...]) -> None:
    """Raise `ValueError` unless the donor activation ``source`` fits the recipient's shape ``recipient``: the same
    shape after the batch axis (the same token length), and the same batch or a batch of 1. The one donor check."""
    if tuple(source.shape[1:]) != tuple(recipient[1:]) or source.shape[0] not in (1, recipient[0]):
        raise ValueError(
            f"{name}: donor activation {tuple(source.shape)} does not match the recipient's {tuple(recipient)} "
            "(donor and recipient need the same token length, and the same batch or a batch of 1)"
        )


def patch(name: str, donor, **where) -> Edit:
    """Copy the selected values from the donor's activation at the same hook and index.

    ``donor``: a cache (mapping) holding ``name``, or the activation itself, TL layout, batch equal to the
    recipient's or 1.
    """
    source = donor_activation(name, donor)

    def rewrite(act: Tensor, i: tuple) -> Tensor:
        check_donor(name, source, tuple(act.shape))
        return source.to(act.device).expand_as(act)[i]

    return Edit(name, rewrite, **where)


def patch_where(name: str, donor, mask: Bool[Tensor, "batch pos"]) -> Edit:
    """Copy the donor's activation at the positions where ``mask`` is true, row by row
    (e.g. ``tokens != donor_tokens``)."""
    source = donor_activation(name, donor)

    def rewrite(act: Tensor, i: tuple) -> Tensor:
        check_donor(name, source, tuple(act.shape))
        if mask.shape != act.shape[:2]:
            raise ValueError(f"{name}: mask {tuple(mask.shape)} does not match [batch, pos] = {tuple(act.shape[:2])}")
        m = mask.to(act.device).reshape(*mask.shape, *[1] * (act.ndim - 2))
        return torch.where(m, source.to(act.device), act)

    return Edit(name, rewrite)


def check_finite(logits: Tensor, edits: Sequence[Edit]) -> Tensor:
    """Raise `FloatingPointError` naming the edits if they made the logits NaN or infinite."""
    if edits and not torch.isfinite(logits).all():
        raise FloatingPointError(f"the edits at {[e.name for e in edits]} produced NaN/inf logits")
    return logits


def run_collecting(
    hooks_for: Callable[[dict[str, Tensor]], contextlib.AbstractContextManager],
    call: Callable[[], Tensor],
    edits: Sequence[Edit],
    cache_device: str | torch.device | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The common body of both backends' ``run``: ``call()`` inside ``hooks_for(acts)`` without gradients,
    NaN/inf checked, the recorded activations moved to ``cache_device``."""
    acts: dict[str, Tensor] = {}
    with torch.no_grad(), hooks_for(acts):
        logits = call()
    return check_finite(logits, edits), {n: a.to(cache_device) if cache_device else a for n, a in acts.items()}
