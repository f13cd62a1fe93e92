"""Bad input fails with a clear exception, on the TL side and the HF side alike."""

import pytest
import torch

from tl_patching import hf_hooks, hooks
from tl_patching.hooks import HookNameError, act_name, patch, replace, zero


@pytest.mark.parametrize("side", ["tl", "hf"])
def test_unknown_hook_name_suggests_nearest(pair, tokens, side):
    hf, tl = pair
    module, model = (hooks, tl) if side == "tl" else (hf_hooks, hf)
    with pytest.raises(HookNameError, match=r"did you mean 'blocks\.1\.attn\.hook_z'"):
        module.run(model, tokens, [zero("blocks.1.attn.hook_zz")])
    with pytest.raises(HookNameError, match="unknown hook name|no HF counterpart"):
        module.run(model, tokens, cache=["nonsense"])


def test_layer_out_of_range(pair, tokens):
    hf, tl = pair
    with pytest.raises(IndexError, match="layer 3 out of range.*3 layers"):
        act_name("z", 3, model=tl)
    with pytest.raises(IndexError, match="layer 7 out of range"):
        hf_hooks.run(hf, tokens, [zero("blocks.7.attn.hook_z")])
    with pytest.raises(HookNameError):  # TL has no such hook either
        hooks.run(tl, tokens, [zero("blocks.7.attn.hook_z")])


@pytest.mark.parametrize("side", ["tl", "hf"])
@pytest.mark.parametrize("where, message", [
    (dict(head=4), "head 4 out of range"),
    (dict(head=-5), "head -5 out of range"),
    (dict(pos=9), "pos 9 out of range"),
    (dict(head=0, neurons=[8]), "neurons 8 out of range"),
])
def test_index_out_of_range(pair, tokens, side, where, message):
    hf, tl = pair
    module, model = (hooks, tl) if side == "tl" else (hf_hooks, hf)
    with pytest.raises(IndexError, match=message):
        module.run(model, tokens, [zero("blocks.0.attn.hook_z", **where)])


def test_head_on_a_hook_without_heads(pair, tokens):
    _, tl = pair
    with pytest.raises(ValueError, match="has no head axis"):
        hooks.run(tl, tokens, [zero("blocks.0.hook_resid_post", head=1)])


def test_wrong_patch_shape(pair, tokens):
    _, tl = pair
    with pytest.raises(ValueError, match=r"replacement of shape \(7,\) does not fit"):
        hooks.run(tl, tokens, [replace("blocks.0.hook_resid_post", torch.zeros(7))])


def test_donor_of_other_length_or_batch(pair, tokens):
    hf, tl = pair
    name = "blocks.0.attn.hook_z"
    short = hooks.run(tl, tokens[:, :5], cache=[name])[1]
    for module, model in ((hooks, tl), (hf_hooks, hf)):
        with pytest.raises(ValueError, match="same token length"):
            module.run(model, tokens, [patch(name, short, head=1, pos=-1)])
        with pytest.raises(ValueError, match="same token length"):
            module.run(model, tokens, [patch(name, {name: torch.zeros(2, 9, 4, 8)}, head=1)])
    with pytest.raises(KeyError, match="holds no"):
        patch("blocks.1.attn.hook_z", short)


def test_read_only_hf_points_refuse_edits(pair, tokens):
    hf, _ = pair
    with pytest.raises(ValueError, match="read-only"):
        hf_hooks.run(hf, tokens, [zero("blocks.0.attn.hook_pattern", head=1)])
