"""The backend-neutral edit vocabulary: hook names as TL spells them, indices checked, rows restricted."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformer_lens.utilities import get_act_name

from tl_patching.edits import HookNameError, act_name, patch, scale, zero


@pytest.mark.parametrize(
    "kind, layer",
    [
        ("z", 3),
        ("q", 0),
        ("k", 1),
        ("v", 2),
        ("rot_q", 1),
        ("rot_k", 0),
        ("result", 1),
        ("pattern", 2),
        ("attn", 2),
        ("attn_scores", 0),
        ("pre", 1),
        ("post", 1),
        ("mid", 0),
        ("pre_linear", 0),
        ("resid_pre", 0),
        ("resid_mid", 1),
        ("resid_post", 2),
        ("attn_out", 0),
        ("mlp_out", 3),
        ("embed", None),
        ("pos_embed", None),
        ("normalized", None),
        ("scale", None),
        ("blocks.2.attn.hook_z", None),
    ],
)
def test_act_name_spells_names_as_transformer_lens(kind, layer):
    assert act_name(kind, layer) == get_act_name(kind, layer)


def test_act_name_rejects_ambiguous_input():
    with pytest.raises(ValueError, match="per-layer hook"):
        act_name("z")
    with pytest.raises(ValueError, match="already a full hook name"):
        act_name("blocks.0.attn.hook_z", 1)


def test_edit_on_rows_touches_only_those_rows():
    act = torch.ones(6, 4, 3, 2)
    out = scale("blocks.0.attn.hook_z", 5.0, head=1).on_rows(slice(2, 4))(act)
    assert torch.equal(out[2:4, :, 1], torch.full((2, 4, 2), 5.0))
    assert (
        torch.equal(out[:2], act[:2])
        and torch.equal(out[4:], act[4:])
        and torch.equal(out[2:4, :, [0, 2]], act[2:4, :, [0, 2]])
    )


def test_patch_with_a_batch_of_one_donor():
    donor = torch.arange(8.0).reshape(1, 2, 4)
    out = patch("blocks.0.hook_resid_post", donor, pos=1)(torch.zeros(3, 2, 4))
    assert torch.equal(out[:, 1], donor[0, 1].expand(3, 4)) and torch.equal(out[:, 0], torch.zeros(3, 4))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layer=st.integers(-2, 4), head=st.integers(-6, 6), pos=st.integers(-12, 12))
def test_any_layer_head_position_gives_a_valid_result_or_the_documented_error(forwards, tokens, layer, head, pos):
    name = f"blocks.{layer}.attn.hook_z"
    try:
        logits, cache = forwards["tl"].run(tokens, [zero(name, head=head, pos=pos)], cache=[name])
    except (IndexError, HookNameError) as e:
        assert not (0 <= layer < 3 and -4 <= head < 4 and -9 <= pos < 9), e
        return
    assert 0 <= layer < 3 and -4 <= head < 4 and -9 <= pos < 9  # Python-style negative indices count from the end
    assert logits.shape == (3, 9, forwards["tl"].cfg.d_vocab)
    assert cache[name].shape == (3, 9, 4, 8) and (cache[name][:, pos, head] == 0).all()
