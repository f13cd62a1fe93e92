"""Edge attribution: the graph by hand, a planted circuit whose edges are known by construction, exact edge effects
against path patching and against faithfulness (two independent mechanisms), EAP against the gradient · difference
taken with TransformerLens's own per-head input hooks, and every enforced check tripped."""

import pytest
import torch

from tl_patching import edges, lens, path_patching
from tl_patching.forward import Forward
from tl_patching.metrics import LogitDiff
from tl_patching.testing import random_config, random_pair

FAMILIES = ["gpt2", "neox", "llama", "mistral", "qwen2", "qwen3"]  # every family whose head writes are linear


def prompts(batch: int = 3, length: int = 6, seed: int = 0):
    """Recipient tokens, donor tokens (position 2 changed, so runs agree on positions 0–1) and a logit difference."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 64, (batch, length), generator=g)
    donor = tokens.clone()
    donor[:, 2] = torch.randint(0, 64, (batch,), generator=g)
    metric = LogitDiff(torch.arange(1, batch + 1), torch.arange(batch + 1, 2 * batch + 1))
    return tokens, donor, metric


def both_backends(family: str, seed: int = 1, **kwargs):
    hf, tl = random_pair(family, n_layers=3, n_heads=4, seed=seed, **kwargs)
    return [Forward(tl), Forward(tl, hf)]


# --- the graph ----------------------------------------------------------------------------------------------------


def test_edge_counts_by_hand():
    # GPT-2 small: Σ_l 36·(1 + 13l) q/k/v edges + Σ_l (1 + 13l + 12) MLP edges + 157 logits edges
    assert edges.Graph(12, 12, 12, has_mlp=True, parallel=False).n_edges == 32491
    # 2 layers, 2 heads sharing 1 key/value head: senders input, a0.h0, a0.h1, m0, a1.h0, a1.h1, m1
    # q/k/v: layer 0 4 receivers × 1 sender, layer 1 4 × 4; MLP 0 reads 1 (+2 heads if sequential), MLP 1 4 (+2)
    assert edges.Graph(2, 2, 1, has_mlp=True, parallel=True).n_edges == 4 + 1 + 16 + 4 + 7
    assert edges.Graph(2, 2, 1, has_mlp=True, parallel=False).n_edges == 4 + 3 + 16 + 6 + 7
    graph = edges.Graph(2, 2, 1, has_mlp=False, parallel=False)
    assert graph.senders == ["input", "a0.h0", "a0.h1", "a1.h0", "a1.h1"]
    assert graph.receivers == ["a0.h0<q>", "a0.h1<q>", "a0.h0<k>", "a0.h0<v>"] + [
        "a1.h0<q>",
        "a1.h1<q>",
        "a1.h0<k>",
        "a1.h0<v>",
        "logits",
    ]
    assert graph.n_edges == 4 + 12 + 5


def test_pruning_drops_dangling_edges_until_none_is_left():
    graph = edges.Graph(2, 2, 2, has_mlp=False, parallel=False)
    circuit = torch.zeros_like(graph.edges)
    circuit[0, graph.receiver(1, "v", 0)] = True  # input -> a1.h0<v>: a1.h0 sends nothing on (dangling)
    circuit[graph.head(0, 1), graph.logits] = True  # a0.h1 -> logits: nothing feeds a0.h1 (dangling)
    circuit[0, graph.receiver(0, "q", 0)] = True  # input -> a0.h0<q> -> a0.h0 -> a1.h1<k> (-> nothing): all go
    circuit[graph.head(0, 0), graph.receiver(1, "k", 1)] = True
    assert not edges.prune(graph, circuit).any()
    circuit[graph.head(1, 1), graph.logits] = True  # now a1.h1 sends, and the chain through a0.h0 is whole
    kept = edges.prune(graph, circuit)
    assert sorted(graph.name(s, r) for s, r in kept.nonzero().tolist()) == [
        "a0.h0->a1.h1<k>",
        "a1.h1->logits",
        "input->a0.h0<q>",
    ]


def test_areas_by_trapezoid():
    curve = edges.Curve(sizes=[0.0, 0.5, 1.0], n_edges=[0, 5, 10], f=[0.0, 1.0, 1.0])
    assert curve.cpr == pytest.approx(0.75)  # 0.5·(0 + 1)/2 + 0.5·(1 + 1)/2
    assert curve.cmd == pytest.approx(0.25)
    with pytest.raises(ValueError, match="increasing"):
        edges.area([0.5, 0.1], [1, 1])


# --- a planted circuit ----------------------------------------------------------------------------------------------

A, B, X = 1, 2, 3  # "A X X" vs "B X X": the answer is the first token, copied by a1.h0 alone


def planted():
    """GPT-2 (2 layers, 2 heads of 4, d_model 8) whose only path from the first token to the answer is
    input -> a1.h0<v> -> a1.h0 -> logits: W_Q = W_K = 0 (uniform attention), every W_O zero but a1.h0's, MLPs write
    nothing, no biases, no positions. Token A is dims 0 and 4, B dims 1 and 5 (tied unembedding: the logit of A reads
    dims 0 and 4); a1.h0's value copies dims 0, 1 and its W_O writes them into 4, 5."""
    from transformers import AutoModelForCausalLM

    from tl_patching.models import hooked_from_hf

    config = random_config("gpt2", n_layers=2, n_heads=2, d_head=4, d_vocab=16)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(torch.ones_like(p) if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0 * p)
        wte = hf.transformer.wte.weight
        wte[:, 3] = wte[:, 7] = 1.0  # every other token
        for token, dims in ((A, (0, 4)), (B, (1, 5)), (X, (2, 6))):
            wte[token] = 0.0
            wte[token, list(dims)] = 1.0
        attn = hf.transformer.h[1].attn
        attn.c_attn.weight[0, 16 + 0] = attn.c_attn.weight[1, 16 + 1] = 1.0  # v of head 0: dims 0, 1
        attn.c_proj.weight[0, 4] = attn.c_proj.weight[1, 5] = 3.0  # W_O of head 0: into dims 4, 5
    tl = hooked_from_hf(hf, None, name="planted")
    tokens = torch.tensor([[A, X, X], [A, X, X]])
    donor = torch.tensor([[B, X, X], [B, X, X]])
    return hf, tl, tokens, donor, LogitDiff(torch.tensor([A, A]), torch.tensor([B, B]))


@pytest.mark.parametrize("backend", ["tl", "hf"])
def test_a_planted_circuit_is_found_by_every_method(backend):
    hf, tl, tokens, donor, metric = planted()
    forward = Forward(tl) if backend == "tl" else Forward(tl, hf)
    graph = edges.graph_of(forward)
    planted_edges = {"input->a1.h0<v>", "a1.h0->logits"}
    exact = edges.exact_edges(forward, tokens, donor, metric)
    scores = {method: edges.attribute(forward, tokens, donor, metric, method) for method in edges.METHODS}
    for name, values in {"exact": exact, **scores}.items():
        nonzero = {graph.name(s, r) for s, r in (values.abs() > 1e-6).nonzero().tolist()}
        assert nonzero == planted_edges, name
        assert (values[values.abs() > 1e-6] < -0.1).all(), name  # A -> B lowers the logit difference
    circuit = edges.top_edges(graph, exact, 2, absolute=True)
    assert {graph.name(s, r) for s, r in circuit.nonzero().tolist()} == planted_edges
    result = edges.faithfulness(forward, tokens, donor, metric, circuit[None])
    assert result.full > 0.5 and result.empty < -0.5
    assert result.f.item() == pytest.approx(1.0, abs=1e-5)
    # mean ablation (the mean over "A X X" and "B X X", each scored for its own answer): the same circuit is the whole
    # behaviour, and with every edge ablated a1.h0 reads the mean first token, which favours neither answer
    both = torch.tensor([[A, X, X], [B, X, X]])
    own = LogitDiff(torch.tensor([A, B]), torch.tensor([B, A]))
    mean = edges.faithfulness(forward, both, None, own, circuit[None])
    assert mean.full > 0.5 and mean.empty == pytest.approx(0.0, abs=1e-5)
    assert mean.f.item() == pytest.approx(1.0, abs=1e-5)
    # one edge of the two is no circuit: dangling, pruned, nothing is left, f = 0
    alone = edges.top_edges(graph, exact, 1, absolute=True)
    assert not alone.any()
    assert edges.faithfulness(forward, tokens, donor, metric, alone[None]).f.item() == pytest.approx(0.0, abs=1e-5)


# --- exact edge effects, two ways ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "neox", "llama"])
def test_exact_edges_equal_path_patching_with_frozen_mlps(family):
    """A head -> logits edge is path patching of that head with MLPs frozen; a head -> q/k/v edge too (every other
    head and MLP frozen, so the receiver's input moves by the sender's difference only). For each kind, the edge
    with the largest effect (so that float noise, ~3e-7 here, cannot decide)."""
    tokens, donor, metric = prompts()
    for forward in both_backends(family):
        graph = edges.graph_of(forward)
        exact = edges.exact_edges(forward, tokens, donor, metric)
        clean = path_patching.path_patch(forward, tokens, tokens, metric, senders=[(0, 0)]).mean()
        heads = [(l, h) for l in range(3) for h in range(graph.n_heads)]
        for kind in ("logits", "q", "k", "v"):
            n = graph.n_heads if kind == "q" else graph.n_kv_heads
            receivers = [graph.logits] if kind == "logits" else [graph.receiver(2, kind, h) for h in range(n)]
            candidates = [(l, h, r) for l, h in heads for r in receivers if graph.edges[graph.head(l, h), r]]
            l, h, r = max(candidates, key=lambda c: exact[graph.head(c[0], c[1]), c[2]].abs())
            target = "logits" if kind == "logits" else [(2, graph.receivers[r].split(".h")[1].split("<")[0], kind)]
            if kind != "logits":
                target = [(2, int(target[0][1]), kind)]
            want = path_patching.path_patch(forward, tokens, donor, metric, [(l, h)], target, "frozen").mean() - clean
            got = exact[graph.head(l, h), r].item()
            assert abs(got) > 1e-3, graph.name(graph.head(l, h), r)
            assert got == pytest.approx(want.item(), rel=1e-4, abs=1e-6), (
                forward.backend,
                graph.name(graph.head(l, h), r),
            )


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_edge_is_the_circuit_without_it(family):
    """The single-edge path (a receiver's own input moved, from its layer on) and the faithfulness run (every edge's
    Δ from this run's own senders, from layer 0) are separate code: the circuit of all edges but e under donor
    ablation must give exactly e's exact effect, for every kind of edge. Every family, both backends."""
    tokens, donor, metric = prompts()
    for forward in both_backends(family):
        graph = edges.graph_of(forward)
        exact = edges.exact_edges(forward, tokens, donor, metric)
        chosen = graph.edges.nonzero().tolist()[:: max(1, graph.n_edges // 40)]
        kinds = {graph.receivers[r].split("<")[-1][:1] if "<" in graph.receivers[r] else r for _, r in chosen}
        assert len(kinds) >= 4  # q, k, v and MLP / logits receivers among them
        circuits = graph.edges.repeat(len(chosen), 1, 1)
        for i, (s, r) in enumerate(chosen):
            circuits[i, s, r] = False
        result = edges.faithfulness(forward, tokens, donor, metric, circuits)
        want = torch.stack([exact[s, r] for s, r in chosen])
        assert want.abs().max() > 1e-3
        torch.testing.assert_close(result.metric - result.full, want, atol=2e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_eap_is_the_derivative_of_the_exact_effect(family):
    """EAP is the first-order term of the exact effect: with every sender's difference scaled by ε, the exact effect
    of each edge is ε · EAP + O(ε²). A central difference (±ε, ε = 0.01) of `exact_edges` checks every edge's
    gradient, of every kind, on every family and both backends, against the model's own layers run forward only;
    EAP-IG's points then all lie within ε/10 of the clean run, so both variants give EAP's scores too."""
    tokens, donor, metric = prompts()
    eps = 0.01
    real = edges._setup

    def scaled(factor):
        def setup(*args):
            s = real(*args)
            s.donor = s.clean + factor * (s.donor - s.clean)
            s.donor_z = [c + factor * (d - c) for c, d in zip(s.clean_z, s.donor_z)]
            return s

        return setup

    for forward in both_backends(family):
        graph = edges.graph_of(forward)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(edges, "_setup", scaled(eps))
            plus = edges.exact_edges(forward, tokens, donor, metric)
            mp.setattr(edges, "_setup", scaled(-eps))
            minus = edges.exact_edges(forward, tokens, donor, metric)
            # EAP-IG's gradients move by O(ε) (on random Llama ~20 × ε relative): a smaller ε for them
            mp.setattr(edges, "_setup", scaled(eps / 10))
            scores = {m: edges.attribute(forward, tokens, donor, metric, m) / (eps / 10) for m in edges.METHODS}
        derivative = (plus - minus) / (2 * eps)  # per unit of ε: the EAP score of the unscaled difference
        eap = edges.attribute(forward, tokens, donor, metric, "eap")
        scale = eap.abs().max()
        assert scale > 1e-2
        torch.testing.assert_close(derivative, eap, atol=2e-3 * scale, rtol=0)
        for method, values in scores.items():
            assert (values - eap).abs().max() <= 2e-2 * scale, (method, (values - eap).abs().max() / scale)
        assert (eap[~graph.edges] == 0).all()


# --- EAP against TransformerLens's own hooks ------------------------------------------------------------------------


@pytest.mark.tl3
@pytest.mark.parametrize("family", ["gpt2", "neox", "llama"])
def test_eap_is_the_gradient_at_transformerlens_per_head_inputs(family):
    """EAP by hand: TransformerLens's split inputs (``hook_q_input``/``hook_k_input``/``hook_v_input`` per head,
    ``hook_mlp_in``) and the final residual stream give ∂m/∂(receiver input) by plain autograd; the sender outputs
    come from a plain cache (z · W_O, ``hook_mlp_out``, ``hook_resid_pre`` of layer 0)."""
    tokens, donor, metric = prompts()
    _, model = random_pair(family, n_layers=3, n_heads=4, seed=1)
    forward = Forward(model)
    graph = edges.graph_of(forward)
    got = edges.attribute(forward, tokens, donor, metric, "eap")

    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.attn.hook_z" for l in range(3)]
    names += [f"blocks.{l}.hook_mlp_out" for l in range(3)]
    _, clean = model.run_with_cache(tokens, names_filter=names)
    _, other = model.run_with_cache(donor, names_filter=names)

    def outputs(cache):
        parts = [cache["blocks.0.hook_resid_pre"]]
        for l in range(3):
            parts += list(torch.einsum("bphk,hkd->hbpd", cache[f"blocks.{l}.attn.hook_z"], model.blocks[l].attn.W_O))
            parts.append(cache[f"blocks.{l}.hook_mlp_out"])
        return torch.stack(parts, 2)

    diff = outputs(other) - outputs(clean)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    try:
        inputs = {}

        def keep(act, hook):
            act.requires_grad_(True)
            act.retain_grad()
            inputs[hook.name] = act

        with model.hooks(fwd_hooks=[(lambda name: name.endswith(("_input", "mlp_in", "2.hook_resid_post")), keep)]):
            logits = model(tokens)
        metric(logits[:, -1]).mean().backward()
    finally:
        model.set_use_split_qkv_input(False)
        model.set_use_hook_mlp_in(False)
    want = torch.zeros_like(got)
    for l in range(3):
        for kind in "qkv":
            grad = inputs[f"blocks.{l}.hook_{kind}_input"].grad  # [batch, pos, head, d_model]
            n = graph.n_heads if kind == "q" else graph.n_kv_heads
            assert grad.shape[2] == n
            for h in range(n):
                g = grad[:, :, h]
                want[:, graph.receiver(l, kind, h)] = torch.einsum("bpsd,bpd->s", diff, g)
        want[:, graph.receiver(l, "mlp")] = torch.einsum("bpsd,bpd->s", diff, inputs[f"blocks.{l}.hook_mlp_in"].grad)
    final = inputs["blocks.2.hook_resid_post"].grad
    want[:, graph.logits] = torch.einsum("bpsd,bpd->s", diff, final)
    want *= graph.edges
    assert got.abs().max() > 1e-2
    torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-4)


# --- what is refused, and the checks that are enforced --------------------------------------------------------------


def test_a_norm_after_attention_is_refused_by_name():
    for forward in both_backends("gemma2"):
        with pytest.raises(NotImplementedError, match="norm after attention"):
            edges.graph_of(forward)


def test_W_O_that_does_not_add_up_to_attn_out_is_refused(monkeypatch):
    tokens, donor, metric = prompts()
    forward = both_backends("gpt2")[1]
    from tl_patching.backends import hf_engine

    real = hf_engine.Engine.W_O
    monkeypatch.setattr(hf_engine.Engine, "W_O", lambda self, j: real(self, j).flip(0))  # heads swapped
    with pytest.raises(NotImplementedError, match="do not add up to hook_attn_out"):
        edges.exact_edges(forward, tokens, donor, metric)


def test_a_full_circuit_that_is_not_the_clean_run_raises(monkeypatch):
    tokens, donor, metric = prompts()
    forward = both_backends("gpt2")[0]
    graph = edges.graph_of(forward)
    real = edges._circuit_runs
    monkeypatch.setattr(edges, "_circuit_runs", lambda s, keep: real(s, keep) + 0.01)
    with pytest.raises(edges.FaithfulnessCheckError, match="the full circuit gives"):
        edges.faithfulness(forward, tokens, donor, metric, graph.edges[None])


def test_an_empty_circuit_that_is_not_the_donor_run_raises(monkeypatch):
    """Mean ablation as if it were the donor's: the empty circuit is then not the donor run."""
    tokens, donor, metric = prompts()
    forward = both_backends("gpt2")[0]
    graph = edges.graph_of(forward)
    real = edges._setup
    monkeypatch.setattr(edges, "_setup", lambda f, t, d, m: real(f, t, None, m))
    with pytest.raises(edges.FaithfulnessCheckError, match="the empty circuit gives"):
        edges.faithfulness(forward, tokens, donor, metric, graph.edges[None])


def test_a_mean_ablated_empty_circuit_must_read_the_batch_mean_residual(monkeypatch):
    """Under mean ablation every edge into the logits carries its batch mean, so the empty circuit's logits read the
    batch-mean final residual stream; an ablation that misses it by 0.01 nats is caught."""
    tokens, _, metric = prompts()
    forward = both_backends("gpt2")[0]
    graph = edges.graph_of(forward)
    result = edges.faithfulness(forward, tokens, None, metric, graph.edges[None])  # passes as it is
    real = edges._circuit_runs
    monkeypatch.setattr(
        edges, "_circuit_runs", lambda s, keep: real(s, keep) + 0.01 * (~keep.flatten(1).any(1))[:, None]
    )
    with pytest.raises(edges.FaithfulnessCheckError, match="the empty circuit gives .* batch-mean final residual"):
        edges.faithfulness(forward, tokens, None, metric, graph.edges[None])
    assert result.f.item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_runs_and_its_checks_still_catch_a_wrong_mechanism(dtype, monkeypatch):
    """The checks follow the dtype's resolution (float32's 1e-4 refused every half-precision model, by rounding):
    scores and f stay near float32's, and swapped heads (an O(1) error) are still refused."""
    from tl_patching.backends import hf_engine
    from tl_patching.forward import load_forward
    from tl_patching.prompts import ioi_dataset

    ref = load_forward("shipped")
    b = ioi_dataset(ref.model, 20)[0]
    metric = LogitDiff(b.correct, b.wrong)
    graph = edges.graph_of(ref)
    scores = edges.attribute(ref, b.tokens, b.donor_tokens, metric, "eap")
    circuit = edges.top_edges(graph, scores, 20)[None]
    want = edges.faithfulness(ref, b.tokens, b.donor_tokens, metric, circuit).f
    for backend in ("tl", "hf"):
        f = load_forward("shipped", backend, "cpu", dtype)
        got = edges.attribute(f, b.tokens, b.donor_tokens, metric, "eap")
        assert (got - scores).abs().max() <= 0.05 * scores.abs().max(), backend
        for donor in (b.donor_tokens, None):
            edges.faithfulness(f, b.tokens, donor, metric, circuit)  # the checks pass
        assert edges.faithfulness(f, b.tokens, b.donor_tokens, metric, circuit).f.item() == pytest.approx(
            want.item(), abs=0.01
        )
    real = hf_engine.Engine.W_O
    monkeypatch.setattr(hf_engine.Engine, "W_O", lambda self, j: real(self, j).flip(0))  # heads swapped
    with pytest.raises(NotImplementedError, match="do not add up to hook_attn_out"):
        edges.attribute(f, b.tokens, b.donor_tokens, metric, "eap")


def test_faithfulness_of_prompts_the_ablation_does_not_change_is_refused():
    tokens, _, metric = prompts()
    forward = both_backends("gpt2")[0]
    graph = edges.graph_of(forward)
    with pytest.raises(edges.FaithfulnessCheckError, match="is undefined for these prompts"):
        edges.faithfulness(forward, tokens, tokens, metric, graph.edges[None])


def test_one_donor_for_every_prompt_is_the_same_as_it_repeated():
    tokens, donor, metric = prompts()
    forward = both_backends("gpt2")[0]
    graph = edges.graph_of(forward)
    one, repeated = donor[:1], donor[:1].repeat(len(tokens), 1)
    torch.testing.assert_close(
        edges.exact_edges(forward, tokens, one, metric), edges.exact_edges(forward, tokens, repeated, metric)
    )
    a = edges.faithfulness(forward, tokens, one, metric, graph.edges[None])  # crashed: V rows for V·batch
    b = edges.faithfulness(forward, tokens, repeated, metric, graph.edges[None])
    assert (a.full, a.empty) == pytest.approx((b.full, b.empty))


def test_bad_arguments_are_refused():
    tokens, donor, metric = prompts()
    forward = both_backends("gpt2")[0]
    graph = edges.graph_of(forward)
    with pytest.raises(ValueError, match="method must be one of"):
        edges.attribute(forward, tokens, donor, metric, "ig")
    with pytest.raises(ValueError, match="steps must be a positive int"):
        edges.attribute(forward, tokens, donor, metric, "eap-ig-inputs", steps=0)
    with pytest.raises(ValueError, match="circuits must be"):
        edges.faithfulness(forward, tokens, donor, metric, graph.edges)
    with pytest.raises(ValueError, match="n must be within"):
        edges.top_edges(graph, torch.zeros(graph.edges.shape), graph.n_edges + 1)
    broken = torch.zeros(graph.edges.shape)
    broken[graph.head(1, 0), graph.logits] = float("nan")  # topk would rank it first
    with pytest.raises(ValueError, match=r"scores must be finite: 1 edges are not, e.g. a1.h0->logits"):
        edges.top_edges(graph, broken, 1)
    broken[graph.head(1, 0), graph.receiver(0, "q", 0)] = float("inf")  # not an edge (a later head): ignored
    with pytest.raises(ValueError, match="1 edges are not"):
        edges.top_edges(graph, broken, 1)
    with pytest.raises(ValueError, match="sizes must be fractions"):
        edges.curve(forward, tokens, donor, metric, torch.zeros(graph.edges.shape), sizes=[0.0, 1.0])
    with pytest.raises(ValueError, match="donor tokens"):
        edges.exact_edges(forward, tokens, donor[:, :-1], metric)
    with pytest.raises(ValueError, match="at least one prompt"):
        edges.exact_edges(forward, tokens[0], donor[0], metric)


def test_lens_kv_heads_matches_the_graph():
    forward = both_backends("llama")[0]
    assert edges.graph_of(forward).n_kv_heads == lens.kv_heads(forward.cfg) == 2
