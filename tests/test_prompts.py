"""IOI prompts and datasets, and the tokenisation checks: no silent <unk>, truncation or empty text."""

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tl_patching.prompts import (
    HELD_OUT_TEMPLATES,
    NAMES,
    TEMPLATES,
    IOIPrompt,
    PromptError,
    ioi_batches,
    ioi_pair,
    ioi_prompts,
    single_token,
    to_tokens,
)
from tl_patching.recipe.word_tokenizer import word_tokenizer


@pytest.fixture(scope="module")
def ioi_model():
    from tl_patching.testing import random_gpt2

    texts = [p.text for p in ioi_prompts(300, templates=TEMPLATES + HELD_OUT_TEMPLATES)] + [" " + n for n in NAMES]
    return random_gpt2(n_layers=2, n_ctx=24, tokenizer=word_tokenizer(texts))[1]


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


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_text_is_refused(ioi_model, text):
    with pytest.raises(PromptError, match="empty text"):
        to_tokens(ioi_model, text)


def test_unknown_words_are_named_not_replaced(ioi_model):
    with pytest.raises(PromptError, match=r"does not know 'cat', 'mat'"):
        to_tokens(ioi_model, "Sam and the cat went to the mat")
    with pytest.raises(PromptError, match="Bartholomew"):
        single_token(ioi_model, " Bartholomew")
    with pytest.raises(PromptError, match="Bartholomew"):
        ioi_pair(
            ioi_model,
            "Sam and Sally went to the park. Sam gave a gift to",
            "Sam and Sally went to the park. Sally gave a gift to",
            " Bartholomew",
            " Sam",
        )


def test_text_longer_than_the_context_is_refused_not_truncated(ioi_model):
    text = " ".join(["Sam and Sally went to the park."] * 5)  # 8 words × 5 + BOS > 24
    with pytest.raises(PromptError, match=r"longer than the model's context of 24"):
        to_tokens(ioi_model, text)
    assert to_tokens(ioi_model, "Sam and Sally went to the park.").shape == (1, 9)


def test_ioi_pair_refuses_a_name_without_its_leading_space(ioi_model):
    """ioi_pair(model, …, "Sally", "Sam") measured other tokens than " Sally" / " Sam": it is refused, naming the
    spaced form."""
    recipient, donor = (
        "Sam and Sally went to the park. Sam gave a gift to",
        "Sam and Sally went to the park. Sally gave a gift to",
    )
    with pytest.raises(PromptError, match=r"'Sally' has no leading space: .* pass ' Sally'"):
        ioi_pair(ioi_model, recipient, donor, "Sally", "Sam")
    with pytest.raises(PromptError, match=r"'Sam' has no leading space: .* pass ' Sam'"):
        ioi_pair(ioi_model, recipient, donor, " Sally", "Sam")
    pair = ioi_pair(ioi_model, recipient, donor, " Sally", " Sam")
    assert ioi_model.tokenizer.decode(pair.correct) == " Sally" and ioi_model.tokenizer.decode(pair.wrong) == " Sam"


def test_a_word_level_vocabulary_read_by_the_qwen2_tokenizer_class_is_refused(tmp_path):
    """transformers 5 loads any `model_type: qwen2` directory with Qwen2Tokenizer, whatever its tokenizer.json: a
    word-level vocabulary then maps the words of a text to a few byte pieces ("Sam and Sally went to the park." →
    "aaaa."), and E1 ran on that without a word of the sentence. to_tokens refuses a text it cannot give back."""
    import json

    from transformers import AutoTokenizer

    from tl_patching.testing import random_gpt2

    text = "Sam and Sally went to the park."
    word_tokenizer([text, "Sam gave a gift to"]).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) != text and len(ids) < len(text.split())  # the trap: other, fewer tokens
    model = random_gpt2(n_layers=1, d_vocab=len(tokenizer), tokenizer=tokenizer)[1]
    with pytest.raises(PromptError, match=r"cannot give this text back: 'Sam' is lost \(the ids decode to 'aaaa\.'\)"):
        to_tokens(model, text)


@pytest.mark.parametrize(
    "template, obj, expected",
    [
        (TEMPLATES[0], "apple", "Sam and Sally went to the park. Sally gave an apple to"),
        (TEMPLATES[0], "Orange", "Sam and Sally went to the park. Sally gave an Orange to"),
        (TEMPLATES[0], "pizza", "Sam and Sally went to the park. Sally gave a pizza to"),
        (TEMPLATES[1], "apple", "Sam and Sally walked to the park. Sally gave the apple to"),  # "the" stays
        (
            "{A} had a day with {B} at the {PLACE}. {S} gave a {OBJECT} to",
            "egg",
            "Sam had a day with Sally at the park. Sally gave an egg to",
        ),  # only the object's article changes
    ],
)
def test_the_article_agrees_with_the_object(template, obj, expected):
    p = IOIPrompt(template, io="Sam", s="Sally", obj=obj, order="ABBA")
    assert p.text == expected
    assert p.donor().text == expected.replace("Sally gave", "Sam gave")  # the donor keeps it: same token length
    assert p.filled() == expected.replace(f" an {obj} ", f" a {obj} ")  # the template as written


def test_no_prompt_of_the_dataset_says_a_before_a_vowel():
    texts = [p.text for p in ioi_prompts(400, templates=TEMPLATES + HELD_OUT_TEMPLATES)]
    texts += [p.text for p in ioi_prompts(50, objects=("apple", "egg", "gift"))]
    assert not [t for t in texts if re.search(r"\ba [aeiouAEIOU]", t)]
    assert sum(" an apple " in t or " an egg " in t for t in texts) > 10


def test_the_recipe_keeps_the_texts_the_shipped_model_was_trained_on():
    """The shipped model's corpus said "gave a apple"; its recipe must still make that corpus, whatever prompts say."""
    from tl_patching.recipe.training import TRAINED_OBJECTS, eval_prompts

    prompts = eval_prompts([("Sam", "Sally"), ("Tom", "Anna")], n=200)
    assert "apple" in TRAINED_OBJECTS and {p.obj for p in prompts} == set(TRAINED_OBJECTS)
    assert any(" a apple " in p.text for p in prompts) and not any(" an " in p.text for p in prompts)
    assert all(p.donor().text == p.donor().filled() for p in prompts)
