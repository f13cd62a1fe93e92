"""Metrics per prompt, and summaries with bootstrap confidence intervals."""

import numpy as np
import pytest
import torch
from scipy import stats

from tl_patching.metrics import logit_diff, normalized_patch_effect, prob_ratio, summarize


def test_logit_diff_and_prob_ratio_by_hand():
    logits = torch.zeros(2, 3, 5)
    logits[0, -1, 1], logits[1, -1, 2] = 2.0, -1.0
    correct, wrong = torch.tensor([1, 2]), torch.tensor([0, 0])
    assert torch.equal(logit_diff(logits, correct, wrong), torch.tensor([2.0, -1.0]))
    assert torch.allclose(prob_ratio(logits, correct, wrong), torch.tensor([2.0, -1.0]).exp())


def test_summary_mean_interval_accuracy():
    s = summarize(torch.tensor([1.0, 2.0, 3.0, -1.0] * 10))
    assert s.mean == pytest.approx(1.25) and s.ci_low < 1.25 < s.ci_high and s.accuracy == 0.75 and s.n == 40
    assert 0.6 < s.ci_low < 1.0 and 1.5 < s.ci_high < 1.9  # ±1.96·σ/√n ≈ ±0.46 around 1.25


def bootstrap_by_hand(x: np.ndarray, seed: int = 0, n_resamples: int = 2000) -> tuple[float, float]:
    """The percentile bootstrap written out: resample with replacement (scipy draws the indices from
    ``RandomState(seed)`` when given an integer seed), mean each resample, take the 2.5% and 97.5% quantiles."""
    means = x[np.random.RandomState(seed).randint(0, len(x), (n_resamples, len(x)))].mean(-1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(low), float(high)


# Skewed, with zeros: percentile, BCa and basic intervals differ, and "> 0" and ">= 0" count differently.
SKEWED = np.array([0.0, 0.0, 0.5, 1.0, 1.5, 2.0, 9.0, -1.0, 0.2, 12.0])


def test_summary_interval_is_the_seeded_percentile_bootstrap():
    s = summarize(SKEWED, seed=3)
    low, high = bootstrap_by_hand(SKEWED, seed=3)
    assert (s.ci_low, s.ci_high) == pytest.approx((low, high), abs=1e-12)
    assert (s.ci_low, s.ci_high) == pytest.approx((0.32, 5.4), abs=1e-9)  # the hand computation's numbers
    for other in ("BCa", "basic"):  # the other two bootstrap intervals scipy offers give other numbers here
        ci = stats.bootstrap((SKEWED,), np.mean, n_resamples=2000, method=other, random_state=3).confidence_interval
        assert abs(ci.low - s.ci_low) > 0.2 and abs(ci.high - s.ci_high) > 0.6, other
    other_seed = summarize(SKEWED, seed=4)
    assert (other_seed.ci_low, other_seed.ci_high) != (s.ci_low, s.ci_high)  # the seed is used
    assert summarize(torch.tensor(SKEWED), seed=3) == s  # a tensor gives the same summary as an array


def test_summary_accuracy_counts_strictly_positive_values():
    s = summarize(SKEWED)
    assert s.accuracy == 0.7 and s.mean == pytest.approx(2.52) and s.n == 10  # 7 of 10 above 0; ">= 0" would give 0.9
    one = summarize(np.array([0.0]))
    assert (one.mean, one.ci_low, one.ci_high, one.accuracy, one.n) == (0.0, 0.0, 0.0, 0.0, 1)


def test_logit_diff_is_correct_minus_wrong_and_prob_ratio_its_softmax_ratio():
    logits = torch.tensor([[[9.0, 9.0, 9.0, 9.0], [0.5, 3.0, -1.0, 2.0]]])  # only the last position counts
    correct, wrong = torch.tensor([3]), torch.tensor([1])
    assert torch.equal(logit_diff(logits, correct, wrong), torch.tensor([-1.0]))  # 2.0 − 3.0, not 3.0 − 2.0
    probs = logits[0, -1].softmax(-1)
    assert torch.allclose(prob_ratio(logits, correct, wrong), (probs[3] / probs[1])[None])  # e^-1 ≈ 0.368, not e^1


def test_normalized_patch_effect_runs_from_clean_to_donor():
    clean, corrupted = torch.tensor([4.0, 4.0, 4.0]), torch.tensor([-2.0, -2.0, -2.0])
    patched = torch.tensor([4.0, -2.0, 2.5])  # unmoved, all the way to the donor, a quarter of the way
    assert torch.equal(normalized_patch_effect(patched, clean, corrupted), torch.tensor([0.0, 1.0, 0.25]))
