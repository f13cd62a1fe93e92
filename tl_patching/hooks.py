"""Hook-point names and the one kind of intervention: rewrite an activation at an index.

A patch, an ablation, a noise injection and a scaling are all an `Edit`: a TransformerLens hook
name, an index (position, head or neuron slice) and a rewrite of the selected values. The same
`Edit` runs on a `HookedTransformer` (`run` below) and on a raw HF ``GPT2LMHeadModel``
(`tl_patching.hf_hooks.run`), which hands the hook the activation in TL's layout.

Layouts (TL's, used on both sides):

- ``hook_q/k/v/z``: ``[batch, pos, head, d_head]`` (``head`` indexes dim 2)
- ``hook_attn_scores``, ``hook_pattern``: ``[batch, head, query_pos, key_pos]`` (``head`` indexes dim 1)
- ``mlp.hook_pre/post``: ``[batch, pos, d_mlp]``; ``hook_resid_*``, ``hook_*_out``: ``[batch, pos, d_model]``
  (``neurons`` indexes the last dim)
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Union

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import ActivationCache, HookedTransformer
from transformer_lens import utils as tl_utils

Index = Union[int, slice, Sequence[int], Tensor, None]
# (whole activation in TL layout, index tuple) -> new values for activation[index] (broadcastable to it)
Rewrite = Callable[[Tensor, tuple], Tensor]

HEAD_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_z")
PATTERN_HOOKS = ("hook_attn_scores", "hook_pattern")


class HookNameError(KeyError):
    """A hook name the model does not have."""

    def __str__(self) -> str:  # KeyError would print the message with quotes
        return str(self.args[0])


def act_name(kind: str, layer: int | None = None, model: HookedTransformer | None = None) -> str:
    """Full TL hook name, e.g. ``act_name("z", 3) == "blocks.3.attn.hook_z"``; checked against ``model`` if given.

    ``kind`` is anything `transformer_lens.utils.get_act_name` accepts ("z", "k", "post", "resid_post", ...).
    """
    name = tl_utils.get_act_name(kind, layer)
    if model is not None:
        if layer is not None and not 0 <= layer < model.cfg.n_layers:
            raise IndexError(f"layer {layer} out of range: the model has {model.cfg.n_layers} layers (0..{model.cfg.n_layers - 1})")
        check_hook_name(model, name)
    return name


def check_hook_name(model: HookedTransformer, name: str) -> None:
    """Raise `HookNameError` naming the closest valid hook if ``name`` is not a hook point of ``model``."""
    if name in model.hook_dict:
        return
    close = difflib.get_close_matches(name, list(model.hook_dict), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise HookNameError(f"unknown hook name {name!r}{hint}")


def hook_suffix(name: str) -> str:
    """``"blocks.3.attn.hook_z" -> "hook_z"``."""
    return name.rsplit(".", 1)[-1]


def _as_index(index: Index) -> int | slice | Tensor:
    if index is None:
        return slice(None)
    if isinstance(index, (int, slice, Tensor)):
        return index
    return torch.as_tensor(list(index), dtype=torch.long)


def _check_in_range(index: Index, size: int, what: str, name: str) -> None:
    if index is None or isinstance(index, slice):
        return
    values = [index] if isinstance(index, int) else [int(i) for i in torch.as_tensor(index).flatten()]
    bad = [v for v in values if not -size <= v < size]
    if bad:
        raise IndexError(f"{what} {bad[0]} out of range for {name}: size {size}")


@dataclass(frozen=True)
class Edit:
    """Rewrite the activation at TL hook ``name``, at ``pos`` × ``head`` × ``neurons``, on every batch row.

    ``pos`` indexes the (query) position, ``head`` the head axis of head-shaped hooks, ``neurons`` the last
    axis (neurons of ``mlp.hook_post``, dimensions of the residual stream, or ``d_head`` components).
    """

    name: str
    rewrite: Rewrite
    pos: Index = None
    head: Index = None
    neurons: Index = None

    def index(self, activation: Tensor) -> tuple:
        """The index tuple into ``activation`` (TL layout) that this edit selects."""
        suffix = hook_suffix(self.name)
        if self.head is not None and suffix not in HEAD_HOOKS + PATTERN_HOOKS:
            raise ValueError(f"{self.name} has no head axis; `head` applies to {HEAD_HOOKS + PATTERN_HOOKS}")
        if suffix in PATTERN_HOOKS:  # [batch, head, query_pos, key_pos]
            dims = {"head": 1, "pos": 2, "neurons": 3}
        elif suffix in HEAD_HOOKS:  # [batch, pos, head, d_head]
            dims = {"pos": 1, "head": 2, "neurons": 3}
        else:  # [batch, pos, features]
            dims = {"pos": 1, "neurons": activation.ndim - 1}
        index: list = [slice(None)] * activation.ndim
        for what, dim in dims.items():
            value = getattr(self, what)
            _check_in_range(value, activation.shape[dim], what, self.name)
            index[dim] = _as_index(value)
        return _broadcastable(tuple(index))

    def __call__(self, activation: Tensor, hook=None) -> Tensor:
        """TL hook function: returns the edited copy of ``activation``."""
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

    def hook(self) -> tuple[str, "Edit"]:
        """``(name, hook_fn)`` for `HookedTransformer.run_with_hooks` / ``model.hooks``."""
        return self.name, self


def _broadcastable(index: tuple) -> tuple:
    """Turn several 1-d tensor indices into an outer product (numpy would zip them instead)."""
    tensor_dims = [i for i, x in enumerate(index) if isinstance(x, Tensor) and x.ndim > 0]
    if len(tensor_dims) < 2:
        return index
    out = list(index)
    for rank, dim in enumerate(tensor_dims):
        shape = [1] * len(tensor_dims)
        shape[rank] = -1
        out[dim] = index[dim].reshape(shape)
    return tuple(out)


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


def _donor_activation(name: str, donor: ActivationCache | dict[str, Tensor] | Tensor) -> Tensor:
    if isinstance(donor, Tensor):
        return donor
    if name not in donor:
        raise KeyError(f"the donor cache holds no {name!r}; cache it (names_filter / cache=[{name!r}]) first")
    return donor[name]


def _check_donor(name: str, source: Tensor, act: Tensor) -> None:
    if source.shape[1:] != act.shape[1:] or source.shape[0] not in (1, act.shape[0]):
        raise ValueError(
            f"{name}: donor activation {tuple(source.shape)} does not match the recipient's {tuple(act.shape)} "
            "(donor and recipient need the same token length, and the same batch or a batch of 1)"
        )


def patch(name: str, donor: ActivationCache | dict[str, Tensor] | Tensor, **where) -> Edit:
    """Copy the selected values from the donor's activation at the same hook and index.

    ``donor``: a cache holding ``name`` or the activation itself, TL layout, batch equal to the recipient's or 1.
    """
    source = _donor_activation(name, donor)

    def rewrite(act: Tensor, i: tuple) -> Tensor:
        _check_donor(name, source, act)
        return source.to(act.device)[i]

    return Edit(name, rewrite, **where)


def patch_where(name: str, donor: ActivationCache | dict[str, Tensor] | Tensor, mask: Bool[Tensor, "batch pos"]) -> Edit:
    """Copy the donor's activation at the positions where ``mask`` is true, row by row (e.g. ``tokens != donor_tokens``)."""
    source = _donor_activation(name, donor)

    def rewrite(act: Tensor, i: tuple) -> Tensor:
        _check_donor(name, source, act)
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


def run(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    edits: Sequence[Edit] = (),
    cache: Sequence[str] = (),
    cache_device: str | torch.device | None = None,
) -> tuple[Float[Tensor, "batch pos d_vocab"], dict[str, Tensor]]:
    """Forward ``tokens`` with ``edits`` applied; return the logits and the (edited) activations named in ``cache``.

    Mirrors `tl_patching.hf_hooks.run` argument for argument. Caching happens after the edits at the
    same hook point, so a cached edited activation shows the edit. Only the named hooks are kept;
    ``cache_device="cpu"`` keeps them off the GPU while the model runs there.
    """
    for edit in edits:
        check_hook_name(model, edit.name)
    for name in cache:
        check_hook_name(model, name)
    with torch.no_grad(), model.hooks(fwd_hooks=[e.hook() for e in edits]):
        if cache:
            logits, acts = model.run_with_cache(tokens, names_filter=list(cache), device=cache_device)
            return check_finite(logits, edits), dict(acts.items())
        return check_finite(model(tokens), edits), {}
