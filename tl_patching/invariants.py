"""Hook invariants: facts of the transformer — not of TransformerLens — that the hooks tl_patching reads and writes
must satisfy, on any architecture, table or not. Measured on a probe input, once per model (reads) and once per
hook point written (writes); a hook that fails one is refused by name for reads and writes
(`tl_patching.backends.tl` asks `require` before every run).

The invariants (relative to the activations' size, ``TOLERANCE`` in float32, wider in half precision):

    resid_pre[l+1] = resid_post[l]
    resid_mid[l]   = resid_pre[l] + attn_out[l]            sequential blocks
    resid_post[l]  = resid_mid[l] + mlp_out[l]             sequential blocks
    resid_post[l]  = resid_pre[l] + attn_out[l] + mlp_out[l]   parallel blocks
    logits         = unembed(ln_final(resid_post[L-1]))    (soft-capped where the model caps its logits)
    attn_out[l]    = Σ_h z[l, h] · W_O[l, h] + b_O[l]       where no norm sits after attention
    mlp_out[l]     = mlp.hook_post[l] · W_out[l] + b_out[l] where the MLP is one (no mixture of experts), no norm after
    pattern rows sum to 1 and are 0 above the diagonal (and outside a sliding window where the layer has one)

A write must propagate as the invariants say: with a change written at one hook point, every invariant above still
holds in that run (the bridge's ``hook_resid_mid`` once was the MLP norm's input only: read, it was the residual
stream; written, the residual stream never saw the change — exactly this check fails), and the written hook point holds
the change. What no invariant covers (q, k, v, scores, the embeddings) is reported as unchecked
(`status`); where tl_patching has an HF table the hooks are also checked against HF's own modules (`hf_table`).
"""

from __future__ import annotations

import contextvars
import re
import weakref
from dataclasses import dataclass

import einops
import torch
from torch import Tensor

from tl_patching import lens

TOLERANCE = 1e-4
RESIDUAL = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")
CHECKED = (*RESIDUAL, "attn.hook_z", "attn.hook_pattern", "mlp.hook_post")
PROBE = 8  # tokens


@dataclass(frozen=True)
class Failure:
    """An invariant that does not hold: the hook points it involves (suffixes), how far off (relative), and the
    write that broke it (None: it fails on a plain read)."""

    invariant: str
    hooks: tuple[str, ...]
    layer: int
    gap: float
    written: str | None = None

    def message(self, name: str, model) -> str:
        how = f"with {self.written} written" if self.written else "on a plain forward"
        return (
            f"{name} fails the hook invariant '{self.invariant}' at layer {self.layer} {how} (relative difference "
            f"{self.gap:.3g}) on this {lens.architecture(model)} (TransformerLens {lens.TL_VERSION}): reading or "
            "writing it would give a wrong number"
        )


_READS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> ([Failure], {hook covered}), plain run
_WRITES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {hook name: Failure | None}
_CLEAN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> the probe's cache, plain run
_MEASURING = contextvars.ContextVar("measuring", default=False)  # the checks' own runs are not checked again


def suffix(name: str) -> str:
    match = re.fullmatch(r"blocks\.\d+\.(.+)", name)
    return match[1] if match else name


def _names(model) -> list[str]:
    from tl_patching.backends import tl

    known = set(tl.readable_hooks(model))
    return [f"blocks.{l}.{s}" for l in range(model.cfg.n_layers) for s in CHECKED if f"blocks.{l}.{s}" in known]


def _gap(a: Tensor, b: Tensor) -> float:
    a, b = a.float(), b.float().to(a.device)
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


def parallel(model) -> bool:
    return bool(getattr(model.cfg, "parallel_attn_mlp", False))


def norm_after_sublayers(model) -> bool:
    """A norm on attention's and the MLP's outputs (Gemma 2/3, OLMo 2, EXAONE 4): attn_out and mlp_out are not linear
    in z and the neurons. HookedTransformer says so in its cfg; on a bridge the HF layers have a
    ``post_feedforward_layernorm`` (the name every such family in transformers uses)."""
    if lens.is_bridge(model):
        post = ("post_feedforward_layernorm", "post_mlp_layernorm")  # AFMoE's name
        return any(name.endswith(post) for name, _ in model.original_model.named_modules())
    return bool(getattr(model.cfg, "use_normalization_before_and_after", False))


def block_layout(model) -> str:
    """Which invariants a block obeys, in words: "parallel", "norm after sublayers", "mixture of experts", "sliding
    window" or "sequential" (the first that applies)."""
    if parallel(model):
        return "parallel"
    if norm_after_sublayers(model):
        return "norm after sublayers"
    if getattr(model.cfg, "num_experts", None):
        return "mixture of experts"
    if any(w is not None for w in windows(model)):
        return "sliding window"
    return "sequential"


def _readout(model, resid: Tensor) -> Tensor:
    """The final norm and unembedding, and what the HF model does to the logits after its head: Gemma 2's soft cap
    (HookedTransformer's cfg), Cohere's ``logit_scale``, Granite's ``logits_scaling`` (a bridge runs HF's own)."""
    final_norm = getattr(model, "ln_final", None)  # None: a model built without norms (normalization_type=None)
    logits = model.unembed(resid if final_norm is None else final_norm(resid))
    cap = getattr(model.cfg, "output_logits_soft_cap", 0.0) or 0.0
    config = lens.hf_config(model) if lens.is_bridge(model) else None
    if config is not None:
        cap = cap if cap > 0 else getattr(config, "final_logit_softcapping", None) or 0.0
        logits = (
            logits * (getattr(config, "logit_scale", None) or 1.0) / (getattr(config, "logits_scaling", None) or 1.0)
        )
    return cap * torch.tanh(logits / cap) if cap > 0 else logits


def windows(model) -> list[int | None]:
    """Each layer's sliding window (keys within ``window`` positions, itself included), None for global layers; on a
    bridge from tl_patching's family row (`lens.attention_config`), and None everywhere for an architecture without
    one (its patterns are then checked against the causal mask only)."""
    from tl_patching.families import UnsupportedArchitectureError

    try:
        cfg = lens.attention_config(model)
    except UnsupportedArchitectureError:
        return [None] * model.cfg.n_layers
    types = getattr(cfg, "attn_types", None)
    window = getattr(cfg, "window_size", None)
    if not getattr(cfg, "use_local_attn", False) or not types or not window:
        return [None] * model.cfg.n_layers
    return [window if types[l % len(types)] == "local" else None for l in range(model.cfg.n_layers)]


def _defined_by(invariant: str, hooks: tuple[str, ...], layer: int) -> tuple[str, ...]:
    """The hook point(s) an invariant defines (its left side: ``hooks[0]``, one layer on for ``resid_pre[l+1]``), which
    a write there legitimately breaks. resid_mid is written as a change of attn_out on a bridge (`backends.tl`), so
    a resid_mid write also frees attn_out's definition."""
    lhs = f"blocks.{layer + 1 if invariant.startswith('resid_pre[l+1]') else layer}.{hooks[0]}"
    if hooks[0] == "hook_attn_out":
        return lhs, f"blocks.{layer}.hook_resid_mid"
    return (lhs,)


def failures(
    model, logits: Tensor, cache: dict[str, Tensor], written: str | None = None
) -> tuple[list[Failure], set[str]]:
    """Every invariant that does not hold in one run (its ``logits`` and ``cache``: the `CHECKED` hook points of
    every layer, TL layout), and the hook kinds some invariant covered."""
    from tl_patching.engine import tolerance  # here: engine imports the backends, which import this module

    L, out, covered = model.cfg.n_layers, [], set()
    limit = tolerance(TOLERANCE, logits.dtype)

    def check(invariant: str, hooks: tuple[str, ...], layer: int, got: Tensor, want: Tensor) -> None:
        covered.update(h for h in hooks if h in CHECKED)
        if written in _defined_by(invariant, hooks, layer):
            return  # a written hook point no longer equals what computes it; everything downstream must still hold
        gap = _gap(got, want)
        if not gap <= limit:  # also NaN
            out.append(Failure(invariant, hooks, layer, gap, written))

    def at(l: int, s: str) -> Tensor | None:
        return cache.get(f"blocks.{l}.{s}")

    with torch.no_grad():
        for l in range(L):
            pre, attn, mid, mlp, post = (at(l, s) for s in RESIDUAL)
            if l + 1 < L and post is not None and at(l + 1, "hook_resid_pre") is not None:
                check(
                    "resid_pre[l+1] = resid_post[l]",
                    ("hook_resid_pre", "hook_resid_post"),
                    l,
                    at(l + 1, "hook_resid_pre"),
                    post,
                )
            if parallel(model):
                if None not in (pre, attn, mlp, post):
                    check(
                        "resid_post = resid_pre + attn_out + mlp_out",
                        ("hook_resid_post", "hook_resid_pre", "hook_attn_out", "hook_mlp_out"),
                        l,
                        post,
                        pre + attn + mlp,
                    )
            else:
                if None not in (pre, attn, mid):
                    check(
                        "resid_mid = resid_pre + attn_out",
                        ("hook_resid_mid", "hook_resid_pre", "hook_attn_out"),
                        l,
                        mid,
                        pre + attn,
                    )
                if None not in (mid, mlp, post):
                    check(
                        "resid_post = resid_mid + mlp_out",
                        ("hook_resid_post", "hook_resid_mid", "hook_mlp_out"),
                        l,
                        post,
                        mid + mlp,
                    )
            z = at(l, "attn.hook_z")
            if z is not None and attn is not None and not norm_after_sublayers(model):
                W_O = model.blocks[l].attn.W_O.to(z)
                b_O = getattr(model.blocks[l].attn, "b_O", None)
                heads = einops.einsum(z, W_O, "b p h k, h k d -> b p d") + (0 if b_O is None else b_O.to(z))
                check("attn_out = Σ_h z · W_O + b_O", ("hook_attn_out", "attn.hook_z"), l, attn, heads)
            post_act = at(l, "mlp.hook_post")
            if (
                post_act is not None
                and mlp is not None
                and hasattr(model.blocks[l].mlp, "W_out")
                and not norm_after_sublayers(model)
            ):
                b_out = getattr(model.blocks[l].mlp, "b_out", None)
                neurons = post_act @ model.blocks[l].mlp.W_out.to(post_act) + (0 if b_out is None else b_out.to(mlp))
                check("mlp_out = mlp.hook_post · W_out + b_out", ("hook_mlp_out", "mlp.hook_post"), l, mlp, neurons)
            pattern = at(l, "attn.hook_pattern")  # [batch, head, query, key]
            if pattern is not None:
                P = pattern.shape[-1]
                q, k = torch.arange(P)[:, None], torch.arange(P)[None, :]
                window = windows(model)[l]
                outside = (k > q) | ((q - k >= window) if window else torch.zeros(P, P, dtype=torch.bool))
                sums = pattern.float().sum(-1)
                check("pattern rows sum to 1", ("attn.hook_pattern",), l, sums, torch.ones_like(sums))
                masked = pattern.float().masked_fill(~outside.to(pattern.device), 0.0)
                check(
                    "pattern is 0 outside the causal mask", ("attn.hook_pattern",), l, masked, torch.zeros_like(masked)
                )
        last = at(L - 1, "hook_resid_post")
        if last is not None:
            check(
                "logits = unembed(ln_final(resid_post[L-1]))",
                ("logits", "hook_resid_post"),
                L - 1,
                _readout(model, last),
                logits,
            )
    return out, covered


def _probe(model) -> Tensor:
    return torch.arange(1, PROBE + 1, device=model.cfg.device)[None].remainder(model.cfg.d_vocab)


def read_failures(model) -> tuple[list[Failure], set[str]]:
    """The invariants a plain forward of ``model`` breaks, and the hook kinds they cover (measured once per
    model)."""
    if model not in _READS:
        from tl_patching.backends import tl

        token = _MEASURING.set(True)
        try:
            with torch.no_grad():
                logits, cache = tl.run(model, _probe(model), cache=_names(model))
        finally:
            _MEASURING.reset(token)
        _READS[model] = failures(model, logits, cache)
        _CLEAN[model] = cache
    return _READS[model]


def write_failure(model, name: str) -> Failure | None:
    """What goes wrong when a change is written at hook point ``name`` (a `CHECKED` residual, z or neuron hook):
    an invariant broken in that run, or the change never taking (the hook point holds what it held). Measured once
    per model and name."""
    done = _WRITES.setdefault(model, {})
    if name not in done:
        from tl_patching.backends import tl
        from tl_patching.edits import Edit

        generator = torch.Generator().manual_seed(0)

        def shift(act: Tensor, index) -> Tensor:
            noise = torch.randn(act[index].shape, generator=generator).to(act)
            return act[index] + noise * act[index].float().std().clamp(min=0.1).to(act)

        token = _MEASURING.set(True)
        try:
            with torch.no_grad():
                read_failures(model)
                clean = _CLEAN[model].get(name)
                logits, cache = tl.run(model, _probe(model), [Edit(name, shift)], cache=_names(model))
        finally:
            _MEASURING.reset(token)
        broken, _ = failures(model, logits, cache, written=name)
        # A write that never took: the hook point holds what it held (downstream, the invariants above see the
        # rest). Not "the logits moved": a model may rightly ignore an activation (a head whose W_O is 0).
        if not broken and clean is not None and name in cache and _gap(cache[name], clean) == 0:
            layer = int(re.match(r"blocks\.(\d+)\.", name)[1])
            broken = [Failure("a write takes at its hook point", (suffix(name),), layer, 0.0, name)]
        done[name] = broken[0] if broken else None
    return done[name]


def require(model, reads: list[str], writes: list[str]) -> None:
    """Raise `NotImplementedError` naming the hook and the invariant if a hook point in ``reads`` or ``writes``
    fails one (`read_failures`; a written one also `write_failure`)."""
    if _MEASURING.get():
        return
    names = [n for n in (*reads, *writes) if suffix(n) in CHECKED]
    if not names:
        return
    broken, _ = read_failures(model)
    for name in names:
        for failure in broken:
            if suffix(name) in failure.hooks:
                raise NotImplementedError(failure.message(name, model))
    for name in writes:
        if suffix(name) in CHECKED and re.match(r"blocks\.\d+\.", name):
            failure = write_failure(model, name)
            if failure is not None:
                raise NotImplementedError(failure.message(name, model))


def status(model) -> dict[str, str]:
    """How each kind of hook point of ``model`` is checked: ``hf_table`` (against HF's own modules: tl_patching has
    a table for the architecture, and the invariants hold too), ``invariants`` (the invariants above hold; no
    table), ``unchecked`` (no invariant covers it, no table); a hook kind failing an invariant is ``refused``."""
    from tl_patching.backends import hf_maps, tl

    table = hf_maps.FAMILIES.get(lens.architecture(model))
    broken, covered = read_failures(model)
    refused = {h for f in broken for h in f.hooks}
    out = {}
    for name in tl.readable_hooks(model):
        kind = suffix(name)
        if kind in out:
            continue
        if kind in refused:
            out[kind] = "refused"
        elif table is not None and kind in table.sites:
            out[kind] = "hf_table"
        elif kind in covered:
            out[kind] = "invariants"
        else:
            out[kind] = "unchecked"
    return out
