"""The fast patching paths equal the plain loop; attribution patching is in the units of exact patching."""

import pytest
import torch

from tl_patching import hooks, patching
from tl_patching.hooks import act_name, patch
from tl_patching.metrics import logit_diff
from tl_patching.models import hooked_from_hf, random_gpt2

ATOL = 1e-4


@pytest.fixture(scope="module", params=["raw", "processed"])
def setup(request):
    hf, tl = random_gpt2(n_layers=4, n_heads=4, d_head=8, seed=7)
    model = tl if request.param == "raw" else hooked_from_hf(hf, weights="processed")
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, 64, (3, 10), generator=g)
    donor_tokens = tokens.clone()
    donor_tokens[:, 4] = torch.randint(0, 64, (3,), generator=g)  # one differing position, as in IOI
    correct, wrong = torch.tensor([3, 4, 5]), torch.tensor([6, 7, 8])
    _, donor = hooks.run(model, donor_tokens, cache=[act_name(k, l) for l in range(4) for k in ("z", "resid_post")])
    plain = patching.plain_head_sweep(model, tokens, donor, correct, wrong, progress=False)
    return model, tokens, donor_tokens, donor, correct, wrong, plain


def test_plain_sweep_moves_the_metric(setup):
    model, tokens, _, _, correct, wrong, plain = setup
    clean = logit_diff(hooks.run(model, tokens)[0], correct, wrong)
    assert (plain - clean).abs().max() > 1e-2


@pytest.mark.parametrize("max_rows", [256, 5])
def test_batched_start_at_layer_equals_plain(setup, max_rows):
    model, tokens, _, donor, correct, wrong, plain = setup
    fast = patching.batched_head_sweep(model, tokens, donor, correct, wrong, max_rows=max_rows, progress=False)
    assert (fast - plain).abs().max() < ATOL


@pytest.mark.parametrize("layers, max_rows", [(None, 8192), (None, 12), ([3, 0], 8192), ([2], 1)])
def test_final_position_equals_plain(setup, layers, max_rows):
    model, tokens, _, donor, correct, wrong, plain = setup
    fast = patching.final_position_head_sweep(model, tokens, donor, correct, wrong, layers=layers, max_rows=max_rows, progress=False)
    expected = plain if layers is None else plain[layers]
    assert fast.shape == expected.shape and (fast - expected).abs().max() < ATOL


def test_batched_sweep_at_another_position(setup):
    model, tokens, _, donor, correct, wrong, _ = setup
    plain = patching.plain_head_sweep(model, tokens, donor, correct, wrong, pos=4, layers=[1], progress=False)
    fast = patching.batched_head_sweep(model, tokens, donor, correct, wrong, pos=4, layers=[1], progress=False)
    assert (fast - plain).abs().max() < ATOL


def test_attribution_is_the_first_order_term_of_exact_patching(setup):
    """Same units and indexing: with the donor difference scaled by ε, exact effect / ε → attribution."""
    model, tokens, _, donor, correct, wrong, _ = setup
    names = list(donor)
    _, clean = hooks.run(model, tokens, cache=names)
    eps = 1e-3
    near = {n: clean[n] + eps * (donor[n] - clean[n]) for n in names}
    attr = patching.attribution_patch(model, tokens, near, correct, wrong)
    base = logit_diff(hooks.run(model, tokens)[0], correct, wrong)
    for layer, pos, head in [(0, 4, 1), (2, 9, 3), (3, 9, 0)]:
        z = act_name("z", layer)
        exact = logit_diff(hooks.run(model, tokens, [patch(z, near, head=head, pos=pos)])[0], correct, wrong) - base
        assert torch.allclose(exact / eps, attr["z"][layer, pos, head] / eps, rtol=0.05, atol=1e-3)
    exact = logit_diff(hooks.run(model, tokens, [patch(act_name("resid_post", 1), near, pos=4)])[0], correct, wrong) - base
    assert torch.allclose(exact / eps, attr["resid_post"][1, 4] / eps, rtol=0.05, atol=1e-3)


def test_attribution_shapes_and_donor_tokens(setup):
    model, tokens, donor_tokens, donor, correct, wrong, _ = setup
    from_tokens = patching.attribution_patch(model, tokens, donor_tokens, correct, wrong)
    from_cache = patching.attribution_patch(model, tokens, donor, correct, wrong)
    assert from_tokens["z"].shape == (4, 10, 4, 3) and from_tokens["resid_post"].shape == (4, 10, 3)
    assert torch.allclose(from_tokens["z"], from_cache["z"], atol=1e-6)
    # Positions before the differing one have zero activation difference, so zero attribution.
    assert from_tokens["z"][:, :4].abs().max() == 0
    assert all(p.grad is None for p in model.parameters())  # gradients cleaned up


def test_bad_sweep_input(setup):
    model, tokens, _, donor, correct, wrong, _ = setup
    with pytest.raises(ValueError, match="one correct and one wrong"):
        patching.final_position_head_sweep(model, tokens, donor, correct[:2], wrong, progress=False)
    with pytest.raises(IndexError, match="layer 4 out of range"):
        patching.final_position_head_sweep(model, tokens, donor, correct, wrong, layers=[4], progress=False)
    short = {n: t[:, :5] for n, t in donor.items()}
    with pytest.raises(ValueError, match="same token length"):
        patching.final_position_head_sweep(model, tokens, short, correct, wrong, progress=False)
