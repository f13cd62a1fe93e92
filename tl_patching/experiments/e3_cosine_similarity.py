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

from tl_patching.edits import act_name, zero
from tl_patching.forward import Forward
from tl_patching.prompts import PIZZA_SENTENCE, start_token_setting, to_tokens
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
                + (f"at layer{'s' if len(sig) > 1 else ''} {', '.join(map(str, sig))}" if sig else "at no layer"))


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


def bonferroni(p_values: list[float], alpha: float = 0.05) -> tuple[float, list[bool]]:
    """(threshold alpha / n_tests, which p-values fall below it)."""
    threshold = alpha / len(p_values)
    return threshold, [p < threshold for p in p_values]


def default_layer(n_layers: int) -> int:
    """The seed's layer 3 on 24-layer GPT-2 medium; n_layers / 8 otherwise."""
    return 3 if n_layers == 24 else round(n_layers / 8)


def run(
    forward: Forward, text: str = DEFAULT_TEXT, layer: int | None = None, head: int = 0, prepend_bos: bool | None = None,
    alpha: float = 0.05,
) -> E3Result:
    """Clean vs head-silenced cosine similarities per layer. BOS is off by default, as in the seed's HF
    tokenisation (and because BOS's large norm dominates every similarity with it)."""
    if forward.weight_mode != "raw":
        raise ValueError("E3 needs raw weights: weight processing centres the residual stream, which changes cosine "
                         "similarities. Load with tl_patching.load_model(name, weights='raw') (TransformerLens: "
                         "HookedTransformer.from_pretrained_no_processing)")
    cfg = forward.cfg
    layer = default_layer(cfg.n_layers) if layer is None else layer
    if not 0 <= layer < cfg.n_layers:
        raise IndexError(f"layer {layer} out of range: the model has {cfg.n_layers} layers (0..{cfg.n_layers - 1})")
    if not 0 <= head < cfg.n_heads:
        raise IndexError(f"head {head} out of range: the model has {cfg.n_heads} heads (0..{cfg.n_heads - 1})")
    edit = zero(act_name("z", layer), head=head)
    prepend_bos = start_token_setting(forward.model, prepend_bos)  # None: the model's own convention
    tokens = to_tokens(forward.model, text, prepend_bos=prepend_bos)
    if tokens.shape[1] < 3:
        raise ValueError(f"E3 needs a text of at least 3 tokens, got {tokens.shape[1]}")
    resid = [act_name("resid_post", l) for l in range(cfg.n_layers)]
    clean = forward.run(tokens, cache=resid, cache_device="cpu")[1]  # statistics on the CPU, in float32
    silenced = forward.run(tokens, [edit], cache=resid, cache_device="cpu")[1]
    clean_pairs = torch.stack([unique_pair_similarities(clean[n][0].float()) for n in resid])
    silenced_pairs = torch.stack([unique_pair_similarities(silenced[n][0].float()) for n in resid])
    tests = [paired_t_test(c, s) for c, s in zip(clean_pairs, silenced_pairs)]
    threshold, significant = bonferroni([p for _, p in tests], alpha)  # one test per layer
    return E3Result(
        info=RunInfo.of(forward, tokens, prepend_bos, text=text, alpha=alpha),
        layer=layer, head=head, n_pairs=clean_pairs.shape[1], clean_pairs=clean_pairs, silenced_pairs=silenced_pairs,
        t_statistic=torch.tensor([t for t, _ in tests]), p_value=torch.tensor([p for _, p in tests], dtype=torch.float64),
        threshold=threshold, significant=significant,
    )
