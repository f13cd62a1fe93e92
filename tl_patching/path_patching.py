"""Exact path patching: the effect of sender heads reaching only chosen receivers, every other path frozen.

Activation patching a head measures everything its output changes downstream. Path patching (Wang et al.
2022, "Interpretability in the Wild"; ARENA's IOI exercises) asks a narrower question: how much of the
effect travels along one *path*, sender head → receiver, with every other route held at its clean value.

Definition used here (the common one, Wang et al. / ARENA):

1. Run the recipient (clean) and the donor; cache every head's output ``hook_z``.
2. *Frozen run*: the recipient with the senders' ``hook_z`` taken from the donor (every position) and every
   other head's ``hook_z`` frozen at its clean value. MLPs are **recomputed** (``mlps="recompute"``, the
   paper's choice: a path through an MLP counts as direct) or frozen at their clean ``hook_mlp_out``
   (``mlps="frozen"``: only the sender's own write into the residual stream moves; the path is then
   linear up to the next normalisation, which is still recomputed exactly). Record the receivers' inputs.
3. *Receivers*: ``"logits"`` — the final residual stream of the frozen run goes through ``ln_final`` and the
   unembedding (one pass suffices); or heads' query / key / value inputs — a clean run in which only those
   inputs are replaced by the frozen run's, everything downstream recomputed.

The metric is any metric of the final position's logits (`tl_patching.metrics.Metric`); a `LogitDiff` goes through
two columns of the unembedding, like `tl_patching.fast`. The reference is that recipe with hand-written TL hooks, two
passes per sender (tests/test_path_patching.py); `path_patch` computes the same numbers with much less work, many sender
variants at once on the batch axis:

- in the frozen run no attention is recomputed: a layer's output is the clean one plus the senders'
  ``(z_donor − z_clean) · W_O``; only the normalisations and (``"recompute"``) the MLPs run again, and
  only from the sender's layer on (below it the clean cache is the answer);
- with logits as receivers nothing mixes positions, so only the final position is computed;
- for q/k/v receivers the clean run restarts at the first receiver layer (``start_at_layer``), through
  TransformerLens's own blocks, with the receivers' ``hook_q``/``hook_k``/``hook_v`` set to the projection
  of the frozen run's residual (equal to TL's ``use_split_qkv_input`` inputs, which the reference uses).

TransformerLens hooks used: ``blocks.{l}.attn.hook_z``, ``hook_resid_pre``, ``hook_mlp_out``, ``hook_q/k/v``.
No HF counterpart: this runs TL's blocks (the HF backend is refused).
"""

from __future__ import annotations

from collections.abc import Sequence

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

from tl_patching import lens
from tl_patching.edits import act_name, check_donor
from tl_patching.forward import Forward
from tl_patching.lens import HookedTransformer
from tl_patching.metrics import LogitDiff, Metric

Head = tuple[int, int]  # (layer, head)
Sender = Head | Sequence[Head]  # one head, or a group patched together (one variant)
Receiver = tuple[int, int, str]  # (layer, head, "q" | "k" | "v"); for k/v on a grouped-query model: the key/value head
MLP_MODES = ("recompute", "frozen")


WHAT = "path patching"
HOOK_ROWS = 256  # rows per pass when path patching runs through hook points (HF backend, TransformerBridge)


def check_family(model: HookedTransformer) -> None:
    """Raise `NotImplementedError` naming each feature of ``model`` that path patching does not compute exactly."""
    cfg = model.cfg
    lens.refuse(
        WHAT,
        {
            "shortformer position embeddings": cfg.positional_embedding_type == "shortformer",
            "4-bit weights": cfg.load_in_4bit,
            f"post-norm blocks ({cfg.original_architecture})": cfg.original_architecture in POST_NORM_ARCHITECTURES,
            "an encoder or bidirectional attention": cfg.attention_dir != "causal",
        },
    )


def all_heads(model: HookedTransformer, below: int | None = None) -> list[Head]:
    """Every (layer, head), layer-major; only layers < ``below`` if given (senders that can reach layer ``below``)."""
    L = model.cfg.n_layers if below is None else below
    return [(l, h) for l in range(L) for h in range(model.cfg.n_heads)]


def _as_groups(model: HookedTransformer, senders: Sequence[Sender] | None) -> list[list[Head]]:
    senders = all_heads(model) if senders is None else senders
    groups = [[tuple(s)] if isinstance(s[0], int) else [tuple(h) for h in s] for s in senders]
    L, H = model.cfg.n_layers, model.cfg.n_heads
    for group in groups:
        if not group:
            raise ValueError("an empty sender group")
        for l, h in group:
            if not (0 <= l < L and 0 <= h < H):
                raise IndexError(f"sender head ({l}, {h}) out of range: the model has {L} layers × {H} heads")
    return groups


def _check_receivers(model: HookedTransformer, receivers) -> list[Receiver] | None:
    if isinstance(receivers, str):
        if receivers != "logits":
            raise ValueError(f"receivers must be 'logits' or a list of (layer, head, 'q'|'k'|'v'), got {receivers!r}")
        return None
    out = []
    cfg = model.cfg
    for l, h, kind in receivers:
        if kind not in ("q", "k", "v"):
            raise ValueError(f"receiver input must be 'q', 'k' or 'v', got {kind!r}")
        n = cfg.n_heads if kind == "q" else lens.kv_heads(cfg)
        if not (0 <= l < cfg.n_layers and 0 <= h < n):
            what = "key/value heads" if n != cfg.n_heads else "heads"
            raise IndexError(f"receiver ({l}, {h}, {kind!r}) out of range: {cfg.n_layers} layers × {n} {what}")
        out.append((l, h, kind))
    if not out:
        raise ValueError("no receivers")
    return out


def clean_names(model: HookedTransformer) -> list[str]:
    """The recipient activations path patching reads (pass them as ``recipient_run`` to reuse a run)."""
    return [
        act_name(k, l)
        for l in range(model.cfg.n_layers)
        for k in ("resid_pre", "z", "mlp_out")
        if not (k == "mlp_out" and model.cfg.attn_only)
    ]


def _readout(model: HookedTransformer, metric: Metric, resid: Float[Tensor, "variant batch d_model"]) -> Tensor:
    """``metric`` of the logits from the final position's residual stream (before ``ln_final``) of every variant,
    ``[variant, batch]``: through two unembedding columns for a `LogitDiff`, the whole unembedding otherwise."""
    V, B = resid.shape[:2]
    rows = resid.reshape(V * B, -1)
    if isinstance(metric, LogitDiff):
        logits = lens.final_logits(model, rows, metric.columns.to(model.W_U.device).repeat(V, 1))
        return (logits[:, 0] - logits[:, 1]).reshape(V, B)
    logits = lens.final_logits(model, rows).reshape(V, B, -1)
    return torch.stack([metric(l) for l in logits])


def _attn_out(model: HookedTransformer, layer: int, raw: Tensor) -> Tensor:
    """The block's attention output from the pre-norm sum of head outputs (post-attention norm where the family has
    one)."""
    block = model.blocks[layer]
    return block.ln1_post(raw) if model.cfg.use_normalization_before_and_after else raw


def _rest_of_block(model: HookedTransformer, layer: int, x: Tensor, attn_out: Tensor, mlp_out: Tensor | None) -> Tensor:
    """resid_post from resid_pre ``x`` and the attention output; the MLP recomputed unless ``mlp_out`` is given."""
    block, cfg = model.blocks[layer], model.cfg
    if cfg.attn_only:
        return x + attn_out
    if cfg.parallel_attn_mlp:
        mlp = block.apply_mlp(block.ln2(x)) if mlp_out is None else mlp_out
        return x + attn_out + mlp
    mid = x + attn_out
    mlp = block.apply_mlp(block.ln2(mid)) if mlp_out is None else mlp_out
    return mid + mlp


def _project(model: HookedTransformer, layer: int, x: Tensor, kind: str, head: int) -> Tensor:
    """``hook_{kind}`` of one head computed from residual ``x`` [rows, pos, d_model] (what TL computes from
    ``ln1(x)``)."""
    attn = model.blocks[layer].attn
    normed = model.blocks[layer].ln1(x)
    if kind == "q":
        W, b = attn.W_Q, attn.b_Q
    elif lens.kv_heads(model.cfg) != model.cfg.n_heads:
        W, b = (attn._W_K, attn._b_K) if kind == "k" else (attn._W_V, attn._b_V)
    else:
        W, b = (attn.W_K, attn.b_K) if kind == "k" else (attn.W_V, attn.b_V)
    return normed @ W[head] + b[head]


def path_patch(
    forward: Forward,
    tokens: Int[Tensor, "batch pos"],
    donor: Int[Tensor, "batch pos"] | dict[str, Tensor],
    metric: Metric,
    senders: Sequence[Sender] | None = None,
    receivers: str | Sequence[Receiver] = "logits",
    mlps: str = "recompute",
    recipient_run: dict[str, Tensor] | None = None,
    max_rows: int = 4096,
) -> Float[Tensor, "variant batch"]:
    """``metric`` of the final position's logits (nats for a `LogitDiff`) per sender variant and prompt when only the
    path senders → receivers is patched, ``[variant, batch]`` (CPU, float32).

    ``senders``: a list of variants, each a head ``(layer, head)`` or a group of heads patched together
    (default: every head alone, layer-major). ``receivers``: ``"logits"`` or ``[(layer, head, "q"|"k"|"v"), …]``,
    all patched together in each variant (on a grouped-query model a k/v receiver is a key/value head).
    ``donor``: donor token ids, or a donor cache with ``hook_z`` of every layer. ``mlps``: "recompute" (default,
    Wang et al.) or "frozen" — see the module docstring. ``recipient_run``: the recipient's `clean_names`
    activations, reused if given. Subtract the clean metric for the effect.
    """
    model = forward.model
    hooks_only = forward.backend == "hf" or lens.is_bridge(model)
    if not hooks_only:
        check_family(model)
    if mlps not in MLP_MODES:
        raise ValueError(f"mlps must be one of {MLP_MODES}, got {mlps!r}")
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, pos], got {tuple(tokens.shape)}")
    if isinstance(metric, LogitDiff):
        if len(metric.correct) != len(tokens):
            raise ValueError(f"tokens {tuple(tokens.shape)} need one correct and one wrong id per prompt")
        metric.check(forward.cfg.d_vocab)
    groups = _as_groups(model, senders)
    recv = _check_receivers(model, receivers)
    L, B = model.cfg.n_layers, len(tokens)
    z_names = [act_name("z", l) for l in range(L)]
    if isinstance(donor, Tensor):
        check_donor("donor tokens", donor, tuple(tokens.shape))
        _, donor = forward.run(donor, cache=z_names)
    if recipient_run is None or any(n not in recipient_run for n in clean_names(model)):
        _, recipient_run = forward.run(tokens, cache=clean_names(model))
    check_donor(z_names[0], donor[z_names[0]], tuple(recipient_run[z_names[0]].shape))
    # Variants sorted by their lowest sender layer: rows join the computation at that layer.
    order = sorted(range(len(groups)), key=lambda i: min(l for l, _ in groups[i]))
    # Through hook points every layer's frozen z of every row is held at once: fewer rows per pass (SmolLM2 at 4096
    # rows took 20 GB).
    per_pass = max(1, (min(max_rows, HOOK_ROWS) if hooks_only else max_rows) // B)
    out = torch.empty(len(groups), B)
    with torch.no_grad():
        for start in range(0, len(order), per_pass):
            idx = order[start : start + per_pass]
            chunk = [groups[i] for i in idx]
            if hooks_only:
                out[idx] = _by_hooks(forward, tokens, chunk, recv, recipient_run, donor, metric, mlps)
            elif recv is None:
                out[idx] = _to_logits(model, chunk, recipient_run, donor, metric, mlps)
            else:
                out[idx] = _to_heads(model, tokens, chunk, recv, recipient_run, donor, metric, mlps)
    return out


def _frozen_run(
    model: HookedTransformer,
    groups: list[list[Head]],
    clean: dict,
    donor: dict,
    mlps: str,
    pos: slice,
    record: Sequence[int],
) -> dict[int, Tensor]:
    """The frozen run of each variant (its senders' z from the donor, every other head's z clean) at positions
    ``pos``: resid_pre of each layer in ``record`` (``n_layers``: the final residual stream), [variant, batch,
    pos, d_model]. Rows join the computation at their lowest sender layer (``groups`` are sorted by it)."""
    H, L = model.cfg.n_heads, model.cfg.n_layers
    first = [min(l for l, _ in g) for g in groups]
    mask = torch.zeros(len(groups), L, H)
    for v, g in enumerate(groups):
        for l, h in g:
            mask[v, l, h] = 1.0
    x: Tensor | None = None  # [active variants, batch, pos, d_model]

    def all_rows(layer: int) -> Tensor:
        """resid_pre of ``layer`` for every variant: the active rows, then the clean stream for the rest."""
        n_active = 0 if x is None else len(x)
        if n_active == len(groups):
            return x
        clean_x = clean[act_name("resid_pre", layer)][:, pos]
        rest = clean_x.expand(len(groups) - n_active, *clean_x.shape)
        return rest if x is None else torch.cat([x, rest])

    recorded = {}
    for j in range(L):
        if j in record:
            recorded[j] = all_rows(j)
        if j >= max(record) or j < min(first):
            continue
        n_active = sum(f <= j for f in first)
        x = all_rows(j)[:n_active]
        block = model.blocks[j]
        z_clean, z_donor = clean[act_name("z", j)][:, pos], donor[act_name("z", j)][:, pos].to(x)
        w = einops.rearrange(block.attn.W_O, "head d_head d_model -> d_model (head d_head)")
        raw = F.linear(z_clean.reshape(*z_clean.shape[:2], -1), w, block.attn.b_O)  # the clean sum, as TL computes it
        delta = einops.einsum(z_donor - z_clean, block.attn.W_O, "b p head d, head d m -> head b p m")
        raw = raw + einops.einsum(mask[:n_active, j].to(x), delta, "v head, head b p m -> v b p m")
        mlp_out = clean[act_name("mlp_out", j)][:, pos] if mlps == "frozen" and not model.cfg.attn_only else None
        x = _rest_of_block(model, j, x, _attn_out(model, j, raw), mlp_out)
    if L in record:
        recorded[L] = x
    return recorded


def _to_logits(model, groups, clean, donor, metric, mlps) -> Tensor:
    L = model.cfg.n_layers
    x = _frozen_run(model, groups, clean, donor, mlps, pos=slice(-1, None), record=[L])[L]
    return _readout(model, metric, x[:, :, 0]).float().cpu()


def _to_heads(model, tokens, groups, receivers, clean, donor, metric, mlps) -> Tensor:
    layers = sorted({l for l, _, _ in receivers})
    recorded = _frozen_run(model, groups, clean, donor, mlps, pos=slice(None), record=layers)
    V, B, P = len(groups), *tokens.shape
    new = {(l, h, kind): _project(model, l, recorded[l].reshape(V * B, P, -1), kind, h) for l, h, kind in receivers}

    def setter(l: int, kind: str):
        def hook(act: Tensor, hook) -> Tensor:
            act = act.clone()
            for (rl, rh, rk), value in new.items():
                if rl == l and rk == kind:
                    act[:, :, rh] = value
            return act

        return hook

    names = sorted({(l, kind) for l, _, kind in receivers})
    start = layers[0]
    x = clean[act_name("resid_pre", start)].repeat(V, 1, 1)
    with model.hooks(fwd_hooks=[(act_name(kind, l), setter(l, kind)) for l, kind in names]):
        resid = model(x, start_at_layer=start, stop_at_layer=model.cfg.n_layers)
    return _readout(model, metric, resid[:, -1].reshape(V, B, -1)).float().cpu()


# --- the same definition through hook points only: TransformerBridge and the HF backend ---------------------------
#
# Where TransformerLens's own blocks are not at hand (a TransformerBridge computes with the HF modules; the HF backend
# has only module boundaries), path patching is the definition itself, run with edits at hook points and many sender
# variants stacked on the batch axis: the frozen run (every head's hook_z clean, the variant's senders' from the
# donor, MLP outputs clean too with mlps="frozen") read at the final position for logits receivers; for q/k/v
# receivers, the receivers' hook_q/k/v recorded in the frozen run and written into a clean run.


def _frozen_edits(forward: Forward, groups: list[list[Head]], clean: dict, donor: dict, mlps: str, B: int) -> list:
    """One edit per layer: rows of variant v get every head's clean z but for v's senders, taken from the donor."""
    from tl_patching.edits import replace

    L, H = forward.cfg.n_layers, forward.cfg.n_heads
    V = len(groups)
    senders = torch.zeros(V, L, H, dtype=torch.bool)
    for v, group in enumerate(groups):
        for l, h in group:
            senders[v, l, h] = True
    edits = []
    for l in range(L):
        name = act_name("z", l)
        z_clean, z_donor = clean[name], donor[name].to(clean[name].device).expand_as(clean[name])
        mask = senders[:, l].repeat_interleave(B, dim=0)[:, None, :, None].to(z_clean.device)  # [V·B, 1, H, 1]
        edits.append(replace(name, torch.where(mask, z_donor.repeat(V, 1, 1, 1), z_clean.repeat(V, 1, 1, 1))))
        if mlps == "frozen" and act_name("mlp_out", l) in clean:
            edits.append(replace(act_name("mlp_out", l), clean[act_name("mlp_out", l)].repeat(V, 1, 1)))
    return edits


def _by_hooks(forward: Forward, tokens: Tensor, groups, receivers, clean: dict, donor: dict, metric, mlps) -> Tensor:
    from tl_patching.edits import replace

    V, B = len(groups), len(tokens)
    rows = tokens.repeat(V, 1)
    frozen = _frozen_edits(forward, groups, clean, donor, mlps, B)
    if receivers is None:
        logits, _ = forward.run(rows, frozen)
    else:
        inputs = sorted({act_name(kind, l) for l, _, kind in receivers})
        _, recorded = forward.run(rows, frozen, cache=inputs)
        edits = [
            replace(act_name(kind, l), recorded[act_name(kind, l)][:, :, [h]], head=[h]) for l, h, kind in receivers
        ]
        logits, _ = forward.run(rows, edits)
    final = logits[:, -1]
    return torch.stack([metric(final[v * B : (v + 1) * B]) for v in range(V)]).float().cpu()
