"""Shared fixtures: small random GPT-2s (HF model + HookedTransformer with the same weights), fixed seeds."""

import pytest
import torch

from tl_patching import lens, prompts
from tl_patching.recipe.word_tokenizer import word_tokenizer
from tl_patching.testing import random_gpt2

TEXTS = [
    "Sam and Sally went to the park. Sam gave a gift to Sally",
    "Tom and Anna went to the shop. Anna gave a book to Tom",
    "I love pizza with pineapple and cheese .",
]


def pytest_report_header(config):
    model = "TransformerBridge (compatibility mode)" if lens.MAJOR >= 4 else "HookedTransformer"
    return f"transformer-lens {lens.TL_VERSION}: the TransformerLens model is a {model}"


def pytest_collection_modifyitems(config, items):
    """``tl3``-marked tests check HookedTransformer's own conversion or engine, which TransformerLens 4 removed."""
    if lens.MAJOR >= 4:
        skip = pytest.mark.skip(reason=f"needs HookedTransformer (TransformerLens 3); installed {lens.TL_VERSION}")
        for item in items:
            if item.get_closest_marker("tl3") is not None:
                item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True, params=[f"tl{lens.MAJOR}"])
def transformer_lens_major(request):
    """Every test ID ends with the TransformerLens major it ran on (``test_x[gpt2-tl4]``), so that a report from
    one environment cannot be mistaken for the other's."""
    return request.param


@pytest.fixture(scope="session")
def tokenizer():
    return word_tokenizer(TEXTS)


@pytest.fixture(scope="session")
def pair(tokenizer):
    """(hf_model, tl_model), raw weights: 3 layers, 4 heads of 8, fp32."""
    return random_gpt2(n_layers=3, n_heads=4, d_head=8, seed=0, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def tokens(pair):
    """Batch of 3 prompts of 9 token ids, seeded."""
    _, tl = pair
    return torch.randint(2, tl.cfg.d_vocab, (3, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def donor_tokens(pair):
    _, tl = pair
    return torch.randint(2, tl.cfg.d_vocab, (3, 9), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="session")
def forwards(pair):
    """The same model on both backends: {"tl": TransformerLens hooks, "hf": raw HF hooks}."""
    from tl_patching.forward import Forward

    hf, tl = pair
    return {"tl": Forward(tl), "hf": Forward(tl, hf)}


@pytest.fixture(scope="session")
def ioi_tokenizer():
    """A word-level tokenizer that knows every IOI template, name and the experiments' default texts."""
    from tl_patching.experiments import e1_attention_scores as e1
    from tl_patching.prompts import NAMES, PIZZA_SENTENCES, TEMPLATES, ioi_prompts

    texts = (
        [e1.DEFAULT_TEXT, prompts.SEED_DONOR, *PIZZA_SENTENCES, *TEMPLATES]
        + [" " + n for n in NAMES]
        + [p.text for p in ioi_prompts(200)]
    )
    return word_tokenizer(texts)


@pytest.fixture(scope="module", params=["raw", "processed"])
def patch_setup(request):
    """A 4-layer random GPT-2 (raw or processed weights) with recipient/donor prompts differing at position 4 (as
    IOI's S2), answer ids, the donor's z and resid_post, and a logit-difference metric."""
    from tl_patching.edits import act_name
    from tl_patching.forward import Forward
    from tl_patching.metrics import LogitDiff
    from tl_patching.models import hooked_from_hf

    hf, tl = random_gpt2(n_layers=4, n_heads=4, d_head=8, seed=7)
    forward = Forward(tl if request.param == "raw" else hooked_from_hf(hf, weights="processed"))
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, 64, (3, 10), generator=g)
    donor_tokens = tokens.clone()
    donor_tokens[:, 4] = torch.randint(0, 64, (3,), generator=g)
    correct, wrong = torch.tensor([3, 4, 5]), torch.tensor([6, 7, 8])
    _, donor = forward.run(donor_tokens, cache=[act_name(k, l) for l in range(4) for k in ("z", "resid_post")])
    return forward, tokens, donor_tokens, donor, correct, wrong, LogitDiff(correct, wrong)


@pytest.fixture(autouse=True)
def one_thread_for_tiny_models(request):
    """Tiny models run faster on one thread than on two, and do not collapse when the machine is busy (two threads
    contending with other work made tiny forwards ~10x slower); the slow tests' larger models keep every thread."""
    threads = torch.get_num_threads()
    if request.node.get_closest_marker("slow") is None:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
