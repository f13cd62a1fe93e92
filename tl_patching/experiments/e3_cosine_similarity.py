"""E3 — silencing one head and the cosine similarity between token representations (seed 002).

Zero one head's output before the W_O mix — TL ``blocks.l.attn.hook_z[:, :, head] = 0`` ↔ a forward
pre-hook on HF ``h[l].attn.c_proj`` zeroing that head's d_head slice. At every layer, take the residual
stream (``blocks.l.hook_resid_post``) of the M tokens, compute the cosine similarity of every pair and
keep the M(M−1)/2 unique pairs (upper triangle without the diagonal). Compare clean vs silenced with a
paired t-test per layer (the same token pairs in both runs), significant below the Bonferroni threshold
0.05 / n_layers.

Seed (GPT-2 medium, layer 3): similarity falls in early layers and rises toward 1 late; the silenced
run differs little at the silenced layer and consistently by layers 20–24 ("ripple effect").
Needs raw weights: processed weights centre the residual stream, which changes cosine similarities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from scipy import stats
from torch import Tensor
from transformer_lens import HookedTransformer
from transformers import GPT2LMHeadModel

from tl_patching import hf_hooks
from tl_patching.hooks import act_name, zero
from tl_patching.models import weight_mode
from tl_patching.prompts import PIZZA_SENTENCE
from tl_patching.results import Result, RunInfo

DEFAULT_TEXT = PIZZA_SENTENCE


@dataclass
class E3Result(Result):
    layer: int  # silenced layer
    head: int  # silenced head
    n_pairs: int  # M(M−1)/2
    clean_pairs: Float[Tensor, "layer pair"]  # cosine similarity of every unique token pair
    silenced_pairs: Float[Tensor, "layer pair"]
    t_statistic: Float[Tensor, " layer"]  # paired t (silenced − clean); 0 where the runs are identical
    p_value: Float[Tensor, " layer"]  # 1 where the runs are identical
    threshold: float  # Bonferroni 0.05 / n_layers
    significant: list[bool]

    def reading(self) -> str:
        sig = [l for l, s in enumerate(self.significant) if s]
        mean = self.clean_pairs.mean(1)
        return (f"clean mean similarity {mean[0]:.2f} (layer 0) → min {mean.min():.2f} (layer {int(mean.argmin())}) → {mean[-1]:.2f} "
                f"(last layer); silencing head {self.head} of layer {self.layer} differs significantly (p < {self.threshold:.4f}) "
                f"at layers {sig if sig else 'none'}")


def unique_pair_similarities(resid: Float[Tensor, "pos d_model"]) -> Float[Tensor, " pair"]:
    """Cosine similarity of each of the M(M−1)/2 unordered token pairs (i < j)."""
    unit = torch.nn.functional.normalize(resid, dim=-1)
    sims = unit @ unit.T
    i, j = torch.triu_indices(len(resid), len(resid), offset=1)
    return sims[i, j]


def paired_t_test(clean: Tensor, silenced: Tensor) -> tuple[float, float]:
    """(t, p) of scipy's paired t-test; (0, 1) when the two runs are identical (no variance to test)."""
    diff = (silenced - clean).double()
    if diff.abs().max() == 0:
        return 0.0, 1.0
    test = stats.ttest_rel(silenced.double().numpy(), clean.double().numpy())
    return float(test.statistic), float(test.pvalue)


def run(
    model: HookedTransformer, text: str = DEFAULT_TEXT, layer: int = 3, head: int = 0, prepend_bos: bool = False,
    alpha: float = 0.05, hf_model: GPT2LMHeadModel | None = None,
) -> E3Result:
    """Clean vs head-silenced cosine similarities per layer. BOS is off by default, as in the seed's HF
    tokenisation (and because BOS's large norm dominates every similarity with it)."""
    if weight_mode(model) != "raw":
        raise ValueError("E3 needs raw weights (load_model(..., weights='raw')): processing centres the residual stream")
    edit = zero(act_name("z", layer, model), head=head)
    tokens = model.to_tokens(text, prepend_bos=prepend_bos)
    if tokens.shape[1] < 3:
        raise ValueError("E3 needs a sentence of at least 3 tokens")
    resid = [act_name("resid_post", l) for l in range(model.cfg.n_layers)]
    forward = hf_hooks.runner(model, hf_model)
    clean = forward(tokens, cache=resid)[1]
    silenced = forward(tokens, [edit], cache=resid)[1]
    clean_pairs = torch.stack([unique_pair_similarities(clean[n][0]) for n in resid])
    silenced_pairs = torch.stack([unique_pair_similarities(silenced[n][0]) for n in resid])
    tests = [paired_t_test(c, s) for c, s in zip(clean_pairs, silenced_pairs)]
    threshold = alpha / model.cfg.n_layers
    return E3Result(
        info=RunInfo.of(model, tokens, prepend_bos, hf_model, text=text, alpha=alpha),
        layer=layer, head=head, n_pairs=clean_pairs.shape[1], clean_pairs=clean_pairs, silenced_pairs=silenced_pairs,
        t_statistic=torch.tensor([t for t, _ in tests]), p_value=torch.tensor([p for _, p in tests], dtype=torch.float64),
        threshold=threshold, significant=[p < threshold for _, p in tests],
    )
