"""Edge attribution on the shipped model (IOI): how well EAP and EAP-IG rank the exact edge effects, the
faithfulness of each method's circuits (CPR, CMD), and each method's cost against the exact effects.

    python benchmarks/bench_edges.py [n_prompts]    # default 16: the largest batch of one token length is used

Lines: ``<name>: <ratio>x vs <reference>, max abs diff <d>`` (time ratios, measured side by side in one run), then a
table: recall@k (the share of the exact top-k edges by |effect| among the method's top-k by |score|, k = 1% and 5%
of the edges), Spearman's ρ (scipy) of score vs exact effect over all edges, CPR and CMD (`tl_patching.edges.Curve`)
of each method's circuits under counterfactual ablation, edges ranked by signed score (most negative first:
the edges that carry the clean run's logit difference).
"""

from __future__ import annotations

import sys
import time

import torch
from scipy.stats import spearmanr

from tl_patching import edges
from tl_patching.forward import load_forward
from tl_patching.metrics import LogitDiff
from tl_patching.prompts import ioi_dataset


def timed(f):
    start = time.perf_counter()
    out = f()
    return out, time.perf_counter() - start


def recall(scores, exact, k: int) -> float:
    want = set(exact.abs().topk(k).indices.tolist())
    return len(want & set(scores.abs().topk(k).indices.tolist())) / k


def main(n_prompts: int = 16) -> None:
    torch.manual_seed(0)
    forward = load_forward("shipped", "tl", "cpu", "float32", 1)
    batch = max(ioi_dataset(forward.model, n_prompts), key=len)
    tokens, donor, metric = batch.tokens, batch.donor_tokens, LogitDiff(batch.correct, batch.wrong)
    graph = edges.graph_of(forward)
    print(
        f"shipped model: {graph.n_layers} layers × {graph.n_heads} heads, {graph.n_edges} edges; {len(batch)} prompts"
    )
    exact, t_exact = timed(lambda: edges.exact_edges(forward, tokens, donor, metric))
    print(f"largest |exact edge effect|: {exact.abs().max():.3g} nats")
    results = {"exact": (exact, t_exact)}
    for method in edges.METHODS:
        results[method] = timed(lambda method=method: edges.attribute(forward, tokens, donor, metric, method))
    for method in edges.METHODS:
        scores, seconds = results[method]
        diff = (scores - exact)[graph.edges].abs().max().item()
        print(f"{method} over all edges: {t_exact / seconds:.1f}x vs exact edge effects, max abs diff {diff:.3g}")
    flat_exact = exact[graph.edges]
    print("| method | recall@1% | recall@5% | Spearman ρ | CPR | CMD | seconds |")
    print("|---|---|---|---|---|---|---|")
    for method, (scores, seconds) in results.items():
        flat = scores[graph.edges]
        k1, k5 = max(1, graph.n_edges // 100), max(1, graph.n_edges // 20)
        rho = spearmanr(flat.numpy(), flat_exact.numpy()).statistic
        curve = edges.curve(forward, tokens, donor, metric, scores)
        print(
            f"| {method} | {recall(flat, flat_exact, k1):.2f} | {recall(flat, flat_exact, k5):.2f} | {rho:.3f} | "
            f"{curve.cpr:.3f} | {curve.cmd:.3f} | {seconds:.1f} |"
        )
        print("  f:", " ".join(f"{f:.2f}" for f in curve.f), " edges kept:", curve.n_edges)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
