"""Fast exact patching: the numbers of `tl_patching.patching.sweep`, with less work (TL backend only).

Causality does the saving. A patch at position p (one head's z, or a residual-stream vector) changes no
position before p, at any layer, and no layer below the patched one. A patched variant therefore needs only
positions p … last, from the patched layer on, attending to the *clean* keys and values of positions < p —
exactly the situation TransformerLens's text generation is built for. So nothing here re-implements a block:
each step calls the model's own ``model.blocks[j]`` with a frozen `TransformerLensKeyValueCacheEntry` holding
the clean prefix's keys and values (as TL's attention caches them: after QK-norm, before RoPE, which the
attention applies on use, at the cache offset), repeated over the variants. Whatever the family's block does —
RoPE at the right position index, partial or NeoX-layout rotary, QK-norm, grouped-query sharing, RMSNorm,
gated or parallel MLP, post-attention/post-MLP norms, attention soft-capping, sliding windows, local/global
rope bases, the score scale — is done by TransformerLens's code, as in ``model(tokens)``.

- `clean_run`: one clean forward through the blocks, keeping each block's input and its cached keys/values.
- `position_sweep` / `position_head_sweep`: exact sweeps over layer × position (× head), as TransformerLens's
  ``get_act_patch_resid_pre`` / ``get_act_patch_attn_head_out_by_pos`` compute them, but per prompt (batch last).
- `final_position_head_sweep`: the case p = last (one head at the final token), through two unembedding columns.

One pass carries every variant at one position p, of all swept layers: at layer j the rows are the variants
patched at layers ≤ j (variants × prompts, at most ``max_rows``; more are split into passes, which costs no
extra work). The metric reads the final position only, through ``ln_final``, the unembedding and the final
soft-cap as ``HookedTransformer.forward`` applies them. Tested equal to the sweep driver in ``tests/test_fast.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
from transformer_lens.utilities.activation_functions import apply_softcap

from tl_patching.edits import act_name
from tl_patching.forward import Forward
from tl_patching.patching import check_layers

# Where a patch at (layer l, position p) enters: ``resid_pre`` changes block l's keys/values at p, so block l
# is recomputed on positions ≥ p; every other kind leaves block l's attention inputs clean, so block l is
# recomputed at position p only and the later positions enter layer l + 1 clean.
POSITION_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
KINDS = ("z",) + POSITION_KINDS

# Final-position metric: [batch, 1, d_vocab] logits (the final position only) -> [batch]. A metric of the sweep
# driver that reads ``logits[:, -1]`` works unchanged.
FinalMetric = Callable[[Float[Tensor, "batch 1 d_vocab"]], Float[Tensor, " batch"]]


def check_pair(model: HookedTransformer, tokens: Tensor, correct: Tensor, wrong: Tensor) -> None:
    """Raise unless there is one correct and one wrong answer id per prompt, inside the vocabulary."""
    if tokens.ndim != 2 or len(correct) != len(tokens) or len(wrong) != len(tokens):
        raise ValueError(f"tokens {tuple(tokens.shape)} need one correct and one wrong id per prompt")
    if int(max(correct.max(), wrong.max())) >= model.cfg.d_vocab_out:
        raise IndexError("answer token id out of the vocabulary")


def tl_model(forward: Forward) -> HookedTransformer:
    """The `HookedTransformer` behind ``forward``; refused on the HF backend (the fast paths run TL's own blocks)."""
    if forward.backend != "tl":
        raise NotImplementedError("the fast paths run TransformerLens's own blocks: use the tl backend, or "
                                  "patching.head_sweep (the reference driver) on the hf backend")
    return forward.model


def check_causal(model: HookedTransformer) -> None:
    """Raise `NotImplementedError` where the fast paths' premise (a patch at p leaves positions < p alone) fails."""
    if model.cfg.attention_dir != "causal":
        raise NotImplementedError(f"{model.cfg.attention_dir} attention: a patch changes earlier positions too, "
                                  "so there is no clean prefix to reuse; use patching.sweep")


@dataclass(frozen=True)
class CleanRun:
    """The recipient's clean forward as TransformerLens's blocks computed it.

    ``resid[l]``: the input of block l (``resid[n_layers]``: the output of the last block), ``[batch, pos, d_model]``;
    ``keys[l]``/``values[l]``: what block l's attention put in its key/value cache, ``[batch, pos, kv_head, d_head]``
    (after QK-norm, before RoPE); the padding mask and shortformer positional embedding the blocks were given.
    """

    tokens: Tensor
    resid: list[Tensor]
    keys: list[Tensor]
    values: list[Tensor]
    attention_mask: Tensor | None
    shortformer_pos_embed: Tensor | None


def clean_run(forward: Forward, tokens: Int[Tensor, "batch pos"]) -> CleanRun:
    """One clean forward through ``model.blocks``, each with a fresh key/value cache entry that it fills."""
    model = tl_model(forward)
    check_causal(model)
    cfg = model.cfg
    kv_heads = cfg.n_heads if cfg.n_key_value_heads is None or cfg.ungroup_grouped_query_attention else cfg.n_key_value_heads
    resid, keys, values = [], [], []
    with torch.no_grad():
        # Exactly how HookedTransformer.forward starts: embeddings, padding mask (None unless the tokenizer pads
        # on the left), shortformer positional embedding.
        residual, tokens, shortformer, mask = model.input_to_embed(tokens)
        for block in model.blocks:
            residual = residual.to(_device(block))  # blocks split over devices (n_devices > 1), as TL's forward does
            empty = torch.empty(len(tokens), 0, kv_heads, cfg.d_head, dtype=cfg.dtype, device=residual.device)
            entry = TransformerLensKeyValueCacheEntry(empty, empty.clone())
            resid.append(residual)
            residual = block(residual, shortformer_pos_embed=shortformer, past_kv_cache_entry=entry, attention_mask=mask)
            keys.append(entry.past_keys)
            values.append(entry.past_values)
        resid.append(residual)
    return CleanRun(tokens, resid, keys, values, mask, shortformer)


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _rows(t: Tensor, n: int) -> Tensor:
    """``t`` [batch, ...] repeated for n variants, variant-major: row v·batch + b."""
    return t.repeat(n, *[1] * (t.ndim - 1))


def _block(model: HookedTransformer, clean: CleanRun, layer: int, x: Tensor, start: int, fwd_hooks=()) -> Tensor:
    """``model.blocks[layer]`` on rows ``x`` [n·batch, S, d_model] holding positions start … start+S−1, against
    the clean keys/values of positions < start (a frozen cache entry: the block appends nothing to it)."""
    n = x.shape[0] // len(clean.tokens)
    end = start + x.shape[1]
    entry = TransformerLensKeyValueCacheEntry(
        _rows(clean.keys[layer][:, :start], n), _rows(clean.values[layer][:, :start], n), frozen=True
    )
    device = _device(model.blocks[layer])
    mask = None if clean.attention_mask is None else _rows(clean.attention_mask[:, :end], n).to(device)
    shortformer = None if clean.shortformer_pos_embed is None else _rows(clean.shortformer_pos_embed[:, start:end], n).to(device)
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        return model.blocks[layer](x.to(device), shortformer_pos_embed=shortformer, past_kv_cache_entry=entry, attention_mask=mask)


def _patched_block(
    model: HookedTransformer, clean: CleanRun, kind: str, layer: int, pos: int, donor: Tensor, heads: Sequence[int]
) -> Float[Tensor, "rows suffix d_model"]:
    """The output of block ``layer`` at positions ``pos`` …, one variant per head (``kind == "z"``: variant i has
    head ``heads[i]``'s z at ``pos`` from the donor) or one variant (the whole ``hook_{kind}`` vector at ``pos``)."""
    B, P = clean.tokens.shape
    name = act_name(kind, layer)
    if name not in model.hook_dict:
        raise NotImplementedError(f"this model has no {name}" + (" (parallel attention and MLP: no resid_mid)"
                                                                 if model.cfg.parallel_attn_mlp else ""))
    V = len(heads) if kind == "z" else 1
    length = P - pos if kind == "resid_pre" else 1
    variants = torch.arange(V)
    source = donor[:, pos].expand(B, *donor.shape[2:]).to(clean.resid[layer])
    ran = []

    def setter(act: Tensor, hook) -> Tensor:
        ran.append(True)
        act = act.clone(memory_format=torch.contiguous_format)  # contiguous, so the per-variant view writes into it
        per_variant = act.view(V, B, *act.shape[1:])
        if kind == "z":  # [V, B, pos, head, d_head]: variant i, head heads[i], relative position 0
            per_variant[:, :, 0][variants, :, list(heads)] = source[:, list(heads)].transpose(0, 1)
        else:
            per_variant[:, :, 0] = source
        return act

    x = _rows(clean.resid[layer][:, pos : pos + length], V)
    out = _block(model, clean, layer, x, pos, [(name, setter)])
    if not ran:
        raise NotImplementedError(f"this model never computes {name} (an attention-only model has no MLP)")
    if length < P - pos:  # later positions of this layer are untouched: clean input of the next layer
        out = torch.cat([out, _rows(clean.resid[layer + 1][:, pos + 1 :], V)], dim=1)
    return out


def _final_logits(model: HookedTransformer, resid: Float[Tensor, "rows d_model"], ids: Tensor | None = None) -> Tensor:
    """Final-position logits from the residual after the last block, as ``HookedTransformer.forward`` computes them
    (``ln_final``, unembedding, final soft-cap); only the vocabulary columns ``ids`` [rows, k] when given."""
    x = resid[:, None].to(model.W_U.device)
    if model.cfg.normalization_type is not None:
        x = model.ln_final(x)
    x = x[:, 0]
    if ids is None:
        logits = model.unembed(x[:, None])[:, 0]
    else:
        logits = einops.einsum(x, model.W_U.T[ids], "r d, r k d -> r k") + model.b_U[ids]
    return apply_softcap(logits, model.cfg.output_logits_soft_cap)


def _readout(model: HookedTransformer, tokens: Tensor, correct, wrong, metric: FinalMetric | None):
    """The metric per variant and prompt, ``[n, batch]``, from the final position's residual of n·batch rows."""
    B = len(tokens)
    if (metric is None) == (correct is None or wrong is None):
        raise ValueError("pass either correct and wrong answer ids (logit difference) or a metric, not both")
    if metric is None:
        correct, wrong = torch.as_tensor(correct), torch.as_tensor(wrong)
        check_pair(model, tokens, correct, wrong)
        pair = torch.stack([correct, wrong], -1).to(model.W_U.device)

        def logit_diff(resid: Tensor) -> Tensor:
            logits = _final_logits(model, resid, _rows(pair, len(resid) // B))
            return (logits[:, 0] - logits[:, 1]).reshape(-1, B)

        return logit_diff

    def general(resid: Tensor) -> Tensor:
        logits = _final_logits(model, resid).reshape(-1, B, 1, model.cfg.d_vocab_out)
        return torch.stack([metric(l) for l in logits])

    return general


def _check_donor(model: HookedTransformer, tokens: Tensor, donor_cache, kind: str, layers: Sequence[int]) -> None:
    for l in layers:
        name = act_name(kind, l)
        if name not in donor_cache:
            raise KeyError(f"the donor cache holds no {name!r}; cache it (cache=[{name!r}]) first")
        d = donor_cache[name]
        if d.shape[1] != tokens.shape[1] or d.shape[0] not in (1, len(tokens)):
            raise ValueError(f"donor {name} {tuple(d.shape)} does not match the recipient's tokens {tuple(tokens.shape)}: "
                             "same token length needed, and the same batch or a batch of 1")


def _positions(tokens: Tensor, positions: Sequence[int] | None) -> list[int]:
    P = tokens.shape[1]
    positions = list(range(P)) if positions is None else list(positions)
    bad = [p for p in positions if not -P <= p < P]
    if bad:
        raise IndexError(f"position {bad[0]} out of range for {P} tokens")
    return positions


def _sweep(
    forward: Forward, tokens: Tensor, donor_cache, kind: str, readout, layers, positions, heads,
    max_rows: int, progress: bool, clean: CleanRun | None, desc: str,
) -> Float[Tensor, "layer pos variant batch"]:
    model = tl_model(forward)
    check_causal(model)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    layers = check_layers(forward, layers)
    positions = _positions(tokens, positions)
    _check_donor(model, tokens, donor_cache, kind, layers)
    if clean is None:
        clean = clean_run(forward, tokens)
    elif not isinstance(clean, CleanRun) or not torch.equal(clean.tokens, tokens.to(clean.tokens.device)):
        raise TypeError("clean_cache must be fast.clean_run(forward, tokens) of these tokens")
    P, B, L = tokens.shape[1], len(tokens), model.cfg.n_layers
    V = len(heads) if kind == "z" else 1
    per_pass = max(1, max_rows // (V * B))
    ordered = sorted(set(layers))  # rows are appended layer by layer, ascending
    out: dict[tuple[int, int], Tensor] = {}
    with torch.no_grad(), tqdm(total=len(ordered) * len(set(p % P for p in positions)), desc=desc, disable=not progress, leave=False) as bar:
        for pos in sorted(set(p % P for p in positions)):
            for i in range(0, len(ordered), per_pass):
                swept = ordered[i : i + per_pass]
                x = None  # [rows, P − pos, d_model]: positions pos … of every variant patched so far
                for j in range(swept[0], L):
                    if x is not None:
                        x = _block(model, clean, j, x, pos)
                    if j in swept:
                        new = _patched_block(model, clean, kind, j, pos, donor_cache[act_name(kind, j)], heads)
                        x = new if x is None else torch.cat([x.to(new.device), new])
                        bar.update()
                values = readout(x[:, -1]).detach().float().cpu()
                for k, l in enumerate(swept):
                    out[l, pos] = values[k * V : (k + 1) * V]
    return torch.stack([torch.stack([out[l, p % P] for p in positions]) for l in layers])


def position_head_sweep(
    forward: Forward, tokens: Int[Tensor, "batch pos"], donor_cache: dict[str, Tensor],
    correct: Int[Tensor, " batch"] | None = None, wrong: Int[Tensor, " batch"] | None = None,
    metric: FinalMetric | None = None, layers: Sequence[int] | None = None, positions: Sequence[int] | None = None,
    heads: Sequence[int] | None = None, max_rows: int = 256, progress: bool = False, clean_cache: CleanRun | None = None,
) -> Float[Tensor, "layer pos head batch"]:
    """Exact patching of each head's ``hook_z`` at each position, alone, from the donor: TransformerLens's
    ``get_act_patch_attn_head_out_by_pos`` per prompt, ``[layer, pos, head, batch]``.

    The metric: the logit difference ``correct`` − ``wrong`` at the final position, or ``metric`` of the final
    position's logits. ``donor_cache`` needs ``hook_z`` of the swept layers; ``clean_cache``: `clean_run` of ``tokens``.
    """
    model = tl_model(forward)
    heads = list(range(model.cfg.n_heads)) if heads is None else list(heads)
    if not heads or not all(0 <= h < model.cfg.n_heads for h in heads):
        raise IndexError(f"heads {heads} out of range: the model has {model.cfg.n_heads} heads")
    readout = _readout(model, tokens, correct, wrong, metric)
    return _sweep(forward, tokens, donor_cache, "z", readout, layers, positions, heads, max_rows, progress,
                  clean_cache, "head × position sweep")


def position_sweep(
    forward: Forward, tokens: Int[Tensor, "batch pos"], donor_cache: dict[str, Tensor], kind: str,
    correct: Int[Tensor, " batch"] | None = None, wrong: Int[Tensor, " batch"] | None = None,
    metric: FinalMetric | None = None, layers: Sequence[int] | None = None, positions: Sequence[int] | None = None,
    max_rows: int = 256, progress: bool = False, clean_cache: CleanRun | None = None,
) -> Float[Tensor, "layer pos batch"]:
    """Exact patching of the whole ``hook_{kind}`` vector (``kind`` in `POSITION_KINDS`) at one layer and one
    position, from the donor: TransformerLens's ``get_act_patch_{kind}`` per prompt, ``[layer, pos, batch]``."""
    if kind not in POSITION_KINDS:
        raise ValueError(f"kind must be one of {POSITION_KINDS} (heads: position_head_sweep), got {kind!r}")
    readout = _readout(tl_model(forward), tokens, correct, wrong, metric)
    out = _sweep(forward, tokens, donor_cache, kind, readout, layers, positions, [None], max_rows, progress,
                 clean_cache, f"{kind} × position sweep")
    return out[:, :, 0]


def final_position_head_sweep(
    forward: Forward, tokens: Int[Tensor, "batch pos"], donor_cache: dict[str, Tensor],
    correct: Int[Tensor, " batch"], wrong: Int[Tensor, " batch"],
    layers: Sequence[int] | None = None, progress: bool = True, clean_cache: CleanRun | None = None,
    max_rows: int = 8192,
) -> Float[Tensor, "layer head batch"]:
    """Exact patching of each head's z at the final position: ``patching.head_sweep(..., pos=-1)`` with a logit
    difference, recomputing only the final position from the patched layer on.

    ``donor_cache`` needs ``hook_z`` of the swept layers; ``clean_cache`` (optional, reused if given) is
    `clean_run` of ``tokens``.
    """
    model = tl_model(forward)
    check_pair(model, tokens, correct, wrong)
    heads = list(range(model.cfg.n_heads))
    readout = _readout(model, tokens, correct, wrong, None)
    out = _sweep(forward, tokens, donor_cache, "z", readout, layers, [-1], heads, max_rows, progress,
                 clean_cache, "final-position head sweep")
    return out[:, 0]
