"""Backend 2 of 2: run `Edit`s as raw PyTorch hooks on an HF model, at the module boundary of each TL hook point.

Mirror of `tl_patching.backends.tl`: same functions, same arguments, same errors. Where each TL name
lives in the HF model is the family's table in `tl_patching.backends.hf_maps`; the edit sees the
activation in TL layout. Hooks are registered with ``prepend=True`` (edits before reads at the same
module, and both before transformers' own ``output_hidden_states`` recorder) and always removed,
even when the forward raises.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from tl_patching.backends.hf_maps import OUTPUT, HookMap, Site, hook_map_of
from tl_patching.edits import Edit, check_name, run_collecting


def hook_names(hf_model: nn.Module) -> list[str]:
    """Every TL hook name of the equivalent `HookedTransformer`: the mapped ones and the refused ones."""
    family = hook_map_of(hf_model)
    suffixes = list(family.sites) + list(family.refused)
    n_layers = family.n_layers(hf_model.config)
    top = [s for s in suffixes if s.startswith(("hook_embed", "hook_pos_embed", "ln_final.", "unembed."))]
    block = [s for s in suffixes if s not in top]
    return top + [f"blocks.{l}.{s}" for l in range(n_layers) for s in block]


def resolve(hf_model: nn.Module, name: str, write: bool = False) -> tuple[Site, nn.Module, int | None]:
    """The `Site`, the HF module and the layer of a TL hook name; a clear error where there is none."""
    family: HookMap = hook_map_of(hf_model)
    check_name(name, hook_names(hf_model), family.n_layers(hf_model.config))
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    layer, suffix = (int(match[1]), match[2]) if match else (None, name)
    if suffix in family.refused:
        raise NotImplementedError(f"{name} has no HF counterpart in {family.architecture}: {family.refused[suffix]}")
    site = family.sites[suffix]
    if write and site.view.write is None:
        raise NotImplementedError(f"{name} is read-only on the HF backend: {family.architecture} has no module boundary there")
    if suffix == "attn.hook_pattern" and hf_model.config._attn_implementation != "eager":
        raise ValueError(f"{name}: HF returns attention probabilities only with eager attention; load the model with "
                         "attn_implementation='eager' (tl_patching.models.load_hf does)")
    return site, hf_model.get_submodule(site.module.format(l=layer)), layer


def _torch_hook(site: Site, hf_model: nn.Module, layer: int | None, fn: Callable[[Tensor], Tensor | None]) -> Callable:
    """Wrap ``fn`` (TL-layout tensor -> replacement or None) as an ``nn.Module`` forward hook or pre-hook."""

    def apply(raw: Tensor) -> Tensor | None:
        new = fn(site.view.read(raw, hf_model, layer))
        return None if new is None else site.view.write(raw, new, hf_model, layer)

    if site.kind == OUTPUT:

        def hook(module, args, output):
            is_tuple = isinstance(output, tuple)  # blocks return a tensor in transformers 5, a tuple before
            new = apply(output[site.element] if is_tuple else output)
            if new is None:
                return None
            return output[: site.element] + (new,) + output[site.element + 1 :] if is_tuple else new

        return hook

    def pre_hook(module, args, kwargs):
        in_args = len(args) > 0
        new = apply(args[0] if in_args else kwargs["hidden_states"])
        if new is None:
            return None
        return ((new,) + tuple(args[1:]), kwargs) if in_args else (args, {**kwargs, "hidden_states": new})

    return pre_hook


@contextlib.contextmanager
def hooks(
    hf_model: nn.Module, edits: Sequence[Edit] = (), cache: dict[str, Tensor] | None = None, names: Sequence[str] = ()
) -> Iterator[None]:
    """Inside: ``edits`` applied, in order, and the (edited) activations at ``names`` recorded into ``cache``.

    Raises on exit if an edit never ran (its module was not called).
    """
    for edit in edits:
        resolve(hf_model, edit.name, write=True)
    for name in names:
        resolve(hf_model, name)
    handles = []
    ran: set[int] = set()

    def register(name: str, fn: Callable[[Tensor], Tensor | None]) -> None:
        site, module, layer = resolve(hf_model, name)
        hook = _torch_hook(site, hf_model, layer, fn)
        if site.kind == OUTPUT:
            handles.append(module.register_forward_hook(hook, prepend=True))
        else:
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True, prepend=True))

    def apply(i: int, edit: Edit) -> Callable[[Tensor], Tensor]:
        def fn(act: Tensor) -> Tensor:
            ran.add(i)
            return edit(act)

        return fn

    def record(name: str) -> Callable[[Tensor], None]:
        def fn(act: Tensor) -> None:
            cache[name] = act.detach().clone()

        return fn

    try:
        # prepend=True reverses the order at one module: register readers first and edits last (reversed),
        # so the edits run in the given order and the readers see their result, as on the TL backend.
        for name in names if cache is not None else ():
            register(name, record(name))
        for i, edit in reversed(list(enumerate(edits))):
            register(edit.name, apply(i, edit))
        yield
    finally:
        for handle in handles:
            handle.remove()
    never = [e.name for i, e in enumerate(edits) if i not in ran]
    if never:
        raise RuntimeError(f"the edit at {never[0]} never ran: its HF module was not called")


def run(
    hf_model: nn.Module,
    tokens: Int[Tensor, "batch pos"],
    edits: Sequence[Edit] = (),
    cache: Sequence[str] = (),
    cache_device: str | torch.device | None = None,
) -> tuple[Float[Tensor, "batch pos d_vocab"], dict[str, Tensor]]:
    """Forward ``tokens`` with ``edits`` applied; return the logits and the (edited) activations named in ``cache``."""
    return run_collecting(lambda acts: hooks(hf_model, edits, acts, cache), lambda: hf_model(tokens.to(hf_model.device)).logits,
                          edits, cache_device)  # HF does not move its inputs (TL does)
