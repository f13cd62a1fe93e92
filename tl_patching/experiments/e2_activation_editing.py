"""E2 — editing attention, MLP neurons and hidden states, with the downstream effect layer by layer (seed 004).

Four interventions, each an `Edit`:

1. zero the key of one head at one layer — TL ``blocks.l.attn.hook_k[:, :, head] = 0``; HF: columns
   d_model + head·d_head … of the fused ``c_attn`` output (768+128 … 768+191 for GPT-2 small, head 2);
2. replace the even MLP neurons (0, 2, 4, …) after GELU by seeded Gaussian noise of mean 10 —
   ``blocks.l.mlp.hook_post[..., ::2]`` ↔ output of ``h[l].mlp.act``;
3. and 4. scale the output of one block by 0.1 and by 10 — ``blocks.l.hook_resid_post`` ↔ output of ``h[l]``.

Effect: the standard deviation of the residual stream (``hook_resid_post``, over positions and d_model)
per layer, clean vs edited, and the change in the top-k next-token predictions at the final position.
Seed (GPT-2 small, block 9): at ×0.1 the spread collapses at that layer and recovers later; at ×10 it
explodes and the last layer compresses it. The last layer here is ``blocks.{L-1}.hook_resid_post``,
*before* ``ln_final`` (HF's ``hidden_states[-1]`` is after it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer
from transformers import GPT2LMHeadModel

from tl_patching import hf_hooks
from tl_patching.hooks import Edit, act_name, gaussian_noise, scale, zero
from tl_patching.results import Result, RunInfo

DEFAULT_TEXT = "Sam and Sally went to the park. Sam gave a gift to"


@dataclass
class Intervention:
    label: str
    resid_std: Float[Tensor, " layer"]  # std of hook_resid_post per layer, edited run
    top_tokens: list[str]  # top-k next tokens, edited run
    top_probs: list[float]
    clean_top1_prob: float  # probability the edited run gives the clean run's top token
    kl_from_clean: float  # KL(clean ‖ edited) of the next-token distribution, nats


@dataclass
class E2Result(Result):
    layer: int
    head: int
    clean_resid_std: Float[Tensor, " layer"]
    clean_top_tokens: list[str]
    clean_top_probs: list[float]
    interventions: list[Intervention] = field(default_factory=list)
    block_output_structure: dict[str, str] = field(default_factory=dict)

    def reading(self) -> str:
        last = len(self.clean_resid_std) - 1
        parts = [f"{iv.label}: std at layer {self.layer} {self.clean_resid_std[self.layer]:.2f}→{iv.resid_std[self.layer]:.2f}, "
                 f"last layer {self.clean_resid_std[last]:.2f}→{iv.resid_std[last]:.2f}, top-1 {self.clean_top_tokens[0]!r}→{iv.top_tokens[0]!r}"
                 for iv in self.interventions]
        return "; ".join(parts)


def default_layer(model: HookedTransformer) -> int:
    """The seed's block 9 on 12-layer GPT-2 small; three quarters of the depth otherwise."""
    return 9 if model.cfg.n_layers == 12 else round(0.75 * (model.cfg.n_layers - 1))


def interventions(model: HookedTransformer, layer: int, head: int, noise_mean: float, seed: int) -> dict[str, list[Edit]]:
    act_name("k", layer, model)  # range checks before anything runs
    if not 0 <= head < model.cfg.n_heads:
        raise IndexError(f"head {head} out of range: the model has {model.cfg.n_heads} heads")
    return {
        f"zero key of head {head}, layer {layer}": [zero(act_name("k", layer), head=head)],
        f"even MLP neurons → N({noise_mean:g}, 1), layer {layer}": [
            gaussian_noise(act_name("post", layer), mean=noise_mean, std=1.0, seed=seed, neurons=slice(0, None, 2))
        ],
        f"block {layer} output × 0.1": [scale(act_name("resid_post", layer), 0.1)],
        f"block {layer} output × 10": [scale(act_name("resid_post", layer), 10.0)],
    }


def run(
    model: HookedTransformer, text: str = DEFAULT_TEXT, layer: int | None = None, head: int = 2,
    noise_mean: float = 10.0, seed: int = 0, top_k: int = 5, prepend_bos: bool = True,
    hf_model: GPT2LMHeadModel | None = None,
) -> E2Result:
    """Run the four interventions through TL hooks, or through HF hooks if ``hf_model`` is given."""
    layer = default_layer(model) if layer is None else layer
    head = min(head, model.cfg.n_heads - 1)
    edits = interventions(model, layer, head, noise_mean, seed)
    tokens = model.to_tokens(text, prepend_bos=prepend_bos)
    resid = [act_name("resid_post", l) for l in range(model.cfg.n_layers)]
    forward = hf_hooks.runner(model, hf_model)

    def spread_and_probs(e: list[Edit]) -> tuple[Tensor, Tensor]:
        logits, cache = forward(tokens, e, resid)
        return torch.stack([cache[n].std() for n in resid]), logits[0, -1].log_softmax(-1)

    clean_std, clean_logp = spread_and_probs([])
    clean_top = clean_logp.topk(top_k)
    result = E2Result(
        info=RunInfo.of(model, tokens, prepend_bos, hf_model, seed=seed, text=text, noise_mean=noise_mean),
        layer=layer, head=head, clean_resid_std=clean_std,
        clean_top_tokens=model.to_str_tokens(clean_top.indices), clean_top_probs=clean_top.values.exp().tolist(),
        block_output_structure=hf_hooks.block_output_structure(hf_model, tokens) if hf_model is not None else {},
    )
    for label, e in edits.items():
        std, logp = spread_and_probs(e)
        top = logp.topk(top_k)
        result.interventions.append(Intervention(
            label, std, model.to_str_tokens(top.indices), top.values.exp().tolist(),
            clean_top1_prob=float(logp[clean_top.indices[0]].exp()),
            kl_from_clean=float((clean_logp.exp() * (clean_logp - logp)).sum()),
        ))
    return result
