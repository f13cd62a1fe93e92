"""Our weight loading is TransformerLens's own `load_and_process_state_dict`, bit for bit, on every family.

`hooked_from_hf` does TL's processing on the state dict and loads it in one `load_state_dict` call; TL's method
loads it one key at a time. Both are run here on the same converted weights and compared exactly: every tensor
of the state dict, the config, the module tree (the folded norms swapped for their ``Pre`` forms), the hook
points, and the logits.
"""

from unittest import mock

import pytest
import torch

from tl_patching import lens

if lens.MAJOR >= 4:
    pytest.skip(
        f"HookedTransformer's own loading (TransformerLens 3); installed {lens.TL_VERSION}", allow_module_level=True
    )

from transformer_lens import HookedTransformer  # noqa: E402
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities.activation_functions import softcap_enabled

from tl_patching.families import FAMILIES
from tl_patching.models import hooked_config
from tl_patching.testing import random_pair


def tl_own_load(hf, family: str, name: str, processed: bool) -> HookedTransformer:
    """hf's weights loaded by TL's `load_and_process_state_dict`, with the flags `from_pretrained` uses."""
    cfg = hooked_config(hf.config)
    cfg.model_name = name
    model = HookedTransformer(cfg, move_to_device=False)
    with torch.no_grad():
        model.load_and_process_state_dict(
            FAMILIES[family].convert_weights(hf, cfg),
            fold_ln=processed,
            center_writing_weights=processed,
            center_unembed=processed and not softcap_enabled(cfg.output_logits_soft_cap),
            fold_value_biases=processed,
            refactor_factored_attn_matrices=False,
        )
    return model.to("cpu").eval()


@pytest.mark.parametrize("weights", ["raw", "processed"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_loading_equals_transformer_lens_own_load_and_process(family, weights):
    hf, ours = random_pair(family, seed=3, weights=weights)
    theirs = tl_own_load(hf, family, ours.cfg.model_name, weights == "processed")

    assert ours.cfg.to_dict() == theirs.cfg.to_dict()
    assert [(n, type(m)) for n, m in ours.named_modules()] == [(n, type(m)) for n, m in theirs.named_modules()]
    assert list(ours.hook_dict) == list(theirs.hook_dict)
    # and they are the hook points of the modules now in the model (set up again after the norm swap)
    assert ours.hook_dict == {n: m for n, m in ours.named_modules() if isinstance(m, HookPoint)}
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert list(ours_state) == list(theirs_state)
    for key, tensor in ours_state.items():
        assert tensor.dtype == theirs_state[key].dtype and torch.equal(tensor, theirs_state[key]), key
    tokens = torch.randint(0, ours.cfg.d_vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(tokens), theirs(tokens))


@pytest.mark.parametrize("weights", ["raw", "processed"])
def test_weights_are_loaded_in_one_call(weights):
    """TL's method calls load_state_dict once per key, each walking the whole module tree (most of a SmolLM2 load)."""
    load = torch.nn.Module.load_state_dict
    with mock.patch.object(HookedTransformer, "load_state_dict", autospec=True, side_effect=load) as spy:
        random_pair("llama", weights=weights)
    assert spy.call_count == 1
