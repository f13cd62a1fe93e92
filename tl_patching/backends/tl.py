"""Backend 1 of 2: run `Edit`s as TransformerLens hooks — on a `HookedTransformer` (TransformerLens 3) or a
`TransformerBridge` in compatibility mode (TransformerLens 4), which has the same hook names and shapes.

Mirror of `tl_patching.backends.hf`: same functions, same arguments, same errors. Where a bridge's hook point does
not mean what HookedTransformer's does, this backend makes it so or refuses it by name:

- ``hook_resid_mid``: the bridge's is the next norm's input (``ln2.hook_in``), so a write there changes only the
  MLP's input, not the residual stream (measured: 1.5–3 logits off). It is written, as on the HF backend, as a
  change of the attention output: ``hook_attn_out := edited − hook_resid_pre``;
- QK-norm hooks (Qwen3, Gemma 3) hold ``[batch, head, pos, d]`` on a bridge: seen in HookedTransformer's
  flattened ``[(batch pos head), d]``;
- hook points the bridge lists but never fires on a model (measured: NeoX's ``hook_rot_q``/``hook_rot_k``), and the
  ones that need a config flag (``hook_result``, ``hook_q_input``, …), are refused with the reason.
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections import defaultdict
from collections.abc import Iterator, Sequence

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_patching import invariants, lens
from tl_patching.edits import Edit, check_name, run_collecting
from tl_patching.lens import HookedTransformer

_FLAGGED = "TransformerLens computes it only under a config flag (cfg.use_attn_result, use_split_qkv_input, …)"


def hook_names(model: HookedTransformer) -> list[str]:
    """Every TL hook name of ``model``: its hook points (on a bridge: those with HookedTransformer's names, without
    the bridge's aliases; where tl_patching has an HF table for the architecture, exactly the names it lists)."""
    if not lens.is_bridge(model):
        return list(model.hook_dict)
    known = _ht_vocabulary(model)
    return [n for n in model.hook_dict if _suffix(n) in known]


def _suffix(name: str) -> str:
    match = re.fullmatch(r"blocks\.\d+\.(.+)", name)
    return match[1] if match else name


def _ht_vocabulary(model) -> set[str]:
    from tl_patching.backends import hf_maps

    table = hf_maps.FAMILIES.get(lens.architecture(model))
    if table is not None:
        return set(table.sites) | set(table.refused)
    return set(hf_maps.NETWORK_ORDER) | {s for t in hf_maps.FAMILIES.values() for s in (*t.sites, *t.refused)}


_SILENT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # bridge -> its hook points that never fire


def silent_hooks(model) -> set[str]:
    """The hook points a bridge lists but never fires on this model (found once, by a two-token probe with every
    point hooked; flag-gated points excluded): an edit there would silently do nothing."""
    if not lens.is_bridge(model):
        return set()
    if model not in _SILENT:
        fired: set[str] = set()

        def seen(act, hook):
            fired.add(hook.name)

        names = [n for n in hook_names(model) if not _needs_flag(model, n)]
        with torch.no_grad(), model.hooks(fwd_hooks=[(n, seen) for n in names]):
            model(torch.zeros(1, 2, dtype=torch.long, device=model.cfg.device))
        fired_points = {id(model.hook_dict[n]) for n in fired}  # a point fires under one name, aliases share it
        _SILENT[model] = {n for n in names if id(model.hook_dict[n]) not in fired_points}
    return _SILENT[model]


def readable_hooks(model: HookedTransformer) -> list[str]:
    """The hook names of `hook_names` that ``model`` computes as it is configured now: without the flag-gated points
    whose flag is off (``hook_result``, ``hook_q_input``, …) and a bridge's silent ones. What a full cache holds."""
    names = hook_names(model)
    if lens.is_bridge(model):
        return [n for n in names if n not in silent_hooks(model) and not _needs_flag(model, n)]
    fired: set[str] = set()
    with torch.no_grad(), model.hooks(fwd_hooks=[(n, lambda act, hook: fired.add(hook.name)) for n in names]):
        model(torch.zeros(1, 2, dtype=torch.long, device=model.cfg.device))
    return [n for n in names if n in fired]


def _needs_flag(model, name: str) -> bool:
    return _suffix(name) in (
        "attn.hook_result",
        "hook_q_input",
        "hook_k_input",
        "hook_v_input",
        "hook_mlp_in",
        "hook_attn_in",
        "attn.hook_q_input",
        "attn.hook_k_input",
        "attn.hook_v_input",
    )


def _check(model: HookedTransformer, names: Sequence[str]) -> None:
    known = hook_names(model)
    for name in names:
        check_name(name, known, model.cfg.n_layers)
    if lens.is_bridge(model):
        silent = silent_hooks(model)
        for name in names:
            if name in silent:
                raise NotImplementedError(
                    f"{name} never fires on this TransformerBridge ({lens.architecture(model)}, TransformerLens "
                    f"{lens.TL_VERSION}): it is listed but computed inside the HF module; edits there would do nothing"
                )


def _flat_qk_norm(name: str) -> bool:
    return re.search(r"\.attn\.[qk]_norm\.hook_(normalized|scale)$", name) is not None


def ht_layout(model, name: str, act: Tensor) -> Tensor:
    """``act`` at hook point ``name`` in HookedTransformer's layout: a bridge's QK-norm hooks hold ``[batch, head,
    pos, d]``, HookedTransformer's ``[(batch pos head), d]``; everything else is the same on both."""
    return einops.rearrange(act, "b h p d -> (b p h) d") if lens.is_bridge(model) and _flat_qk_norm(name) else act


def model_layout(model, name: str, new: Tensor, act: Tensor) -> Tensor:
    """``new`` (HookedTransformer's layout) back in the layout of ``act``, the model's own (inverse of `ht_layout`)."""
    if lens.is_bridge(model) and _flat_qk_norm(name):
        return einops.rearrange(new, "(b p h) d -> b h p d", b=act.shape[0], p=act.shape[2])
    return new


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
    readers = list(names) if cache is not None else []
    _check(model, [e.name for e in edits] + readers)
    invariants.require(model, readers, [e.name for e in edits])
    bridge = lens.is_bridge(model)
    ran: set[int] = set()
    captured: dict[int, Tensor] = {}  # layer -> resid_pre, for resid_mid written as a change of attn_out (bridge)
    at: dict[str, list[tuple[tuple, callable]]] = defaultdict(list)  # hook point -> (order, hook): edits, readers

    for i, edit in enumerate(edits):
        layer = re.match(r"blocks\.(\d+)\.hook_resid_mid$", edit.name)
        if bridge and layer:  # the bridge's hook_resid_mid is the next norm's input: write through attn_out
            l = int(layer[1])
            # invariants.require (above) has measured resid_mid = resid_pre + attn_out, which this assumes

            def capture(act: Tensor, hook, l=l) -> None:
                captured[l] = act

            def via_attn_out(act: Tensor, hook, i=i, edit=edit, l=l) -> Tensor:
                ran.add(i)
                return edit(captured[l] + act) - captured[l]

            at[f"blocks.{l}.hook_resid_pre"].append(((2, i), capture))  # after every edit of resid_pre
            at[f"blocks.{l}.hook_attn_out"].append(((2, i), via_attn_out))  # after attn_out's edits and readers
            continue

        def apply(act: Tensor, hook, i=i, edit=edit) -> Tensor:
            ran.add(i)
            return model_layout(model, edit.name, edit(ht_layout(model, edit.name, act)), act)

        at[edit.name].append(((0, i), apply))
    for i, name in enumerate(readers):

        def record(act: Tensor, hook, name=name) -> None:
            cache[name] = ht_layout(model, name, act).detach().clone()

        at[name].append(((1, i), record))  # readers after edits: TL runs one point's hooks in registration order
    fwd_hooks = [(point, fn) for point, entries in at.items() for _, fn in sorted(entries, key=lambda e: e[0])]
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(model.hooks(fwd_hooks=fwd_hooks))
        except ValueError as e:  # a bridge refuses flag-gated hook points at registration: the error of TL 3's
            gated = [point for point, _ in fwd_hooks if _needs_flag(model, point)]
            if not gated:
                raise
            raise NotImplementedError(
                f"{gated[0]} never ran: this model does not compute that hook point ({_FLAGGED}; the bridge: {e})"
            ) from None
        yield
    never = [e.name for i, e in enumerate(edits) if i not in ran]
    never += [n for n in readers if n not in cache]
    if never:
        raise NotImplementedError(f"{never[0]} never ran: this model does not compute that hook point ({_FLAGGED})")


def run(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    edits: Sequence[Edit] = (),
    cache: Sequence[str] = (),
    cache_device: str | torch.device | None = None,
) -> tuple[Float[Tensor, "batch pos d_vocab"], dict[str, Tensor]]:
    """Forward ``tokens`` with ``edits`` applied; return the logits and the (edited) activations named in ``cache``."""
    return run_collecting(lambda acts: hooks(model, edits, acts, cache), lambda: model(tokens), edits, cache_device)
