"""The IOI circuit, found by path patching (Wang et al. 2022, on our models).

Three questions, each one path-patching sweep (`tl_patching.path_patching`), every effect the change in
logit difference (IO − S, nats) when the donor's head output travels along that path alone:

1. **Who writes the answer?** Every head → logits. Heads whose direct effect is large are the
   *name movers* (negative effect: the donor's output pushes toward S; positive: a negative name mover).
2. **Who steers them?** Every head below them → the name movers' **queries, keys and values** (all name
   movers together, one sweep per input). Wang et al. use the queries (in GPT-2 small the S-inhibition heads
   decide where the name movers look); we measure all three inputs and keep a head by its strongest one,
   because a small model may route the same information differently (the shipped model: through values).
3. **What do the steering heads read?** The same sweep, to the steering heads' q, k and v (in GPT-2 small:
   duplicate-token and induction heads, read through the S-inhibition heads' values at S2).

A head is kept at a level if its |effect| (mean over prompts) is at least ``threshold`` × |clean − donor
logit difference| (default 10%), at most ``max_heads`` per level, largest first. Edges are path patches to
one receiver at a time; an edge is drawn if its |effect| ≥ ``edge_min`` nats.

`run(forward, data)` returns a `CircuitResult`; `circuit_figure(result)` draws it (plotly).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import plotly.graph_objects as go
import torch
from jaxtyping import Float
from plotly.colors import sample_colorscale
from torch import Tensor

from tl_patching import lens
from tl_patching.edits import act_name
from tl_patching.forward import Forward
from tl_patching.graph_layout import FONT, LABEL_BORDER, LABEL_PAD, Canvas, Edge, Node, layout
from tl_patching.metrics import LogitDiff, logit_diff
from tl_patching.path_patching import all_heads, clean_names, path_patch
from tl_patching.plotting import DIVERGING, NEGATIVE_COLOUR, POSITIVE_COLOUR, WIDTH, titled
from tl_patching.prompts import IOIBatch, run_info
from tl_patching.results import Result

LEVELS = ("name mover", "steering", "source")


@dataclass
class CircuitResult(Result):
    clean: Float[Tensor, " prompt"]  # recipient's logit difference (IO − S)
    donor: Float[Tensor, " prompt"]  # the donor's (its own answer flipped: negative when the model does IOI)
    direct: Float[Tensor, "layer head"]  # every head → logits, mean effect (nats)
    steer: dict[str, Tensor] = field(
        default_factory=dict
    )  # "q"/"k"/"v": every head → all name movers' inputs [layer, head]
    read: dict[str, Tensor] = field(default_factory=dict)  # "q"/"k"/"v": every head → all steering heads' inputs
    heads: dict[str, list] = field(default_factory=dict)  # level name → [[layer, head], ...]
    edges: list[dict] = field(default_factory=list)  # {"sender", "receiver" ([l, h] or "logits"), "input", "effect"}
    settings: dict = field(default_factory=dict)  # thresholds

    @property
    def gap(self) -> float:
        return float((self.clean - self.donor).mean())

    def reading(self) -> str:
        def listed(level: str, tables: dict[str, Tensor]) -> str:
            out = []
            for l, h in self.heads.get(level, []):
                kind, effect = max(((k, float(t[l, h])) for k, t in tables.items()), key=lambda ke: abs(ke[1]))
                out.append(f"{l}.{h} ({effect:+.2f}{'' if kind == 'direct' else ' via ' + kind})")
            return ", ".join(out) or "none"

        return (
            f"clean logit diff {self.clean.mean():.2f} nats, donor {self.donor.mean():.2f}; name movers "
            f"{listed('name mover', {'direct': self.direct})}; steered by {listed('steering', self.steer)}; "
            f"those read from {listed('source', self.read)} (nats, {len(self.clean)} prompts)"
        )


def _mean_effect(forward: Forward, batches: Sequence[IOIBatch], senders, receivers, clean_runs) -> Tensor:
    """Mean over every prompt of (path-patched − clean) logit difference, per sender variant."""
    total, n = 0.0, 0
    for b, (clean_cache, donor_cache, clean_ld) in zip(batches, clean_runs):
        out = path_patch(
            forward,
            b.tokens,
            donor_cache,
            LogitDiff(b.correct, b.wrong),
            senders=senders,
            receivers=receivers,
            recipient_run=clean_cache,
        )
        total = total + (out - clean_ld).sum(-1)
        n += len(b)
    return total / n


def _select(table: Tensor, candidates: Sequence[tuple[int, int]], cut: float, max_heads: int) -> list[list[int]]:
    ranked = sorted(candidates, key=lambda h: -abs(float(table[h])))
    return [list(h) for h in ranked if abs(float(table[h])) >= cut][:max_heads]


def _strongest(tables: dict[str, Tensor]) -> Tensor:
    """Per head, the effect through whichever input (q, k or v) carries the most (signed)."""
    stacked = torch.stack(list(tables.values()))
    return stacked.gather(0, stacked.abs().argmax(0, keepdim=True))[0]


def run(
    forward: Forward,
    data: Sequence[IOIBatch] | IOIBatch,
    threshold: float = 0.1,
    max_heads: int = 4,
    edge_min: float = 0.05,
    inputs: Sequence[str] = ("q", "k", "v"),
) -> CircuitResult:
    """Find name movers, the heads steering their queries, and the heads those read (see the module docstring)."""
    batches = [data] if isinstance(data, IOIBatch) else list(data)
    model = forward.model
    L, H = model.cfg.n_layers, model.cfg.n_heads
    z_names = [act_name("z", l) for l in range(L)]
    runs, cleans, donors = [], [], []
    for b in batches:
        logits, clean_cache = forward.run(b.tokens, cache=clean_names(model))
        donor_logits, donor_cache = forward.run(b.donor_tokens, cache=z_names)
        clean_ld = logit_diff(logits, b.correct, b.wrong)
        runs.append((clean_cache, donor_cache, clean_ld))
        cleans.append(clean_ld)
        donors.append(logit_diff(donor_logits, b.correct, b.wrong))
    clean, donor = torch.cat(cleans), torch.cat(donors)
    cut = threshold * abs(float((clean - donor).mean()))
    heads: dict[str, list] = {}
    edges: list[dict] = []

    def mean(senders, receivers) -> Tensor:
        return _mean_effect(forward, batches, senders, receivers, runs)

    def inputs_of(receivers_of: Sequence[Sequence[int]], kind: str) -> list[tuple[int, int, str]]:
        """The receivers' ``kind`` inputs; under grouped-query attention a key/value input belongs to the shared
        key/value head of the receiver (`lens.kv_head_of`), so two receivers may share it."""
        head_of = (lambda h: lens.kv_head_of(model.cfg, h)) if kind in ("k", "v") else (lambda h: h)  # noqa: E731
        return list(dict.fromkeys((l, head_of(h), kind) for l, h in receivers_of))

    direct = mean(all_heads(model), "logits").reshape(L, H)
    heads["name mover"] = _select(direct, all_heads(model), cut, max_heads)
    edges += [
        {"sender": h, "receiver": "logits", "input": "direct", "effect": float(direct[h[0], h[1]])}
        for h in heads["name mover"]
    ]

    def level(receivers_of: list[list[int]], kinds: Sequence[str]) -> tuple[dict[str, Tensor], list[tuple[int, int]]]:
        """Every head below the receivers → their ``kind`` inputs together; the candidates (heads below the top
        receiver)."""
        below = all_heads(model, below=max(l for l, _ in receivers_of))
        tables = {}
        for kind in kinds:
            t = torch.zeros(L, H)
            if below:
                t.view(-1)[: len(below)] = mean(below, inputs_of(receivers_of, kind))
            tables[kind] = t
        return tables, [tuple(h) for h in below]

    def draw_edges(senders: list[list[int]], receivers_of: list[list[int]], kind: str) -> None:
        for r in receivers_of:
            below = [s for s in senders if s[0] < r[0]]
            if not below:
                continue
            effects = mean([tuple(s) for s in below], inputs_of([r], kind))
            edges.extend(
                {"sender": s, "receiver": r, "input": kind, "effect": float(e)}
                for s, e in zip(below, effects)
                if abs(float(e)) >= edge_min
            )

    steer: dict[str, Tensor] = {}
    read: dict[str, Tensor] = {}
    if heads["name mover"] and max(l for l, _ in heads["name mover"]) > 0:
        steer, below = level(heads["name mover"], inputs)
        heads["steering"] = _select(_strongest(steer), below, cut, max_heads)
        for kind in inputs:
            draw_edges(heads["steering"], heads["name mover"], kind)
        if heads["steering"] and max(l for l, _ in heads["steering"]) > 0:
            read, below = level(heads["steering"], inputs)
            heads["source"] = _select(_strongest(read), below, cut, max_heads)
            for kind in inputs:
                draw_edges(heads["source"], heads["steering"], kind)
    return CircuitResult(
        info=run_info(forward, batches),
        clean=clean,
        donor=donor,
        direct=direct,
        steer=steer,
        read=read,
        heads=heads,
        edges=edges,
        settings={
            "threshold": threshold,
            "cut_nats": cut,
            "max_heads": max_heads,
            "edge_min": edge_min,
            "inputs": list(inputs),
            "mlps": "recompute",
        },
    )


# --- the figure: a layered graph, every edge and label readable (`tl_patching.graph_layout` has the geometry) ---

NODE_DIAMETER = {"other": 8, "level": 18, "logits": 20}  # marker sizes (px)


def _colour_position(v: float) -> float:
    """Where on `plotting.DIVERGING` an effect of ``v`` × the largest one sits: the faint middle of the scale is
    skipped (|v| → 0.15 … 0.5 from the centre), so the weakest edge drawn is still visible on white."""
    return 0.5 + math.copysign(0.15 + 0.35 * min(abs(v), 1.0), v) if v else 0.5


def edge_colour(effect: float, scale: float) -> str:
    """The page's convention (E5's heatmap): negative = blue = lowers the logit difference, positive = red."""
    return sample_colorscale(DIVERGING, [_colour_position(effect / scale)])[0]


def circuit_figure(result: CircuitResult) -> go.Figure:
    """The circuit as a layered graph: heads placed by layer (x) and head index (y), the logits on the right; each
    edge a curve coloured by its path-patching effect (nats; blue = lowers the logit difference, as E5's heatmap),
    as wide as its size, labelled beside it. Fixed size (1000 px wide), so the layout holds in pixels."""
    L, H = result.info.n_layers, result.info.n_heads
    effects = [e["effect"] for e in result.edges] or [1.0]
    scale = max(abs(min(effects)), abs(max(effects)), 1e-6)
    canvas = Canvas(
        WIDTH, 230 + min(max(400, 64 * H), 900), dict(l=60, r=150, t=110, b=120), (-0.5, L + 0.5), (-0.8, H - 0.2)
    )
    level_of = {tuple(h): level for level in LEVELS for h in result.heads.get(level, [])}
    nodes = {
        (l, h): Node(
            canvas.px(l, h),
            NODE_DIAMETER["level" if (l, h) in level_of else "other"] / 2,
            f"{l}.{h}" if (l, h) in level_of else "",
        )
        for l in range(L)
        for h in range(H)
    }
    nodes["logits"] = Node(canvas.px(L, (H - 1) / 2), NODE_DIAMETER["logits"] / 2, "logits")
    key = lambda node: node if node == "logits" else tuple(node)  # noqa: E731
    edges = [
        Edge(
            (key(e["sender"]), key(e["receiver"])),
            width=1.5 + 4 * abs(e["effect"]) / scale,
            text=f"{e['effect']:+.2f}" + ("" if e["input"] == "direct" else f" ({e['input']})"),
            strength=abs(e["effect"]),
        )
        for e in result.edges
    ]
    paths, labels, node_labels = layout(nodes, edges, canvas)

    fig = go.Figure()
    dash = {"direct": "solid", "q": "solid", "k": "dot", "v": "dash"}
    for e, edge, path in zip(result.edges, edges, paths):
        x, y = canvas.data(path)
        fig.add_trace(
            go.Scatter(
                x=x,
                y=y,
                mode="lines",
                showlegend=False,
                hoverinfo="text",
                line=dict(color=edge_colour(e["effect"], scale), width=edge.width, dash=dash[e["input"]]),
                text=f"{e['sender']} → {e['receiver']} ({e['input']}): {e['effect']:+.3f} nats",
                meta="edge",  # what the tests measure
            )
        )
    others = [(l, h) for l in range(L) for h in range(H) if (l, h) not in level_of]
    fig.add_trace(
        go.Scatter(
            x=[l for l, _ in others],
            y=[h for _, h in others],
            mode="markers",
            name="other heads",
            marker=dict(color="lightgrey", size=NODE_DIAMETER["other"]),
            hoverinfo="skip",
        )
    )
    symbols = {"name mover": "circle", "steering": "diamond", "source": "square"}
    for level_name in LEVELS:
        hs = result.heads.get(level_name, [])
        if hs:
            fig.add_trace(
                go.Scatter(
                    x=[h[0] for h in hs],
                    y=[h[1] for h in hs],
                    mode="markers",
                    name=level_name,
                    hovertext=[f"layer {h[0]} head {h[1]}" for h in hs],
                    hoverinfo="text",
                    marker=dict(
                        size=NODE_DIAMETER["level"],
                        symbol=symbols[level_name],
                        color="white",
                        line=dict(width=2, color="black"),
                    ),
                )
            )
    fig.add_trace(
        go.Scatter(
            x=[L],
            y=[(H - 1) / 2],
            mode="markers",
            name="logits (IO − S)",
            marker=dict(size=NODE_DIAMETER["logits"], symbol="star", color="black"),
        )
    )
    # Labels are annotations: drawn above every line, on white. Edge labels framed in their edge's colour.
    for k, (e, edge, centre) in enumerate(zip(result.edges, edges, labels)):
        _label(fig, canvas, centre, edge.text, edge_colour(e["effect"], scale), f"edge {k}")
    for node_key, centre in node_labels.items():
        _label(fig, canvas, centre, nodes[node_key].text, None, f"node {nodes[node_key].text}")
    # The colour bar for the edges (an invisible marker trace carries it): the edges' own mapping, which jumps over
    # the faint middle at 0.
    stops = [i / 20 for i in range(21)]
    bar = [[p / 2, c] for p, c in zip(stops, sample_colorscale(DIVERGING, [_colour_position(p - 1) for p in stops]))]
    bar[-1][1] = sample_colorscale(DIVERGING, [_colour_position(-1e-9)])[0]
    bar += [[0.5 + p / 2, c] for p, c in zip(stops, sample_colorscale(DIVERGING, [_colour_position(p) for p in stops]))]
    bar[21][1] = sample_colorscale(DIVERGING, [_colour_position(1e-9)])[0]
    fig.add_trace(
        go.Scatter(
            x=[None],
            y=[None],
            mode="markers",
            showlegend=False,
            hoverinfo="skip",
            marker=dict(
                colorscale=bar,
                cmin=-scale,
                cmax=scale,
                color=[0],
                showscale=True,
                colorbar=dict(title="path effect<br>(nats)", x=1.02, len=0.9),
            ),
        )
    )
    fig.update_layout(
        title=titled(
            f"IOI circuit of {result.info.model_name}, found by exact path patching ({len(result.clean)} prompts)",
            "edge = change in logit difference (nats) when the donor's head output travels that path alone: "
            f"{NEGATIVE_COLOUR} = lowers it, {POSITIVE_COLOUR} = raises it<br>line: solid = to the logits or a "
            "query, dashed = to a value, dotted = to a key; width ∝ |effect|",
        ),
        xaxis=dict(
            title="layer",
            tickvals=list(range(L)) + [L],
            ticktext=[str(l) for l in range(L)] + ["out"],
            range=list(canvas.xrange),
            showgrid=False,
            zeroline=False,
        ),
        yaxis=dict(title="head", tickvals=list(range(H)), range=list(canvas.yrange), showgrid=False, zeroline=False),
        width=canvas.width,
        height=canvas.height,
        margin=dict(**canvas.margin, autoexpand=False),
        legend=dict(orientation="h", x=0, y=-0.12, yanchor="top"),
        template="plotly_white",
    )
    return fig


def _label(fig: go.Figure, canvas: Canvas, centre, text: str, frame: str | None, name: str) -> None:
    (x,), (y,) = canvas.data(centre[None])
    fig.add_annotation(
        x=x,
        y=y,
        text=text,
        name=name,
        showarrow=False,
        font=dict(size=FONT, color="black"),
        bgcolor="white",
        bordercolor=frame or "white",
        borderwidth=LABEL_BORDER,
        borderpad=LABEL_PAD,
    )


def canvas_of(fig: go.Figure) -> Canvas:
    """The `Canvas` a figure drawn by `circuit_figure` is laid out on, read back from its layout."""
    m = fig.layout.margin
    return Canvas(
        fig.layout.width,
        fig.layout.height,
        dict(l=m.l, r=m.r, t=m.t, b=m.b),
        tuple(fig.layout.xaxis.range),
        tuple(fig.layout.yaxis.range),
    )
