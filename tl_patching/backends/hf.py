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
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from tl_patching.backends.hf_maps import NETWORK_ORDER, OUTPUT, HookMap, Site, Sum, View, hook_map_of
from tl_patching.edits import Edit, check_name, run_collecting


def hook_names(hf_model: nn.Module) -> list[str]:
    """Every TL hook name of the equivalent `HookedTransformer`: the mapped ones and the refused ones."""
    family = hook_map_of(hf_model)
    suffixes = list(family.sites) + list(family.refused)
    n_layers = family.n_layers(hf_model.config)
    top = [s for s in suffixes if s.startswith(("hook_embed", "hook_pos_embed", "ln_final.", "unembed."))]
    block = [s for s in suffixes if s not in top]
    return top + [f"blocks.{l}.{s}" for l in range(n_layers) for s in block]


def resolve(hf_model: nn.Module, name: str, write: bool = False) -> tuple[Site | Sum, int | None]:
    """The `Site` (or `Sum`) and the layer of a TL hook name; a clear error where there is none."""
    family: HookMap = hook_map_of(hf_model)
    check_name(name, hook_names(hf_model), family.n_layers(hf_model.config))
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    layer, suffix = (int(match[1]), match[2]) if match else (None, name)
    if suffix in family.refused:
        raise NotImplementedError(f"{name} has no HF counterpart in {family.architecture}: {family.refused[suffix]}")
    site = family.sites[suffix]
    if write and isinstance(site, Site) and site.view.write is None:
        raise NotImplementedError(
            f"{name} is read-only on the HF backend: {family.architecture} has no module boundary there"
        )
    if suffix == "attn.hook_pattern" and hf_model.config._attn_implementation != "eager":
        raise ValueError(
            f"{name}: HF returns attention probabilities only with eager attention; load the model with "
            "attn_implementation='eager' (tl_patching.checkpoints.load_hf does)"
        )
    return site, layer


def _first_input(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


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
        new = apply(_first_input(args, kwargs))
        if new is None:
            return None
        return ((new,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

    return pre_hook


def _sum_site(hf_model: nn.Module, total: Sum, layer: int, captured: dict[int, Tensor]) -> Site:
    """``total``'s site: the module of ``total.added``, seen as ``base + added`` with ``base`` taken from
    ``captured``."""
    family = hook_map_of(hf_model)
    added = family.sites[total.added]
    view = View(
        lambda raw, hf, l: captured[l] + added.view.read(raw, hf, l),
        lambda raw, new, hf, l: added.view.write(raw, new - captured[l], hf, l),
    )
    return Site(added.module, added.kind, view, added.element)


@contextlib.contextmanager
def hooks(
    hf_model: nn.Module, edits: Sequence[Edit] = (), cache: dict[str, Tensor] | None = None, names: Sequence[str] = ()
) -> Iterator[None]:
    """Inside: ``edits`` applied, in order, and the (edited) activations at ``names`` recorded into ``cache``.

    As on TransformerLens: hooks at one place run in the order given, edits before readers; where several
    TL names share one HF module they run in TL's order (`NETWORK_ORDER`). Raises `NotImplementedError` on
    exit if an edit never ran or a name was never recorded (its module was not called), as the TL backend does.
    """
    for edit in edits:
        resolve(hf_model, edit.name, write=True)
    readers = list(names) if cache is not None else []
    for name in readers:
        resolve(hf_model, name)
    ran: set[int] = set()
    captured: dict[int, Tensor] = {}  # layer -> the base of a `Sum` (resid_pre), as the block received it
    planned: dict[tuple[nn.Module, str], list[tuple[tuple, Callable]]] = defaultdict(list)  # (module, kind) -> hooks

    def plan(name: str, order: tuple, fn: Callable[[Tensor], Tensor | None]) -> None:
        site, layer = resolve(hf_model, name)
        if isinstance(site, Sum):
            base = hook_map_of(hf_model).sites[site.base]
            capture_at = (hf_model.get_submodule(base.module.format(l=layer)), "capture")
            planned[capture_at] = [((), _capture(captured, layer))]
            site = _sum_site(hf_model, site, layer, captured)
        module = hf_model.get_submodule(site.module.format(l=layer))
        rank = NETWORK_ORDER.index(name.split(".", 2)[-1] if layer is not None else name)
        planned[module, site.kind].append(((rank,) + order, _torch_hook(site, hf_model, layer, fn)))

    def apply(i: int, edit: Edit) -> Callable[[Tensor], Tensor]:
        def fn(act: Tensor) -> Tensor:
            ran.add(i)
            return edit(act)

        return fn

    def record(name: str) -> Callable[[Tensor], None]:
        def fn(act: Tensor) -> None:
            cache[name] = act.detach().clone()

        return fn

    for i, edit in enumerate(edits):
        plan(edit.name, (0, i), apply(i, edit))  # edits before readers, in the order given
    for i, name in enumerate(readers):
        plan(name, (1, i), record(name))
    handles = []
    try:
        for (module, kind), entries in planned.items():
            if kind == "capture":  # appended: it runs after every edit at the block input
                handles.append(module.register_forward_pre_hook(entries[0][1], with_kwargs=True))
                continue
            # prepend=True (before transformers' own output_hidden_states recorder) reverses the order at one
            # module: register the last to run first.
            for _, hook in sorted(entries, key=lambda e: e[0], reverse=True):
                if kind == OUTPUT:
                    handles.append(module.register_forward_hook(hook, prepend=True))
                else:
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True, prepend=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
    never = [e.name for i, e in enumerate(edits) if i not in ran] + [n for n in readers if n not in cache]
    if never:
        raise NotImplementedError(f"{never[0]} never ran: its HF module was not called")


def _capture(captured: dict[int, Tensor], layer: int) -> Callable:
    def pre_hook(module, args, kwargs) -> None:
        captured[layer] = _first_input(args, kwargs)

    return pre_hook


@contextlib.contextmanager
def same_hooks(hf_model: nn.Module) -> Iterator[None]:
    """Every hook registered on ``hf_model``'s modules inside is removed on exit: transformers installs its own
    recorders on the first call that asks for ``output_attentions`` / ``output_hidden_states`` and keeps them,
    and the model must leave as it came."""
    before = {m: (set(m._forward_hooks), set(m._forward_pre_hooks)) for m in hf_model.modules()}
    try:
        yield
    finally:
        for m, (forward_hooks, pre_hooks) in before.items():
            for key in set(m._forward_hooks) - forward_hooks:
                del m._forward_hooks[key]
            for key in set(m._forward_pre_hooks) - pre_hooks:
                del m._forward_pre_hooks[key]


def run(
    hf_model: nn.Module,
    tokens: Int[Tensor, "batch pos"],
    edits: Sequence[Edit] = (),
    cache: Sequence[str] = (),
    cache_device: str | torch.device | None = None,
) -> tuple[Float[Tensor, "batch pos d_vocab"], dict[str, Tensor]]:
    """Forward ``tokens`` with ``edits`` applied; return the logits and the (edited) activations named in ``cache``."""
    return run_collecting(
        lambda acts: hooks(hf_model, edits, acts, cache),
        lambda: hf_model(tokens.to(hf_model.device)).logits,
        edits,
        cache_device,
    )  # HF does not move its inputs (TL does)
