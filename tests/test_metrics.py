"""Metrics per prompt, and summaries with bootstrap confidence intervals."""

import pytest
import torch

from tl_patching.metrics import logit_diff, prob_ratio, summarize


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
