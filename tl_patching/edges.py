"""Edges of the computational graph: exact edge effects, edge attribution (EAP, EAP-IG), circuit faithfulness.

Path patching (`tl_patching.path_patching`) asks how much of an effect travels from a sender head to a receiver.
Edge attribution asks it of every edge of the model's computational graph at once (Syed et al. 2023, "Attribution
Patching Outperforms Automated Circuit Discovery"; Hanna et al. 2024, "Have Faith in Faithfulness"; Mueller et al.
2025, MIB), and judges the circuits it finds by *faithfulness*. The graph, as the EAP-IG reference code
(hannamw/EAP-IG) names it:

- senders: ``input`` (the embeddings, ``hook_resid_pre`` of layer 0), every head ``a{l}.h{h}`` (its write into the
  residual stream, ``z_h · W_O[h]``, without ``b_O``: a constant is not a node), every MLP ``m{l}``
  (``hook_mlp_out``);
- receivers: each head's query, key and value inputs ``a{l}.h{h}<q>``, ``a{l}.h{g}<k>``, ``a{l}.h{g}<v>`` (on a
  grouped-query model k and v belong to the key/value head g, shared by its query heads), each MLP's input ``m{l}``,
  and ``logits`` (the final residual stream);
- an edge s → r for every sender upstream of r: everything written before layer l reaches layer l's q/k/v; an MLP
  also reads its own layer's heads in a sequential block, not in a parallel one (GPT-J, Pythia).

Every receiver r has a *private input*: the residual stream at its layer, ``x_l``, plus what its own edges change.
Patching edges means ``x_l + Δ_r``, ``Δ_r = Σ_{s → r patched} (a_s^other − a_s)``. Done with the model's own layers
(the layer engine, `tl_patching.engine`), nothing re-implemented:

- q/k/v receivers: the layer run on ``x_l + Δ_r`` gives r's ``hook_q``/``hook_k``/``hook_v``, written into the layer
  run on ``x_l`` (path patching's own step);
- an MLP receiver: ``Δ_m`` added where the MLP reads it (``hook_attn_out`` of a sequential block, the layer's input of
  a parallel one, whose attention then runs on written q/k/v) and taken off the layer's output again, so the skip
  connection carries the unpatched stream;
- ``logits``: the final residual stream plus ``Δ_logits``, through the final norm and the unembedding.

Three uses, one graph:

- `exact_edges`: the metric change when only that edge carries the donor's sender output, for every edge
  (``Δ_r = a_s^donor − a_s^clean`` for its one sender, every other edge clean); the reference the two below are
  judged by.
- `attribute`: EAP, ``(a_s^donor − a_s^clean) · ∂m/∂x_r`` at the clean run (the gradient of the metric with respect
  to r's private input; one forward and one backward for all edges), and EAP-IG, that gradient averaged over ``steps``
  points between the donor and the clean run, of the inputs' embeddings (``"eap-ig-inputs"``) or of each sender
  group's output in turn (``"eap-ig-activations"``).
- `faithfulness`: the metric when every edge outside a circuit carries the ablated sender output (the donor's, or
  the mean over the clean prompts), each edge's Δ computed from the current run's own senders; f = (m(C) − m(∅)) /
  (m(M) − m(∅)) (MIB), and the curve over circuit sizes with its areas CPR and CMD.

Refused by name: a head write that is not linear in its z (a norm after attention: Gemma 2/3, where a head's write
is not its own), post-norm blocks, and architectures without a layer engine (`tl_patching.fast.unavailable`).

Metrics are of the final position's logits (`tl_patching.metrics.Metric`), averaged over prompts; scores and effects
are in the metric's unit (nats for a `LogitDiff`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_patching import engine as engines
from tl_patching import lens
from tl_patching.edits import Edit, act_name, check_donor, replace
from tl_patching.engine import Engine, Run, tolerance
from tl_patching.forward import Forward
from tl_patching.metrics import LogitDiff, Metric

WHAT = "edge attribution"
METHODS = ("eap", "eap-ig-inputs", "eap-ig-activations")
IG_STEPS = 5  # MIB's choice for EAP-IG
# MIB's circuit sizes, as fractions of all edges
SIZES = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
# How far the full circuit may be from the clean run, and the empty one from the donor run, relative to the metric's
# scale: the ablation machinery is checked on every faithfulness call.
CHECK_TOLERANCE = 1e-3
W_O_TOLERANCE = 1e-4  # the heads' z · W_O against hook_attn_out, relative


class FaithfulnessCheckError(ArithmeticError):
    """The full circuit did not give the clean metric (or the empty one the donor's): the ablation is wrong."""


# --- the graph ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Graph:
    """The computational graph of a model: which sender reaches which receiver (see the module docstring).

    Senders are indexed ``input``, then per layer its heads and its MLP; receivers per layer its q inputs (one per
    head), k and v inputs (one per key/value head) and its MLP, then ``logits``.
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int
    has_mlp: bool
    parallel: bool

    @property
    def _per_layer(self) -> int:
        return self.n_heads + self.has_mlp

    @property
    def _receivers_per_layer(self) -> int:
        return self.n_heads + 2 * self.n_kv_heads + self.has_mlp

    def head(self, l: int, h: int) -> int:
        """Sender index of head (l, h)."""
        return 1 + l * self._per_layer + h

    def mlp(self, l: int) -> int:
        """Sender index of MLP l."""
        return 1 + l * self._per_layer + self.n_heads

    def receiver(self, l: int, kind: str, h: int = 0) -> int:
        """Receiver index of layer l's ``kind`` ("q", "k", "v", "mlp"; head h, a key/value head for k and v)."""
        offset = {"q": h, "k": self.n_heads + h, "v": self.n_heads + self.n_kv_heads + h}.get(kind)
        if kind == "mlp":
            offset = self.n_heads + 2 * self.n_kv_heads
        return l * self._receivers_per_layer + offset

    @property
    def logits(self) -> int:
        return self.n_layers * self._receivers_per_layer

    @property
    def senders(self) -> list[str]:
        names = ["input"]
        for l in range(self.n_layers):
            names += [f"a{l}.h{h}" for h in range(self.n_heads)] + ([f"m{l}"] if self.has_mlp else [])
        return names

    @property
    def receivers(self) -> list[str]:
        names = []
        for l in range(self.n_layers):
            names += [f"a{l}.h{h}<q>" for h in range(self.n_heads)]
            names += [f"a{l}.h{g}<{kind}>" for kind in "kv" for g in range(self.n_kv_heads)]
            names += [f"m{l}"] if self.has_mlp else []
        return names + ["logits"]

    def _times(self) -> tuple[Tensor, Tensor]:
        """When each sender writes and each receiver reads, in steps of the forward (input 0, layer l's heads
        2l+1, its MLP 2l+2): s → r is an edge iff s writes before r reads."""
        write = torch.zeros(len(self.senders))
        for l in range(self.n_layers):
            write[self.head(l, 0) : self.head(l, 0) + self.n_heads] = 2 * l + 1
            if self.has_mlp:
                write[self.mlp(l)] = 2 * l + 2
        read = torch.full((len(self.receivers),), float("inf"))
        for l in range(self.n_layers):
            first = self.receiver(l, "q")
            read[first : first + self.n_heads + 2 * self.n_kv_heads] = 2 * l + 1
            if self.has_mlp:
                read[self.receiver(l, "mlp")] = 2 * l + 1 if self.parallel else 2 * l + 2
        return write, read

    @property
    def edges(self) -> Bool[Tensor, "sender receiver"]:
        """Which (sender, receiver) pairs are edges."""
        write, read = self._times()
        return write[:, None] < read[None, :]

    @property
    def n_edges(self) -> int:
        return int(self.edges.sum())

    def receivers_of(self, l: int) -> range:
        """Receiver indices of layer l (q, k, v, MLP)."""
        return range(l * self._receivers_per_layer, (l + 1) * self._receivers_per_layer)

    def upstream_of(self, l: int) -> int:
        """How many senders write before layer l's attention reads (input and every sender of layers < l)."""
        return 1 + l * self._per_layer

    def name(self, sender: int, receiver: int) -> str:
        return f"{self.senders[sender]}->{self.receivers[receiver]}"


def graph_of(forward: Forward) -> Graph:
    """The graph of ``forward``'s model; `NotImplementedError` naming what edge attribution cannot compute exactly."""
    cfg = forward.cfg
    reason = _unavailable(forward)
    if reason is not None:
        raise NotImplementedError(f"{WHAT} runs on the layer engine: {reason}")
    return Graph(
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=lens.kv_heads(cfg),
        has_mlp=not cfg.attn_only,
        parallel=bool(getattr(lens.attention_config(forward.model), "parallel_attn_mlp", False)),
    )


def _unavailable(forward: Forward) -> str | None:
    from tl_patching import fast, path_patching

    reason = fast.unavailable(forward)
    if reason is not None:
        return reason
    engine = engines.engine_of(forward)
    if engine.name == "tl":
        try:
            path_patching.check_family(forward.model)
        except NotImplementedError as e:
            return str(e)
    if not engine.head_writes_are_linear():
        return (
            f"{lens.architecture(forward.model)} normalises the attention output before the residual stream (a norm "
            "after attention), so a head's write is not its own z · W_O: the graph has no head senders"
        )
    return None


# --- what every method starts from ----------------------------------------------------------------------------


@dataclass
class _Setup:
    forward: Forward
    engine: Engine
    graph: Graph
    run: Run  # the clean run, on the engine
    W_O: list[Float[Tensor, "head d_head d_model"]]
    clean: Float[Tensor, "batch pos sender d_model"]  # sender outputs of the clean run
    donor: Float[Tensor, "batch pos sender d_model"]  # … of the donor run (or the ablation's values)
    clean_z: list[Tensor]
    donor_z: list[Tensor]
    readout: object  # final-position residual [rows, d_model] -> metric [variants, batch]
    start: int  # the first position where any sender output differs (before it, every run is the clean one)


def _names(graph: Graph) -> list[str]:
    names = [act_name("resid_pre", 0)]
    for l in range(graph.n_layers):
        names += [act_name("z", l), act_name("attn_out", l)] + ([act_name("mlp_out", l)] if graph.has_mlp else [])
    return names


def _sender_outputs(graph: Graph, cache: dict, W_O: list[Tensor]) -> Float[Tensor, "batch pos sender d_model"]:
    parts = [cache[act_name("resid_pre", 0)][:, :, None]]
    for l in range(graph.n_layers):
        parts.append(torch.einsum("bphk,hkd->bphd", cache[act_name("z", l)], W_O[l].to(cache[act_name("z", l)])))
        if graph.has_mlp:
            parts.append(cache[act_name("mlp_out", l)][:, :, None])
    return torch.cat(parts, dim=2)


def _check_W_O(graph: Graph, engine: Engine, cache: dict, W_O: list[Tensor]) -> None:
    """The heads' writes must add up to ``hook_attn_out`` (less its bias): the head senders are what they say."""
    for l in range(graph.n_layers):
        z, attn_out = cache[act_name("z", l)], cache[act_name("attn_out", l)]
        heads = torch.einsum("bphk,hkd->bpd", z, W_O[l].to(z))
        bias = engine.b_O(l)
        total = heads + (0 if bias is None else bias.to(z))
        gap = ((total.float() - attn_out.float()).abs().max() / attn_out.float().abs().max().clamp(min=1.0)).item()
        if not gap <= tolerance(W_O_TOLERANCE, z.dtype):
            raise NotImplementedError(
                f"{WHAT}: layer {l}'s heads' z · W_O do not add up to hook_attn_out (relative difference {gap:.3g}): "
                "the head senders would be wrong"
            )


def _setup(
    forward: Forward, tokens: Tensor, donor: Tensor | None, metric: Metric, ablated: Tensor | None = None
) -> _Setup:
    graph = graph_of(forward)
    engine = engines.engine_of(forward)
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise ValueError(f"tokens must be [batch, pos] with at least one prompt, got {tuple(tokens.shape)}")
    if isinstance(metric, LogitDiff):
        if len(metric.correct) != len(tokens):
            raise ValueError(f"tokens {tuple(tokens.shape)} need one correct and one wrong id per prompt")
        metric.check(forward.cfg.d_vocab)
    names = _names(graph)
    W_O = [engine.W_O(l) for l in range(graph.n_layers)]
    with torch.no_grad():
        _, clean = forward.run(tokens, cache=names)
        _check_W_O(graph, engine, clean, W_O)
        clean_out = _sender_outputs(graph, clean, W_O)
        if donor is not None:
            check_donor("donor tokens", donor, tuple(tokens.shape))
            donor = donor.expand(tokens.shape)  # one donor for every prompt: a row each, as the ablations index rows
            _, donor_cache = forward.run(donor, cache=names)
            donor_out = _sender_outputs(graph, donor_cache, W_O)
            donor_z = [donor_cache[act_name("z", l)] for l in range(graph.n_layers)]
        else:  # mean ablation: the mean over the clean prompts, per position
            donor_out = clean_out.mean(0, keepdim=True).expand_as(clean_out)
            donor_z = [clean[act_name("z", l)].mean(0, keepdim=True) for l in range(graph.n_layers)]
        differs = (donor_out != clean_out).flatten(2).any(-1).any(0)
        start = int(differs.nonzero()[0]) if differs.any() else tokens.shape[1] - 1
        run = engine.clean_run(tokens, verify_from=start)
    return _Setup(
        forward,
        engine,
        graph,
        run,
        W_O,
        clean_out,
        donor_out,
        [clean[act_name("z", l)] for l in range(graph.n_layers)],
        donor_z,
        engines.readout(engine, metric, len(tokens)),
        start,
    )


# --- exact edge effects ---------------------------------------------------------------------------------------


def exact_edges(
    forward: Forward,
    tokens: Int[Tensor, "batch pos"],
    donor: Int[Tensor, "batch pos"],
    metric: Metric,
    edges: Bool[Tensor, "sender receiver"] | None = None,
    max_rows: int = 4096,
) -> Float[Tensor, "sender receiver"]:
    """The exact effect of each edge, ``[sender, receiver]`` (CPU, float32; 0 where there is no edge or it was not
    asked for): the metric, averaged over prompts, when that edge alone carries the donor's sender output and every
    other edge the clean one, minus the clean metric. ``edges``: which edges to compute (default all,
    `Graph.edges`). Rows (one per edge and prompt, positions from the first that differs) are computed in passes of
    about ``max_rows`` rows × positions, from the receiver's layer on."""
    s = _setup(forward, tokens, donor, metric)
    graph, run, B = s.graph, s.run, len(tokens)
    wanted = graph.edges if edges is None else edges & graph.edges
    out = torch.zeros(wanted.shape)
    P = tokens.shape[1]
    with torch.no_grad():
        base = s.readout(run.resid[graph.n_layers][:, -1]).float().cpu()[0]  # [batch]
        diff = (s.donor - s.clean)[:, s.start :]  # [batch, pos, sender, d_model]
        # logits receiver: the final residual stream plus the sender's difference, at the final position only
        senders = wanted[:, graph.logits].nonzero()[:, 0].tolist()
        for chunk in _chunks(senders, max(1, max_rows // B)):
            final = run.resid[graph.n_layers][:, -1].repeat(len(chunk), 1) + _rows(diff[:, -1, chunk])
            out[chunk, graph.logits] = (s.readout(final).float().cpu() - base).mean(1)
        S = P - s.start
        for l in range(graph.n_layers):
            pairs = [(si, r) for r in graph.receivers_of(l) for si in wanted[:, r].nonzero()[:, 0].tolist()]
            for chunk in _chunks(pairs, max(1, max_rows // (B * S))):
                values = _edges_into_layer(s, l, chunk, diff)
                for (si, r), v in zip(chunk, (values - base).mean(1)):
                    out[si, r] = v
    return out


def _chunks(items: list, n: int) -> list[list]:
    return [items[i : i + n] for i in range(0, len(items), n)]


def _rows(t: Tensor) -> Tensor:
    """``[batch, …, variant, d]`` -> ``[variant·batch, …, d]`` (variant-major rows)."""
    return t.movedim(-2, 0).flatten(0, 1)


def _edges_into_layer(s: _Setup, l: int, pairs: list[tuple[int, int]], diff: Tensor) -> Tensor:
    """Metric ``[edge, batch]`` with each edge (sender, receiver at layer l) patched alone."""
    graph, run, engine, B = s.graph, s.run, s.engine, len(s.run.tokens)
    x = run.resid[l][:, s.start :].repeat(len(pairs), 1, 1)
    delta = _rows(diff[:, :, [si for si, _ in pairs]])  # [edge·batch, pos, d_model]
    kinds = [_kind(graph, r) for _, r in pairs]
    edits: list[Edit] = []
    qkv = [act_name(k, l) for k in "qkv"]
    _, recorded = engine.layer(run, l, x + delta, s.start, record=qkv)
    mlp_rows = torch.zeros(len(x), 1, 1)
    for i, (kind, h) in enumerate(kinds):
        part = slice(i * B, (i + 1) * B)
        if kind == "mlp":
            mlp_rows[part] = 1.0
        else:
            name = act_name(kind, l)
            edits.append(replace(name, recorded[name][part][:, :, [h]], head=[h], rows=part))
    mlp_delta = delta * mlp_rows.to(delta)
    if graph.parallel:
        # the layer's input carries the MLP rows' Δ; their attention must not see it: clean q/k/v written back
        _, clean_qkv = engine.layer(run, l, run.resid[l][:, s.start :], s.start, record=qkv)
        for i, (kind, _) in enumerate(kinds):
            if kind == "mlp":
                part = slice(i * B, (i + 1) * B)
                edits += [replace(name, clean_qkv[name], rows=part) for name in qkv]
        y, _ = engine.layer(run, l, x + mlp_delta, s.start, edits)
    else:
        edits.append(Edit(act_name("attn_out", l), lambda act, i: act[i] + mlp_delta.to(act)))
        y, _ = engine.layer(run, l, x, s.start, edits)
    y = y - mlp_delta.to(y)
    for j in range(l + 1, graph.n_layers):
        y, _ = engine.layer(run, j, y, s.start)
    return s.readout(y[:, -1]).float().cpu()


def _kind(graph: Graph, r: int) -> tuple[str, int]:
    """("q"|"k"|"v"|"mlp", head) of receiver r (not logits)."""
    offset = r % graph._receivers_per_layer
    H, G = graph.n_heads, graph.n_kv_heads
    if offset < H:
        return "q", offset
    if offset < H + G:
        return "k", offset - H
    if offset < H + 2 * G:
        return "v", offset - H - G
    return "mlp", 0


# --- edge attribution: EAP and EAP-IG -----------------------------------------------------------------------------


def attribute(
    forward: Forward,
    tokens: Int[Tensor, "batch pos"],
    donor: Int[Tensor, "batch pos"],
    metric: Metric,
    method: str = "eap",
    steps: int = IG_STEPS,
) -> Float[Tensor, "sender receiver"]:
    """Edge scores ``[sender, receiver]`` (CPU, float32; 0 where there is no edge), in the metric's unit: an estimate
    of `exact_edges`, ``Σ_{prompt, pos, d} (a_s^donor − a_s^clean) · G_r``, G_r the gradient of the metric averaged
    over prompts with respect to receiver r's input.

    ``method``: ``"eap"`` — G_r = ∂m/∂x_r at the clean run (one forward, one backward); ``"eap-ig-inputs"`` — G_r
    averaged over ``steps`` runs whose embeddings are ``donor + (k/steps)(clean − donor)``, k = 0 … steps−1;
    ``"eap-ig-activations"`` — for each sender group (the input, layer l's heads, layer l's MLP) in turn, G_r of the
    receivers downstream averaged over ``steps`` runs with that group's output at ``donor + (k/steps)(clean − donor)``,
    k = 1 … steps, every other activation computed (Hanna et al. 2024; MIB). Cost in forward-and-backward passes: 1,
    ``steps``, and ``steps × (1 + layers × (1 + has MLP))``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "eap" and not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    s = _setup(forward, tokens, donor, metric)
    graph = s.graph
    diff = (s.donor - s.clean)[:, s.start :]  # [batch, pos, sender, d_model]
    x_clean, x_donor = s.clean[:, s.start :, 0], s.donor[:, s.start :, 0]
    if method == "eap":
        scores = _dot(diff, _gradients(s, x_clean))
    elif method == "eap-ig-inputs":
        G = sum(_gradients(s, x_donor + (k / steps) * (x_clean - x_donor)) for k in range(steps))
        scores = _dot(diff, G / steps)
    else:
        scores = torch.zeros(len(graph.senders), len(graph.receivers))
        groups = [([0], None, None)]
        for l in range(graph.n_layers):
            groups.append(([graph.head(l, h) for h in range(graph.n_heads)], "z", l))
            if graph.has_mlp:
                groups.append(([graph.mlp(l)], "mlp_out", l))
        for senders, kind, l in groups:
            G = 0
            for k in range(1, steps + 1):
                alpha = k / steps
                if kind is None:
                    G = G + _gradients(s, x_donor + alpha * (x_clean - x_donor))
                    continue
                name = act_name(kind, l)
                if kind == "z":
                    clean, other = s.clean_z[l][:, s.start :], s.donor_z[l][:, s.start :]
                else:
                    clean, other = s.clean[:, s.start :, senders[0]], s.donor[:, s.start :, senders[0]]
                G = G + _gradients(s, x_clean, {l: [replace(name, other + alpha * (clean - other))]})
            scores[senders] = _dot(diff[:, :, senders], G / steps)
    return scores * graph.edges


def _dot(diff: Tensor, G: Tensor) -> Tensor:
    return torch.einsum("bpsd,bprd->sr", diff.float().cpu(), G.float().cpu())


def _gradients(
    s: _Setup, x0: Float[Tensor, "batch pos d_model"], extra: dict[int, list[Edit]] | None = None
) -> Float[Tensor, "batch pos receiver d_model"]:
    """∂m/∂x_r for every receiver r (m: the metric averaged over prompts) of the run from embeddings ``x0`` at
    positions ``start`` … (with ``extra`` edits at their layers): one forward and one backward through the engine's
    layers, with the gradients at ``hook_q/k/v`` and ``hook_mlp_out`` taken back to each receiver's private input
    one head at a time (through the norm and projection that make its q, k or v; through the MLP to its input)."""
    graph, engine, run = s.graph, s.engine, s.run
    extra = extra or {}
    H, G = graph.n_heads, graph.n_kv_heads
    model = engine.hf if engine.name == "hf" else engine.model
    out = torch.zeros(*x0.shape[:2], len(graph.receivers), x0.shape[-1])
    with torch.enable_grad(), lens.frozen_weights(model):
        x = x0.detach().clone().requires_grad_(True)
        inputs, kept = [], []
        for l in range(graph.n_layers):
            inputs.append(x)
            names = [act_name(k, l) for k in "qkv"]
            if graph.has_mlp:
                names += [act_name("mlp_out", l)] + ([] if graph.parallel else [act_name("attn_out", l)])
            here: dict[str, tuple[Tensor, Tensor]] = {}
            x, _ = engine.layer(run, l, x, s.start, [_keep(name, here) for name in names] + extra.get(l, []))
            kept.append(here)
        final = x[:, -1]
        final_leaf = torch.zeros_like(final, requires_grad=True)
        m = s.readout(final + final_leaf).mean()
        leaves = [final_leaf] + [here[name][1] for here in kept for name in here if not name.endswith("attn_out")]
        grads = dict(zip(map(id, leaves), torch.autograd.grad(m, leaves, retain_graph=True, allow_unused=True)))
        out[:, -1, graph.logits] = grads[id(final_leaf)].detach().to(out)
        for l, here in enumerate(kept):
            for kind, n in (("q", H), ("k", G), ("v", G)):
                value, leaf = here[act_name(kind, l)]
                g = grads[id(leaf)]
                for h in range(n):
                    if g is None:
                        continue
                    masked = torch.zeros_like(g)
                    masked[:, :, h] = g[:, :, h]
                    (gx,) = torch.autograd.grad(value, inputs[l], masked, retain_graph=True)
                    out[:, :, graph.receiver(l, kind, h)] = gx.detach().to(out)
            if graph.has_mlp:
                value, leaf = here[act_name("mlp_out", l)]
                g = grads[id(leaf)]
                reads = inputs[l] if graph.parallel else here[act_name("attn_out", l)][0]
                if g is not None:
                    (gx,) = torch.autograd.grad(value, reads, g, retain_graph=True)
                    out[:, :, graph.receiver(l, "mlp")] = gx.detach().to(out)
    return out


def _keep(name: str, into: dict) -> Edit:
    """An edit that changes nothing but keeps the activation as the rest of the forward uses it, and a zero leaf
    added to it (whose gradient is the metric's gradient at that activation)."""

    def rewrite(act: Tensor, index: tuple) -> Tensor:
        leaf = torch.zeros_like(act[index], requires_grad=True)
        value = act[index] + leaf
        into[name] = (value, leaf)
        return value

    return Edit(name, rewrite)


# --- faithfulness -------------------------------------------------------------------------------------------------


@dataclass
class Faithfulness:
    """Circuits' metrics and faithfulness. ``metric``: m(C) per circuit ``[circuit]``, averaged over prompts;
    ``full``: m(M), the clean run; ``empty``: m(∅), every edge ablated; ``f``: (m(C) − m(∅)) / (m(M) − m(∅))."""

    metric: Float[Tensor, " circuit"]
    full: float
    empty: float

    @property
    def f(self) -> Float[Tensor, " circuit"]:
        return (self.metric - self.empty) / (self.full - self.empty)


def faithfulness(
    forward: Forward,
    tokens: Int[Tensor, "batch pos"],
    donor: Int[Tensor, "batch pos"] | None,
    metric: Metric,
    circuits: Bool[Tensor, "circuit sender receiver"],
    max_rows: int = 4096,
) -> Faithfulness:
    """The metric of each circuit: every edge outside it carries the ablated sender output — the ``donor`` run's
    (counterfactual ablation) or, with ``donor=None``, the mean over the clean prompts at each position (mean
    ablation) — and every edge inside it the sender's output in this very run. Checked on every call: the full
    circuit must give the clean run's metric and (counterfactual ablation) the empty circuit the donor run's, and the
    two must differ (f is undefined otherwise), else `FaithfulnessCheckError`."""
    s = _setup(forward, tokens, donor, metric)
    graph = s.graph
    if circuits.ndim != 3 or tuple(circuits.shape[1:]) != tuple(graph.edges.shape):
        raise ValueError(f"circuits must be [circuit, {len(graph.senders)}, {len(graph.receivers)}] booleans")
    everything = torch.stack([graph.edges, torch.zeros_like(graph.edges)])
    keep = torch.cat([everything, circuits.bool().cpu() & graph.edges])
    B, S = len(tokens), tokens.shape[1] - s.start
    per_pass = max(1, max_rows // (B * S * (graph.n_heads + 2 * graph.n_kv_heads + 1)))
    with torch.no_grad():
        values = torch.cat([_circuit_runs(s, part) for part in keep.split(per_pass)]).mean(1)
        clean = s.readout(s.run.resid[graph.n_layers][:, -1]).float().cpu()[0].mean()
    full, empty = values[0].item(), values[1].item()
    allowed = max(abs(clean.item()), 1.0) * tolerance(CHECK_TOLERANCE, s.run.resid[0].dtype)
    checks = {"the full circuit": (full, clean.item(), "the clean run")}
    if donor is not None:
        logits, _ = forward.run(donor.expand(tokens.shape))
        checks["the empty circuit"] = (empty, _metric_of(metric, logits[:, -1]), "the donor run")
    else:  # every edge carries its batch mean: the logits read the batch-mean final residual stream
        with torch.no_grad():
            final = s.run.resid[graph.n_layers][:, -1]
            mean = s.readout(final.mean(0, keepdim=True).expand_as(final)).float().cpu()[0].mean().item()
        checks["the empty circuit"] = (empty, mean, "the readout of the batch-mean final residual stream")
    if not abs(full - empty) > allowed:
        raise FaithfulnessCheckError(
            f"{WHAT}: the clean run and the ablated one give the same metric ({full:.6g}, {empty:.6g}): "
            "faithfulness (m(C) − m(∅)) / (m(M) − m(∅)) is undefined for these prompts"
        )
    for what, (got, want, of) in checks.items():
        if not abs(got - want) <= allowed:
            raise FaithfulnessCheckError(
                f"{WHAT}: {what} gives {got:.6g}, {of} {want:.6g}: the edges' ablation does not reproduce it"
            )
    return Faithfulness(values[2:], full, empty)


def _metric_of(metric: Metric, logits: Tensor) -> float:
    return float(metric(logits.float()).float().mean())


def _circuit_runs(s: _Setup, keep: Bool[Tensor, "variant sender receiver"]) -> Float[Tensor, "variant batch"]:
    """The metric of each circuit in ``keep``, every run from layer 0 at positions ``start`` …: each receiver's input
    is the layer's residual stream plus Σ over its ablated edges of (ablated − current) sender output."""
    graph = s.graph
    V, B = len(keep), len(s.run.tokens)
    ablate = (~keep & graph.edges).float()  # [variant, sender, receiver]
    ablated = s.donor[:, s.start :].repeat(V, 1, 1, 1)  # [variant·batch, pos, sender, d_model]
    x = s.run.resid[0][:, s.start :].repeat(V, 1, 1)
    current = [x]  # sender outputs of these runs, in sender order

    def deltas(n_up: int, receivers) -> Tensor:
        """[variant·batch, pos, receiver, d_model]: Σ over the first n_up senders of the ablated edges' differences."""
        diff = ablated[:, :, :n_up] - torch.stack(current[:n_up], dim=2).to(ablated)
        w = ablate[:, :n_up][:, :, receivers].to(diff)
        return torch.einsum("vbpsd,vsr->vbprd", diff.unflatten(0, (V, B)), w).flatten(0, 1)

    for l in range(graph.n_layers):
        delta = deltas(graph.upstream_of(l), list(graph.receivers_of(l)))  # [rows, pos, layer l's receivers, d]
        x, z, mlp_out = _circuit_layer(s, l, x, delta, ablate, ablated, V)
        current += list(torch.einsum("rphk,hkd->rphd", z, s.W_O[l].to(z)).unbind(2))
        if graph.has_mlp:
            current.append(mlp_out)
    final = x[:, -1] + deltas(len(graph.senders), [graph.logits])[:, -1, 0].to(x)
    return s.readout(final).float().cpu()


# --- circuits from scores, and the faithfulness curve ---------------------------------------------------------------


def top_edges(graph: Graph, scores: Tensor, n: int, absolute: bool = False) -> Bool[Tensor, "sender receiver"]:
    """The circuit of the ``n`` edges that carry the clean run's behaviour most: the most negative scores (an edge
    whose donor output lowers the metric most; scores and effects are donor − clean), or the largest ``|score|``
    if ``absolute``; then dangling edges pruned (`prune`): it may hold fewer than ``n``."""
    if not 0 <= n <= graph.n_edges:
        raise ValueError(f"n must be within 0 … {graph.n_edges} edges, got {n}")
    bad = ~torch.isfinite(scores.detach().cpu()) & graph.edges
    if bad.any():  # topk ranks NaN above every number: the circuit would be made of the broken edges
        s, r = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"scores must be finite: {int(bad.sum())} edges are not, e.g. {graph.name(s, r)}")
    key = (scores.abs() if absolute else -scores).float().masked_fill(~graph.edges, float("-inf"))
    circuit = torch.zeros_like(graph.edges)
    circuit.view(-1)[key.flatten().topk(n).indices] = True
    return prune(graph, circuit)


def prune(graph: Graph, circuit: Bool[Tensor, "sender receiver"]) -> Bool[Tensor, "sender receiver"]:
    """``circuit`` without dangling edges, repeatedly until none is left: an edge whose sender (not the input) has no
    edge into it (into any of a head's q, k, v inputs; into an MLP's input), or whose receiver's node sends nothing
    on (a k/v input counts for every query head sharing it; ``logits`` always counts)."""
    circuit = circuit & graph.edges
    H, G = graph.n_heads, graph.n_kv_heads
    while True:
        fed = torch.zeros(len(graph.senders), dtype=torch.bool)
        fed[0] = True
        into = circuit.any(0)  # [receiver]
        sends = circuit.any(1)  # [sender]
        used = torch.zeros(len(graph.receivers), dtype=torch.bool)
        used[graph.logits] = True
        for l in range(graph.n_layers):
            for h in range(H):
                g = h * G // H
                fed[graph.head(l, h)] = bool(
                    into[graph.receiver(l, "q", h)] | into[graph.receiver(l, "k", g)] | into[graph.receiver(l, "v", g)]
                )
                used[graph.receiver(l, "q", h)] = sends[graph.head(l, h)]
            for g in range(G):
                group = sends[[graph.head(l, h) for h in range(g * H // G, (g + 1) * H // G)]].any()
                used[graph.receiver(l, "k", g)] = used[graph.receiver(l, "v", g)] = group
            if graph.has_mlp:
                fed[graph.mlp(l)] = into[graph.receiver(l, "mlp")]
                used[graph.receiver(l, "mlp")] = sends[graph.mlp(l)]
        pruned = circuit & fed[:, None] & used[None, :]
        if torch.equal(pruned, circuit):
            return circuit
        circuit = pruned


@dataclass
class Curve:
    """A faithfulness curve: ``sizes`` (fractions of all edges asked for), ``n_edges`` (edges kept after pruning),
    ``f`` (faithfulness of each circuit), and its areas over the sizes (trapezoid rule): ``cpr`` = ∫ f, ``cmd`` =
    ∫ |1 − f| (MIB: higher CPR, lower CMD are better)."""

    sizes: list[float]
    n_edges: list[int]
    f: list[float]

    @property
    def cpr(self) -> float:
        return area(self.sizes, self.f)

    @property
    def cmd(self) -> float:
        return area(self.sizes, [abs(1 - f) for f in self.f])


def area(x: Sequence[float], y: Sequence[float]) -> float:
    """∫ y dx by the trapezoid rule over the points given (x increasing)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or np.any(np.diff(x) <= 0):
        raise ValueError("an area needs at least two sizes, increasing")
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


def curve(
    forward: Forward,
    tokens: Int[Tensor, "batch pos"],
    donor: Int[Tensor, "batch pos"] | None,
    metric: Metric,
    scores: Float[Tensor, "sender receiver"],
    sizes: Sequence[float] = SIZES,
    absolute: bool = False,
) -> Curve:
    """The faithfulness of the top-``scores`` circuit at each size (a fraction of all edges: ``int(size · edges)``
    edges, then pruned), under counterfactual (``donor``) or mean (``donor=None``) ablation."""
    graph = graph_of(forward)
    if not sizes or any(not 0 < x <= 1 for x in sizes):
        raise ValueError(f"sizes must be fractions of the edges in (0, 1], got {list(sizes)}")
    circuits = torch.stack([top_edges(graph, scores, int(x * graph.n_edges), absolute) for x in sizes])
    result = faithfulness(forward, tokens, donor, metric, circuits)
    return Curve(list(sizes), circuits.flatten(1).sum(1).tolist(), result.f.tolist())


def _circuit_layer(
    s: _Setup, l: int, x: Tensor, delta: Tensor, ablate: Tensor, ablated: Tensor, V: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Layer l of `_circuit_runs` on rows ``x`` ``[variant·batch, pos, d_model]`` whose receivers at layer l get
    ``delta`` ``[rows, pos, receiver, d_model]`` from the senders of layers < l: the layer's output, its z and its MLP
    output."""
    graph, engine, run = s.graph, s.engine, s.run
    H, G, R = graph.n_heads, graph.n_kv_heads, len(x)
    B = R // V
    layer = list(graph.receivers_of(l))
    n_up = graph.upstream_of(l)
    qkv = [act_name(k, l) for k in "qkv"]
    # Step 1: the layer on x (block 0) and on x + Δ_r for each q/k/v receiver r with an ablated edge (block 1, …).
    active = [i for i in range(H + 2 * G) if ablate[:, :n_up, layer[i]].any()]
    block_of = {i: 1 + n for n, i in enumerate(active)}
    _, rec = engine.layer(run, l, torch.cat([x] + [x + delta[:, :, i].to(x) for i in active]), s.start, record=qkv)

    def assembled(kind: str, n: int, offset: int) -> Tensor:
        name = act_name(kind, l)
        return torch.stack([rec[name][block_of.get(offset + h, 0) * R :][:R, :, h] for h in range(n)], dim=2)

    # Step 2: the layer on x with every head's q, k, v from its own receiver's block; the MLP's Δ where it reads.
    edits = [
        replace(act_name("q", l), assembled("q", H, 0)),
        replace(act_name("k", l), assembled("k", G, H)),
        replace(act_name("v", l), assembled("v", G, H + G)),
    ]
    record = [act_name("z", l)] + ([act_name("mlp_out", l)] if graph.has_mlp else [])
    mlp_delta = delta[:, :, -1].to(x).clone() if graph.has_mlp else torch.zeros_like(x)
    if graph.has_mlp and not graph.parallel:
        # the MLP also reads this layer's heads: their ablated edges' differences need this run's z
        heads = [graph.head(l, h) for h in range(H)]
        w = ablate[:, heads, graph.receiver(l, "mlp")]  # [variant, head]
        seen: dict[str, Tensor] = {}

        def keep_z(act: Tensor, index: tuple) -> Tensor:
            seen["z"] = act[index]
            return act[index]

        def add(act: Tensor, index: tuple) -> Tensor:
            writes = torch.einsum("rphk,hkd->rphd", seen["z"], s.W_O[l].to(seen["z"]))
            diff = (ablated[:, :, heads].to(writes) - writes).unflatten(0, (V, B))
            mlp_delta.add_(torch.einsum("vbphd,vh->vbpd", diff, w.to(diff)).flatten(0, 1).to(mlp_delta))
            return act[index] + mlp_delta.to(act)

        edits += [Edit(act_name("z", l), keep_z), Edit(act_name("attn_out", l), add)]
        y, recorded = engine.layer(run, l, x, s.start, edits, record=record)
    else:
        y, recorded = engine.layer(run, l, x + mlp_delta, s.start, edits, record=record)
    return y - mlp_delta.to(y), recorded[act_name("z", l)], recorded.get(act_name("mlp_out", l))
