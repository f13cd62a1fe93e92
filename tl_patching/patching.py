"""Activation patching: one sweep driver, and the sweeps built on it.

Activation patching asks *where* a model computes something: run a recipient prompt, overwrite one
activation with its value from a donor prompt that differs in one fact (which name is repeated),
and measure how far the output moves toward the donor's. A component whose patch moves it a lot
carries the information; localisation is the point, so patches are small (one head, one position).

`sweep` is the one driver under every sweep (TransformerLens's ``generic_activation_patch``, with our
`Edit` as the patch setter): it takes a list of *variants*, each a list of edits, runs them through a
`Forward` on either backend, several variants per forward stacked on the batch axis, and returns the
metric of the final position's logits per variant and prompt ``[variant, batch]`` (the one metric convention,
`tl_patching.metrics.Metric`, e.g. ``LogitDiff(correct, wrong)``). A kind of sweep is a function that lists variants:

    variants = [[patch(act_name("z", l), donor, head=h, pos=-1)] for l in range(L) for h in range(H)]
    effect = sweep(forward, tokens, variants, LogitDiff(correct, wrong)).reshape(L, H, -1)

The fast paths in `tl_patching.fast` compute the same numbers with less work and are tested equal to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from tl_patching.edits import Edit, act_name, patch
from tl_patching.forward import Forward
from tl_patching.metrics import Metric


def sweep(
    forward: Forward,
    tokens: Int[Tensor, "batch pos"],
    variants: Sequence[Sequence[Edit]],
    metric: Metric,
    max_rows: int = 64,
    progress: bool = False,
    desc: str = "sweep",
) -> Float[Tensor, "variant batch"]:
    """``metric`` of the final position's logits of the recipient ``tokens`` under each variant's edits, per prompt,
    on the CPU in float32.

    Variants are stacked on the batch axis, at most ``max_rows`` rows (variants × prompts) per forward;
    each edit sees only its own variant's rows. An empty variant is the clean run.
    """
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise ValueError(f"tokens must be [batch, pos] with at least one prompt, got {tuple(tokens.shape)}")
    if len(variants) == 0:
        raise ValueError("no variants to sweep")
    B = tokens.shape[0]
    per_forward = max(1, max_rows // B)
    out = torch.empty(len(variants), B)
    with tqdm(total=len(variants), desc=desc, disable=not progress, leave=False) as bar:
        for start in range(0, len(variants), per_forward):
            chunk = variants[start : start + per_forward]
            rows = einops.repeat(tokens, "b p -> (v b) p", v=len(chunk))
            edits = [e.on_rows(slice(i * B, (i + 1) * B)) for i, variant in enumerate(chunk) for e in variant]
            logits, _ = forward.run(rows, edits)
            for i in range(len(chunk)):
                out[start + i] = metric(logits[i * B : (i + 1) * B, -1]).detach().float().cpu()
            bar.update(len(chunk))
    return out


# --- kinds of sweep: each a function that lists variants ---


def head_variants(
    donor: dict[str, Tensor], layers: Sequence[int], heads: Sequence[int], pos: int | None = -1, kind: str = "z"
) -> list[list[Edit]]:
    """One variant per (layer, head), layer-major: that head's ``hook_{kind}`` taken from the donor at ``pos``
    (None: every position)."""
    return [[patch(act_name(kind, l), donor, head=h, pos=pos)] for l in layers for h in heads]


def layer_variants(
    donor: dict[str, Tensor], layers: Sequence[int], kind: str, pos: int | None = None
) -> list[list[Edit]]:
    """One variant per layer: the whole ``hook_{kind}`` of that layer (all heads, for ``z``) from the donor."""
    return [[patch(act_name(kind, l), donor, pos=pos)] for l in layers]


def check_layers(forward: Forward, layers: Sequence[int] | None) -> list[int]:
    """``layers`` (default: all) as a list, each checked against the model."""
    n = forward.cfg.n_layers
    layers = list(range(n)) if layers is None else list(layers)
    bad = [l for l in layers if not 0 <= l < n]
    if bad:
        raise IndexError(f"layer {bad[0]} out of range: the model has {n} layers (0..{n - 1})")
    return layers


def head_sweep(
    forward: Forward,
    tokens: Int[Tensor, "batch pos"],
    donor: dict[str, Tensor],
    metric: Metric,
    pos: int | None = -1,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    max_rows: int = 64,
    progress: bool = False,
) -> Float[Tensor, "layer head batch"]:
    """The reference head sweep: every (layer, head) patched alone from the donor at ``pos``, on either backend."""
    layers = check_layers(forward, layers)
    heads = list(range(forward.cfg.n_heads)) if heads is None else list(heads)
    variants = head_variants(donor, layers, heads, pos)
    out = sweep(forward, tokens, variants, metric, max_rows=max_rows, progress=progress, desc="head sweep")
    return einops.rearrange(out, "(l h) b -> l h b", l=len(layers))


def head_pos_sweep(
    forward: Forward,
    tokens: Int[Tensor, "batch pos"],
    donor: dict[str, Tensor],
    metric: Metric,
    max_rows: int = 256,
    progress: bool = False,
) -> Float[Tensor, "layer pos head batch"]:
    """The reference head × position sweep: each head's ``hook_z`` at each position patched alone from the donor,
    the change in ``metric`` (patched − clean) ``[layer, pos, head, batch]``; one variant per (layer, pos, head)."""
    L, H, P = forward.cfg.n_layers, forward.cfg.n_heads, tokens.shape[1]
    variants = [[]] + [
        [patch(act_name("z", l), donor, head=h, pos=p)] for l in range(L) for p in range(P) for h in range(H)
    ]
    out = sweep(forward, tokens, variants, metric, max_rows=max_rows, progress=progress, desc="head × position sweep")
    return (out[1:] - out[0]).reshape(L, P, H, -1)
