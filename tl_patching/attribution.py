"""Attribution patching: a first-order estimate of every patch's effect at once; AtP* and its report.

∂metric/∂act · (donor − recipient), from one recipient forward and backward (and one donor forward),
for every head and position. It approximates the exact effects of `tl_patching.patching.sweep`
(`tl_patching.patching.head_pos_sweep`); `atp_star` adds Kramár et al.'s (2024) two fixes, `atp_report` measures how
well each estimate ranks the exact effects (Spearman, top-k recall).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import einops
import numpy as np
import torch
from jaxtyping import Int
from scipy import stats
from torch import Tensor
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES
from transformer_lens.utilities.attention import simple_attn_linear

from tl_patching import lens
from tl_patching.edits import act_name
from tl_patching.forward import Forward
from tl_patching.lens import HookedTransformer
from tl_patching.metrics import LogitDiff, Metric

WHAT = "attribution patching"


def _check_metric(model: HookedTransformer, tokens: Tensor, metric: Metric) -> None:
    if isinstance(metric, LogitDiff):
        if tokens.ndim != 2 or len(metric.correct) != len(tokens):
            raise ValueError(f"tokens {tuple(tokens.shape)} need one correct and one wrong id per prompt")
        metric.check(model.cfg.d_vocab_out)


def attribution_patch(
    forward: Forward,
    tokens: Int[Tensor, "batch pos"],
    donor: Int[Tensor, "batch pos"] | dict[str, Tensor],
    metric: Metric,
) -> dict[str, Tensor]:
    """First-order estimate of every patch's effect on ``metric`` (of the final position's logits, e.g. a
    `LogitDiff`): ∂metric/∂act · (donor − recipient).

    ``donor``: donor token ids (run here), or a donor cache with ``hook_z`` and ``hook_resid_post`` of every layer.
    Returns ``{"z": [layer, pos, head, batch], "resid_post": [layer, pos, batch]}`` (CPU, float32) in the metric's
    units (nats for a logit difference), those of the exact patch effects, from one recipient forward and backward
    (and one donor forward).
    """
    model = lens.tl_model(forward, WHAT)
    _check_metric(model, tokens, metric)
    L = model.cfg.n_layers
    names = [act_name(kind, l) for l in range(L) for kind in ("z", "resid_post")]
    if isinstance(donor, Tensor):
        if donor.shape != tokens.shape:
            raise ValueError(f"donor {tuple(donor.shape)} and recipient {tuple(tokens.shape)} need the same shape")
        _, donor = forward.run(donor, cache=names)
    acts: dict[str, Tensor] = {}

    def start_grad(embed: Tensor, hook) -> Tensor:
        return embed.detach().requires_grad_(True)

    def keep(act: Tensor, hook, name: str) -> Tensor:  # by the name asked for (a bridge's hook.name may be an alias)
        act.retain_grad()
        acts[name] = act
        return act  # returned, so the tensor kept is the one the rest of the forward uses (a bridge hooks a view)

    # Gradients flow from the embedding on, with the weights frozen: the backward computes activation
    # gradients only (no weight gradients), about one forward's cost instead of two.
    with (
        lens.frozen_weights(model),
        torch.enable_grad(),
        model.hooks(fwd_hooks=[("hook_embed", start_grad)] + [(n, functools.partial(keep, name=n)) for n in names]),
    ):
        logits = model(tokens)
        metric(logits[:, -1]).sum().backward()  # per-prompt gradients: prompts don't interact
    effect = {n: ((donor[n].to(acts[n].device) - acts[n].detach()) * acts[n].grad) for n in names}
    z = torch.stack([einops.reduce(effect[act_name("z", l)], "b p head d -> p head b", "sum") for l in range(L)])
    resid = torch.stack([einops.reduce(effect[act_name("resid_post", l)], "b p d -> p b", "sum") for l in range(L)])
    return {"z": z.detach().float().cpu(), "resid_post": resid.detach().float().cpu()}


# --- AtP* (Kramár et al. 2024): the QK fix and GradDrop, checked against exact patching ---
#
# AtP linearises every path from a node to the metric. Two ways that fails (the paper's false negatives):
#
# - *attention saturation*: a node whose effect goes through a later head's attention pattern changes that
#   head's attention scores, and a saturated softmax has almost no gradient. The QK fix computes the
#   change in the pattern exactly: for every later head, the node's write into the residual stream at
#   its position p changes that head's query at p and key at p (exactly through ``ln1``, the projection,
#   rotary and the score scaling, TL's own modules); the softmax of every affected row (row p, and
#   column p of every later row t) is recomputed exactly, and only the step from pattern to metric stays
#   linear (⟨∂metric/∂pattern, Δpattern⟩). It replaces AtP's linear term for that one-hop path;
#   longer paths through patterns stay linear.
# - *cancellation*: a node's direct and indirect effects can cancel in the gradient. GradDrop runs one
#   extra backward per layer ℓ with the gradient through layer ℓ's residual-stream writes (``hook_attn_out``,
#   ``hook_mlp_out``) set to zero, and averages the magnitudes: (1/(L−1)) Σ_{ℓ ≠ layer(n)} |ĉ_{∼ℓ}(n)|.
#   It estimates |effect| (unsigned), so it is compared on magnitudes.


class _GradGate(torch.autograd.Function):
    """Identity forward; backward passes the gradient unless ``state["drop"]`` is this gate's layer."""

    @staticmethod
    def forward(ctx, x, layer, state):
        ctx.layer, ctx.state = layer, state
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (torch.zeros_like(grad) if ctx.state["drop"] == ctx.layer else grad), None, None


def check_qk_family(model: HookedTransformer) -> None:
    """Raise `NotImplementedError` naming each attention feature the closed-form QK fix (`_qk_terms`, TransformerLens
    3's attention modules) does not recompute; the engine's QK fix (`_qk_fix_on_engine`) runs those models instead."""
    if lens.is_bridge(model):
        raise NotImplementedError("the closed-form QK fix needs HookedTransformer's attention modules")
    cfg = model.cfg
    lens.refuse(
        "the AtP* QK fix (use attribution_patch, AtP)",
        {
            "QK-norm": cfg.use_qk_norm
            or cfg.original_architecture in ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM"),
            "Q/K clipping": cfg.clip_qkv is not None,
            "log-n attention scaling": cfg.use_logn_attn,
            "local (sliding-window) attention": cfg.use_local_attn,
            "attention sinks": cfg.use_attention_sinks,
            f"{cfg.positional_embedding_type} position bias": cfg.positional_embedding_type
            in ("alibi", "relative_positional_bias"),
            "shortformer position embeddings": cfg.positional_embedding_type == "shortformer",
            "split q/k/v inputs": cfg.use_split_qkv_input or cfg.use_attn_in,
            f"post-norm blocks ({cfg.original_architecture})": cfg.original_architecture in POST_NORM_ARCHITECTURES,
        },
    )


def _closed_form_applies(model: HookedTransformer) -> bool:
    try:
        check_qk_family(model)
    except NotImplementedError:
        return False
    return True


@dataclass
class AtPStar:
    """Estimates of every head × position z patch's effect on the logit difference, ``[layer, pos, head, batch]`` nats.

    ``scores``: ``"atp"`` (signed), ``"atp_qk"`` (AtP with the QK fix, signed), ``"atp_gd"`` (AtP with GradDrop,
    magnitude) and ``"atp_star"`` (both, magnitude). ``seconds``: wall time of the parts (``forward_backward``: the
    recipient forward and backward; ``qk_fix``; ``grad_drop``: the extra backwards; ``donor``: the donor forward,
    0 when a donor cache was given).
    """

    scores: dict[str, Tensor]
    seconds: dict[str, float] = field(default_factory=dict)


def atp_star(
    forward: Forward,
    tokens: Int[Tensor, "batch pos"],
    donor: Int[Tensor, "batch pos"] | dict[str, Tensor],
    metric: Metric,
    qk_fix: bool = True,
    grad_drop: bool = True,
) -> AtPStar:
    """AtP, AtP + QK fix, AtP + GradDrop and AtP* for every head's ``hook_z`` at every position (see above).

    ``donor``: donor token ids, or a cache with ``hook_z`` of every layer. One recipient forward with gradients,
    one backward (AtP), L more backwards on the same graph (GradDrop), and the QK fix's exact softmaxes.
    """
    model = lens.tl_model(forward, "AtP*")
    _check_metric(model, tokens, metric)
    # The QK fix: in closed form on TransformerLens 3's attention where it applies, else on the layer engine (every
    # family tl_patching's engines run, a TransformerBridge included), which refuses what it cannot do by name.
    closed_form = qk_fix and _closed_form_applies(model)
    engine = None
    if qk_fix and not closed_form:
        from tl_patching import engine as engines

        engine = engines.engine_of(forward)
        if not engine.head_writes_are_linear():
            raise NotImplementedError(
                f"the AtP* QK fix on {lens.architecture(model)}: a norm after the attention makes a head's write into "
                "the residual stream non-linear in its z, so AtP's linear term for the path is not δ·∇; use "
                "qk_fix=False (GradDrop) or attribution_patch"
            )
    cfg = model.cfg
    L = cfg.n_layers
    if grad_drop and L < 2:
        raise ValueError("GradDrop needs at least 2 layers")
    seconds = {"donor": 0.0}
    z_names = [act_name("z", l) for l in range(L)]
    if isinstance(donor, Tensor):
        if donor.shape != tokens.shape:
            raise ValueError(f"donor {tuple(donor.shape)} and recipient {tuple(tokens.shape)} need the same shape")
        t0 = time.perf_counter()
        _, donor = forward.run(donor, cache=z_names)
        seconds["donor"] = time.perf_counter() - t0
    rotary = cfg.positional_embedding_type == "rotary"
    q_kind, k_kind = ("rot_q", "rot_k") if rotary else ("q", "k")
    live: dict[str, Tensor] = {}  # tensors in the graph (z, pattern)
    saved: dict[str, Tensor] = {}  # detached clean values the QK fix reads
    state = {"drop": None}

    def start_grad(embed, hook):
        return embed.detach().requires_grad_(True)

    # Hooks know the name they were registered under (a bridge's hook.name may be an alias of it).
    def keep(act, hook, name):
        live[name] = act
        return act

    def save(act, hook, name):
        saved[name] = act.detach()

    def gate(act, hook, layer):
        return _GradGate.apply(act, layer, state)

    def on(name: str, fn, **bound):
        return name, functools.partial(fn, **bound) if bound else functools.partial(fn, name=name)

    fwd_hooks = [("hook_embed", start_grad)] + [on(n, keep) for n in z_names]
    if qk_fix:
        fwd_hooks += [on(act_name("pattern", l), keep) for l in range(L)]
    if closed_form:
        fwd_hooks += [on(act_name(k, l), save) for l in range(L) for k in ("resid_pre", q_kind, k_kind, "attn_scores")]
    if grad_drop:
        fwd_hooks += [on(act_name("attn_out", l), gate, layer=l) for l in range(L)]
        fwd_hooks += [] if cfg.attn_only else [on(act_name("mlp_out", l), gate, layer=l) for l in range(L)]
    grads: dict = {}
    t0 = time.perf_counter()
    with lens.frozen_weights(model), torch.enable_grad(), model.hooks(fwd_hooks=fwd_hooks):
        total = metric(model(tokens)[:, -1]).sum()  # per-prompt gradients: prompts don't interact
        inputs = [live[n] for n in z_names] + ([live[act_name("pattern", l)] for l in range(L)] if qk_fix else [])
        for drop in [None] + (list(range(L)) if grad_drop else []):
            state["drop"] = drop
            grads[drop] = torch.autograd.grad(total, inputs, retain_graph=True, allow_unused=True)
            if drop is None:
                seconds["forward_backward"] = time.perf_counter() - t0
                t1 = time.perf_counter()
    seconds["grad_drop"] = time.perf_counter() - t1 if grad_drop else 0.0
    dz = [(donor[n].to(live[n].device) - live[n].detach()) for n in z_names]

    def linear(g) -> Tensor:  # [L, P, H, B]
        return torch.stack(
            [
                einops.einsum(dz[l], g[l], "b p h d, b p h d -> p h b")
                if g[l] is not None
                else torch.zeros(dz[l].shape[1:3] + dz[l].shape[:1])
                for l in range(L)
            ]
        )

    atp = {drop: linear(g) for drop, g in grads.items()}
    corr = {drop: torch.zeros_like(atp[None]) for drop in grads}
    t0 = time.perf_counter()
    with torch.no_grad():
        for l, lp in [(s, r) for s in range(L - 1) for r in range(s + 1, L)] if closed_form else []:
            D_row, D_col = _qk_terms(model, l, lp, dz[l], saved, q_kind, k_kind)
            for drop, g in grads.items():
                corr[drop][l] += _contract(g[L + lp].double(), D_row, D_col).float()
    if engine is not None:
        patterns = {
            drop: [None if g[L + lp] is None else g[L + lp].detach() for lp in range(L)] for drop, g in grads.items()
        }
        corr = _qk_fix_on_engine(engine, tokens, dz, patterns)
    seconds["qk_fix"] = time.perf_counter() - t0
    scores = {"atp": atp[None], "atp_qk": atp[None] + corr[None]}
    if grad_drop:
        layer_of = torch.arange(L).reshape(L, 1, 1, 1)
        mean_abs = lambda c: sum((c[d].abs() * (layer_of != d)) for d in range(L)) / (L - 1)  # noqa: E731
        scores["atp_gd"] = mean_abs(atp)
        scores["atp_star"] = mean_abs({d: atp[d] + corr[d] for d in range(L)}) if qk_fix else scores["atp_gd"]
    return AtPStar({k: v.detach().float().cpu() for k, v in scores.items()}, seconds)


def _qk_terms(model: HookedTransformer, l: int, lp: int, dz: Tensor, saved: dict, q_kind: str, k_kind: str):
    """Exact and linearised pattern changes of layer ``lp`` when node (l, p, h) writes its donor z at p.

    Nodes are laid out ``n = (b, h)`` with the position on the pos axis (so rotary sees position p).
    Returns exact Δpattern minus its linearisation, for the node's own row p (``D_row [n, head', p, s]``: its
    query and its key at p changed) and for the later rows t > p (``D_col [n, head', p, t, s]``: its key at p).
    """
    block, attn = model.blocks[l], model.blocks[lp].attn
    B, P, Hs, _ = dz.shape
    delta = einops.einsum(dz, block.attn.W_O[:], "b p h d, h d m -> b h p m").reshape(B * Hs, P, -1)
    grouped = lens.kv_heads(model.cfg) != model.cfg.n_heads

    def queries_keys(x: Tensor) -> tuple[Tensor, Tensor]:  # as TransformerLens's attention computes them from x
        normed = model.blocks[lp].ln1(x)
        q = simple_attn_linear(normed, attn.W_Q, attn.b_Q)
        k = simple_attn_linear(normed, *((attn._W_K, attn._b_K) if grouped else (attn.W_K, attn.b_K)))
        if model.cfg.positional_embedding_type == "rotary":
            q, k = attn.apply_rotary(q), attn.apply_rotary(k)
        return q, k

    x = saved[act_name("resid_pre", lp)].repeat_interleave(Hs, dim=0)
    q_new, k_new = queries_keys(x + delta)
    # AtP's own linear term for this path is first order in δ through ln1 too: q and k moved along δ (a
    # Jacobian-vector product), not the exact moves (which differ where ln1 normalises).
    _, (q_lin, k_lin) = torch.func.jvp(queries_keys, (x,), (delta,))
    q, k = (saved[act_name(kind, lp)].repeat_interleave(Hs, dim=0) for kind in (q_kind, k_kind))
    S = saved[act_name("attn_scores", lp)].double().repeat_interleave(Hs, dim=0)  # [n, head', t, s], -inf above
    causal = torch.isfinite(S)
    eye = torch.eye(P, dtype=torch.bool)
    scores = lambda a, b: attn.calculate_attention_scores(a, b).double()  # noqa: E731
    # Row p: the node's query at p against the clean keys, and its own new key at s = p.
    S_row = torch.where(eye, scores(q_new, k_new), scores(q_new, k)).masked_fill(~causal, -torch.inf)
    A = S.softmax(-1)
    exact = S_row.softmax(-1) - A
    # The first-order score change: the query's move against every key, and at s = p the key's move too.
    dS_lin = torch.where(causal, scores(q_lin, k) + torch.where(eye, scores(q, k_lin), 0.0), 0.0)
    lin = A * (dS_lin - (A * dS_lin).sum(-1, keepdim=True))
    D_row = exact - lin  # row t belongs to the node at position t
    # Rows t > p: only the score at key p changes (the clean query of t against the node's new key at p).
    # The softmax of each such row is recomputed in full (a closed form through 1 − A[t, p] loses the mass of
    # a saturated row): D_col [n, head', p, t, s].
    S_col = scores(q, k_new)  # [n, head', t, p]
    below = torch.tril(torch.ones(P, P, dtype=torch.bool), diagonal=-1)  # [t, p]: t > p
    S_new = S[:, :, None].expand(-1, -1, P, -1, -1).clone()  # [n, head', p, t, s]
    at_p = below.T[:, :, None] & eye[:, None, :]  # [p, t, s]: t > p and s = p
    S_new[:, :, at_p] = einops.rearrange(S_col, "n h t p -> n h p t")[:, :, below.T]
    dS = torch.where(below, scores(q, k_lin), 0.0)  # [n, head', t, p], first order
    A_tp = A * below
    lin_col = (
        A[:, :, None]
        * (eye[:, None, :].double() - einops.rearrange(A_tp, "n h t p -> n h p t")[..., None])
        * einops.rearrange(dS, "n h t p -> n h p t")[..., None]
    )  # [n, head', p, t, s]
    D_col = torch.where(below.T[:, :, None], S_new.softmax(-1) - A[:, :, None] - lin_col, 0.0)
    return D_row, D_col


def _contract(G: Tensor, D_row: Tensor, D_col: Tensor) -> Tensor:
    """Σ over later heads of ⟨G, correction⟩ per node → [pos, head, batch] (``G``: [batch, head', t, s])."""
    B = G.shape[0]
    Gn = G.repeat_interleave(D_row.shape[0] // B, dim=0)
    row = einops.einsum(Gn, D_row, "n h p s, n h p s -> n p")  # row p of each node
    col = einops.einsum(Gn, D_col, "n h t s, n h p t s -> n p")
    return einops.rearrange(row + col, "(b h) p -> p h b", b=B)


def _qk_fix_on_engine(engine, tokens: Tensor, dz: list[Tensor], G: dict) -> dict:
    """The QK fix through the model's own attention (the layer engine), for every node (l, p, h) and later layer lp:
    ⟨G_lp, A_lp(x + δ e_p) − A_lp(x)⟩ − δ·∇_{x_p}⟨G_lp, A_lp(x)⟩, with x the clean resid_pre of lp, δ the node's write
    into the residual stream at its position p (layer l's ``hook_attn_out`` with head h's z from the donor, minus the
    clean one) and G_lp ∂metric/∂pattern of lp (one per GradDrop variant, ``G[drop][lp]`` ``[batch, head', t, s]``).

    The exact pattern of a node at p is one engine call of layer lp on positions p … last with x[p] + δ against the
    clean prefix: row p sees the new query and key at p, rows t > p their clean queries and the new key at p — the
    changes the QK fix makes exact. The linear term is one backward per layer lp. Returns ``{drop: [layer, pos, head,
    batch]}``."""
    from tl_patching.edits import Edit

    run = engine.clean_run(tokens, verify_from=0)
    B, P = tokens.shape
    L, H = engine.n_layers, engine.n_heads
    corr = {drop: torch.zeros(L, P, H, B, dtype=torch.float64) for drop in G}
    with torch.no_grad():
        # δ[l]: [head, batch, pos, d_model], each head's write with its z from the donor at every position (a head's
        # write at p depends on its z at p only).
        clean_out = [engine.layer(run, l, run.resid[l], 0, record=[act_name("attn_out", l)])[1] for l in range(L - 1)]
        delta = []
        for l in range(L - 1):
            d = dz[l].detach()

            def rewrite(act: Tensor, index: tuple, d=d) -> Tensor:  # rows (h, b): head h moved by the donor difference
                out = act[index].clone().view(H, B, P, H, -1)
                out[torch.arange(H), :, :, torch.arange(H)] += d.to(out).permute(2, 0, 1, 3)
                return out.view(H * B, P, H, -1)

            name = act_name("attn_out", l)
            moved = engine.layer(run, l, run.resid[l].repeat(H, 1, 1), 0, [Edit(act_name("z", l), rewrite)], [name])
            delta.append((moved[1][name] - clean_out[l][name].repeat(H, 1, 1)).view(H, B, P, -1))
        clean_pattern = [engine.attention_pattern(run, lp, run.resid[lp], 0) for lp in range(L)]
        for lp in range(1, L):
            for p in range(P):
                # rows (l, h, b) for every l < lp: layer lp at positions p … with x[p] moved by the node's write
                x = run.resid[lp][:, p:].repeat(lp * H, 1, 1)
                x[:, 0] += torch.cat([delta[l][:, :, p] for l in range(lp)]).reshape(lp * H * B, -1).to(x)
                changed = engine.attention_pattern(run, lp, x, p) - clean_pattern[lp][:, :, p:].repeat(lp * H, 1, 1, 1)
                changed = changed.view(lp, H, B, *changed.shape[1:]).double()
                for drop, g in G.items():
                    if g[lp] is not None:
                        exact = einops.einsum(changed, g[lp][:, :, p:].double(), "l h b k t s, b k t s -> l h b")
                        corr[drop][:lp, p] += exact
    for lp in range(1, L):
        x = run.resid[lp].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            pattern = engine.attention_pattern(run, lp, x, 0)
            for drop, g in G.items():
                if g[lp] is None:
                    continue
                (grad,) = torch.autograd.grad((pattern * g[lp].to(pattern)).sum(), x, retain_graph=True)
                for l in range(lp):
                    linear = einops.einsum(delta[l].double(), grad.double(), "h b p d, b p d -> p h b")
                    corr[drop][l] -= linear
    return {drop: c.float() for drop, c in corr.items()}


def atp_report(
    attribution: dict[str, Tensor] | Tensor,
    exact: Tensor,
    k: Sequence[int] = (5, 10, 20),
    mask: Tensor | None = None,
    costs: dict[str, float] | None = None,
    show: bool = True,
) -> dict[str, dict[str, float]]:
    """Spearman correlation and top-k recall of |attribution| vs |exact|, per prompt then averaged.

    ``attribution``: one ``[layer, pos, head, batch]`` tensor or several by name; ``exact`` the same shape.
    ``mask`` ``[pos, batch]``: the nodes to rank (default all; pass ``pos ≥ first differing token`` so the block
    of exact zeros before it does not inflate the correlation). Recall@k: the share of the k largest |exact|
    that are among the k largest |attribution|. ``costs``: forward-pass equivalents per name, printed along.
    """
    methods = attribution if isinstance(attribution, dict) else {"attribution": attribution}
    B = exact.shape[-1]
    mask = torch.ones(exact.shape[1], B, dtype=torch.bool) if mask is None else mask
    report = {}
    for name, a in methods.items():
        if a.shape != exact.shape:
            raise ValueError(f"{name}: shape {tuple(a.shape)} is not the exact effects' {tuple(exact.shape)}")
        rho, recall = [], {kk: [] for kk in k}
        for b in range(B):
            keep = mask[:, b][None, :, None].expand(exact.shape[:3])
            x, y = a[..., b][keep].abs().double().numpy(), exact[..., b][keep].abs().double().numpy()
            rho.append(stats.spearmanr(x, y).statistic)
            for kk in k:
                kk_ = min(kk, len(y))
                recall[kk].append(len(set(np.argsort(-y)[:kk_]) & set(np.argsort(-x)[:kk_])) / kk_)
        report[name] = {
            "spearman": float(np.nanmean(rho)),
            **{f"recall@{kk}": float(np.mean(v)) for kk, v in recall.items()},
        }
        if costs and name in costs:
            report[name]["cost_fwd"] = costs[name]
    if show:
        cols = ["spearman"] + [f"recall@{kk}" for kk in k] + (["cost_fwd"] if costs else [])
        print(f"{'method':<12}" + "".join(f"{c:>12}" for c in cols))
        for name, row in report.items():
            print(f"{name:<12}" + "".join(f"{row.get(c, float('nan')):>12.3f}" for c in cols))
    return report
