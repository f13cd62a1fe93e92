"""Fast exact patching: the numbers of `tl_patching.patching.sweep`, with less work, on both backends.

Causality does the saving (`tl_patching.engine`). A patch at position p (one head's z, or a residual-stream
vector) changes no position before p, at any layer, and no layer below the patched one. A patched variant therefore
needs only positions p … last, from the patched layer on, attending to the *clean* keys and values of positions < p;
and its metric only the final position, through two unembedding columns for a logit difference. The layers are the
model's own, run by the engine of the backend (TransformerLens 3's blocks, or the HF model's decoder layers — also
under a TransformerBridge), so no block is re-implemented here.

- `clean_run`: the recipient's clean run as the engine keeps it (each layer's input, keys and values).
- `position_sweep` / `position_head_sweep`: exact sweeps over layer × position (× head), as TransformerLens's
  ``get_act_patch_resid_pre`` / ``get_act_patch_attn_head_out_by_pos`` compute them, but per prompt (batch last).
- `final_position_head_sweep`: the case p = last (one head at the final token).

One pass carries every variant at one position p, of all swept layers: at layer j the rows are the variants
patched at layers ≤ j. ``max_rows`` bounds a pass's hidden-state rows, one per position computed (variants ×
prompts × positions p … last), so a pass's memory does not grow with the layer count or with how early p is; more
rows are split into passes, which costs no extra work (each pass starts at its own lowest layer), and one layer's
variants always share a pass. Tested equal to the sweep driver in ``tests/test_fast.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from tl_patching import engine as engines
from tl_patching import lens
from tl_patching.edits import Edit, act_name, check_donor, donor_activation
from tl_patching.engine import Engine, Run
from tl_patching.forward import Forward
from tl_patching.metrics import Metric
from tl_patching.patching import check_layers

# Where a patch at (layer l, position p) enters: ``resid_pre`` changes block l's keys/values at p, so block l
# is recomputed on positions ≥ p; every other kind leaves block l's attention inputs clean, so block l is
# recomputed at position p only and the later positions enter layer l + 1 clean.
POSITION_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
KINDS = ("z",) + POSITION_KINDS


def unavailable(forward: Forward) -> str | None:
    """Why the fast paths cannot run on ``forward`` (None: they can): an architecture without tl_patching's HF table
    (on the HF backend or a bridge), a bridge whose weights make no plain HF twin, bidirectional attention."""
    try:
        engines.engine_of(forward)
    except NotImplementedError as e:
        return str(e)
    return None


def clean_run(forward: Forward, tokens: Int[Tensor, "batch pos"]) -> Run:
    """The recipient's clean run as the fast paths start from it (pass it as ``recipient_run`` to reuse it)."""
    return engines.engine_of(forward).clean_run(tokens, verify_from=0)


def _z_variants(name: str, donor: Tensor, heads: Sequence[int], batch: int) -> Edit:
    """One edit at ``name`` (positions relative to the call, position 0 the patched one) for ``len(heads)`` variants
    stacked variant-major: variant i takes head ``heads[i]``'s z from ``donor`` ``[batch, 1, head, d_head]``."""
    V = len(heads)
    variants = torch.arange(V)

    def rewrite(act: Tensor, index: tuple) -> Tensor:  # act[index]: [V·batch, head, d_head] at position 0
        out = act[index].clone()
        per_variant = out.view(V, batch, *out.shape[1:])
        per_variant[variants, :, list(heads)] = donor[:, 0, list(heads)].to(out).transpose(0, 1)
        return out

    return Edit(name, rewrite, pos=0)


def _patched(
    engine: Engine, run: Run, kind: str, layer: int, pos: int, donor: Tensor, heads: Sequence[int]
) -> Float[Tensor, "rows suffix d_model"]:
    """Layer ``layer``'s output at positions ``pos`` …, one variant per head (``kind == "z"``: variant i has head
    ``heads[i]``'s z at ``pos`` from the donor) or one variant (the whole ``hook_{kind}`` vector at ``pos``)."""
    B, P = run.tokens.shape
    name = act_name(kind, layer)
    V = len(heads) if kind == "z" else 1
    length = P - pos if kind == "resid_pre" else 1  # resid_pre changes the layer's keys at pos: recompute the rest
    source = donor[:, pos : pos + length].expand(B, length, *donor.shape[2:])
    edit = _z_variants(name, source, heads, B) if kind == "z" else Edit(name, lambda act, i: source[:, 0], pos=0)
    x = run.resid[layer][:, pos : pos + length].repeat(V, 1, 1)
    out, _ = engine.layer(run, layer, x, pos, [edit])
    if length < P - pos:  # later positions of this layer are untouched: the clean input of the next layer
        out = torch.cat([out, run.resid[layer + 1][:, pos + 1 :].to(out).repeat(V, 1, 1)], dim=1)
    return out


def _check_donor(tokens: Tensor, donor_cache, kind: str, layers: Sequence[int]) -> None:
    for l in layers:
        name = act_name(kind, l)
        d = donor_activation(name, donor_cache)
        check_donor(name, d, (len(tokens), tokens.shape[1], *d.shape[2:]))


def _positions(tokens: Tensor, positions: Sequence[int] | None) -> list[int]:
    P = tokens.shape[1]
    positions = list(range(P)) if positions is None else list(positions)
    bad = [p for p in positions if not -P <= p < P]
    if bad:
        raise IndexError(f"position {bad[0]} out of range for {P} tokens")
    return positions


def _sweep(
    forward: Forward,
    tokens: Tensor,
    donor_cache,
    kind: str,
    metric: Metric,
    layers,
    positions,
    heads,
    max_rows: int,
    progress: bool,
    clean: Run | None,
    desc: str,
) -> Float[Tensor, "layer pos variant batch"]:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "resid_mid" and getattr(lens.attention_config(forward.model), "parallel_attn_mlp", False):
        raise NotImplementedError("this model has no hook_resid_mid (parallel attention and MLP: no resid_mid)")
    layers = check_layers(forward, layers)
    positions = _positions(tokens, positions)
    _check_donor(tokens, donor_cache, kind, layers)
    engine = engines.engine_of(forward)
    readout = engines.readout(engine, metric, len(tokens))
    if clean is not None and (
        not isinstance(clean, Run) or clean.engine != engine.name or not torch.equal(clean.tokens.cpu(), tokens.cpu())
    ):
        raise TypeError("recipient_run must be fast.clean_run(forward, tokens) of these tokens")
    P, B, L = tokens.shape[1], len(tokens), engine.n_layers
    if clean is None:
        clean = engine.clean_run(tokens, verify_from=min(p % P for p in positions))
    V = len(heads) if kind == "z" else 1
    S = {pos: P - pos for pos in (p % P for p in positions)}  # positions each row computes, per patched position
    ordered = sorted(set(layers))  # rows are appended layer by layer, ascending
    out: dict[tuple[int, int], Tensor] = {}
    with (
        torch.no_grad(),
        tqdm(
            total=len(ordered) * len(set(p % P for p in positions)), desc=desc, disable=not progress, leave=False
        ) as bar,
    ):
        for pos in sorted(set(p % P for p in positions)):
            per_pass = max(1, max_rows // (V * B * S[pos]))
            for i in range(0, len(ordered), per_pass):
                swept = ordered[i : i + per_pass]
                x = None  # [rows, P − pos, d_model]: positions pos … of every variant patched so far
                for j in range(swept[0], L):
                    if x is not None:
                        x = engine.layer(clean, j, x, pos)[0]
                    if j in swept:
                        new = _patched(engine, clean, kind, j, pos, donor_cache[act_name(kind, j)], heads)
                        x = new if x is None else torch.cat([x.to(new.device), new])
                        bar.update()
                values = readout(x[:, -1]).detach().float().cpu()
                for k, l in enumerate(swept):
                    out[l, pos] = values[k * V : (k + 1) * V]
    return torch.stack([torch.stack([out[l, p % P] for p in positions]) for l in layers])


def position_head_sweep(
    forward: Forward,
    tokens: Int[Tensor, "batch pos"],
    donor_cache: dict[str, Tensor],
    metric: Metric,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    max_rows: int = 2048,
    progress: bool = False,
    recipient_run: Run | None = None,
) -> Float[Tensor, "layer pos head batch"]:
    """Exact patching of each head's ``hook_z`` at each position, alone, from the donor: TransformerLens's
    ``get_act_patch_attn_head_out_by_pos`` per prompt, ``[layer, pos, head, batch]`` (CPU, float32).

    ``metric`` of the final position's logits (a `LogitDiff` goes through two unembedding columns). ``donor_cache``
    needs ``hook_z`` of the swept layers; ``recipient_run``: `clean_run` of ``tokens``, reused if given.
    """
    n_heads = forward.cfg.n_heads
    heads = list(range(n_heads)) if heads is None else list(heads)
    if not heads or not all(0 <= h < n_heads for h in heads):
        raise IndexError(f"heads {heads} out of range: the model has {n_heads} heads")
    return _sweep(
        forward,
        tokens,
        donor_cache,
        "z",
        metric,
        layers,
        positions,
        heads,
        max_rows,
        progress,
        recipient_run,
        "head × position sweep",
    )


def position_sweep(
    forward: Forward,
    tokens: Int[Tensor, "batch pos"],
    donor_cache: dict[str, Tensor],
    metric: Metric,
    kind: str,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    max_rows: int = 2048,
    progress: bool = False,
    recipient_run: Run | None = None,
) -> Float[Tensor, "layer pos batch"]:
    """Exact patching of the whole ``hook_{kind}`` vector (``kind`` in `POSITION_KINDS`) at one layer and one
    position, from the donor: TransformerLens's ``get_act_patch_{kind}`` per prompt, ``[layer, pos, batch]``."""
    if not callable(metric):  # the order of every sweep: (forward, tokens, donor_cache, metric, …)
        raise TypeError(
            f"position_sweep(forward, tokens, donor_cache, metric, kind, …): metric {metric!r} is not callable"
        )
    if kind not in POSITION_KINDS:
        raise ValueError(f"kind must be one of {POSITION_KINDS} (heads: position_head_sweep), got {kind!r}")
    out = _sweep(
        forward,
        tokens,
        donor_cache,
        kind,
        metric,
        layers,
        positions,
        [None],
        max_rows,
        progress,
        recipient_run,
        f"{kind} × position sweep",
    )
    return out[:, :, 0]


def final_position_head_sweep(
    forward: Forward,
    tokens: Int[Tensor, "batch pos"],
    donor_cache: dict[str, Tensor],
    metric: Metric,
    layers: Sequence[int] | None = None,
    progress: bool = True,
    recipient_run: Run | None = None,
    max_rows: int = 8192,
) -> Float[Tensor, "layer head batch"]:
    """Exact patching of each head's z at the final position: ``patching.head_sweep(..., pos=-1)``, recomputing only
    the final position from the patched layer on, ``[layer, head, batch]`` (CPU, float32).

    ``donor_cache`` needs ``hook_z`` of the swept layers; ``recipient_run`` (optional, reused if given) is
    `clean_run` of ``tokens``.
    """
    heads = list(range(forward.cfg.n_heads))
    out = _sweep(
        forward,
        tokens,
        donor_cache,
        "z",
        metric,
        layers,
        [-1],
        heads,
        max_rows,
        progress,
        recipient_run,
        "final-position head sweep",
    )
    return out[:, 0]
