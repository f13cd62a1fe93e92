"""Fast exact patching: the numbers of `tl_patching.patching.sweep`, with less work (TL backend only).

A patch at the final position cannot change any earlier position (causal mask), so earlier positions'
keys and values are the clean run's at every layer. `final_position_head_sweep` recomputes only the
final position, from the patched layer on, against the cached clean keys and values, and reads only
the two unembedding columns a logit difference needs. It is tested equal to `patching.head_sweep`.
"""

from __future__ import annotations

from collections.abc import Sequence

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from tl_patching.edits import act_name
from tl_patching.forward import Forward
from tl_patching.patching import check_layers


def check_pair(model: HookedTransformer, tokens: Tensor, correct: Tensor, wrong: Tensor) -> None:
    """Raise unless there is one correct and one wrong answer id per prompt, inside the vocabulary."""
    if tokens.ndim != 2 or len(correct) != len(tokens) or len(wrong) != len(tokens):
        raise ValueError(f"tokens {tuple(tokens.shape)} need one correct and one wrong id per prompt")
    if int(max(correct.max(), wrong.max())) >= model.cfg.d_vocab:
        raise IndexError("answer token id out of the vocabulary")


def _tl_model(forward: Forward) -> HookedTransformer:
    if forward.backend != "tl":
        raise NotImplementedError("the fast paths run TransformerLens's own blocks: use the tl backend, or "
                                  "patching.head_sweep (the reference driver) on the hf backend")
    return forward.model


def final_logit_diff(
    model: HookedTransformer, resid_final: Float[Tensor, "... batch d_model"], correct: Int[Tensor, " batch"], wrong: Int[Tensor, " batch"]
) -> Float[Tensor, "... batch"]:
    """Logit difference from the final position's residual stream (after the last block, before ``ln_final``),
    through two unembedding columns only."""
    direction = (model.W_U[:, correct] - model.W_U[:, wrong]).T  # [batch, d_model]
    bias = model.b_U[correct] - model.b_U[wrong]
    normed = model.ln_final(resid_final.reshape(-1, 1, resid_final.shape[-1])).reshape(resid_final.shape)
    return (normed * direction).sum(-1) + bias


def check_gpt2_block(model: HookedTransformer) -> None:
    """Raise `NotImplementedError` naming each feature of ``model``'s block that `_attend_final` does not compute."""
    cfg = model.cfg
    features = {
        "rotary position embeddings": cfg.positional_embedding_type != "standard",
        "grouped-query attention": cfg.n_key_value_heads not in (None, cfg.n_heads),
        "gated MLP": cfg.gated_mlp,
        "parallel attention and MLP": cfg.parallel_attn_mlp,
        "QK-norm": getattr(cfg, "use_qk_norm", False),
        "post-attention/MLP norms": getattr(cfg, "use_normalization_before_and_after", False),
        "attention soft-capping": cfg.attn_scores_soft_cap > 0,
        "sliding-window attention": cfg.window_size is not None or cfg.attn_types is not None,
        "RMSNorm": cfg.normalization_type not in ("LN", "LNPre"),
        "attention-score scaling by layer": cfg.scale_attn_by_inverse_layer_idx,
    }
    missing = [name for name, present in features.items() if present]
    if missing:
        raise NotImplementedError(f"the final-position fast path computes the GPT-2 block only; this model has "
                                  f"{', '.join(missing)}: use patching.head_sweep")


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
    forward: Forward, tokens: Int[Tensor, "batch pos"], donor_cache: dict[str, Tensor],
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
    model = _tl_model(forward)
    check_gpt2_block(model)
    check_pair(model, tokens, correct, wrong)
    layers = check_layers(forward, layers)
    L, H, B = model.cfg.n_layers, model.cfg.n_heads, len(tokens)
    if clean_cache is None:
        names = [act_name(kind, l) for l in range(L) for kind in ("resid_pre", "z", "k", "v")]
        _, clean_cache = forward.run(tokens, cache=names)
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


