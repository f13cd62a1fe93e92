"""TransformerLens plumbing, in one place: everything the library needs to know about TransformerLens's model
beyond its hook points.

- `tl_model`: the TransformerLens model behind a `Forward`, or a refusal naming the feature that needs it;
- grouped-query attention: `kv_heads`, `kv_group`, `kv_head_of` (which shared key/value head a query head reads);
- `final_logits`: the final position's logits from the residual stream after the last block, as TransformerLens's
  forward computes them (final norm, unembedding, output soft-cap), optionally for a few vocabulary columns only;
- `refuse`: `NotImplementedError` naming each feature of a model that a computation does not handle exactly;
- `frozen_weights`: a context manager for what changes a model for a while and must be restored, even after an
  exception (no weight gradients during attribution patching).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.utilities.activation_functions import apply_softcap


def tl_model(forward, what: str) -> HookedTransformer:
    """The TransformerLens model of ``forward``; `NotImplementedError` on the HF backend, where ``what`` (e.g.
    "the fast sweeps") cannot run because it goes through TransformerLens's own modules."""
    if forward.backend != "tl":
        raise NotImplementedError(
            f"{what} run TransformerLens's own modules: use the tl backend (Forward(model) without "
            "hf_model), or the sweep driver (tl_patching.patching), which runs on both"
        )
    return forward.model


def refuse(what: str, features: dict[str, bool]) -> None:
    """Raise `NotImplementedError` naming every feature in ``features`` that is present, if any."""
    present = [name for name, there in features.items() if there]
    if present:
        raise NotImplementedError(f"{what} does not support {', '.join(present)}")


# --- grouped-query attention ---


def kv_heads(cfg) -> int:
    """How many key/value heads ``hook_k``/``hook_v`` hold: ``n_key_value_heads`` on a grouped-query model (unless
    TransformerLens's ungrouped view is on), ``n_heads`` otherwise."""
    grouped = cfg.n_key_value_heads is not None and not getattr(cfg, "ungroup_grouped_query_attention", False)
    return cfg.n_key_value_heads if grouped else cfg.n_heads


def kv_group(cfg) -> int:
    """How many query heads share one key/value head (1 without grouped-query attention)."""
    return cfg.n_heads // kv_heads(cfg)


def kv_head_of(cfg, head: int) -> int:
    """The key/value head query head ``head`` reads (query heads 0…g−1 share key/value head 0, and so on)."""
    return head // kv_group(cfg)


@contextlib.contextmanager
def frozen_weights(model: torch.nn.Module) -> Iterator[None]:
    """No weight gradients for the duration (a backward then costs about one forward: activation gradients only);
    every parameter's ``requires_grad`` is restored on exit, whatever happens inside."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


# --- the final position's logits ---


def final_logits(
    model: HookedTransformer, resid: Float[Tensor, "rows d_model"], columns: Int[Tensor, "rows k"] | None = None
) -> Float[Tensor, "rows vocab"]:
    """Logits from the final position's residual stream after the last block, as ``HookedTransformer.forward``
    computes them (``ln_final``, unembedding, final soft-cap); only the vocabulary ``columns`` of each row when given
    (``[rows, k]``), e.g. the two answers of a logit difference."""
    x = resid[:, None].to(model.W_U.device)
    if model.cfg.normalization_type is not None:
        x = model.ln_final(x)
    x = x[:, 0]
    if columns is None:
        logits = model.unembed(x[:, None])[:, 0]
    else:
        logits = einops.einsum(x, model.W_U.T[columns], "r d, r k d -> r k") + model.b_U[columns]
    return apply_softcap(logits, model.cfg.output_logits_soft_cap)
