"""The sweep driver equals one forward per variant, on both backends; every fast path equals the driver.
(Attribution patching: tests/test_attribution.py.)"""

import pytest
import torch

from tl_patching import fast, lens, patching
from tl_patching.edits import act_name, patch, scale, zero
from tl_patching.forward import Forward
from tl_patching.metrics import LogitDiff
from tl_patching.testing import random_gpt2

ATOL = 1e-4


@pytest.fixture(scope="module")
def setup(patch_setup):
    """conftest's patch_setup plus the reference head sweep of the driver."""
    forward, tokens, _, donor, _, _, metric = patch_setup
    return (*patch_setup, patching.head_sweep(forward, tokens, donor, metric))


@pytest.mark.parametrize("max_rows", [64, 3, 1])
def test_sweep_equals_one_forward_per_variant(setup, max_rows):
    forward, tokens, _, donor, _, _, metric, _ = setup
    variants = [
        [],
        [zero(act_name("z", 1), head=2)],
        [patch(act_name("resid_post", 2), donor, pos=4)],
        [scale(act_name("post", 0), 0.5), zero(act_name("k", 3), head=0)],
    ]
    swept = patching.sweep(forward, tokens, variants, metric, max_rows=max_rows)
    one_by_one = torch.stack([metric(forward(tokens, v)[:, -1]) for v in variants])
    assert swept.shape == (4, 3) and (swept - one_by_one).abs().max() < ATOL
    assert (swept[1:] - swept[0]).abs().amax(-1).min() > 1e-3  # every variant moved the metric


def test_head_sweep_by_hand(setup):
    """Known answer: patching head h of layer l at the final position, with a hand-written TL hook."""
    forward, tokens, _, donor, _, _, metric, reference = setup
    assert reference.shape == (4, 4, 3)
    for l, h in [(0, 1), (2, 3), (3, 0)]:

        def hook(z, hook, l=l, h=h):
            z = z.clone()
            z[:, -1, h] = donor[act_name("z", l)][:, -1, h]
            return z

        by_hand = metric(forward.model.run_with_hooks(tokens, fwd_hooks=[(act_name("z", l), hook)])[:, -1])
        assert (reference[l, h] - by_hand).abs().max() < ATOL


def test_head_sweep_same_on_hf():
    hf, tl = random_gpt2(n_layers=3, n_heads=4, d_head=8, seed=5)
    tokens = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    donor_tokens = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    metric = lambda final: final[:, 3] - final[:, 4]  # noqa: E731  (any metric of the final position's logits)
    out = {}
    for backend, forward in {"tl": Forward(tl), "hf": Forward(tl, hf)}.items():
        _, donor = forward.run(donor_tokens, cache=[act_name("z", l) for l in range(3)])
        out[backend] = patching.head_sweep(forward, tokens, donor, metric, pos=3)
    assert (out["tl"] - out["hf"]).abs().max() < ATOL


@pytest.mark.parametrize("layers, max_rows", [(None, 8192), (None, 12), ([3, 0], 8192), ([2], 1)])
def test_final_position_fast_path_equals_the_driver(setup, layers, max_rows):
    forward, tokens, _, donor, correct, wrong, _, reference = setup
    out = fast.final_position_head_sweep(
        forward, tokens, donor, LogitDiff(correct, wrong), layers=layers, max_rows=max_rows, progress=False
    )
    expected = reference if layers is None else reference[layers]
    assert out.shape == expected.shape and (out - expected).abs().max() < ATOL


def test_donor_equal_to_recipient_has_no_effect(setup):
    forward, tokens, _, _, correct, wrong, metric, _ = setup
    _, same = forward.run(tokens, cache=[act_name("z", l) for l in range(4)])
    out = fast.final_position_head_sweep(forward, tokens, same, LogitDiff(correct, wrong), progress=False)
    assert (out - metric(forward(tokens)[:, -1])).abs().max() < ATOL


def test_fast_path_on_the_hf_backend_and_refused_blocks(setup):
    """On the HF backend the fast path runs the HF model's own layers (the same numbers); a model whose patches reach
    earlier positions is refused by name."""
    forward, tokens, _, donor, correct, wrong, _, reference = setup
    hf, tl = random_gpt2(n_layers=4, n_heads=4, d_head=8, seed=7)
    if forward.weight_mode == "raw":  # the HF model holds raw weights: compare against the raw reference only
        out = fast.final_position_head_sweep(Forward(tl, hf), tokens, donor, LogitDiff(correct, wrong), progress=False)
        assert (out - reference).abs().max() < ATOL
    if lens.is_bridge(tl):
        return  # a bridge's attention is its HF CausalLM's, whatever cfg.attention_dir says
    tl.cfg.attention_dir = "bidirectional"  # no clean prefix to reuse: refused by name (families: tests/test_fast.py)
    with pytest.raises(NotImplementedError, match="bidirectional attention"):
        fast.final_position_head_sweep(Forward(tl), tokens, donor, LogitDiff(correct, wrong))


def test_bad_sweep_input(setup):
    forward, tokens, _, donor, correct, wrong, metric, _ = setup
    with pytest.raises(ValueError, match="one correct and one wrong"):
        fast.final_position_head_sweep(forward, tokens, donor, LogitDiff(correct[:2], wrong), progress=False)
    with pytest.raises(IndexError, match="layer 4 out of range"):
        fast.final_position_head_sweep(forward, tokens, donor, LogitDiff(correct, wrong), layers=[4], progress=False)
    short = {n: t[:, :5] for n, t in donor.items()}
    with pytest.raises(ValueError, match="same token length"):
        fast.final_position_head_sweep(forward, tokens, short, LogitDiff(correct, wrong), progress=False)
    with pytest.raises(ValueError, match="no variants"):
        patching.sweep(forward, tokens, [], metric)
    with pytest.raises(ValueError, match="at least one prompt"):
        patching.sweep(forward, tokens[:0], [[]], metric)
    with pytest.raises(IndexError, match="layer 9 out of range"):
        patching.head_sweep(forward, tokens, donor, metric, layers=[9])


def test_docs_example_neuron_groups():
    """The example of docs/patching.md: a new kind of sweep is one variants list and one call."""
    from tl_patching.models import load_model
    from tl_patching.prompts import ioi_dataset

    model = load_model("shipped")
    batch = ioi_dataset(model, 20)[0]
    groups = [range(g, g + 16) for g in range(0, model.cfg.d_mlp, 16)]
    variants = [[zero(act_name("post", l), pos=-1, neurons=list(g))] for l in range(model.cfg.n_layers) for g in groups]
    forward = Forward(model)
    metric = LogitDiff(batch.correct, batch.wrong)
    effect = patching.sweep(forward, batch.tokens, variants, metric).reshape(model.cfg.n_layers, len(groups), -1)
    assert effect.shape == (model.cfg.n_layers, model.cfg.d_mlp // 16, len(batch))
    l, g = 2, 5  # one entry by hand
    by_hand = metric(forward(batch.tokens, [zero(act_name("post", l), pos=-1, neurons=list(groups[g]))])[:, -1])
    assert (effect[l, g] - by_hand).abs().max() < ATOL
