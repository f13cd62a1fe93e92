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

import copy
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

from tl_patching import lens
from tl_patching.edits import act_name, check_donor, donor_activation
from tl_patching.forward import Forward
from tl_patching.lens import HookedTransformer
from tl_patching.metrics import LogitDiff, Metric
from tl_patching.patching import check_layers

# Where a patch at (layer l, position p) enters: ``resid_pre`` changes block l's keys/values at p, so block l
# is recomputed on positions ≥ p; every other kind leaves block l's attention inputs clean, so block l is
# recomputed at position p only and the later positions enter layer l + 1 clean.
POSITION_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
KINDS = ("z",) + POSITION_KINDS

WHAT = "the fast sweeps"


def check_causal(model: HookedTransformer) -> None:
    """Raise `NotImplementedError` where the fast paths' premise (a patch at p leaves positions < p alone) fails."""
    lens.refuse(
        WHAT,
        {
            f"{model.cfg.attention_dir} attention (a patch changes earlier positions too, so there is no "
            "clean prefix to reuse; use patching.sweep)": model.cfg.attention_dir != "causal"
        },
    )


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


@dataclass(frozen=True)
class HFCleanRun:
    """The recipient's clean run for the HF engine (HF backend, TransformerBridge): its tokens only. The engine
    rebuilds the clean key/value prefix of each swept position with one HF forward over the positions before it (a
    `DynamicCache` with sliding-window layers cannot be cropped back to a shorter prefix); that forward is 1/(variants)
    of a position's work."""

    tokens: Tensor


def _hf_engine(forward: Forward) -> bool:
    return forward.backend == "hf" or lens.is_bridge(forward.model)


def unavailable(forward: Forward) -> str | None:
    """Why the fast paths cannot run on ``forward`` (None: they can). On a bridge they need tl_patching's HF table
    for its architecture and a plain HF twin computing what the bridge computes (`lens.plain_hf`)."""
    if not lens.is_bridge(forward.model) or forward.backend != "tl":
        return None
    from tl_patching.backends import hf_maps

    try:
        hf_maps.hook_map_of(forward.model.original_model)  # the HF model the bridge wraps: its class and config
        lens.plain_hf(forward.model)
    except NotImplementedError as e:
        return str(e)
    return None


def clean_run(forward: Forward, tokens: Int[Tensor, "batch pos"]) -> CleanRun | HFCleanRun:
    """One clean forward through ``model.blocks``, each with a fresh key/value cache entry that it fills (the HF
    engine: `HFCleanRun`)."""
    if _hf_engine(forward):
        return HFCleanRun(tokens)
    model = lens.tl_model(forward, WHAT)
    check_causal(model)
    cfg = model.cfg
    kv_heads = lens.kv_heads(cfg)
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
            residual = block(
                residual, shortformer_pos_embed=shortformer, past_kv_cache_entry=entry, attention_mask=mask
            )
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
    shortformer = (
        None if clean.shortformer_pos_embed is None else _rows(clean.shortformer_pos_embed[:, start:end], n).to(device)
    )
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        return model.blocks[layer](
            x.to(device), shortformer_pos_embed=shortformer, past_kv_cache_entry=entry, attention_mask=mask
        )


def _patched_block(
    model: HookedTransformer, clean: CleanRun, kind: str, layer: int, pos: int, donor: Tensor, heads: Sequence[int]
) -> Float[Tensor, "rows suffix d_model"]:
    """The output of block ``layer`` at positions ``pos`` …, one variant per head (``kind == "z"``: variant i has
    head ``heads[i]``'s z at ``pos`` from the donor) or one variant (the whole ``hook_{kind}`` vector at ``pos``)."""
    B, P = clean.tokens.shape
    name = act_name(kind, layer)
    if name not in model.hook_dict:
        raise NotImplementedError(f"this model has no {name}")
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


def _readout(model: HookedTransformer, tokens: Tensor, metric: Metric):
    """The metric per variant and prompt, ``[n, batch]``, from the final position's residual of n·batch rows: through
    the two unembedding columns of a `LogitDiff`, through the whole unembedding for any other metric."""
    B = len(tokens)
    if isinstance(metric, LogitDiff):
        if len(metric.correct) != B:
            raise ValueError(f"tokens {tuple(tokens.shape)} need one correct and one wrong id per prompt")
        metric.check(model.cfg.d_vocab_out)
        columns = metric.columns.to(model.W_U.device)

        def logit_diff(resid: Tensor) -> Tensor:
            logits = lens.final_logits(model, resid, _rows(columns, len(resid) // B))
            return (logits[:, 0] - logits[:, 1]).reshape(-1, B)

        return logit_diff

    def general(resid: Tensor) -> Tensor:
        logits = lens.final_logits(model, resid).reshape(-1, B, model.cfg.d_vocab_out)
        return torch.stack([metric(l) for l in logits])

    return general


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
    clean: CleanRun | HFCleanRun | None,
    desc: str,
) -> Float[Tensor, "layer pos variant batch"]:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "resid_mid" and getattr(lens.attention_config(forward.model), "parallel_attn_mlp", False):
        raise NotImplementedError("this model has no hook_resid_mid (parallel attention and MLP: no resid_mid)")
    if clean is not None and (
        not isinstance(clean, HFCleanRun if _hf_engine(forward) else CleanRun)
        or not torch.equal(clean.tokens.cpu(), tokens.cpu())
    ):
        raise TypeError("recipient_run must be fast.clean_run(forward, tokens) of these tokens")
    if _hf_engine(forward):
        return _hf_sweep(forward, tokens, donor_cache, kind, metric, layers, positions, heads, max_rows, progress, desc)
    model = lens.tl_model(forward, WHAT)
    check_causal(model)
    readout = _readout(model, tokens, metric)
    layers = check_layers(forward, layers)
    positions = _positions(tokens, positions)
    _check_donor(tokens, donor_cache, kind, layers)
    if clean is None:
        clean = clean_run(forward, tokens)
    P, B, L = tokens.shape[1], len(tokens), model.cfg.n_layers
    V = len(heads) if kind == "z" else 1
    per_pass = max(1, max_rows // (V * B))
    ordered = sorted(set(layers))  # rows are appended layer by layer, ascending
    out: dict[tuple[int, int], Tensor] = {}
    with (
        torch.no_grad(),
        tqdm(
            total=len(ordered) * len(set(p % P for p in positions)), desc=desc, disable=not progress, leave=False
        ) as bar,
    ):
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
    forward: Forward,
    tokens: Int[Tensor, "batch pos"],
    donor_cache: dict[str, Tensor],
    metric: Metric,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    max_rows: int = 256,
    progress: bool = False,
    recipient_run: CleanRun | HFCleanRun | None = None,
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
    max_rows: int = 256,
    progress: bool = False,
    recipient_run: CleanRun | HFCleanRun | None = None,
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
    recipient_run: CleanRun | HFCleanRun | None = None,
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


# --- the HF engine: the same sweeps through HF's own modules and key/value cache ---------------------------------
#
# On the HF backend, and on a TransformerBridge (TransformerLens 4 wraps the HF model and computes attention itself,
# and with transformers 5.24 keeps no key/value cache), the clean prefix is reused through HF's own key/value cache:
# one HF forward over positions < p fills a `DynamicCache`, which is copied for the variants; each variant then runs
# positions p … last through the HF model, its patch written by the HF backend's hooks (`backends.hf`), and its metric
# read from the final position's last hidden state through the output embedding (two columns for a `LogitDiff`) and
# the final soft-cap, as the HF model's own head computes it. Every layer runs for every variant (HF's forward cannot
# start at a layer): less saving than the TransformerLens 3 engine, the same numbers.


def _hf_model(forward: Forward):
    """The plain HF model the HF engine runs: the HF backend's, or a bridge's twin over the same weights."""
    if forward.backend == "hf":
        return forward.hf_model
    return lens.plain_hf(forward.model)


def _hf_readout(hf, tokens: Tensor, metric: Metric):
    """``metric`` per variant and prompt ``[n, batch]`` from the final position's last hidden state of n·batch rows,
    as the HF model's head computes the logits (output embedding, its bias, the final soft-cap)."""
    head = hf.get_output_embeddings()
    cap = getattr(hf.config, "final_logit_softcapping", None)
    B = len(tokens)

    def logits_of(h: Tensor, columns: Tensor | None = None) -> Tensor:
        if columns is None:
            out = head(h)
        else:
            out = torch.einsum("rd,rkd->rk", h, head.weight[columns])
            if head.bias is not None:
                out = out + head.bias[columns]
        return cap * torch.tanh(out / cap) if cap else out

    if isinstance(metric, LogitDiff):
        if len(metric.correct) != B:
            raise ValueError(f"tokens {tuple(tokens.shape)} need one correct and one wrong id per prompt")
        metric.check(hf.config.vocab_size)

        def logit_diff(h: Tensor) -> Tensor:
            columns = metric.columns.to(h.device).repeat(len(h) // B, 1)
            pair = logits_of(h, columns)
            return (pair[:, 0] - pair[:, 1]).reshape(-1, B)

        return logit_diff
    return lambda h: torch.stack([metric(part) for part in logits_of(h).reshape(-1, B, head.weight.shape[0])])


def _tiled(cache, n: int):
    """A copy of a filled `DynamicCache` with every layer's keys and values repeated for n variants (variant-major)."""
    out = copy.deepcopy(cache)
    for layer in out.layers:
        if getattr(layer, "is_initialized", False) and layer.keys is not None and layer.keys.numel():
            layer.keys, layer.values = layer.keys.repeat(n, 1, 1, 1), layer.values.repeat(n, 1, 1, 1)
    return out


def _hf_sweep(
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
    desc: str,
) -> Float[Tensor, "layer pos variant batch"]:
    from transformers import DynamicCache

    from tl_patching.backends import hf as hf_backend
    from tl_patching.edits import patch

    layers = check_layers(forward, layers)
    positions = _positions(tokens, positions)
    _check_donor(tokens, donor_cache, kind, layers)
    if isinstance(metric, LogitDiff) and len(metric.correct) != len(tokens):
        raise ValueError(f"tokens {tuple(tokens.shape)} need one correct and one wrong id per prompt")
    hf = _hf_model(forward)
    hf_backend.hook_map_of(hf)  # the HF hooks need the family's table: refused by name otherwise
    base = hf.base_model
    # transformers ≥ 5.2x names the key/value cache argument ``cache`` (``past_key_values`` deprecated), older ones
    # ``past_key_values`` only
    cache_kw = "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"
    readout = _hf_readout(hf, tokens, metric)
    B, P = tokens.shape
    device = next(hf.parameters()).device
    tokens = tokens.to(device)
    variants = [(l, h) for l in layers for h in (heads if kind == "z" else [None])]
    per_pass = max(1, max_rows // B)
    out: dict[tuple[int, int | None, int], Tensor] = {}
    with (
        torch.no_grad(),
        tqdm(
            total=len(set(p % P for p in positions)) * len(variants), desc=desc, disable=not progress, leave=False
        ) as bar,
    ):
        for pos in sorted(set(p % P for p in positions)):
            prefix = DynamicCache(config=hf.config)
            if pos > 0:
                base(input_ids=tokens[:, :pos], **{cache_kw: prefix}, use_cache=True)
            suffix = tokens[:, pos:]
            for start in range(0, len(variants), per_pass):
                chunk = variants[start : start + per_pass]
                edits = [
                    patch(act_name(kind, l), donor_cache[act_name(kind, l)][:, pos:], head=h, pos=0).on_rows(
                        slice(i * B, (i + 1) * B)
                    )
                    for i, (l, h) in enumerate(chunk)
                ]
                with hf_backend.hooks(hf, edits):
                    hidden = base(
                        input_ids=suffix.repeat(len(chunk), 1),
                        **{cache_kw: _tiled(prefix, len(chunk))},
                        use_cache=True,
                    ).last_hidden_state
                values = readout(hidden[:, -1]).detach().float().cpu()
                for i, variant in enumerate(chunk):
                    out[(*variant, pos)] = values[i]
                bar.update(len(chunk))
    V = len(heads) if kind == "z" else 1
    return torch.stack(
        [
            torch.stack(
                [torch.stack([out[l, h, p % P] for h in (heads if kind == "z" else [None])]) for p in positions]
            )
            for l in layers
        ]
    ).reshape(len(layers), len(positions), V, B)
