"""Attribution patching: a first-order estimate of every patch's effect at once.

∂metric/∂act · (donor − recipient), from one recipient forward and backward (and one donor forward),
for every head and position. It approximates the exact effects of `tl_patching.patching.sweep`.
"""

from __future__ import annotations

import einops
import torch
from jaxtyping import Int
from torch import Tensor

from tl_patching.edits import act_name
from tl_patching.fast import _tl_model, check_pair
from tl_patching.forward import Forward
from tl_patching.metrics import logit_diff


def attribution_patch(
    forward: Forward, tokens: Int[Tensor, "batch pos"], donor: Int[Tensor, "batch pos"] | dict[str, Tensor],
    correct: Int[Tensor, " batch"], wrong: Int[Tensor, " batch"],
) -> dict[str, Tensor]:
    """First-order estimate of every patch's effect on the logit difference: ∂LD/∂act · (donor − recipient).

    ``donor``: donor token ids (run here), or a donor cache with ``hook_z`` and ``hook_resid_post`` of every layer.
    Returns ``{"z": [layer, pos, head, batch], "resid_post": [layer, pos, batch]}`` in nats, the units of the
    exact patch effects, from one recipient forward and backward (and one donor forward).
    """
    model = _tl_model(forward)
    check_pair(model, tokens, correct, wrong)
    L = model.cfg.n_layers
    names = [act_name(kind, l) for l in range(L) for kind in ("z", "resid_post")]
    if isinstance(donor, Tensor):
        if donor.shape != tokens.shape:
            raise ValueError(f"donor {tuple(donor.shape)} and recipient {tuple(tokens.shape)} need the same shape")
        _, donor = forward.run(donor, cache=names)
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
