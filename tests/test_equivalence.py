"""TransformerLens hook points and edits equal their raw-HF counterparts (fp32, abs tolerance 1e-4)."""

import pytest
import torch

from tl_patching import hf_hooks, hooks
from tl_patching.hooks import gaussian_noise, patch, scale, zero

ATOL = 1e-4


def assert_close(a, b, atol=ATOL):
    """Equal values; -inf (masked attention scores) in the same places on both sides."""
    assert a.shape == b.shape
    finite = torch.isfinite(a)
    assert torch.equal(finite, torch.isfinite(b))
    assert (a[finite] - b[finite]).abs().max().item() <= atol


@pytest.mark.parametrize("name", hf_hooks.supported_names(3))
def test_cached_activation_equals_hf(pair, tokens, name):
    hf, tl = pair
    _, tl_cache = hooks.run(tl, tokens, cache=[name])
    _, hf_cache = hf_hooks.run(hf, tokens, cache=[name])
    assert tl_cache[name].abs().max() > 1e-2  # a non-trivial activation, so equality means something
    assert_close(tl_cache[name], hf_cache[name])


def test_logits_equal_hf(pair, tokens):
    hf, tl = pair
    assert_close(hooks.run(tl, tokens)[0], hf_hooks.run(hf, tokens)[0])


def test_attn_scores_mask_future_and_first_token_attends_to_itself(pair, tokens):
    _, tl = pair
    name = "blocks.1.attn.hook_"
    _, cache = hooks.run(tl, tokens, cache=[name + "attn_scores", name + "pattern"])
    scores, pattern = cache[name + "attn_scores"], cache[name + "pattern"]
    future = torch.triu(torch.ones(9, 9, dtype=torch.bool), diagonal=1)
    assert torch.isinf(scores[..., future]).all() and torch.isfinite(scores[..., ~future]).all()
    assert torch.allclose(pattern[:, :, 0, 0], torch.ones(()))


EDITS = ["zero head z", "zero head key", "noise even MLP neurons", "scale block output 0.1", "scale block output 10",
         "patch one head at one position", "patch whole resid_post"]


def edits_for(donor_cache, head=2):
    """The six interventions of the Foundation issue, addressed at ``head`` where they are head-level."""
    return {
        "zero head z": [zero("blocks.1.attn.hook_z", head=head)],
        "zero head key": [zero("blocks.1.attn.hook_k", head=head)],
        "noise even MLP neurons": [gaussian_noise("blocks.1.mlp.hook_post", mean=10.0, std=1.0, seed=0, neurons=slice(0, None, 2))],
        "scale block output 0.1": [scale("blocks.1.hook_resid_post", 0.1)],
        "scale block output 10": [scale("blocks.1.hook_resid_post", 10.0)],
        "patch one head at one position": [patch("blocks.1.attn.hook_z", donor_cache, head=head, pos=-1)],
        "patch whole resid_post": [patch("blocks.1.hook_resid_post", donor_cache)],
    }


@pytest.fixture(scope="module")
def donor_cache(pair, donor_tokens):
    _, tl = pair
    return hooks.run(tl, donor_tokens, cache=["blocks.1.attn.hook_z", "blocks.1.hook_resid_post"])[1]


@pytest.mark.parametrize("what", EDITS)
def test_edit_equals_hf(pair, tokens, donor_cache, what):
    hf, tl = pair
    edits = edits_for(donor_cache)[what]
    clean = hooks.run(tl, tokens)[0]
    tl_logits = hooks.run(tl, tokens, edits)[0]
    hf_logits = hf_hooks.run(hf, tokens, edits)[0]
    assert (tl_logits - clean).abs().max() > 1e-2  # the edit does something
    assert_close(tl_logits, hf_logits)


@pytest.mark.parametrize("what", ["zero head z", "zero head key", "patch one head at one position"])
def test_hf_side_on_neighbouring_head_differs(pair, tokens, donor_cache, what):
    """The equivalence above could not pass if the HF side read the wrong head slice."""
    hf, tl = pair
    tl_logits = hooks.run(tl, tokens, edits_for(donor_cache, head=2)[what])[0]
    for wrong in (1, 3):
        hf_logits = hf_hooks.run(hf, tokens, edits_for(donor_cache, head=wrong)[what])[0]
        assert (tl_logits - hf_logits).abs().max() > 1e-2


def test_hf_noise_on_odd_neurons_differs(pair, tokens):
    hf, tl = pair
    even = gaussian_noise("blocks.1.mlp.hook_post", mean=10.0, seed=0, neurons=slice(0, None, 2))
    odd = gaussian_noise("blocks.1.mlp.hook_post", mean=10.0, seed=0, neurons=slice(1, None, 2))
    assert (hooks.run(tl, tokens, [even])[0] - hf_hooks.run(hf, tokens, [odd])[0]).abs().max() > 1e-2


def test_edited_activation_is_what_the_cache_and_downstream_see(pair, tokens, donor_cache):
    hf, tl = pair
    name = "blocks.1.attn.hook_z"
    edit = patch(name, donor_cache, head=2, pos=-1)
    for side in (hooks, hf_hooks):
        model = tl if side is hooks else hf
        clean = side.run(model, tokens, cache=[name])[1][name]
        patched = side.run(model, tokens, [edit], cache=[name])[1][name]
        assert torch.equal(patched[:, -1, 2], donor_cache[name][:, -1, 2])
        assert torch.equal(patched[:, :-1], clean[:, :-1]) and torch.equal(patched[:, :, [0, 1, 3]], clean[:, :, [0, 1, 3]])


def test_hf_edit_is_visible_in_hidden_states_after_recorder_installed(pair, tokens):
    """transformers 5 records hidden_states with its own hooks; ours must run before them (prepend=True)."""
    hf, _ = pair
    with torch.no_grad():
        clean = hf(tokens, output_hidden_states=True).hidden_states  # installs the recorder first
        with hf_hooks.hooks(hf, [scale("blocks.1.hook_resid_post", 0.1)]):
            edited = hf(tokens, output_hidden_states=True).hidden_states
    assert torch.allclose(edited[2], 0.1 * clean[2], atol=1e-6)


def n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_removed_even_when_forward_raises(pair, tokens):
    hf, tl = pair
    bad = hooks.replace("blocks.0.attn.hook_z", torch.zeros(5))  # does not fit d_head=8
    for side, model in ((hooks, tl), (hf_hooks, hf)):
        side.run(model, tokens)  # let transformers install whatever hooks of its own it keeps
        before = n_hooks(model)
        with pytest.raises(ValueError, match="does not fit"):
            side.run(model, tokens, [bad])
        assert n_hooks(model) == before
    assert_close(hf_hooks.run(hf, tokens)[0], hooks.run(tl, tokens)[0])


def test_block_output_structure_reported(pair, tokens):
    hf, _ = pair
    seen = hf_hooks.block_output_structure(hf, tokens)
    assert set(seen) == {"output_attentions=False", "output_attentions=True"}
    assert all(v.startswith(("Tensor(", "tuple")) for v in seen.values())
    assert "(3, 9, 32)" in seen["output_attentions=False"]
