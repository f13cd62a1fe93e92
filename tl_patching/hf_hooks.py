"""The HF counterpart of every TransformerLens hook point, as raw PyTorch hooks on ``GPT2LMHeadModel``.

`run` here mirrors `tl_patching.hooks.run`: same arguments, same TL hook names, same `Edit`
objects. Each TL name maps to one HF module and one view of its input or output in TL layout:

=============================  ==========================================  ==============================
TL hook                         HF module (hook kind)                       view in TL layout
=============================  ==========================================  ==============================
blocks.l.hook_resid_pre         h[l] (forward pre-hook)                     input
blocks.l.attn.hook_q/k/v        h[l].attn.c_attn (output)                   third 0/1/2 of 3·d_model, split into heads
blocks.l.attn.hook_attn_scores  h[l].attn.c_attn (output), read only        Q·Kᵀ/√d_head, future keys = −inf
blocks.l.attn.hook_pattern      h[l].attn (output[1], eager), read only     attention probabilities
blocks.l.attn.hook_z            h[l].attn.c_proj (forward pre-hook)         input split into heads
blocks.l.hook_attn_out          h[l].attn.c_proj (output)                   output
blocks.l.hook_resid_mid         h[l].ln_2 (forward pre-hook)                input
blocks.l.mlp.hook_pre           h[l].mlp.c_fc (output)                      output
blocks.l.mlp.hook_post          h[l].mlp.act (output)                       output (after GELU)
blocks.l.hook_mlp_out           h[l].mlp (output)                           output
blocks.l.hook_resid_post        h[l] (output; tensor, or tuple in old HF)   output / output[0]
hook_embed                      transformer.wte (output)                    output
ln_final.hook_normalized        transformer.ln_f (output)                   (output − b) / w
=============================  ==========================================  ==============================

Hooks are registered with ``prepend=True`` (edits before reads at the same module, both before
transformers' own ``output_hidden_states`` recorder) and always removed, even when the forward raises.
"""

from __future__ import annotations

import contextlib
import functools
import difflib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformers import GPT2LMHeadModel

from tl_patching import hooks as tl_hooks
from tl_patching.hooks import Edit, HookNameError, check_finite

ReadFn = Callable[[Tensor, GPT2LMHeadModel], Tensor]  # (raw HF tensor, model) -> TL layout
WriteFn = Callable[[Tensor, Tensor, GPT2LMHeadModel], Tensor]  # (raw HF tensor, new TL-layout value, model) -> new raw


@dataclass(frozen=True)
class Site:
    """Where a TL hook point lives in HF GPT-2 and how to view it in TL layout."""

    module: Callable[[GPT2LMHeadModel, int | None], nn.Module]
    kind: str  # "output" (forward hook) or "input" (forward pre-hook)
    read: ReadFn
    write: WriteFn | None  # None: read only
    element: int = 0  # which element of a tuple output holds the tensor


def _identity(raw: Tensor, hf) -> Tensor:
    return raw


def _overwrite(raw: Tensor, new: Tensor, hf) -> Tensor:
    return new


def _split_heads(x: Float[Tensor, "batch pos d_model"], hf: GPT2LMHeadModel) -> Float[Tensor, "batch pos head d_head"]:
    return einops.rearrange(x, "b p (h dh) -> b p h dh", h=hf.config.n_head)


def _merge_heads(raw: Tensor, new: Float[Tensor, "batch pos head d_head"], hf) -> Float[Tensor, "batch pos d_model"]:
    return einops.rearrange(new, "b p h dh -> b p (h dh)")


def _qkv_site(which: int) -> Site:
    """Q, K or V: one third of the fused ``c_attn`` output (HF ``Conv1D``; order Q, K, V)."""

    def read(qkv: Float[Tensor, "batch pos 3*d_model"], hf: GPT2LMHeadModel) -> Tensor:
        return split_qkv(qkv, hf.config.n_head)[which]

    def write(qkv: Tensor, new: Tensor, hf: GPT2LMHeadModel) -> Tensor:
        d = hf.config.n_embd
        out = qkv.clone()
        out[..., which * d : (which + 1) * d] = _merge_heads(qkv, new, hf)
        return out

    return Site(lambda m, l: m.transformer.h[l].attn.c_attn, "output", read, write)


def split_qkv(
    qkv: Float[Tensor, "batch pos 3*d_model"], n_heads: int
) -> tuple[Float[Tensor, "batch pos head d_head"], ...]:
    """The fused ``c_attn`` output as (Q, K, V) in TL layout: thirds in order Q, K, V, each split into heads."""
    return tuple(einops.rearrange(t, "b p (h dh) -> b p h dh", h=n_heads) for t in qkv.chunk(3, dim=-1))


def causal_scores(
    q: Float[Tensor, "batch pos head d_head"], k: Float[Tensor, "batch pos head d_head"], scale: float | None = None
) -> Float[Tensor, "batch head query_pos key_pos"]:
    """Q·Kᵀ·scale (default 1/√d_head) with future keys set to −inf, as TL's ``hook_attn_scores`` holds them."""
    scores = einops.einsum(q, k, "b q h dh, b k h dh -> b h q k") * (scale if scale is not None else q.shape[-1] ** -0.5)
    n = scores.shape[-1]
    future = torch.triu(torch.ones(n, n, dtype=torch.bool, device=scores.device), diagonal=1)
    return scores.masked_fill(future, float("-inf"))


def _attn_scores_read(layer: int) -> ReadFn:
    def read(qkv: Tensor, hf: GPT2LMHeadModel) -> Float[Tensor, "batch head query_pos key_pos"]:
        config = hf.config
        q, k, _ = split_qkv(qkv, config.n_head)
        scale = (q.shape[-1] ** -0.5 if config.scale_attn_weights else 1.0) / (
            layer + 1 if config.scale_attn_by_inverse_layer_idx else 1
        )
        return causal_scores(q, k, scale)

    return read


# TL's hook_normalized sits before LayerNorm's affine part, HF's ln_f output after it: undo/redo w, b.
def _ln_f_read(out: Tensor, hf: GPT2LMHeadModel) -> Tensor:
    return (out - hf.transformer.ln_f.bias) / hf.transformer.ln_f.weight


def _ln_f_write(out: Tensor, new: Tensor, hf: GPT2LMHeadModel) -> Tensor:
    return new * hf.transformer.ln_f.weight + hf.transformer.ln_f.bias


def _site(suffix: str, layer: int | None) -> Site:
    h = lambda m, l: m.transformer.h[l]  # noqa: E731
    sites = {
        "hook_resid_pre": Site(h, "input", _identity, _overwrite),
        "attn.hook_q": _qkv_site(0),
        "attn.hook_k": _qkv_site(1),
        "attn.hook_v": _qkv_site(2),
        "attn.hook_attn_scores": Site(lambda m, l: m.transformer.h[l].attn.c_attn, "output", _attn_scores_read(layer or 0), None),
        "attn.hook_pattern": Site(lambda m, l: m.transformer.h[l].attn, "output", _identity, None, element=1),
        "attn.hook_z": Site(lambda m, l: m.transformer.h[l].attn.c_proj, "input", _split_heads, _merge_heads),
        "hook_attn_out": Site(lambda m, l: m.transformer.h[l].attn.c_proj, "output", _identity, _overwrite),
        "hook_resid_mid": Site(lambda m, l: m.transformer.h[l].ln_2, "input", _identity, _overwrite),
        "mlp.hook_pre": Site(lambda m, l: m.transformer.h[l].mlp.c_fc, "output", _identity, _overwrite),
        "mlp.hook_post": Site(lambda m, l: m.transformer.h[l].mlp.act, "output", _identity, _overwrite),
        "hook_mlp_out": Site(lambda m, l: m.transformer.h[l].mlp, "output", _identity, _overwrite),
        "hook_resid_post": Site(h, "output", _identity, _overwrite),
    }
    top_level = {
        "hook_embed": Site(lambda m, l: m.transformer.wte, "output", _identity, _overwrite),
        "ln_final.hook_normalized": Site(lambda m, l: m.transformer.ln_f, "output", _ln_f_read, _ln_f_write),
    }
    return (sites if layer is not None else top_level)[suffix]


BLOCK_SUFFIXES = (
    "hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_attn_scores", "attn.hook_pattern",
    "attn.hook_z", "hook_attn_out", "hook_resid_mid", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out", "hook_resid_post",
)
TOP_LEVEL = ("hook_embed", "ln_final.hook_normalized")


def supported_names(n_layers: int) -> list[str]:
    """Every TL hook name this module can hook on an HF GPT-2 of ``n_layers`` layers."""
    return list(TOP_LEVEL) + [f"blocks.{l}.{s}" for l in range(n_layers) for s in BLOCK_SUFFIXES]


def resolve(hf_model: GPT2LMHeadModel, name: str) -> tuple[Site, nn.Module]:
    """The `Site` and HF module for a TL hook name; a clear error for names that do not exist."""
    n_layers = hf_model.config.n_layer
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    layer, suffix = (int(match[1]), match[2]) if match else (None, name)
    if layer is not None and layer >= n_layers:
        raise IndexError(f"{name}: layer {layer} out of range, the model has {n_layers} layers (0..{n_layers - 1})")
    if suffix not in (BLOCK_SUFFIXES if layer is not None else TOP_LEVEL):
        close = difflib.get_close_matches(name, supported_names(n_layers), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise HookNameError(f"no HF counterpart for hook name {name!r}{hint}")
    site = _site(suffix, layer)
    if suffix == "attn.hook_pattern" and hf_model.config._attn_implementation != "eager":
        raise ValueError(
            f"{name}: HF returns attention probabilities only with eager attention; load the model with "
            "attn_implementation='eager' (tl_patching.models.load_hf does)"
        )
    return site, site.module(hf_model, layer)


def _forward_hook(site: Site, hf_model: GPT2LMHeadModel, fn: Callable[[Tensor], Tensor | None]) -> Callable:
    """Wrap ``fn`` (TL-layout tensor -> replacement or None) as an ``nn.Module`` forward hook or pre-hook."""

    def apply(raw: Tensor) -> Tensor | None:
        new = fn(site.read(raw, hf_model))
        return None if new is None else site.write(raw, new, hf_model)

    if site.kind == "output":

        def hook(module, args, output):
            is_tuple = isinstance(output, tuple)  # GPT2Block returns a tensor in transformers 5, a tuple before
            raw = output[site.element] if is_tuple else output
            new = apply(raw)
            if new is None:
                return None
            return output[: site.element] + (new,) + output[site.element + 1 :] if is_tuple else new

        return hook

    def pre_hook(module, args, kwargs):
        in_args = len(args) > 0
        raw = args[0] if in_args else kwargs["hidden_states"]
        new = apply(raw)
        if new is None:
            return None
        return ((new,) + tuple(args[1:]), kwargs) if in_args else (args, {**kwargs, "hidden_states": new})

    return pre_hook


@contextlib.contextmanager
def hooks(hf_model: GPT2LMHeadModel, edits: Sequence[Edit] = (), cache: dict[str, Tensor] | None = None, names: Sequence[str] = ()) -> Iterator[None]:
    """Context manager: ``edits`` applied and ``names`` recorded into ``cache`` while inside; hooks removed on exit.

    The HF counterpart of TL's ``with model.hooks(...)``.
    """
    handles = []
    if cache is None:
        cache = {}

    def register(name: str, fn: Callable[[Tensor], Tensor | None]) -> None:
        site, module = resolve(hf_model, name)
        hook = _forward_hook(site, hf_model, fn)
        # prepend=True: our hooks run before transformers' hidden-state recorder (see SPEC traps).
        if site.kind == "output":
            handles.append(module.register_forward_hook(hook, prepend=True))
        else:
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True, prepend=True))

    def recorder(name: str) -> Callable[[Tensor], None]:
        def record(act: Tensor) -> None:
            cache[name] = act.detach().clone()

        return record

    try:
        # Prepending reverses order: register readers first and edits last (reversed), so at one module
        # the edits run in the given order and the readers see their result, as in TransformerLens.
        for name in names:
            register(name, recorder(name))
        for edit in reversed(edits):
            site, _ = resolve(hf_model, edit.name)
            if site.write is None:
                raise ValueError(f"{edit.name} is read-only on the HF side: HF GPT-2 has no module boundary there")
            register(edit.name, lambda act, edit=edit: edit(act))
        yield
    finally:
        for handle in handles:
            handle.remove()


def run(
    hf_model: GPT2LMHeadModel,
    tokens: Int[Tensor, "batch pos"],
    edits: Sequence[Edit] = (),
    cache: Sequence[str] = (),
    cache_device: str | torch.device | None = None,
) -> tuple[Float[Tensor, "batch pos d_vocab"], dict[str, Tensor]]:
    """Forward ``tokens`` with ``edits`` applied; return the logits and the activations named in ``cache``.

    Mirrors `tl_patching.hooks.run` argument for argument; activations are returned in TL layout.
    """
    acts: dict[str, Tensor] = {}
    with torch.no_grad(), hooks(hf_model, edits, acts, cache):
        logits = hf_model(tokens).logits
    return check_finite(logits, edits), {n: a.to(cache_device) if cache_device else a for n, a in acts.items()}


def runner(model, hf_model: GPT2LMHeadModel | None = None) -> Callable[..., tuple[Tensor, dict[str, Tensor]]]:
    """``run`` bound to the HF model if one is given, else `tl_patching.hooks.run` bound to the TL model:
    experiments call it as ``forward(tokens, edits, cache)`` and are written once for both sides."""
    return functools.partial(run, hf_model) if hf_model is not None else functools.partial(tl_hooks.run, model)


def block_output_structure(hf_model: GPT2LMHeadModel, tokens: Int[Tensor, "batch pos"]) -> dict[str, str]:
    """What ``transformer.h[0]`` returns in the installed transformers, with and without ``output_attentions``.

    The seeds index ``output[0]`` / ``output[1:]``; transformers 5 returns a plain tensor.
    """
    seen: dict[str, str] = {}

    def describe(output) -> str:
        if isinstance(output, tuple):
            parts = ", ".join("None" if o is None else f"Tensor{tuple(o.shape)}" for o in output)
            return f"tuple of {len(output)}: ({parts})"
        return f"Tensor{tuple(output.shape)}"

    for flag in (False, True):
        handle = hf_model.transformer.h[0].register_forward_hook(
            lambda m, a, out, flag=flag: seen.__setitem__(f"output_attentions={flag}", describe(out))
        )
        try:
            with torch.no_grad():
                hf_model(tokens, output_attentions=flag)
        finally:
            handle.remove()
    return seen
