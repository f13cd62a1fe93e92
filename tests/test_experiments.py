"""E1–E5 on small random GPT-2s: each equals its HF-hook version, saves and loads, and checks its inputs."""

import pytest
import torch

from tl_patching.experiments import (
    e1_attention_scores as e1,
    e2_activation_editing as e2,
    e3_cosine_similarity as e3,
    e4_ioi_patching as e4,
    e5_head_token_patching as e5,
)
from tl_patching.models import random_gpt2
from tl_patching.prompts import NAMES, PIZZA_SENTENCES, TEMPLATES, PromptError, ioi_batches, ioi_pair, ioi_prompts
from tl_patching.word_tokenizer import word_tokenizer

ATOL = 1e-4


@pytest.fixture(scope="module")
def models():
    texts = [e1.DEFAULT_TEXT, e4.SEED_DONOR, *PIZZA_SENTENCES, *TEMPLATES] + [" " + n for n in NAMES] + [p.text for p in ioi_prompts(200)]
    # 4 layers, 4 heads, with "Sally" deliberately split in two so the multi-token check has a victim
    return random_gpt2(n_layers=4, n_heads=4, d_head=8, seed=3, tokenizer=word_tokenizer(texts), n_ctx=64)


def close(a, b, atol=ATOL):
    return (torch.as_tensor(a) - torch.as_tensor(b)).abs().max().item() <= atol


def test_e1_matches_hf_and_checks(models):
    hf, tl = models
    r, rh = e1.run(tl), e1.run(tl, hf_model=hf)
    assert r.mean_score.shape == r.frac_negative.shape == (4, 4)
    assert close(r.mean_score, rh.mean_score) and close(r.frac_negative, rh.frac_negative) and close(r.kde_density, rh.kde_density)
    assert torch.allclose(r.first_token_self_attention, torch.ones(4, 4))
    assert r.max_diff_split_vs_hook < ATOL
    assert r.kde_density.shape == (4, 200) and (r.kde_density >= 0).all()
    n = len(r.info.token_ids[0])
    assert r.info.prepend_bos and r.info.token_ids[0][0] == tl.tokenizer.bos_token_id
    assert n * (n + 1) // 2 > 0  # visible pairs include the diagonal
    back = e1.E1Result.from_json(r.to_json())
    assert torch.allclose(back.mean_score, r.mean_score, rtol=1e-5, atol=1e-12) and back.info == r.info  # 6 significant digits


def test_e2_matches_hf(models):
    hf, tl = models
    r, rh = e2.run(tl, layer=2, head=1), e2.run(tl, layer=2, head=1, hf_model=hf)
    assert [i.label for i in r.interventions] == [i.label for i in rh.interventions] and len(r.interventions) == 4
    assert close(r.clean_resid_std, rh.clean_resid_std)
    for a, b in zip(r.interventions, rh.interventions):
        assert close(a.resid_std, b.resid_std) and a.top_tokens == b.top_tokens and abs(a.kl_from_clean - b.kl_from_clean) < ATOL
    scaled = r.interventions[2]  # × 0.1: the edited layer's spread is exactly a tenth
    assert abs(scaled.resid_std[2] - 0.1 * r.clean_resid_std[2]) < 1e-5
    assert torch.equal(scaled.resid_std[:2], r.clean_resid_std[:2])  # earlier layers untouched
    assert set(rh.block_output_structure) == {"output_attentions=False", "output_attentions=True"}
    assert type(e2.E2Result.from_json(r.to_json()).interventions[0]) is e2.Intervention


def test_e2_defaults_follow_the_model(models):
    _, tl = models
    assert e2.default_layer(tl) == 2  # three quarters of 4 layers; the seed's 9 only for 12-layer models
    with pytest.raises(IndexError):
        e2.run(tl, layer=4)


def test_e3_matches_hf_and_counts_pairs(models):
    hf, tl = models
    r, rh = e3.run(tl, layer=1, head=2), e3.run(tl, layer=1, head=2, hf_model=hf)
    m = len(r.info.token_ids[0])
    assert r.n_pairs == m * (m - 1) // 2 == r.clean_pairs.shape[1]
    assert not r.info.prepend_bos
    assert close(r.clean_pairs, rh.clean_pairs) and close(r.silenced_pairs, rh.silenced_pairs)
    assert r.significant == rh.significant and r.threshold == pytest.approx(0.05 / 4)
    assert torch.equal(r.clean_pairs[:1], r.silenced_pairs[:1]) and r.p_value[0] == 1.0  # before the silenced layer
    assert (r.silenced_pairs[1:] != r.clean_pairs[1:]).any()


def test_e3_unique_pairs():
    x = torch.randn(5, 8)
    sims = e3.unique_pair_similarities(x)
    assert sims.shape == (10,)
    assert sims[0] == pytest.approx(torch.nn.functional.cosine_similarity(x[0], x[1], dim=0).item(), abs=1e-6)


def test_e3_refuses_processed_weights(models):
    hf, _ = models
    from tl_patching.models import hooked_from_hf
    with pytest.raises(ValueError, match="raw weights"):
        e3.run(hooked_from_hf(hf, weights="processed"))


def test_e4_matches_hf(models):
    hf, tl = models
    r, rh = e4.run(tl, progress=False), e4.run(tl, hf_model=hf, progress=False)
    for field in ("clean", "donor", "heads_patched", "resid_s2_patched", "resid_final_patched"):
        assert close(getattr(r, field), getattr(rh, field)), field
    # The donor differs at S2 only: patching resid_post there at layer 0 already gives the donor run's
    # final logits if nothing else differs; at the last layer it changes nothing at the final position.
    assert close(r.resid_final_patched[-1], r.donor)
    assert close(r.resid_s2_patched[-1], r.clean)
    assert torch.allclose(r.prob_ratio("heads_patched"), r.heads_patched.double().mean(-1).exp())  # geometric mean


def test_e4_dataset_and_json(models):
    _, tl = models
    batches = ioi_batches(tl, ioi_prompts(12, seed=5))
    r = e4.run(tl, batches, progress=False)
    assert r.clean.shape == (12,) and r.heads_patched.shape == (4, 12) and r.info.settings["n_prompts"] == 12
    assert sorted(r.info.token_ids) == sorted(row for b in batches for row in b.tokens.tolist())  # every prompt recorded
    assert r.heads_summary[0].ci_low <= r.heads_summary[0].mean <= r.heads_summary[0].ci_high
    back = e4.E4Result.from_json(r.to_json())
    assert back.heads_summary[0].mean == pytest.approx(r.heads_summary[0].mean, rel=1e-5)  # JSON keeps 6 significant digits
    assert torch.allclose(back.heads_patched, r.heads_patched, rtol=1e-5, atol=0)


def test_e4_pair_builder_rejects_bad_pairs(models):
    _, tl = models
    with pytest.raises(PromptError, match="not one"):
        ioi_pair(tl, e4.SEED_RECIPIENT, e4.SEED_DONOR, " Sally Sam", " Sam")
    with pytest.raises(PromptError, match="equal lengths"):
        ioi_pair(tl, e4.SEED_RECIPIENT, "Sam and Sally went to the park. Sally gave a gift", " Sally", " Sam")
    with pytest.raises(PromptError, match="empty"):
        ioi_pair(tl, "  ", e4.SEED_DONOR, " Sally", " Sam")


def test_e5_fast_equals_plain_equals_hf(models):
    hf, tl = models
    fast, plain, hf_r = e5.run(tl, progress=False), e5.run(tl, method="plain", progress=False), e5.run(tl, hf_model=hf, progress=False)
    assert fast.effect.shape == (4, 4, 1)
    assert close(fast.effect, plain.effect) and close(fast.effect, hf_r.effect)
    assert hf_r.method == "plain" and fast.method == "fast"
    summary = fast.layer_summary()
    assert summary["n_positive"].sum() == (fast.heatmap > 0).sum()


def test_readings_are_one_line(models):
    _, tl = models
    for module in (e1, e2, e3):
        line = module.run(tl).reading()
        assert "\n" not in line and len(line) > 20
