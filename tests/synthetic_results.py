"""E1–E5 and edge-attribution results with made-up, seeded numbers (no model run), for the figure and report tests."""

from __future__ import annotations

import math

import torch

from tl_patching.experiments.e1_attention_scores import E1Result
from tl_patching.experiments.e2_activation_editing import E2Result, Intervention
from tl_patching.experiments.e3_cosine_similarity import E3Result
from tl_patching.experiments.e4_ioi_patching import E4Result
from tl_patching.experiments.e5_head_token_patching import E5Result
from tl_patching.experiments.ioi_edges import EdgesResult
from tl_patching.results import RunInfo

L, H, N = 4, 4, 24  # layers, heads, prompts


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def info(model_name: str = "shipped", n_layers: int = L, n_heads: int = H, **settings) -> RunInfo:
    return RunInfo(
        model_name=model_name,
        weight_mode="raw",
        n_layers=n_layers,
        n_heads=n_heads,
        token_ids=[[0, 5, 6, 7, 8, 9]],
        prepend_bos=True,
        settings=settings,
        start_token="<|endoftext|>",
        start_token_convention=True,
    )


def e1(model_name: str = "shipped") -> E1Result:
    grid = torch.linspace(-6, 6, 60)
    centres = torch.tensor([-0.2, -0.6, -0.3, 0.1])
    widths = torch.tensor([0.6, 1.2, 1.5, 2.0])
    density = torch.stack(
        [torch.exp(-(((grid - c) / w) ** 2) / 2) / (w * math.sqrt(2 * math.pi)) for c, w in zip(centres, widths)]
    )
    return E1Result(
        info=info(model_name, text="Sam and Sally went to the park."),
        mean_score=torch.randn(L, H, generator=gen(1)) * 0.5,
        frac_negative=0.5 + 0.1 * torch.rand(L, H, generator=gen(2)),
        first_token_self_attention=torch.ones(L, H),
        kde_grid=grid,
        kde_density=density,
        max_diff_split_vs_hook=9.5e-7,
    )


def e2(model_name: str = "shipped") -> E2Result:
    clean = torch.tensor([2.0, 3.0, 6.0, 10.0])

    def edited(label, std, top):
        return Intervention(
            label, torch.tensor(std), [top, " Sam"], [0.7, 0.2], clean_top1_prob=0.5, kl_from_clean=0.25
        )

    return E2Result(
        info=info(model_name, text="Sam and Sally went to the park. Sam gave a gift to", noise_mean=10.0),
        layer=2,
        head=2,
        clean_resid_std=clean,
        clean_top_tokens=[" Sally", " Sam"],
        clean_top_probs=[0.9, 0.05],
        interventions=[
            edited("zero key of head 2, layer 2", [2.0, 3.0, 6.0, 10.0], " Sally"),
            edited("even MLP neurons → N(10, 1), layer 2", [2.0, 3.0, 25.0, 24.0], " and"),
            edited("block 2 output × 0.1", [2.0, 3.0, 0.6, 5.6], " were"),
            edited("block 2 output × 10", [2.0, 3.0, 60.0, 61.0], " Sally"),
        ],
    )


def e3(model_name: str = "shipped") -> E3Result:
    pairs = 6  # M = 4 tokens
    clean = torch.tensor([0.35, 0.3, 0.2, 0.05])[:, None] + 0.05 * torch.randn(L, pairs, generator=gen(3))
    silenced = clean - torch.tensor([0.04, 0.05, 0.01, 0.0])[:, None]
    p = torch.tensor([1e-5, 1e-6, 0.2, 1.0], dtype=torch.float64)
    return E3Result(
        info=info(model_name, text="I think that pineapple on pizza is a crime."),
        layer=0,
        head=0,
        n_pairs=pairs,
        clean_pairs=clean,
        silenced_pairs=silenced,
        t_statistic=torch.tensor([5.0, 6.0, 1.0, 0.0]),
        p_value=p,
        threshold=0.05 / L,
        significant=[bool(x < 0.05 / L) for x in p],
    )


def e4(model_name: str = "shipped", n: int = N) -> E4Result:
    clean = 9.0 + torch.randn(n, generator=gen(4))
    donor = -9.0 + torch.randn(n, generator=gen(5))
    # A few prompts very confident: an arithmetic mean of exp(logit diff) would be dominated by them.
    heads = torch.tensor([-7.0, 3.0, 2.0, 4.0])[:, None] + 3 * torch.randn(L, n, generator=gen(6))
    heads[2, :3] = 12.0
    s2 = torch.tensor([4.5, 4.5, 9.0, 9.0])[:, None] + torch.randn(L, n, generator=gen(7))
    final = torch.tensor([10.0, 5.0, -4.0, -9.0])[:, None] + torch.randn(L, n, generator=gen(8))
    texts = ["Sam and Sally went to the park. Sam gave a gift to"]
    return E4Result.of(info(model_name, n_prompts=n, texts=texts), clean, donor, heads, s2, final)


def e5(model_name: str = "shipped", n_layers: int = L, n_heads: int = H) -> E5Result:
    effect = 0.2 * torch.randn(n_layers, n_heads, N, generator=gen(9))
    effect[2, 1] -= 7.0  # the largest fall
    effect[0, 1] += 0.5
    return E5Result(
        info=info(
            model_name, n_layers, n_heads, n_prompts=N, texts=["Sam and Sally went to the park. Sam gave a gift to"]
        ),
        clean=9.0 + torch.randn(N, generator=gen(10)),
        effect=effect,
        method="fast",
    )


def edges(model_name: str = "shipped", largest: float = -2.0) -> EdgesResult:
    """4 senders × 5 receivers, all 20 edges; exact effects −0.1 … −2.0 nats (the last, m0->logits, the largest,
    set by ``largest``). EAP ranks them backwards (recall@1 0, Spearman −1), EAP-IG (inputs) exactly (1, 1), EAP-IG
    (activations) with the top two swapped (0, 1 − 6·2/(20·399))."""
    exact = -torch.arange(1, 21, dtype=torch.float32) / 10
    exact[-1] = largest
    swapped = exact.clone()
    swapped[[18, 19]] = exact[[19, 18]]
    scores = {"exact": exact, "eap": exact.flip(0), "eap-ig-inputs": 2 * exact, "eap-ig-activations": swapped}
    senders, receivers = ["input", "a0.h0", "a0.h1", "m0"], ["a1.h0<q>", "a1.h0<k>", "a1.h0<v>", "m1", "logits"]
    order = exact.abs().argsort(descending=True).tolist()
    f = {m: [0.5, 0.8, 1.0] for m in scores}
    f["eap"] = [0.0, 0.2, 1.0]
    return EdgesResult(
        info=info(model_name, n_prompts=N, texts=["Sam and Sally went to the park. Sam gave a gift to"]),
        senders=senders,
        receivers=receivers,
        scores={m: s.reshape(4, 5) for m, s in scores.items()},
        sizes=[0.1, 0.5, 1.0],
        f=f,
        kept={m: [2, 10, 20] for m in scores},
        full=9.0,
        empty=-1.0,
        top=[
            {"edge": f"{senders[i // 5]}->{receivers[i % 5]}", **{m: float(s[i]) for m, s in scores.items()}}
            for i in order
        ],
    )


ALL = {"e1": e1, "e2": e2, "e3": e3, "e4": e4, "e5": e5, "edges": edges}
