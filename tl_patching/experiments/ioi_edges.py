"""Edge attribution on IOI: the exact effect of every edge of the computational graph, EAP and EAP-IG's estimates of
it, and how faithful each method's circuits are over MIB's circuit sizes (`tl_patching.edges` has the methods and
their definitions; docs/circuits.md the formulas).

Over every batch of the main job's IOI prompts (one per token length): edge effects and scores are means over
prompts, weighted by batch size; a circuit's faithfulness uses the same weighted means of m(C), m(M) and m(∅).

TransformerLens hooks: ``hook_resid_pre`` of layer 0, ``blocks.l.attn.hook_z``, ``hook_attn_out``, ``hook_mlp_out``
(senders, read); the receivers' ``hook_q/k/v`` and ``hook_attn_out`` (written), on the layer engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import plotly.graph_objects as go
import torch
from scipy.stats import spearmanr
from torch import Tensor

from tl_patching import edges
from tl_patching.experiments.spec import Experiment, Option
from tl_patching.forward import Forward
from tl_patching.metrics import LogitDiff
from tl_patching.plotting import log_axis, reference_line, titled
from tl_patching.prompts import IOIBatch, run_info
from tl_patching.report.words import Claim
from tl_patching.results import Result

NAMES = {
    "exact": "exact",
    "eap": "EAP",
    "eap-ig-inputs": "EAP-IG (inputs)",
    "eap-ig-activations": "EAP-IG (activations)",
}
N_TOP = 20  # edges listed in the result, by |exact effect|
# Exact effects of every edge cost about one layer-engine pass per few edges: the shipped model's 479 edges take
# seconds, SmolLM2-135M's 70,651 about half an hour on this 2-core CPU. Above this, ask for it by --max-edges.
MAX_EDGES = 5000


@dataclass
class EdgesResult(Result):
    senders: list[str] = field(default_factory=list)
    receivers: list[str] = field(default_factory=list)
    scores: dict[str, Tensor] = field(default_factory=dict)  # "exact", "eap", …: [sender, receiver], nats
    sizes: list[float] = field(default_factory=list)  # circuit sizes, fractions of all edges
    f: dict[str, list[float]] = field(default_factory=dict)  # method -> faithfulness at each size
    kept: dict[str, list[int]] = field(default_factory=dict)  # method -> edges in each circuit after pruning
    full: float = 0.0  # m(M): the clean logit difference, nats
    empty: float = 0.0  # m(∅): every edge carrying the donor's sender output
    top: list[dict] = field(default_factory=list)  # {"edge", "exact", method: score}: the largest exact effects

    def curve(self, method: str) -> edges.Curve:
        return edges.Curve(self.sizes, self.kept[method], self.f[method])

    def recall(self, method: str, k: int) -> float:
        """The share of the k edges with the largest |exact effect| among the method's k largest |scores|."""
        exact, scores = self.scores["exact"].flatten(), self.scores[method].flatten()
        return len(set(exact.abs().topk(k).indices.tolist()) & set(scores.abs().topk(k).indices.tolist())) / k

    def spearman(self, method: str) -> float:
        edges_ = self.scores["exact"] != 0
        return float(spearmanr(self.scores[method][edges_].numpy(), self.scores["exact"][edges_].numpy()).statistic)

    @property
    def n_edges(self) -> int:
        return self.kept["exact"][-1]

    def reading(self) -> str:
        first = self.top[0] if self.top else {"edge": "none", "exact": 0.0}
        return f"{self.n_edges} edges; largest exact effect {first['edge']} ({first['exact']:+.2f} nats); " + "; ".join(
            f"{NAMES[m]}: CPR {self.curve(m).cpr:.2f}, CMD {self.curve(m).cmd:.2f}"
            + ("" if m == "exact" else f", recall@{self.k} {self.recall(m, self.k):.2f}")
            for m in self.scores
        )

    @property
    def n_prompts(self) -> int:
        return self.info.settings.get("n_prompts", len(self.info.token_ids))

    @property
    def k(self) -> int:
        return max(1, self.n_edges // 20)  # 5% of the edges


def run(
    forward: Forward,
    data: Sequence[IOIBatch],
    donor_cache=None,
    progress: bool = True,
    max_edges: int = MAX_EDGES,
) -> EdgesResult:
    """Every method over ``data`` (its donors are run here: no donor cache). A graph of more than ``max_edges``
    edges is refused (`NotImplementedError`: the main job notes it and goes on) rather than sampled: every number
    here is over all edges."""
    graph = edges.graph_of(forward)
    n = sum(len(b) for b in data)
    if graph.n_edges > max_edges:
        raise NotImplementedError(
            f"this model's graph has {graph.n_edges:,} edges, more than --max-edges {max_edges:,}: exact effects of "
            f"every edge would take about {graph.n_edges * n / 20_000:.0f} minutes at "
            "SmolLM2-135M's rate on a 2-core CPU (20,000 edge-prompts a minute); ask for them with "
            f"`tl-patching edges --max-edges {graph.n_edges}`"
        )
    weights = [len(b) / n for b in data]
    pairs = [(b.tokens, b.donor_tokens, LogitDiff(b.correct, b.wrong)) for b in data]
    scores = {"exact": sum(w * edges.exact_edges(forward, *p) for w, p in zip(weights, pairs))}
    for method in edges.METHODS:
        scores[method] = sum(w * edges.attribute(forward, *p, method) for w, p in zip(weights, pairs))
    sizes = list(edges.SIZES)
    circuits = {
        m: torch.stack([edges.top_edges(graph, s, int(x * graph.n_edges)) for x in sizes]) for m, s in scores.items()
    }
    everything = torch.cat(list(circuits.values()))
    parts = [edges.faithfulness(forward, *p, everything) for p in pairs]
    metric = sum(w * part.metric for w, part in zip(weights, parts))
    full, empty = (sum(w * getattr(part, k) for w, part in zip(weights, parts)) for k in ("full", "empty"))
    f = ((metric - empty) / (full - empty)).split(len(sizes))
    order = scores["exact"].abs().flatten().topk(min(N_TOP, graph.n_edges)).indices.tolist()
    top = []
    for i in order:
        s, r = divmod(i, len(graph.receivers))
        top.append({"edge": graph.name(s, r), **{m: float(v[s, r]) for m, v in scores.items()}})
    return EdgesResult(
        info=run_info(forward, data, sizes=sizes, ablation="donor (counterfactual)", ig_steps=edges.IG_STEPS),
        senders=graph.senders,
        receivers=graph.receivers,
        scores=scores,
        sizes=sizes,
        f={m: fm.tolist() for m, fm in zip(scores, f)},
        kept={m: c.flatten(1).sum(1).tolist() for m, c in circuits.items()},
        full=float(full),
        empty=float(empty),
        top=top,
    )


def smallest_faithful(r: EdgesResult, method: str, level: float = 0.8) -> int | None:
    """Edges in the smallest of the method's circuits with f ≥ ``level`` (None if none below the full model)."""
    for kept, f in zip(r.kept[method], r.f[method]):
        if f >= level and kept < r.n_edges:
            return kept
    return None


def finding(r: EdgesResult) -> tuple[str, list[Claim]]:
    """Which edges carry the answer, how well each estimate ranks them, and how small a faithful circuit is."""
    top = ", ".join(f"{e['edge']} ({e['exact']:+.2f})" for e in r.top[:5])
    methods = [m for m in r.scores if m != "exact"]
    text = (
        f"Exact edge effects over all {r.n_edges} edges (mean over {r.n_prompts} prompts; clean logit "
        f"difference {r.full:.2f} nats, every edge ablated {r.empty:.2f}). Largest, in nats: {top}. Against the "
        "exact effects: "
        + "; ".join(f"{NAMES[m]} recall@{r.k} {r.recall(m, r.k):.2f}, Spearman {r.spearman(m):.2f}" for m in methods)
        + ". Faithfulness of each method's top-edge circuits over sizes 0.1%–100% of the edges: "
        + "; ".join(f"{NAMES[m]} CPR {r.curve(m).cpr:.2f}, CMD {r.curve(m).cmd:.2f}" for m in r.scores)
        + "."
    )
    smallest = smallest_faithful(r, "exact")
    one_edge = abs(r.top[0]["exact"]) / abs(r.full - r.empty) if r.top and r.full != r.empty else 0.0
    claims = [
        Claim(
            "to get a large effect, find and patch a group of heads with the same function",
            "agrees" if smallest is not None and one_edge < 0.8 else "partly",
            (
                f"the largest single edge moves the logit difference by {one_edge:.0%} of the clean − ablated gap; "
                f"the smallest exact-ranked circuit with f ≥ 0.8 has "
                + (f"{smallest} of {r.n_edges} edges." if smallest is not None else "no size below the full model.")
            ),
        )
    ]
    return text, claims


def figures(r: EdgesResult) -> dict[str, go.Figure]:
    """The faithfulness curve of each method's circuits, with f = 1 (the full model) and f = 0 (every edge ablated)
    marked."""
    fig = go.Figure()
    for method in r.scores:
        curve = r.curve(method)
        fig.add_trace(
            go.Scatter(
                x=[100 * x for x in curve.sizes],
                y=curve.f,
                mode="lines+markers",
                name=f"{NAMES[method]} (CPR {curve.cpr:.2f}, CMD {curve.cmd:.2f})",
                customdata=curve.n_edges,
                hovertemplate="%{x:.1f}% of edges (%{customdata} kept): f = %{y:.2f}<extra></extra>",
            )
        )
    reference_line(fig, 1.0, f"1: the full model<br>({r.full:.2f} nats)", "green")
    reference_line(fig, 0.0, f"0: every edge ablated<br>({r.empty:.2f} nats)", "red")
    fig.update_layout(
        title=titled(
            f"Edges ({r.info.model_name}, {r.n_prompts} IOI prompts): faithfulness of each method's "
            f"top-edge circuits, {r.n_edges} edges",
            "f = (m(C) − m(∅)) / (m(M) − m(∅)), m = logit difference correct − wrong (nats); edges outside the circuit "
            "carry the donor's sender output; circuits pruned of dangling edges",
        ),
        xaxis=log_axis("circuit size (% of all edges, log scale)", [100 * x for x in r.sizes]),
        yaxis_title="faithfulness f",
        legend=dict(orientation="h", y=-0.2),
    )
    return {"edges_faithfulness": fig}


EXPERIMENT = Experiment(
    key="edges",
    title="Edge attribution — EAP and EAP-IG against exact edge effects, and faithfulness curves",
    seed="seed 000",
    seed_model="GPT-2 large",
    inputs="ioi",
    order=7,
    options=(Option("--max-edges", "int", "refuse graphs with more edges than this (default 5000)"),),
    max_prompts=50,  # exact edge effects and five-step EAP-IG: the slow part of the main job on a larger model
    run=run,
    result=EdgesResult,
    figures=figures,
    finding=finding,
)
