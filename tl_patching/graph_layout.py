"""Drawing a graph on a grid so that every edge and every label can be read (the circuit figure's geometry).

Nodes on a grid (heads on a layer × head grid) make straight edges overlap (0.3 → 1.3 is a piece of 0.3 → 3.3) and
pass over nodes they do not touch (0.1 → 2.1 over 1.1). Each edge is therefore a quadratic curve bowed by its own
offset: the smallest that keeps it clear of every node it does not touch and off the edges drawn before it
(strongest edges first, so they stay straight where they can; two edges joining the same nodes bulge apart). Each
label then sits beside its own line, on white, where no other line, node or label is, and never where another line
is as near as its own; where there is no such place the edge is bowed again, and failing that the label sits on
its own line.
Everything is measured in pixels: the figure has a fixed size and fixed margins, so data coordinates map to pixels
exactly (`Canvas`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FONT = 13  # edge and node labels (px)
LABEL_PAD, LABEL_BORDER = 2, 1  # plotly's annotation borderpad and borderwidth (px)
NODE_ROOM = 8  # px between a line's edge and the edge of a node it does not touch
LABEL_ROOM = 4  # px between a label and any line but its own, which runs LABEL_ROOM / 2 px from it
APART = 10  # two edges closer than this (px, between their edges) and within 20° of each other run over each
MAX_SHARED = 12  # other when they do so for longer than this (px); a crossing does not
TWINS_APART = 36  # px between the middles of two edges joining the same two nodes (a label fits between them)
BOWS = [0.0] + [sign * k * 8.0 for k in range(1, 31) for sign in (1, -1)]  # how far (px) a curve's middle bulges
ALONG = sorted((k / 40 for k in range(4, 37)), key=lambda t: abs(t - 0.5))  # label positions, the middle first


@dataclass(frozen=True)
class Canvas:
    """Pixel geometry of a figure with a fixed size and margins (plotly's ``margin.autoexpand`` off)."""

    width: int
    height: int
    margin: dict[str, int]  # l, r, t, b
    xrange: tuple[float, float]
    yrange: tuple[float, float]

    def _plot(self) -> tuple[float, float]:
        m = self.margin
        return self.width - m["l"] - m["r"], self.height - m["t"] - m["b"]

    def px(self, x, y) -> np.ndarray:
        """Data coordinates → pixels (origin top left), ``[..., 2]``."""
        (w, h), m = self._plot(), self.margin
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        return np.stack(
            [
                m["l"] + (x - self.xrange[0]) / (self.xrange[1] - self.xrange[0]) * w,
                m["t"] + (self.yrange[1] - y) / (self.yrange[1] - self.yrange[0]) * h,
            ],
            -1,
        )

    def data(self, p: np.ndarray) -> tuple[list[float], list[float]]:
        """Pixels → data coordinates (x list, y list)."""
        (w, h), m = self._plot(), self.margin
        x = self.xrange[0] + (p[..., 0] - m["l"]) / w * (self.xrange[1] - self.xrange[0])
        y = self.yrange[1] - (p[..., 1] - m["t"]) / h * (self.yrange[1] - self.yrange[0])
        return x.tolist(), y.tolist()

    def inside(self, p: np.ndarray, pad: float = 0.0) -> bool:
        m = self.margin
        x, y = p[..., 0], p[..., 1]
        return bool(
            ((x >= m["l"] + pad) & (x <= self.width - m["r"] - pad)).all()
            and ((y >= m["t"] + pad) & (y <= self.height - m["b"] - pad)).all()
        )


@dataclass
class Node:
    px: np.ndarray  # centre (px)
    radius: float  # marker radius (px)
    text: str = ""  # its label ("2.1"), placed by `layout`


@dataclass
class Edge:
    ends: tuple  # (sender key, receiver key) into the nodes
    width: float  # line width (px)
    text: str  # its label
    strength: float  # the order of placement: strongest first


def bezier(p0: np.ndarray, p2: np.ndarray, bow: float, n: int = 41) -> np.ndarray:
    """``n`` points of the quadratic curve from ``p0`` to ``p2`` (px) whose middle bulges ``bow`` px to the chord's
    left (its control point twice as far); bow 0 is the straight line."""
    chord = p2 - p0
    left = np.array([chord[1], -chord[0]]) / max(float(np.linalg.norm(chord)), 1e-12)
    control = (p0 + p2) / 2 + 2 * bow * left
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * control + t**2 * p2


def nearest_on_path(points: np.ndarray, path: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each point ``[n, 2]``: its distance (px) to the polyline ``path`` ``[m, 2]`` and the unit direction of
    the segment it is nearest to."""
    a, ab = path[:-1], path[1:] - path[:-1]
    t = np.clip(((points[:, None] - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0, 1)
    distances = np.linalg.norm(points[:, None] - (a + t[..., None] * ab), axis=-1)
    segment = distances.argmin(-1)
    direction = ab[segment] / np.maximum(np.linalg.norm(ab[segment], axis=-1, keepdims=True), 1e-12)
    return distances.min(-1), direction


def shared_length(path: np.ndarray, other: np.ndarray, within: float, skip: list[tuple[np.ndarray, float]]) -> float:
    """The longest stretch (px) along which ``path`` runs over ``other``: within ``within`` px of it and at most 20°
    from its direction, outside the discs ``skip`` (centre, radius) around shared end nodes, where edges meet."""
    if (path.min(0) > other.max(0) + within).any() or (other.min(0) > path.max(0) + within).any():
        return 0.0  # their bounding boxes are apart: most pairs, at no cost
    distance, direction = nearest_on_path(path, other)
    steps = path[1:] - path[:-1]
    own = np.concatenate([steps[:1], steps])
    parallel = np.abs((own * direction).sum(-1)) > math.cos(math.radians(20)) * np.linalg.norm(own, axis=-1)
    close = (distance < within) & parallel
    for centre, radius in skip:
        close &= np.linalg.norm(path - centre, axis=-1) > radius
    if not close.any():
        return 0.0
    length = np.where(close[1:] & close[:-1], np.linalg.norm(steps, axis=-1), 0.0)
    total = np.cumsum(length)
    runs = total - np.maximum.accumulate(np.where(length == 0, total, 0.0))  # cumulative length since the last gap
    return float(runs.max())


def box_gap(centre: np.ndarray, half: np.ndarray, path: np.ndarray) -> float:
    """How far (px) the polyline ``path`` stays from the box (centre, half width/height), as the largest coordinate
    gap; negative: it enters the box. Midpoints are added so no sample step is longer than half the original."""
    points = np.concatenate([path, (path[1:] + path[:-1]) / 2])
    return float((np.abs(points - centre) - half).max(-1).min())


def label_size(text: str, font: int = FONT) -> np.ndarray:
    """A label's box (px): 0.62 em per character is at least the width of digits, signs, dots and parentheses in
    plotly's default font, so the box is never smaller than the drawn one."""
    frame = 2 * (LABEL_PAD + LABEL_BORDER)
    return np.array([0.62 * font * len(text) + frame, 1.3 * font + frame])


def layout(nodes: dict, edges: list[Edge], canvas: Canvas) -> tuple[list[np.ndarray], list[np.ndarray], dict]:
    """Per edge a curve (px points ``[n, 2]``) and its label's box centre (px); per labelled node its label's centre.

    1. Edges, strongest first: the first bow (smallest first) whose curve clears every node it does not touch by
       ``NODE_ROOM`` px, runs over no edge drawn before it and bulges ``TWINS_APART`` px from an edge joining the
       same nodes (where none does, the least bad).
    2. A node's label above it, else right, below or left: the first place no line or label covers.
    3. Edge labels, shortest edge first (`_place_label`). Where there is no free place, the edge is bowed again
       (among the bows step 1 allows, now also keeping off the labels placed); failing that, the least bad place.
    """
    markers = [(n.px, np.full(2, n.radius)) for n in nodes.values()]
    paths: list[np.ndarray | None] = [None] * len(edges)
    for i in sorted(range(len(edges)), key=lambda i: -edges[i].strength):
        best = None
        for path in _bows(i, nodes, edges):
            cost = _path_cost(i, path, nodes, edges, paths, canvas, [], math.inf if best is None else best[0])
            if best is None or cost < best[0]:
                best = (cost, path)
            if cost == 0:
                break
        paths[i] = best[1]
    placed: list[tuple[np.ndarray, np.ndarray]] = []  # label boxes (centre, half size)
    node_labels = {}
    lines = _Lines.of(list(zip(paths, (e.width for e in edges))))
    for key, node in nodes.items():
        if node.text:
            half = label_size(node.text) / 2
            spots = [node.px + d * (node.radius + 1 + (np.abs(d) * half).sum()) for d in _SIDES]
            boxes = _Boxes.of([b for b in markers + placed if not np.array_equal(b[0], node.px)])  # not its own marker
            free = [c for c in spots if _label_cost(c, half, lines, boxes, canvas) == 0]
            node_labels[key] = (free or spots)[0]
            placed.append((node_labels[key], half))
    labels: list[np.ndarray | None] = [None] * len(edges)
    # The shortest edges first: they have the fewest places for a label.
    for i in sorted(range(len(edges)), key=lambda i: float(np.linalg.norm(np.diff(paths[i], axis=0), axis=-1).sum())):
        half = label_size(edges[i].text) / 2
        centre, cost = _place_label(i, paths[i], half, paths, edges, markers + placed, canvas)
        for path in _bows(i, nodes, edges) if cost > 0 else ():
            if _path_cost(i, path, nodes, edges, paths, canvas, placed, limit=1e-9) == 0:
                moved, moved_cost = _place_label(i, path, half, paths, edges, markers + placed, canvas)
                if moved_cost < cost:
                    paths[i], centre, cost = path, moved, moved_cost
                if cost == 0:
                    break
        labels[i] = centre
        placed.append((centre, half))
    return paths, labels, node_labels


_SIDES = [np.array(d, dtype=float) for d in ((0, -1), (1, 0), (0, 1), (-1, 0))]  # above, right, below, left


def _bows(i: int, nodes: dict, edges: list[Edge]):
    """Edge ``i``'s candidate curves, straight first; a bulge at most 0.6 × the chord (no loops)."""
    a, b = (nodes[k].px for k in edges[i].ends)
    chord = float(np.linalg.norm(b - a))
    return (bezier(a, b, bow) for bow in BOWS if abs(bow) <= 0.6 * chord)


def _path_cost(i, path, nodes, edges, paths, canvas, labels, limit: float = math.inf) -> float:
    """How badly ``path`` (edge ``i``) breaks the rules (0: not at all): px of intrusion, 100 outside the plot.
    Stops counting at ``limit`` (the cheapest candidate so far); the cheap checks come first."""
    e = edges[i]
    cost = 0.0 if canvas.inside(path, pad=e.width / 2) else 100.0
    others = [n for k, n in nodes.items() if k not in e.ends]
    if others:
        centres, radii = np.stack([n.px for n in others]), np.array([n.radius for n in others])
        cost += float(np.clip(radii + e.width / 2 + NODE_ROOM - nearest_on_path(centres, path)[0], 0, None).sum())
    for centre, half in labels:  # through a label placed before
        cost += max(0.0, LABEL_ROOM + e.width / 2 - box_gap(centre, half, path))
    for j, other in enumerate(paths):
        if cost >= limit:
            return cost
        if other is not None and j != i and set(e.ends) == set(edges[j].ends):  # room for a label between them
            cost += max(0.0, TWINS_APART - float(np.linalg.norm(path[len(path) // 2] - other[len(other) // 2])))
        if other is not None and j != i:
            meet = [(nodes[k].px, nodes[k].radius + APART) for k in set(e.ends) & set(edges[j].ends)]
            shared = shared_length(path, other, APART + (e.width + edges[j].width) / 2, meet)
            cost += max(0.0, shared - MAX_SHARED)
    return cost


def _label_cost(centre, half, lines, obstacles, canvas) -> float:
    """How badly a label box breaks the rules (0: not at all): ``lines`` (`_Lines`) closer than ``LABEL_ROOM`` px,
    an overlapped obstacle box (`_Boxes`: nodes, labels), or out of the plot."""
    cost = 0.0 if canvas.inside(centre + half) and canvas.inside(centre - half) else 100.0
    if lines.points.size:
        gaps = (np.abs(lines.points - centre) - half).max(-1).min(-1)  # per line
        cost += float(np.clip(LABEL_ROOM + lines.widths / 2 - gaps, 0, None).sum())
    if obstacles.centres.size:
        cost += 10.0 * float((np.abs(obstacles.centres - centre) < obstacles.halves + half + 1).all(-1).sum())
    return cost


@dataclass
class _Lines:
    """Paths stacked for the label checks: points (midpoints added) ``[line, point, 2]`` and widths ``[line]``."""

    points: np.ndarray
    widths: np.ndarray

    @classmethod
    def of(cls, pairs: list[tuple[np.ndarray, float]]) -> _Lines:
        if not pairs:
            return cls(np.zeros((0, 0, 2)), np.zeros(0))
        points = np.stack([np.concatenate([p, (p[1:] + p[:-1]) / 2]) for p, _ in pairs])
        return cls(points, np.array([w for _, w in pairs], dtype=float))


@dataclass
class _Boxes:
    centres: np.ndarray  # [box, 2]
    halves: np.ndarray  # [box, 2]

    @classmethod
    def of(cls, boxes: list[tuple[np.ndarray, np.ndarray]]) -> _Boxes:
        if not boxes:
            return cls(np.zeros((0, 2)), np.zeros((0, 2)))
        return cls(np.stack([c for c, _ in boxes]), np.stack([h for _, h in boxes]))


def _place_label(i, path, half, paths, edges, obstacles, canvas) -> tuple[np.ndarray, float]:
    """The first spot beside ``path`` (edge ``i``; middle first, either side; ``LABEL_ROOM / 2`` px from the line's
    drawn edge, else 6 px further, else on the line) where its label fits: every other line ``LABEL_ROOM`` px
    away and further than its own (so the label is read as its own line's); else the least bad."""
    others = _Lines.of([(p, e.width) for j, (p, e) in enumerate(zip(paths, edges)) if j != i and p is not None])
    no_lines, boxes = _Lines.of([]), _Boxes.of(obstacles)
    width = edges[i].width
    best = None
    for offset in (LABEL_ROOM / 2, LABEL_ROOM / 2 + 6, None):  # None: on its own line, hiding a piece of it
        for t in ALONG:
            k = round(t * (len(path) - 1))
            tangent = path[min(k + 1, len(path) - 1)] - path[max(k - 1, 0)]
            normal = np.array([tangent[1], -tangent[0]]) / np.linalg.norm(tangent)
            for n in (normal, -normal) if offset is not None else (0 * normal,):
                centre = path[k] + n * ((np.abs(n) * half).sum() + width / 2 + (offset or 0))
                own = box_gap(centre, half, path) - width / 2
                cost = _label_cost(centre, half, no_lines, boxes, canvas) + (max(0.0, -own) if offset else 0.0)
                if others.points.size:
                    gaps = (np.abs(others.points - centre) - half).max(-1).min(-1) - others.widths / 2
                    cost += float(np.clip(max(LABEL_ROOM, own + 2) - gaps, 0, None).sum())
                    cost += 1000.0 * bool((gaps < own + 2).any())  # another line as near as its own: ambiguous
                if best is None or cost < best[1]:
                    best = (centre, cost)
                if cost == 0:
                    return best
    return best
