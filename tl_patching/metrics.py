"""Metrics read from logits at the final position, per prompt (never averaged away inside)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from scipy import stats
from torch import Tensor

# The one metric convention: a metric reads the final position's logits ``[batch, d_vocab]`` and returns one number
# per prompt. Every sweep, fast path, attribution and path patch takes such a metric.
Metric = Callable[[Float[Tensor, "batch d_vocab"]], Float[Tensor, " batch"]]


def logit_diff(
    logits: Float[Tensor, "batch pos d_vocab"], correct: Int[Tensor, " batch"], wrong: Int[Tensor, " batch"]
) -> Float[Tensor, " batch"]:
    """Logit of the correct answer minus the wrong one at the last position (nats, per prompt), from the logits of
    every position (what a forward returns). As a sweep's metric, use `LogitDiff`."""
    if logits.ndim != 3:
        raise ValueError(
            f"logit_diff takes the logits of every position [batch, pos, d_vocab], got {tuple(logits.shape)}; "
            "on the final position's logits use LogitDiff(correct, wrong)"
        )
    return LogitDiff(correct, wrong)(logits[:, -1])


@dataclass(frozen=True, eq=False)
class LogitDiff:
    """The metric ``logit[correct] − logit[wrong]`` at the final position, per prompt (nats). The fast paths recognise
    it and compute only these two columns of the unembedding."""

    correct: Int[Tensor, " batch"]
    wrong: Int[Tensor, " batch"]

    def __post_init__(self):
        if self.correct.ndim != 1 or self.correct.shape != self.wrong.shape:
            raise ValueError(
                f"one correct and one wrong answer id per prompt, got {tuple(self.correct.shape)} and "
                f"{tuple(self.wrong.shape)}"
            )

    def __call__(self, final_logits: Float[Tensor, "batch d_vocab"]) -> Float[Tensor, " batch"]:
        if final_logits.ndim != 2 or len(final_logits) != len(self.correct):
            raise ValueError(
                f"a metric takes the final position's logits [batch={len(self.correct)}, d_vocab], got "
                f"{tuple(final_logits.shape)}"
            )
        ids = self.columns.to(final_logits.device)
        pair = final_logits.gather(-1, ids)
        return pair[:, 0] - pair[:, 1]

    @property
    def columns(self) -> Int[Tensor, "batch 2"]:
        """The two vocabulary columns per prompt: ``[correct, wrong]``."""
        return torch.stack([self.correct, self.wrong], -1)

    def check(self, d_vocab: int) -> None:
        """Raise `IndexError` unless every answer id is inside a vocabulary of ``d_vocab``."""
        if int(self.columns.max()) >= d_vocab or int(self.columns.min()) < 0:
            raise IndexError(f"answer token id out of the vocabulary of {d_vocab}")


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
    ci = stats.bootstrap(
        (x,), np.mean, n_resamples=n_resamples, method="percentile", random_state=seed
    ).confidence_interval
    return Summary(float(x.mean()), float(ci.low), float(ci.high), float((x > 0).mean()), len(x))


def normalized_patch_effect(patched: Tensor, clean: Tensor, corrupted: Tensor) -> Tensor:
    """0 = recipient's clean metric, 1 = the donor's: the fraction of the way a patch moves it."""
    return (patched - clean) / (corrupted - clean)


def loss_per_token(
    logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"], mask: Tensor | None = None
) -> float:
    """Mean next-token cross-entropy (nats/token) over positions where ``mask`` (of the targets) is true."""
    log_probs = logits[:, :-1].log_softmax(-1)
    nll = -log_probs.gather(-1, tokens[:, 1:, None])[..., 0]
    if mask is not None:
        nll = nll[mask[:, 1:]]
    return float(nll.mean())
