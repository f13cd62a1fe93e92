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
passes per sender (tests/test_path_patching.py); `path_patch` computes the same numbers with much less work, many
sender variants at once on the batch axis, on the layer engine of the backend (`tl_patching.engine`: TransformerLens
3's blocks, or the HF model's decoder layers — the HF backend, and a TransformerBridge through its plain HF twin):

- in the frozen run no attention pattern is needed: a layer's heads' outputs are given (`Engine.layer_with_z`: the
  clean z, the senders' from the donor), only the norms and (``"recompute"``) the MLPs run again, and only from the
  sender's layer on (below it the clean run is the answer);
- with logits as receivers nothing mixes positions, so only the final position is computed, and only the two
  unembedding columns of a `LogitDiff`;
- for q/k/v receivers the frozen run records the receivers' ``hook_q``/``hook_k``/``hook_v`` (the projections of
  its residual stream, equal to TL's ``use_split_qkv_input`` inputs, which the reference uses), and the clean run
  restarts at the first receiver layer with those inputs written there.

An architecture the engines do not cover (a bridge without tl_patching's HF table) runs the definition itself
through hook points, full forwards in passes of `HOOK_ROWS` rows.

TransformerLens hooks used: ``blocks.{l}.attn.hook_z``, ``hook_resid_pre``, ``hook_mlp_out``, ``hook_q/k/v``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

from tl_patching import engine as engines
from tl_patching import lens
from tl_patching.edits import act_name, check_donor, replace
from tl_patching.engine import Engine, Run
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
    engine = None if unavailable(forward) else engines.engine_of(forward)
    if engine is not None and engine.name == "tl":
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
    out = torch.empty(len(groups), B)
    with torch.no_grad():
        first = _first_difference(clean=recipient_run, donor=donor, n_layers=L)
        run = None if engine is None else engine.clean_run(tokens, verify_from=-1 if recv is None else first)
        # On the engine a row computes positions first … last: ``max_rows`` counts one row per position, so a pass's
        # memory does not depend on the prompt length (SmolLM2, 20 prompts: 4096 rows × 5 positions peaked at 4× one
        # run_with_cache). Through hook points every layer's frozen z of every row is held at once: fewer rows per
        # pass (SmolLM2 at 4096 rows took 20 GB).
        S = 1 if recv is None else tokens.shape[1] - first  # logits receivers: the final position only
        per_pass = max(1, max_rows // (B * S) if engine is not None else min(max_rows, HOOK_ROWS) // B)
        for start in range(0, len(order), per_pass):
            idx = order[start : start + per_pass]
            chunk = [groups[i] for i in idx]
            if engine is None:
                out[idx] = _by_hooks(forward, tokens, chunk, recv, recipient_run, donor, metric, mlps)
            elif recv is None:
                out[idx] = _to_logits(engine, run, chunk, recipient_run, donor, metric, mlps)
            else:
                out[idx] = _to_heads(engine, run, chunk, recv, recipient_run, donor, metric, mlps, first)
    return out


def _first_difference(clean: dict, donor: dict, n_layers: int) -> int:
    """The first position where any head's donor z differs from the recipient's (the last if none): before it the
    frozen run is the clean run at every layer (its z are the clean ones and nothing else mixes positions), so the
    receivers' inputs there are clean too — the clean prefix the engine reuses."""
    differs = torch.zeros(clean[act_name("z", 0)].shape[1], dtype=torch.bool)
    for l in range(n_layers):
        name = act_name("z", l)
        z_donor = donor[name].to(clean[name].device).expand_as(clean[name])
        differs |= (z_donor != clean[name]).flatten(2).any(-1).any(0).cpu()
    return int(differs.nonzero()[0]) if differs.any() else len(differs) - 1


def unavailable(forward: Forward) -> str | None:
    """Why path patching cannot run on a layer engine (None: it can): it then runs through hook points."""
    from tl_patching import fast

    return fast.unavailable(forward)


def _frozen_run(
    engine: Engine,
    run: Run,
    groups: list[list[Head]],
    clean: dict,
    donor: dict,
    mlps: str,
    start: int,
    stop: int,
    record: dict[int, list[str]] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The frozen run of each variant (its senders' z from the donor, every other head's z clean; MLP outputs clean
    too with ``mlps="frozen"``) at positions ``start`` …, up to layer ``stop``: resid_pre of layer ``stop`` of every
    variant ``[variant·batch, pos, d_model]``, and the hook points ``record[j]`` read at layers j < ``stop`` (layer
    j run then as it is, from the frozen run's residual stream). Rows join the computation at their lowest sender
    layer (``groups`` are sorted by it); below it their stream is the clean one."""
    H, B = engine.n_heads, len(run.tokens)
    record = record or {}
    first = [min(l for l, _ in g) for g in groups]
    senders = torch.zeros(len(groups), engine.n_layers, H, dtype=torch.bool)
    for v, g in enumerate(groups):
        for l, h in g:
            senders[v, l, h] = True
    x: Tensor | None = None  # [active variants · batch, pos, d_model]
    recorded: dict[str, Tensor] = {}

    def all_rows(layer: int) -> Tensor:
        """resid_pre of ``layer`` for every variant: the active rows, then the clean stream for the rest."""
        n_active = 0 if x is None else len(x) // B
        clean_x = run.resid[layer][:, start:]
        rest = clean_x.repeat(len(groups) - n_active, 1, 1)
        return rest if x is None else torch.cat([x, rest.to(x)])

    for j in range(min([*first, *record]), stop):
        if j in record:
            _, recorded_j = engine.layer(run, j, all_rows(j), start, record=record[j])
            recorded |= recorded_j
        n_active = sum(f <= j for f in first)
        if n_active == 0:
            continue  # no variant has a sender at or below layer j: every row's stream is still the clean one
        x = all_rows(j)[: n_active * B]
        z_clean, z_donor = clean[act_name("z", j)][:, start:], donor[act_name("z", j)][:, start:].to(x)
        mask = senders[:n_active, j].repeat_interleave(B, dim=0)[:, None, :, None].to(x.device)  # [V·B, 1, H, 1]
        z = torch.where(mask, z_donor.expand_as(z_clean).repeat(n_active, 1, 1, 1), z_clean.repeat(n_active, 1, 1, 1))
        mlp_out = None
        if mlps == "frozen" and act_name("mlp_out", j) in clean:
            mlp_out = clean[act_name("mlp_out", j)][:, start:].repeat(n_active, 1, 1)
        x = engine.layer_with_z(run, j, x, start, z, mlp_out)
    return all_rows(stop), recorded


def _to_logits(engine: Engine, run: Run, groups, clean, donor, metric, mlps) -> Tensor:
    P = run.tokens.shape[1]
    x, _ = _frozen_run(engine, run, groups, clean, donor, mlps, start=P - 1, stop=engine.n_layers)
    return engines.readout(engine, metric, len(run.tokens))(x[:, -1]).float().cpu()


def _to_heads(engine: Engine, run: Run, groups, receivers, clean, donor, metric, mlps, first: int) -> Tensor:
    """Positions from ``first`` on (`_first_difference`): before it both runs are the clean run."""
    layers = sorted({l for l, _, _ in receivers})
    names = {l: sorted({act_name(kind, l) for rl, _, kind in receivers if rl == l}) for l in layers}
    _, recorded = _frozen_run(engine, run, groups, clean, donor, mlps, start=first, stop=layers[-1] + 1, record=names)
    x = run.resid[layers[0]][:, first:].repeat(len(groups), 1, 1)
    for j in range(layers[0], engine.n_layers):
        edits = [
            replace(act_name(kind, l), recorded[act_name(kind, l)][:, :, [h]], head=[h])
            for l, h, kind in receivers
            if l == j
        ]
        x, _ = engine.layer(run, j, x, first, edits)
    return engines.readout(engine, metric, len(run.tokens))(x[:, -1]).float().cpu()


# --- the same definition through hook points only: an architecture the layer engines do not cover ---------------
#
# Path patching is the definition itself, run with edits at hook points and many sender variants stacked on the
# batch axis: the frozen run (every head's hook_z clean, the variant's senders' from the donor, MLP outputs clean too
# with mlps="frozen") read at the final position for logits receivers; for q/k/v receivers, the receivers'
# hook_q/k/v recorded in the frozen run and written into a clean run.


def _frozen_edits(forward: Forward, groups: list[list[Head]], clean: dict, donor: dict, mlps: str, B: int) -> list:
    """One edit per layer: rows of variant v get every head's clean z but for v's senders, taken from the donor."""
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
