"""Attribution patching is in the units of exact patching; AtP*'s QK fix and GradDrop have known answers;
the report's numbers are the definitions'."""

import pytest
import torch

from tl_patching import attribution, lens, patching, path_patching
from tl_patching.edits import act_name, patch
from tl_patching.forward import Forward
from tl_patching.metrics import LogitDiff, logit_diff
from tl_patching.testing import random_gpt2


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
    if lens.is_bridge(forward.model):  # the QK fix recomputes scores with HookedTransformer's attention: refused
        with pytest.raises(NotImplementedError, match=r"QK fix.*TransformerBridge.*qk_fix=False"):
            attribution.atp_star(forward, tokens, donor, LogitDiff(correct, wrong))
        out = attribution.atp_star(forward, tokens, donor, LogitDiff(correct, wrong), qk_fix=False)
        assert torch.allclose(out.scores["atp"], plain, atol=1e-6)
        assert torch.equal(out.scores["atp_qk"], out.scores["atp"]) and torch.equal(
            out.scores["atp_star"], out.scores["atp_gd"]
        )
        assert out.scores["atp_gd"][:, :4].abs().max() == 0 and out.scores["atp_gd"][:, 4:].abs().max() > 1e-3
        return
    out = attribution.atp_star(forward, tokens, donor, LogitDiff(correct, wrong))
    assert set(out.scores) == {"atp", "atp_qk", "atp_gd", "atp_star"}
    assert all(s.shape == (4, 10, 4, 3) and not s.requires_grad for s in out.scores.values())
    assert torch.allclose(out.scores["atp"], plain, atol=1e-6)  # AtP* starts from the same AtP
    assert out.scores["atp_star"][:, :4].abs().max() == 0 and out.scores["atp_star"].min() >= 0
    assert (out.scores["atp_qk"] - out.scores["atp"]).abs().max() > 1e-4  # the QK fix does something here
    assert all(p.grad is None and p.requires_grad for p in forward.model.parameters())


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
    if lens.is_bridge(tl):
        with pytest.raises(NotImplementedError, match="TransformerBridge"):
            attribution.atp_star(Forward(tl), tokens, tokens, LogitDiff(correct, wrong))
        return
    tl.cfg.use_local_attn = True
    with pytest.raises(NotImplementedError, match="sliding-window"):
        attribution.atp_star(Forward(tl), tokens, tokens, LogitDiff(correct, wrong))


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
