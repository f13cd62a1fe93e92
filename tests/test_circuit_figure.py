"""The circuit figure can be read: computed from the figure itself, in pixels, with plotly's own mapping of a figure
with fixed size and margins. No edge passes over a node it does not touch, no two edges are drawn over each other,
every label sits beside its own edge on white (≥ 12 px), and the colours follow the page's convention (E5's heatmap:
blue = lowers the logit difference). Before this, 0.3 → 1.3 (v) and 0.3 → 3.3 (v) shared a row, so "-0.88 (v)" read
as an edge 1.3 → 3.3, and 0.1 → 2.1 (k), (v) ran through the grey head 1.1, in red for negative effects."""

import re

import numpy as np
import pytest
import synthetic_results as synth
import torch

from tl_patching.circuit import CircuitResult, circuit_figure

# The shipped model's circuit over the main job's 50 prompts (the figure of issue 21), edges as `circuit.run` gave.
SHIPPED_EDGES = [
    ([2, 1], "logits", "direct", -7.3209),
    ([1, 3], "logits", "direct", -6.2525),
    ([3, 3], "logits", "direct", -4.9860),
    ([0, 1], [2, 1], "k", -1.2865),
    ([0, 3], [2, 1], "k", -0.0575),
    ([0, 1], [2, 1], "v", -1.7341),
    ([0, 3], [2, 1], "v", -1.3084),
    ([0, 1], [1, 3], "v", -3.8220),
    ([0, 3], [1, 3], "v", -0.9663),
    ([0, 1], [3, 3], "v", -4.1313),
    ([0, 3], [3, 3], "v", -0.8810),
]


def result(n_layers, n_heads, heads, edges) -> CircuitResult:
    return CircuitResult(
        info=synth.info(n_layers=n_layers, n_heads=n_heads, n_prompts=2),
        clean=torch.tensor([9.0, 9.5]),
        donor=torch.tensor([-9.0, -9.5]),
        direct=torch.zeros(n_layers, n_heads),
        heads=heads,
        edges=[{"sender": s, "receiver": r, "input": k, "effect": e} for s, r, k, e in edges],
        settings={"edge_min": 0.05},
    )


def shipped() -> CircuitResult:
    return result(4, 4, {"name mover": [[2, 1], [1, 3], [3, 3]], "steering": [[0, 1], [0, 3]]}, SHIPPED_EDGES)


def mixed() -> CircuitResult:
    """A larger made-up circuit with both signs, three levels and every input kind: 6 layers × 6 heads."""
    g = np.random.default_rng(3)
    movers, steering, sources = [[5, 2], [4, 4], [5, 5]], [[3, 1], [3, 4]], [[1, 0], [2, 3]]
    edges = [(m, "logits", "direct", float(g.choice([-1, 1]) * g.uniform(0.5, 3))) for m in movers]
    for receivers, senders in ((movers, steering), (steering, sources)):
        for r in receivers:
            for s in senders:
                for k in "qkv":
                    if g.random() < 0.4:
                        edges.append((s, r, k, float(g.choice([-1, 1]) * g.uniform(0.05, 2))))
    return result(6, 6, {"name mover": movers, "steering": steering, "source": sources}, edges)


# --- the figure, measured: plotly's data → pixel mapping for fixed width, height and margins (autoexpand off) ---


def to_px(fig, x, y) -> np.ndarray:
    lay = fig.layout
    assert lay.margin.autoexpand is False and lay.width and lay.height  # otherwise plotly may move the plot area
    w, h = lay.width - lay.margin.l - lay.margin.r, lay.height - lay.margin.t - lay.margin.b
    (x0, x1), (y0, y1) = lay.xaxis.range, lay.yaxis.range
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    return np.stack([lay.margin.l + (x - x0) / (x1 - x0) * w, lay.margin.t + (y1 - y) / (y1 - y0) * h], -1)


def distance(point: np.ndarray, path: np.ndarray) -> float:
    """From a point to a polyline (px)."""
    a, b = path[:-1], path[1:]
    t = np.clip(((point - a) * (b - a)).sum(-1) / np.maximum(((b - a) ** 2).sum(-1), 1e-12), 0, 1)
    return float(np.linalg.norm(point - (a + t[:, None] * (b - a)), axis=-1).min())


def dense(path: np.ndarray, step: float = 1.0) -> np.ndarray:
    """The polyline resampled every ``step`` px."""
    out = [path[0]]
    for a, b in zip(path[:-1], path[1:]):
        n = max(1, int(np.ceil(np.linalg.norm(b - a) / step)))
        out += [a + (b - a) * k / n for k in range(1, n + 1)]
    return np.array(out)


def drawn(fig):
    """Nodes (centre, radius, name) and edges (points, width, colour, its two nodes) as drawn."""
    nodes = []
    for t in fig.data:
        if t.mode and "markers" in t.mode and t.x and t.x[0] is not None:
            for x, y in zip(t.x, t.y):
                nodes.append((to_px(fig, x, y), t.marker.size / 2, (x, y)))
    edges = []
    for t in fig.data:
        if t.meta == "edge":
            path = to_px(fig, t.x, t.y)
            ends = [min(range(len(nodes)), key=lambda n: np.linalg.norm(nodes[n][0] - p)) for p in (path[0], path[-1])]
            assert all(np.linalg.norm(nodes[n][0] - p) < 0.5 for n, p in zip(ends, (path[0], path[-1])))  # at a node
            edges.append((path, t.line.width, t.line.color, ends, t.text))
    return nodes, edges


def label_box(fig, a) -> tuple[np.ndarray, np.ndarray]:
    """An annotation's box (centre, half size) in px: 0.6 em per character (plotly's font: digits are 0.55 em)."""
    size = a.font.size
    half = np.array([0.6 * size * len(a.text), 1.2 * size]) / 2 + a.borderpad + a.borderwidth
    return to_px(fig, a.x, a.y), half


def gap(centre, half, path) -> float:
    """How far a polyline stays outside a box (px; negative: it enters)."""
    return float((np.abs(dense(path) - centre) - half).max(-1).min())


def over_nodes(fig) -> list[tuple[str, tuple]]:
    """(edge, node) for every edge passing within the node's radius (+ half its width + 2 px) of a node it does not
    touch."""
    nodes, edges = drawn(fig)
    return [
        (name, where)
        for path, width, _, ends, name in edges
        for n, (centre, radius, where) in enumerate(nodes)
        if n not in ends and distance(centre, path) < radius + width / 2 + 2
    ]


def drawn_over_each_other(fig) -> list[tuple[str, str]]:
    """Pairs of edges where one runs within touching distance (+2 px) of the other along more than 50 px, away from
    the nodes they share. A crossing is much shorter: two 5.5 px lines crossing at 20° touch over 44 px."""
    nodes, edges = drawn(fig)
    out = []
    for i, (a, wa, _, ends_a, name_a) in enumerate(edges):
        for b, wb, _, ends_b, name_b in edges[i + 1 :]:
            points = dense(a)  # 1 px apart
            close = np.array([distance(p, b) < (wa + wb) / 2 + 2 for p in points])
            for n in set(ends_a) & set(ends_b):
                close &= np.linalg.norm(points - nodes[n][0], axis=-1) > nodes[n][1] + 12
            longest = run = 0
            for c in close:
                run = run + 1 if c else 0
                longest = max(longest, run)
            if longest > 50:
                out.append((name_a, name_b))
    return out


@pytest.fixture(scope="module", params=["shipped", "mixed"])
def figure(request):
    r = shipped() if request.param == "shipped" else mixed()
    return r, circuit_figure(r)


def test_no_edge_passes_over_a_node_it_does_not_touch(figure):
    r, fig = figure
    nodes, edges = drawn(fig)
    assert len(edges) == len(r.edges) and len(nodes) == r.info.n_layers * r.info.n_heads + 1
    assert over_nodes(fig) == []


def test_no_two_edges_are_drawn_over_each_other(figure):
    assert drawn_over_each_other(figure[1]) == []


def test_straight_edges_fail_both_measures():
    """The measures catch what the issue saw: drawn straight, 0.3 → 1.3 (v) lies on 0.3 → 3.3 (v) and 0.1 → 2.1
    (k, v) run through head 1.1."""
    fig = circuit_figure(shipped())
    for t in fig.data:
        if t.meta == "edge":
            t.x, t.y = (t.x[0], t.x[-1]), (t.y[0], t.y[-1])
    assert ("[0, 1] → [2, 1] (k): -1.286 nats", (1, 1)) in over_nodes(fig)
    assert ("[0, 1] → [2, 1] (v): -1.734 nats", (1, 1)) in over_nodes(fig)
    assert ("[0, 3] → [1, 3] (v): -0.966 nats", "[0, 3] → [3, 3] (v): -0.881 nats") in drawn_over_each_other(fig)


def test_labels_are_readable_beside_their_own_edge(figure):
    """Each edge label: ≥ 12 px on white, framed in its edge's colour, above every line (an annotation), beside its
    own line (or, where the graph leaves no room beside it, on it) and nearer to it than to any other line, over no
    node and no other label. On the shipped circuit every other line stays ≥ 3 px off every label; the made-up one
    is crowded enough (five lines leave head 3.4; two of them join it to head 4.4, one layer on) that two labels,
    each on its own short line, are clipped by another line."""
    r, fig = figure
    crowded = r.info.n_layers == 6
    nodes, edges = drawn(fig)
    labels = {a.name: a for a in fig.layout.annotations}
    boxes = [label_box(fig, a) for a in fig.layout.annotations]
    on_its_line = touched = 0
    for k, (*_, colour, _, name) in enumerate(edges):
        a = labels[f"edge {k}"]
        e = r.edges[k]
        assert a.text == f"{e['effect']:+.2f}" + ("" if e["input"] == "direct" else f" ({e['input']})")
        assert a.font.size >= 12 and a.bgcolor == "white" and a.showarrow is False and a.bordercolor == colour
        centre, half = label_box(fig, a)
        gaps = [gap(centre, half, other) - w / 2 for other, w, *_ in edges]
        own = gaps.pop(k)
        assert own <= 10, (name, own)  # beside its line (≤ 10 px from it) or on it
        on_its_line += own < -1
        assert min(gaps, default=99) >= own + 2, (name, own, min(gaps))  # its own line is the nearest (or deepest)
        touched += min(gaps, default=99) < 3
        assert min(gaps, default=99) >= 3 or crowded, (name, min(gaps))  # clear of every other line
        for c, radius, where in nodes:
            assert (np.abs(c - centre) - half).max() >= radius - 1, (name, where)  # over no node marker
    assert on_its_line <= len(edges) // 4 and touched <= (2 if crowded else 0)  # beside, and clear, is the rule
    for i, (ci, hi) in enumerate(boxes):  # edge and node labels apart
        for cj, hj in boxes[i + 1 :]:
            assert (np.abs(ci - cj) - hi - hj).max() >= 0
    assert {a.name for a in fig.layout.annotations if a.name.startswith("node")} == {
        f"node {l}.{h}" for hs in r.heads.values() for l, h in hs
    } | {"node logits"}


def test_colours_follow_the_page_blue_lowers_the_logit_difference(figure):
    r, fig = figure
    _, edges = drawn(fig)

    def rgb(colour: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", colour)[:3])

    for (_, _, colour, _, name), e in zip(edges, r.edges):
        red, _, blue = rgb(colour)
        assert (blue > red + 40) if e["effect"] < 0 else (red > blue + 40), (name, colour)  # and never near white
    bar = next(t for t in fig.data if t.marker is not None and t.marker.showscale)
    low, high = rgb(bar.marker.colorscale[0][1]), rgb(bar.marker.colorscale[-1][1])
    assert low[2] > low[0] and high[0] > high[2] and bar.marker.cmin == -bar.marker.cmax < 0
    assert "blue = lowers it, red = raises it" in fig.layout.title.text
    if r.info.n_layers == 6:  # the made-up circuit: both branches above are taken
        assert {e["effect"] > 0 for e in r.edges} == {True, False}
