"""Metrics read from logits at the final position, per prompt (never averaged away inside)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from jaxtyping import Float, Int
from scipy import stats
from torch import Tensor


def logit_diff(
    logits: Float[Tensor, "batch pos d_vocab"], correct: Int[Tensor, " batch"], wrong: Int[Tensor, " batch"]
) -> Float[Tensor, " batch"]:
    """Logit of the correct answer minus the wrong one at the last position (nats, per prompt)."""
    last = logits[:, -1]
    return last.gather(-1, correct[:, None].to(last.device))[:, 0] - last.gather(-1, wrong[:, None].to(last.device))[:, 0]


def prob_ratio(
    logits: Float[Tensor, "batch pos d_vocab"], correct: Int[Tensor, " batch"], wrong: Int[Tensor, " batch"]
) -> Float[Tensor, " batch"]:
    """P(correct) / P(wrong) at the last position; equals exp(logit_diff)."""
    return logit_diff(logits, correct, wrong).exp()


@dataclass(frozen=True)
class Summary:
    """Mean with a bootstrap 95% confidence interval, and accuracy (fraction of prompts with the value > 0)."""

    mean: float
    ci_low: float
    ci_high: float
    accuracy: float
    n: int


def summarize(values: Float[Tensor, " n"] | np.ndarray, seed: int = 0, n_resamples: int = 2000) -> Summary:
    """Mean, bootstrap 95% CI (scipy, percentile method, seeded) and accuracy of per-prompt values."""
    x = values.detach().cpu().double().numpy() if isinstance(values, Tensor) else np.asarray(values, dtype=float)
    if len(x) < 2:
        return Summary(float(x.mean()), float(x.mean()), float(x.mean()), float((x > 0).mean()), len(x))
    ci = stats.bootstrap((x,), np.mean, n_resamples=n_resamples, method="percentile", random_state=seed).confidence_interval
    return Summary(float(x.mean()), float(ci.low), float(ci.high), float((x > 0).mean()), len(x))


def normalized_patch_effect(patched: Tensor, clean: Tensor, corrupted: Tensor) -> Tensor:
    """0 = recipient's clean metric, 1 = the donor's: the fraction of the way a patch moves it."""
    return (patched - clean) / (corrupted - clean)


def loss_per_token(logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"], mask: Tensor | None = None) -> float:
    """Mean next-token cross-entropy (nats/token) over positions where ``mask`` (of the targets) is true."""
    log_probs = logits[:, :-1].log_softmax(-1)
    nll = -log_probs.gather(-1, tokens[:, 1:, None])[..., 0]
    if mask is not None:
        nll = nll[mask[:, 1:]]
    return float(nll.mean())

