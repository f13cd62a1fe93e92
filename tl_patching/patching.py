"""Activation patching, exact and fast, and attribution patching.

Activation patching asks *where* a model computes something: run a recipient prompt, overwrite one
activation with its value from a donor prompt that differs in one fact (which name is repeated),
and measure how far the output moves toward the donor's. A component whose patch moves it a lot
carries the information; localisation is the point, so patches are small (one head, one position).

A sweep patches every head of every layer, one at a time, at the final position: L × H runs. Done as
L × H full forwards (`plain_head_sweep`) that is 720 forwards on GPT-2 large. The exact answer is much
cheaper, because most of each forward recomputes what the clean run already computed:

- `batched_head_sweep`: all H variants of a layer stacked on the batch axis, started from the clean
  ``resid_pre`` of that layer (``start_at_layer``): layers before the patch are not recomputed.
- `final_position_head_sweep`: a patch at the final position cannot change any earlier position
  (causal mask), so earlier positions' keys and values are the clean run's at every layer. Only the
  final position is recomputed, from the patched layer on, against the cached keys and values.
- Both read only what a logit difference needs: ``ln_final`` of the last position times the
  difference of two unembedding columns, not the full vocabulary.

`attribution_patch` approximates every patch at once (gradient × (donor − recipient), one forward of
each prompt and one backward). All functions return per-prompt values ``[layer, head, batch]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformers import GPT2LMHeadModel

from tl_patching import hf_hooks, hooks
from tl_patching.hooks import act_name, patch
from tl_patching.metrics import logit_diff


def _check_pair(model: HookedTransformer, tokens: Tensor, correct: Tensor, wrong: Tensor) -> None:
    if tokens.ndim != 2 or len(correct) != len(tokens) or len(wrong) != len(tokens):
        raise ValueError(f"tokens {tuple(tokens.shape)} need one correct and one wrong id per prompt")
    if int(max(correct.max(), wrong.max())) >= model.cfg.d_vocab:
        raise IndexError("answer token id out of the vocabulary")


def _layers(model: HookedTransformer, layers: Sequence[int] | None) -> list[int]:
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    for l in layers:
        act_name("z", l, model)  # range check
    return layers


def final_logit_diff(
    model: HookedTransformer, resid_final: Float[Tensor, "... batch d_model"], correct: Int[Tensor, " batch"], wrong: Int[Tensor, " batch"]
) -> Float[Tensor, "... batch"]:
    """Logit difference from the final position's residual stream (after the last block, before ``ln_final``),
    through two unembedding columns only."""
    direction = (model.W_U[:, correct] - model.W_U[:, wrong]).T  # [batch, d_model]
    bias = model.b_U[correct] - model.b_U[wrong]
    normed = model.ln_final(resid_final.reshape(-1, 1, resid_final.shape[-1])).reshape(resid_final.shape)
    return (normed * direction).sum(-1) + bias


def plain_head_sweep(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"], donor_cache: dict[str, Tensor],
    correct: Int[Tensor, " batch"], wrong: Int[Tensor, " batch"], pos: int = -1,
    layers: Sequence[int] | None = None, heads: Sequence[int] | None = None, progress: bool = True,
    hf_model: GPT2LMHeadModel | None = None,
) -> Float[Tensor, "layer head batch"]:
    """Reference: one full forward per (layer, head), patching that head's z at ``pos``; through HF hooks
    on ``hf_model`` if given (``model`` then only supplies the config)."""
    _check_pair(model, tokens, correct, wrong)
    forward = hf_hooks.runner(model, hf_model)
    layers = _layers(model, layers)
    heads = list(range(model.cfg.n_heads)) if heads is None else list(heads)
    out = torch.empty(len(layers), len(heads), len(tokens))
    for i, l in enumerate(tqdm(layers, desc="plain head sweep", disable=not progress, leave=False)):
        for j, h in enumerate(heads):
            logits, _ = forward(tokens, [patch(act_name("z", l), donor_cache, head=h, pos=pos)])
            out[i, j] = logit_diff(logits, correct, wrong)
    return out


def batched_head_sweep(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"], donor_cache: dict[str, Tensor],
    correct: Int[Tensor, " batch"], wrong: Int[Tensor, " batch"], pos: int = -1,
    layers: Sequence[int] | None = None, max_rows: int = 256, progress: bool = True,
) -> Float[Tensor, "layer head batch"]:
    """Exact, any position: per layer, the H patched variants stacked on the batch axis (chunks of at most
    ``max_rows`` rows), each started from the clean ``resid_pre`` of that layer."""
    _check_pair(model, tokens, correct, wrong)
    layers = _layers(model, layers)
    B, H = len(tokens), model.cfg.n_heads
    _, clean = hooks.run(model, tokens, cache=[act_name("resid_pre", l) for l in layers])
    out = torch.empty(len(layers), H, B)
    per_chunk = max(1, max_rows // B)
    with torch.no_grad():
        for i, l in enumerate(tqdm(layers, desc="batched head sweep", disable=not progress, leave=False)):
            donor_z = donor_cache[act_name("z", l)]
            for start in range(0, H, per_chunk):
                variants = torch.arange(start, min(H, start + per_chunk))
                V = len(variants)

                def patch_variants(z: Tensor, hook) -> Tensor:
                    z = einops.rearrange(z, "(v b) p h d -> v b p h d", v=V).clone()
                    z[torch.arange(V), :, pos, variants] = donor_z[:, pos, variants].transpose(0, 1).to(z)
                    return einops.rearrange(z, "v b p h d -> (v b) p h d")

                x = einops.repeat(clean[act_name("resid_pre", l)], "b p d -> (v b) p d", v=V)
                with model.hooks(fwd_hooks=[(act_name("z", l), patch_variants)]):
                    resid = model(x, start_at_layer=l, stop_at_layer=model.cfg.n_layers)
                resid_final = einops.rearrange(resid[:, -1], "(v b) d -> v b d", v=V)
                out[i, start : start + V] = final_logit_diff(model, resid_final, correct, wrong)
    return out


def _attend_final(
    block, x: Float[Tensor, "v batch d_model"], k_prev: Float[Tensor, "batch prev head d_head"], v_prev: Tensor
) -> Float[Tensor, "v batch d_model"]:
    """One block for the final position only, against the clean keys/values of the earlier positions."""
    attn = block.attn
    h = block.ln1(x)
    q, k, v = (
        einops.einsum(h, W, "v b m, head m d -> v b head d") + b
        for W, b in ((attn.W_Q, attn.b_Q), (attn.W_K, attn.b_K), (attn.W_V, attn.b_V))
    )
    scores_prev = einops.einsum(q, k_prev, "v b head d, b p head d -> v b head p")
    scores_self = (q * k).sum(-1, keepdim=True)
    pattern = (torch.cat([scores_prev, scores_self], dim=-1) / attn.attn_scale).softmax(-1)
    z = einops.einsum(pattern[..., :-1], v_prev, "v b head p, b p head d -> v b head d") + pattern[..., -1:] * v
    x = x + einops.einsum(z, attn.W_O, "v b head d, head d m -> v b m") + attn.b_O
    return x + block.mlp(block.ln2(x))


def final_position_head_sweep(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"], donor_cache: dict[str, Tensor],
    correct: Int[Tensor, " batch"], wrong: Int[Tensor, " batch"],
    layers: Sequence[int] | None = None, progress: bool = True, clean_cache: dict[str, Tensor] | None = None,
    max_rows: int = 8192,
) -> Float[Tensor, "layer head batch"]:
    """Exact patching of each head's z at the final position, recomputing only the final position from the
    patched layer on (earlier positions' keys and values come from the clean run).

    One pass over the layers carries every variant patched so far: at layer j the rows are the variants
    of all swept layers ≤ j (``n_variants × batch`` rows, at most ``max_rows``; more are split into passes).
    ``donor_cache`` needs ``hook_z`` of the swept layers; ``clean_cache`` (optional, reused if given) the
    recipient's ``hook_resid_pre``, ``hook_z``, ``hook_k``, ``hook_v`` of every layer.
    """
    _check_pair(model, tokens, correct, wrong)
    layers = _layers(model, layers)
    L, H, B = model.cfg.n_layers, model.cfg.n_heads, len(tokens)
    if clean_cache is None:
        names = [act_name(kind, l) for l in range(L) for kind in ("resid_pre", "z", "k", "v")]
        _, clean_cache = hooks.run(model, tokens, cache=names)
    per_pass = max(1, max_rows // (H * B))
    ordered = sorted(set(layers))  # rows are appended layer by layer, ascending
    passes = [ordered[i : i + per_pass] for i in range(0, len(ordered), per_pass)]
    out = {}
    with torch.no_grad(), tqdm(total=len(ordered), desc="final-position head sweep", disable=not progress, leave=False) as bar:
        for swept in passes:
            x = None  # [variants, batch, d_model]: the final position of every variant patched so far
            for j in range(min(swept), L):
                if x is not None:
                    k_prev, v_prev = (clean_cache[act_name(kind, j)][:, :-1] for kind in ("k", "v"))
                    x = _attend_final(model.blocks[j], x, k_prev, v_prev)
                if j in swept:
                    x = torch.cat([x, _patched_final_block(model, j, clean_cache, donor_cache)]) if x is not None else \
                        _patched_final_block(model, j, clean_cache, donor_cache)
                    bar.update()
            ld = final_logit_diff(model, x, correct, wrong)
            for i, l in enumerate(swept):
                out[l] = ld[i * H : (i + 1) * H]
    return torch.stack([out[l] for l in layers])


def _patched_final_block(
    model: HookedTransformer, layer: int, clean_cache: dict[str, Tensor], donor_cache: dict[str, Tensor]
) -> Float[Tensor, "head batch d_model"]:
    """Block ``layer`` at the final position, H variants: variant h has head h's z taken from the donor."""
    block, H = model.blocks[layer], model.cfg.n_heads
    clean_z, donor_z = clean_cache[act_name("z", layer)], donor_cache[act_name("z", layer)]
    if donor_z.shape[1:] != clean_z.shape[1:]:
        raise ValueError(f"donor z {tuple(donor_z.shape)} does not match the recipient's {tuple(clean_z.shape)}: same token length needed")
    z = einops.repeat(clean_z[:, -1], "b head d -> v b head d", v=H).clone()
    heads = torch.arange(H)
    z[heads, :, heads] = donor_z[:, -1].transpose(0, 1).to(z)
    x = clean_cache[act_name("resid_pre", layer)][:, -1] + einops.einsum(z, block.attn.W_O, "v b head d, head d m -> v b m") + block.attn.b_O
    return x + block.mlp(block.ln2(x))


def attribution_patch(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"], donor: Int[Tensor, "batch pos"] | dict[str, Tensor],
    correct: Int[Tensor, " batch"], wrong: Int[Tensor, " batch"],
) -> dict[str, Tensor]:
    """First-order estimate of every patch's effect on the logit difference: ∂LD/∂act · (donor − recipient).

    ``donor``: donor token ids (run here), or a donor cache with ``hook_z`` and ``hook_resid_post`` of every layer.
    Returns ``{"z": [layer, pos, head, batch], "resid_post": [layer, pos, batch]}`` in nats, the units of the
    exact patch effects, from one recipient forward and backward (and one donor forward).
    """
    _check_pair(model, tokens, correct, wrong)
    L = model.cfg.n_layers
    names = [act_name(kind, l) for l in range(L) for kind in ("z", "resid_post")]
    if isinstance(donor, Tensor):
        if donor.shape != tokens.shape:
            raise ValueError(f"donor {tuple(donor.shape)} and recipient {tuple(tokens.shape)} need the same shape")
        _, donor = hooks.run(model, donor, cache=names)
    acts: dict[str, Tensor] = {}

    def start_grad(embed: Tensor, hook) -> Tensor:
        return embed.detach().requires_grad_(True)

    def keep(act: Tensor, hook) -> None:
        act.retain_grad()
        acts[hook.name] = act

    # Gradients flow from the embedding on, with the weights frozen: the backward computes activation
    # gradients only (no weight gradients), about one forward's cost instead of two.
    frozen = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(False)
        with torch.enable_grad(), model.hooks(fwd_hooks=[("hook_embed", start_grad)] + [(n, keep) for n in names]):
            logits = model(tokens)
            logit_diff(logits, correct, wrong).sum().backward()  # per-prompt gradients: prompts don't interact
    finally:
        for p in frozen:
            p.requires_grad_(True)
    effect = {n: ((donor[n] - acts[n].detach()) * acts[n].grad) for n in names}
    return {
        "z": torch.stack([einops.reduce(effect[act_name("z", l)], "b p head d -> p head b", "sum") for l in range(L)]),
        "resid_post": torch.stack([einops.reduce(effect[act_name("resid_post", l)], "b p d -> p b", "sum") for l in range(L)]),
    }
