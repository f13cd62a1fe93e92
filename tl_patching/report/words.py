"""Numbers in words, for the report's findings: lists, layer ranges, intervals, ratios, and a claim against a seed.

Nothing here imports torch: the report is rebuilt from results JSON alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

CI = "95% bootstrap CI"
SHIPPED_NAME = "shipped"  # = tl_patching.checkpoints' name for the shipped model (not imported: that imports torch)


def listing(items: list[Any], none: str = "none") -> str:
    """``[2, 3] -> "2 and 3"``, ``[0, 1, 2] -> "0, 1 and 2"``, ``[] -> none``: never a raw ``[]``."""
    items = [str(i) for i in items]
    if not items:
        return none
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def at_layers(layers: list[int]) -> str:
    """``"at layer 2"``, ``"at layers 2 and 3"``, ``"at no layer"``."""
    if not layers:
        return "at no layer"
    return f"at layer{'s' if len(layers) > 1 else ''} {listing(layers)}"


def with_ci(summary, unit: str = " nats", brackets: bool = True) -> str:
    """``9.41 nats (95% bootstrap CI [8.91, 9.92])``, or with ``brackets=False`` (inside parentheses)
    ``9.41 nats, 95% bootstrap CI [8.91, 9.92]``; a single prompt has no interval."""
    if summary.n < 2:
        return f"{summary.mean:.2f}{unit}" + (" (one prompt, no interval)" if brackets else ", one prompt, no interval")
    interval = f"{CI} [{summary.ci_low:.2f}, {summary.ci_high:.2f}]"
    return f"{summary.mean:.2f}{unit} ({interval})" if brackets else f"{summary.mean:.2f}{unit}, {interval}"


def ratio_text(x: float) -> str:
    """A probability ratio readable at any size: 0.37, 12, 1.2 × 10⁴."""
    if 0.01 <= x < 1000:
        return f"{x:.3g}"
    exponent = math.floor(math.log10(x))
    return f"{x / 10**exponent:.1f} × 10^{exponent}"


@dataclass
class Claim:
    seed_says: str
    verdict: str  # "agrees", "partly" or "differs" (or "not tested")
    because: str


def token_count(info) -> str:
    """``"12 tokens, start token <bos> prepended (as its tokenizer does)"`` for a one-sentence run."""
    n = len(info.token_ids[0])  # the ids the model ran on: the start token among them when one was prepended
    return f"{n} tokens, {info.start_token_words()}"
