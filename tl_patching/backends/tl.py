"""Backend 1 of 2: run `Edit`s as TransformerLens hooks on a `HookedTransformer`.

Mirror of `tl_patching.backends.hf`: same functions, same arguments, same errors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from tl_patching.edits import Edit, check_name, run_collecting


def hook_names(model: HookedTransformer) -> list[str]:
    """Every TL hook name of ``model``."""
    return list(model.hook_dict)


def _check(model: HookedTransformer, names: Sequence[str]) -> None:
    known = hook_names(model)
    for name in names:
        check_name(name, known, model.cfg.n_layers)


@contextlib.contextmanager
def hooks(
    model: HookedTransformer,
    edits: Sequence[Edit] = (),
    cache: dict[str, Tensor] | None = None,
    names: Sequence[str] = (),
) -> Iterator[None]:
    """Inside: ``edits`` applied, in order, and the (edited) activations at ``names`` recorded into ``cache``.

    Raises `NotImplementedError` on exit if an edit never ran or a name was never recorded: TL creates some hook
    points (``hook_result``, ``hook_q_input``, …) whose hooks fire only under a config flag, and an edit there
    would silently do nothing (the HF backend refuses the same names with the same class: no HF counterpart).
    """
    _check(model, [e.name for e in edits] + list(names))
    ran: set[int] = set()

    def apply(i: int, edit: Edit):
        def hook(act: Tensor, hook=None) -> Tensor:
            ran.add(i)
            return edit(act)

        return hook

    def record(name: str):
        def hook(act: Tensor, hook=None) -> None:
            cache[name] = act.detach().clone()

        return hook

    # Edits first, readers after: at one hook point TL runs hooks in registration order.
    fwd_hooks = [(e.name, apply(i, e)) for i, e in enumerate(edits)]
    fwd_hooks += [(name, record(name)) for name in names] if cache is not None else []
    with model.hooks(fwd_hooks=fwd_hooks):
        yield
    never = [e.name for i, e in enumerate(edits) if i not in ran]
    never += [n for n in names if cache is not None and n not in cache]
    if never:
        raise NotImplementedError(
            f"{never[0]} never ran: this model does not compute that hook point (TL fires hook_result, hook_attn_in, "
            "hook_*_input and hook_mlp_in only when cfg.use_attn_result, use_attn_in, use_split_qkv_input or "
            "use_hook_mlp_in is set)"
        )


def run(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    edits: Sequence[Edit] = (),
    cache: Sequence[str] = (),
    cache_device: str | torch.device | None = None,
) -> tuple[Float[Tensor, "batch pos d_vocab"], dict[str, Tensor]]:
    """Forward ``tokens`` with ``edits`` applied; return the logits and the (edited) activations named in ``cache``."""
    return run_collecting(lambda acts: hooks(model, edits, acts, cache), lambda: model(tokens), edits, cache_device)
