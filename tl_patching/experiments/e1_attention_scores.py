"""E1 — attention-head isolation and the distribution of raw attention scores (seed 003).

Per head, the raw score of query i for key j is Q_i·K_jᵀ/√d_head before softmax; the causal mask
sets future keys to −inf, so the first token can only attend to itself (probability 1). The seed
found raw scores over visible positions shifted strongly negative rather than centred on zero,
and proposed per-layer kernel density estimates stacked by depth instead of scatter plots.

TL hooks: ``blocks.l.attn.hook_q``, ``hook_k`` (Q, K per head), ``hook_attn_scores`` (the same scores,
masked), ``hook_pattern``. HF counterpart: the fused output of ``transformer.h[l].attn.c_attn``
(width 3·d_model, order Q, K, V) split into heads — both routes go through `causal_scores`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from scipy.stats import gaussian_kde
from torch import Tensor
from transformer_lens import HookedTransformer
from transformers import GPT2LMHeadModel

from tl_patching import hooks
from tl_patching.hf_hooks import causal_scores, split_qkv
from tl_patching.hooks import act_name
from tl_patching.results import Result, RunInfo

DEFAULT_TEXT = "Sam and Sally went to the park. Sam gave a gift to Sally"


@dataclass
class E1Result(Result):
    mean_score: Float[Tensor, "layer head"]  # mean raw score over visible (query, key) pairs
    frac_negative: Float[Tensor, "layer head"]  # fraction of visible raw scores < 0
    first_token_self_attention: Float[Tensor, "layer head"]  # pattern[0, 0] (must be 1)
    kde_grid: Float[Tensor, " grid"]
    kde_density: Float[Tensor, "layer grid"]  # density of all heads' visible raw scores per layer
    max_diff_split_vs_hook: float  # |scores from hook_q/hook_k − hook_attn_scores|, visible positions

    def reading(self) -> str:
        layers = self.mean_score.mean(-1)
        self_attention = "is 1 in every head" if torch.allclose(self.first_token_self_attention, torch.tensor(1.0)) else (
            f"ranges {self.first_token_self_attention.min():.4f}–{self.first_token_self_attention.max():.4f}")
        return (f"mean raw score {self.mean_score.mean():.2f} over all heads ({self.frac_negative.mean():.0%} of visible scores below 0; "
                f"layer means from {layers.min():.2f} to {layers.max():.2f}); scores from the split Q and K equal hook_attn_scores "
                f"to {self.max_diff_split_vs_hook:.1e}; the first token's self-attention {self_attention}, as the causal mask "
                f"requires (a check, not a finding)")


def tl_raw_scores(model: HookedTransformer, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(scores from hook_q/hook_k, hook_attn_scores, hook_pattern), each ``[layer, batch, head, q, k]``."""
    names = [act_name(n, l) for l in range(model.cfg.n_layers) for n in ("q", "k", "attn_scores", "pattern")]
    _, cache = hooks.run(model, tokens, cache=names)
    by = lambda kind: torch.stack([cache[act_name(kind, l)] for l in range(model.cfg.n_layers)])  # noqa: E731
    split = torch.stack([causal_scores(cache[act_name("q", l)], cache[act_name("k", l)]) for l in range(model.cfg.n_layers)])
    return split, by("attn_scores"), by("pattern")


def hf_raw_scores(hf_model: GPT2LMHeadModel, tokens: Tensor) -> Tensor:
    """Scores from the fused ``c_attn`` output of every layer (the seed's method), ``[layer, batch, head, q, k]``."""
    fused: dict[int, Tensor] = {}
    handles = [
        block.attn.c_attn.register_forward_hook(lambda m, args, out, l=l: fused.__setitem__(l, out.detach()))
        for l, block in enumerate(hf_model.transformer.h)
    ]
    try:
        with torch.no_grad():
            hf_model(tokens)
    finally:
        for handle in handles:
            handle.remove()
    n_heads = hf_model.config.n_head
    return torch.stack([causal_scores(*split_qkv(fused[l], n_heads)[:2]) for l in sorted(fused)])


def run(model: HookedTransformer, text: str = DEFAULT_TEXT, prepend_bos: bool = True, hf_model: GPT2LMHeadModel | None = None,
        grid_points: int = 200) -> E1Result:
    """Raw-score statistics per layer × head; with ``hf_model``, the scores come from HF's fused c_attn output."""
    tokens = model.to_tokens(text, prepend_bos=prepend_bos)
    split, hooked, pattern = tl_raw_scores(model, tokens)
    scores = split if hf_model is None else hf_raw_scores(hf_model, tokens)
    n = tokens.shape[1]
    visible = torch.tril(torch.ones(n, n, dtype=torch.bool))
    values = scores[..., visible]  # [layer, batch, head, n_visible]
    per_head = values.transpose(1, 2).flatten(2)  # [layer, head, batch * n_visible]
    per_layer = per_head.flatten(1).numpy()
    grid = np.linspace(per_layer.min(), per_layer.max(), grid_points)
    density = np.stack([gaussian_kde(v)(grid) for v in per_layer])
    return E1Result(
        info=RunInfo.of(model, tokens, prepend_bos, hf_model, text=text),
        mean_score=per_head.mean(-1),
        frac_negative=(per_head < 0).float().mean(-1),
        first_token_self_attention=pattern[:, 0, :, 0, 0],
        kde_grid=torch.tensor(grid, dtype=torch.float32),
        kde_density=torch.tensor(density, dtype=torch.float32),
        max_diff_split_vs_hook=float((split[..., visible] - hooked[..., visible]).abs().max()),
    )
