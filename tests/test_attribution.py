"""Attribution patching is in the units of exact patching; AtP*'s QK fix and GradDrop have known answers;
the report's numbers are the definitions'."""

import pytest
import torch

from tl_patching import attribution, patching, path_patching
from tl_patching.edits import Edit, act_name, patch
from tl_patching.forward import Forward
from tl_patching.metrics import LogitDiff, logit_diff
from tl_patching.testing import random_gpt2, random_pair


@pytest.fixture(scope="module")
def setup(patch_setup):
    return patch_setup


def test_attribution_is_the_first_order_term_of_exact_patching(setup):
    """Same units and indexing: with the donor difference scaled by ε, exact effect / ε → attribution."""
    forward, tokens, _, donor, correct, wrong, metric = setup
    names = list(donor)
    _, clean = forward.run(tokens, cache=names)
    eps = 1e-3
    near = {n: clean[n] + eps * (donor[n] - clean[n]) for n in names}
    attr = attribution.attribution_patch(forward, tokens, near, LogitDiff(correct, wrong))
    base = metric(forward(tokens)[:, -1])
    for layer, pos, head in [(0, 4, 1), (2, 9, 3), (3, 9, 0)]:
        exact = metric(forward(tokens, [patch(act_name("z", layer), near, head=head, pos=pos)])[:, -1]) - base
        assert torch.allclose(exact / eps, attr["z"][layer, pos, head] / eps, rtol=0.05, atol=1e-3)
    exact = metric(forward(tokens, [patch(act_name("resid_post", 1), near, pos=4)])[:, -1]) - base
    assert torch.allclose(exact / eps, attr["resid_post"][1, 4] / eps, rtol=0.05, atol=1e-3)


def test_attribution_shapes_and_donor_tokens(setup):
    forward, tokens, donor_tokens, donor, correct, wrong, _ = setup
    from_tokens = attribution.attribution_patch(forward, tokens, donor_tokens, LogitDiff(correct, wrong))
    from_cache = attribution.attribution_patch(forward, tokens, donor, LogitDiff(correct, wrong))
    assert from_tokens["z"].shape == (4, 10, 4, 3) and from_tokens["resid_post"].shape == (4, 10, 3)
    assert torch.allclose(from_tokens["z"], from_cache["z"], atol=1e-6)
    assert from_tokens["z"][:, :4].abs().max() == 0  # before the differing position: no difference, no attribution
    assert all(p.grad is None for p in forward.model.parameters())  # gradients cleaned up


def test_atp_star_shapes_and_agreement(setup):
    forward, tokens, donor_tokens, donor, correct, wrong, _ = setup
    plain = attribution.attribution_patch(forward, tokens, donor, LogitDiff(correct, wrong))["z"]
    out = attribution.atp_star(forward, tokens, donor, LogitDiff(correct, wrong))
    assert set(out.scores) == {"atp", "atp_qk", "atp_gd", "atp_star"}
    assert all(s.shape == (4, 10, 4, 3) and not s.requires_grad for s in out.scores.values())
    assert torch.allclose(out.scores["atp"], plain, atol=1e-6)  # AtP* starts from the same AtP
    # Before the differing position no difference: zero up to the QK fix's recomputed softmax (exactly 0 run alone,
    # 1.1e-7 in one full-suite run), against scores above 1e-4 where the donor differs.
    assert out.scores["atp_star"][:, :4].abs().max() < 1e-6 and out.scores["atp_star"].min() >= 0
    assert out.scores["atp_star"][:, 4:].abs().max() > 1e-4
    assert (out.scores["atp_qk"] - out.scores["atp"]).abs().max() > 1e-4  # the QK fix does something here
    assert all(p.grad is None and p.requires_grad for p in forward.model.parameters())
    without = attribution.atp_star(forward, tokens, donor, LogitDiff(correct, wrong), qk_fix=False)
    assert torch.equal(without.scores["atp_qk"], without.scores["atp"])
    assert torch.equal(without.scores["atp_star"], without.scores["atp_gd"])
    assert torch.allclose(without.scores["atp_gd"], out.scores["atp_gd"], atol=1e-6)


def qk_correction_by_hand(model, tokens, donor, metric, l: int, p: int, h: int) -> torch.Tensor:
    """The QK fix of node (l, p, h), per prompt, through the model's own hook points (not the engine, not the closed
    form): Σ over later layers lp of ⟨G, A(x + δ at p) − A(x)⟩ − d/dε ⟨G, A(x + εδ at p)⟩|₀, with A lp's pattern, x
    its resid_pre, G = ∂metric/∂A and δ layer l's attn_out with head h's z from the donor, minus the clean one."""
    forward = Forward(model)
    attn_out = act_name("attn_out", l)
    _, clean = forward.run(tokens, cache=[attn_out])
    _, moved = forward.run(tokens, [patch(act_name("z", l), donor, head=h)], cache=[attn_out])
    delta = (moved[attn_out] - clean[attn_out])[:, p]  # [batch, d_model]
    return sum(_qk_term(model, tokens, metric, lp, p, delta) for lp in range(l + 1, model.cfg.n_layers))


def _qk_term(model, tokens, metric, lp: int, p: int, delta: torch.Tensor) -> torch.Tensor:
    """⟨G, A(x + δ at p) − A(x)⟩ − d/dε ⟨G, A(x + εδ at p)⟩|₀ for layer lp, per prompt (see above)."""
    pattern, resid = act_name("pattern", lp), act_name("resid_pre", lp)
    kept, eps = {}, torch.zeros(len(tokens), requires_grad=True)

    def keep(act, hook):
        act.retain_grad()
        kept["A"] = act
        return act

    def nudge(act, hook):  # x + ε δ at position p, one ε per prompt (prompts don't interact)
        act = act.clone()
        act[:, p] = act[:, p] + eps[:, None] * delta
        return act

    with torch.enable_grad(), model.hooks(fwd_hooks=[(resid, nudge), (pattern, keep)]):
        metric(model(tokens)[:, -1]).sum().backward()  # ε = 0: the clean run
        G = kept["A"].grad.detach()
    with torch.enable_grad(), model.hooks(fwd_hooks=[(resid, nudge), (pattern, keep)]):
        model(tokens)
        (linear,) = torch.autograd.grad((kept["A"] * G).sum(), [eps])
    model.zero_grad(set_to_none=True)
    forward = Forward(model)
    moved = forward.run(tokens, [Edit(resid, lambda act, i: act[i] + delta, pos=p)], cache=[pattern])[1][pattern]
    clean = forward.run(tokens, cache=[pattern])[1][pattern]
    return ((moved - clean) * G).sum(dim=(1, 2, 3)).double() - linear.double()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_qk_fix_equals_the_definition_through_hook_points(family):
    """On every engine (TL 3's closed form, the HF engine under a bridge): the QK fix of single nodes equals the
    definition computed with nothing but the model's own hook points."""
    _, model = random_pair(family, n_layers=3, seed=1, weight_std=0.3)
    g = torch.Generator().manual_seed(2)
    tokens, donor_tokens = torch.randint(0, 64, (2, 7), generator=g), torch.randint(0, 64, (2, 7), generator=g)
    metric = LogitDiff(torch.tensor([1, 2]), torch.tensor([3, 4]))
    _, donor = Forward(model).run(donor_tokens, cache=[act_name("z", l) for l in range(3)])
    out = attribution.atp_star(Forward(model), tokens, donor, metric, grad_drop=False)
    fix = out.scores["atp_qk"] - out.scores["atp"]
    for l, p, h in [(0, 2, 1), (0, 6, 3), (1, 4, 0), (1, 0, 2)]:
        by_hand = qk_correction_by_hand(model, tokens, donor, metric, l, p, h)
        assert (fix[l, p, h] - by_hand).abs().max() < 1e-4, (l, p, h)
    assert fix[:2].abs().max() > 1e-2  # the fix is not nothing here
    assert fix[2].abs().max() == 0  # the last layer has no later pattern


@pytest.mark.tl3
@pytest.mark.parametrize("family", ["gpt2", "llama", "neox"])
def test_qk_fix_closed_form_equals_the_engine(family, monkeypatch):
    """TransformerLens 3: the closed form (TL's attention, in scores) and the engine's (the blocks themselves, one call
    per later layer and position) are two computations of the same numbers, GradDrop's variants included."""
    _, model = random_pair(family, n_layers=3, seed=0, weight_std=0.3)
    g = torch.Generator().manual_seed(2)
    tokens, donor_tokens = torch.randint(0, 64, (2, 7), generator=g), torch.randint(0, 64, (2, 7), generator=g)
    metric = LogitDiff(torch.tensor([1, 2]), torch.tensor([3, 4]))
    closed = attribution.atp_star(Forward(model), tokens, donor_tokens, metric)
    monkeypatch.setattr(attribution, "_closed_form_applies", lambda model: False)
    engine = attribution.atp_star(Forward(model), tokens, donor_tokens, metric)
    for key in ("atp_qk", "atp_star"):
        assert (closed.scores[key] - engine.scores[key]).abs().max() < 1e-5, key
    assert (closed.scores["atp_qk"] - closed.scores["atp"]).abs().max() > 0.1


def qk_only_model(rotary: bool):
    """2 attention-only layers, no norms: layer 0 head 0 writes into dims 0..7 only, which layer 1's values
    never read. That head's effect on layer 1 is through queries and keys alone, and the logits are linear
    in layer 1's pattern: AtP with the QK fix must then be exact for its nodes."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    extra = dict(positional_embedding_type="rotary", rotary_dim=8, n_key_value_heads=1) if rotary else {}
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=16,
        n_heads=2,
        d_head=8,
        d_vocab=20,
        n_ctx=16,
        attn_only=True,
        normalization_type=None,
        act_fn="relu",
        seed=0,
        **extra,
    )
    model = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.6)  # large: saturated attention, where AtP fails
        model.blocks[0].attn.W_O[0, :, 8:] = 0.0
        W_V = model.blocks[1].attn._W_V if rotary else model.blocks[1].attn.W_V
        W_V[:, :8, :] = 0.0
    return model.eval()


@pytest.mark.tl3
@pytest.mark.parametrize("rotary", [False, True])
def test_qk_fix_is_exact_when_the_pattern_is_the_only_nonlinearity(rotary):
    model = qk_only_model(rotary)
    forward = Forward(model)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 20, (2, 6), generator=g)
    donor_tokens = torch.randint(0, 20, (2, 6), generator=g)
    correct, wrong = torch.tensor([1, 2]), torch.tensor([3, 4])
    _, donor = forward.run(donor_tokens, cache=[act_name("z", l) for l in range(2)])
    exact = patching.head_pos_sweep(forward, tokens, donor, LogitDiff(correct, wrong))
    out = attribution.atp_star(forward, tokens, donor, LogitDiff(correct, wrong))
    assert (out.scores["atp_qk"][0, :, 0] - exact[0, :, 0]).abs().max() < 1e-3
    assert (out.scores["atp"][0, :, 0] - exact[0, :, 0]).abs().max() > 0.1  # plain AtP is off here
    # Layer 1 has no later layer: nothing to fix, AtP is exact there (no norm, linear unembedding).
    assert (out.scores["atp_qk"][1] - exact[1]).abs().max() < 1e-3


@pytest.mark.tl3
def test_grad_drop_known_answer():
    """Two layers, no norms, attention only: dropping layer 1's writes leaves layer-0 nodes their direct path,
    so GradDrop of a layer-0 head = |its direct effect| = |path patching head → logits| at the last position."""
    model = qk_only_model(rotary=False)
    g = torch.Generator().manual_seed(3)
    tokens, donor_tokens = torch.randint(0, 20, (2, 6), generator=g), torch.randint(0, 20, (2, 6), generator=g)
    correct, wrong = torch.tensor([1, 2]), torch.tensor([3, 4])
    out = attribution.atp_star(Forward(model), tokens, donor_tokens, LogitDiff(correct, wrong))
    direct = path_patching.path_patch(
        Forward(model), tokens, donor_tokens, LogitDiff(correct, wrong), senders=[(0, 0), (0, 1)]
    )
    clean = logit_diff(model(tokens), correct, wrong)
    assert torch.allclose(out.scores["atp_gd"][0, -1], (direct - clean).abs(), atol=1e-4)
    assert out.scores["atp_gd"][0, :-1].abs().max() < 1e-6  # earlier positions reach the logits only via layer 1
    assert torch.allclose(out.scores["atp_gd"][1], out.scores["atp"][1].abs(), atol=1e-6)  # last layer: |AtP|


def test_report_numbers():
    exact = torch.arange(1.0, 25.0).reshape(2, 3, 4, 1)  # 24 nodes, one prompt
    flipped = exact.clone()
    flipped.view(-1)[[23, 0]] = flipped.view(-1)[[0, 23]]  # the largest node now ranked last
    report = attribution.atp_report({"same": -exact, "flipped": flipped}, exact, k=(1, 5), show=False)
    assert report["same"] == pytest.approx({"spearman": 1.0, "recall@1": 1.0, "recall@5": 1.0})
    assert report["flipped"]["recall@1"] == 0.0 and report["flipped"]["recall@5"] == 0.8
    assert report["flipped"]["spearman"] < 0.7
    mask = torch.zeros(3, 1, dtype=torch.bool)
    mask[2] = True  # only the last position's 8 nodes
    assert attribution.atp_report(flipped, exact, k=(1,), mask=mask, show=False)["attribution"]["recall@1"] == 0.0


def test_refusals():
    hf, tl = random_gpt2(n_layers=2, n_heads=2, d_head=4, seed=0)
    tokens, correct, wrong = torch.zeros(1, 4, dtype=torch.long), torch.tensor([1]), torch.tensor([2])
    with pytest.raises(NotImplementedError, match="tl backend"):
        attribution.atp_star(Forward(tl, hf), tokens, tokens, LogitDiff(correct, wrong))
    # A norm after the attention (Gemma 2/3) makes a head's write non-linear in its z: refused by name on every major
    for family in ("gemma2", "gemma3"):
        _, gemma = random_pair(family, n_layers=2, seed=0)
        with pytest.raises(NotImplementedError, match="norm after the attention"):
            attribution.atp_star(Forward(gemma), tokens, tokens, LogitDiff(correct, wrong))
        attribution.atp_star(Forward(gemma), tokens, tokens, LogitDiff(correct, wrong), qk_fix=False)  # GradDrop


def test_grad_drop_of_the_last_layer_is_the_magnitude_of_atp():
    """No later layer to drop a gradient through: GradDrop of a last-layer node is |AtP| (any major, any backend
    that runs AtP*); of a first-layer node it differs (two-layer model, gradients through layer 1 dropped)."""
    _, tl = random_gpt2(n_layers=2, n_heads=2, d_head=4, seed=1)
    g = torch.Generator().manual_seed(3)
    tokens, donor_tokens = torch.randint(0, 64, (2, 6), generator=g), torch.randint(0, 64, (2, 6), generator=g)
    out = attribution.atp_star(
        Forward(tl), tokens, donor_tokens, LogitDiff(torch.tensor([1, 2]), torch.tensor([3, 4])), qk_fix=False
    )
    assert torch.allclose(out.scores["atp_gd"][1], out.scores["atp"][1].abs(), atol=1e-6)
    assert (out.scores["atp_gd"][0] - out.scores["atp"][0].abs()).abs().max() > 1e-3
