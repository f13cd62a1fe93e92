"""IOI datasets and metrics, plus property-based checks of index validation."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tl_patching import hooks
from tl_patching.hooks import HookNameError, zero
from tl_patching.metrics import logit_diff, prob_ratio, summarize
from tl_patching.prompts import HELD_OUT_TEMPLATES, NAMES, TEMPLATES, IOIPrompt, ioi_batches, ioi_prompts
from tl_patching.recipe.word_tokenizer import word_tokenizer


@pytest.fixture(scope="module")
def ioi_model():
    from tl_patching.models import random_gpt2

    texts = [p.text for p in ioi_prompts(300, templates=TEMPLATES + HELD_OUT_TEMPLATES)] + [" " + n for n in NAMES]
    return random_gpt2(n_layers=2, tokenizer=word_tokenizer(texts))[1]


def test_prompts_balanced_and_seeded():
    a, b = ioi_prompts(40, seed=3), ioi_prompts(40, seed=3)
    assert a == b and a != ioi_prompts(40, seed=4)
    assert sum(p.order == "ABBA" for p in a) == 20
    assert {p.template for p in a} == set(TEMPLATES)
    assert all(p.io != p.s for p in a)


def test_donor_flips_the_answer_only():
    p = IOIPrompt(TEMPLATES[0], io="Sally", s="Sam", order="ABBA")
    assert p.text == "Sally and Sam went to the park. Sam gave a gift to"
    d = p.donor()
    assert d.text == "Sally and Sam went to the park. Sally gave a gift to" and (d.io, d.s) == ("Sam", "Sally")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 60), seed=st.integers(0, 10_000))
def test_dataset_never_yields_a_pair_that_fails_its_checks(ioi_model, n, seed):
    batches = ioi_batches(ioi_model, ioi_prompts(n, seed=seed, templates=TEMPLATES + HELD_OUT_TEMPLATES))
    assert sum(len(b) for b in batches) == n
    for b in batches:
        assert b.tokens.shape == b.donor_tokens.shape
        assert ((b.tokens != b.donor_tokens).sum(1) == 1).all()  # exactly the repeated name differs
        assert (b.correct != b.wrong).all()
        assert (b.donor_tokens[b.tokens != b.donor_tokens] == b.correct).all()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layer=st.integers(-2, 4), head=st.integers(-6, 6), pos=st.integers(-12, 12))
def test_any_layer_head_position_gives_a_valid_result_or_the_documented_error(pair, tokens, layer, head, pos):
    _, tl = pair
    name = f"blocks.{layer}.attn.hook_z"
    try:
        logits, cache = hooks.run(tl, tokens, [zero(name, head=head, pos=pos)], cache=[name])
    except (IndexError, HookNameError) as e:
        assert not (0 <= layer < 3 and -4 <= head < 4 and -9 <= pos < 9), e
        return
    assert 0 <= layer < 3 and -4 <= head < 4 and -9 <= pos < 9  # Python-style negative indices count from the end
    assert logits.shape == (3, 9, tl.cfg.d_vocab)
    assert cache[name].shape == (3, 9, 4, 8) and (cache[name][:, pos, head] == 0).all()


def test_metrics():
    logits = torch.zeros(2, 3, 5)
    logits[0, -1, 1], logits[1, -1, 2] = 2.0, -1.0
    correct, wrong = torch.tensor([1, 2]), torch.tensor([0, 0])
    assert torch.equal(logit_diff(logits, correct, wrong), torch.tensor([2.0, -1.0]))
    assert torch.allclose(prob_ratio(logits, correct, wrong), torch.tensor([2.0, -1.0]).exp())
    s = summarize(torch.tensor([1.0, 2.0, 3.0, -1.0] * 10))
    assert s.mean == pytest.approx(1.25) and s.ci_low < 1.25 < s.ci_high and s.accuracy == 0.75 and s.n == 40


def test_nan_from_an_intervention_is_reported(pair, tokens):
    hf, tl = pair
    from tl_patching import hf_hooks
    from tl_patching.hooks import scale

    for module, model in ((hooks, tl), (hf_hooks, hf)):
        with pytest.raises(FloatingPointError, match="blocks.1.hook_resid_post"):
            module.run(model, tokens, [scale("blocks.1.hook_resid_post", float("nan"))])
