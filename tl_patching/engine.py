"""The layer engine: run layers l … L−1 of a model on some positions of a residual stream, from a clean run.

Every fast path rests on causality. A change at position p (a head's z, a residual vector, a sender's output)
changes no position before p, at any layer, and nothing below the layer it enters. So a patched variant needs
only layers l … L−1, only at positions p … last, attending to the *clean* keys and values of positions < p; and a
metric of the final position's logits needs the final position's residual through the final norm and, for a logit
difference, two columns of the unembedding. Done for many variants at once, stacked on the batch axis, that is
most of the saving of `tl_patching.fast` and `tl_patching.path_patching` over one full forward per patch.

One interface, one implementation per backend, each calling the model's *own* layers (nothing here re-implements a
block, so every family feature — rotary at the right position, QK-norm, grouped-query heads, sliding windows,
soft-caps, post-norms, parallel blocks — is the model's own code):

- `tl_patching.backends.tl_engine.Engine`: a TransformerLens 3 `HookedTransformer`'s ``model.blocks[j]`` with a
  frozen `TransformerLensKeyValueCacheEntry` of the clean prefix (TransformerLens's text-generation path);
- `tl_patching.backends.hf_engine.Engine`: the HF model's decoder layers, called with exactly the arguments the
  model's own forward gave them in the clean run (position embeddings, masks, both of Gemma's rotaries, GPT-2's
  positions: recorded, then cut to the positions computed), with a key/value cache that holds the clean prefix
  and never grows. It runs the HF backend, and a TransformerBridge (TransformerLens 4) through a plain HF model
  sharing the bridge's weights (`tl_patching.lens.plain_hf`).

`engine_of(forward)` picks the one that runs ``forward``. Each engine checks itself on every clean run: its layers,
called as the sweeps call them, must give back the clean run's own residual stream and logits (`verify`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_patching.edits import Edit
from tl_patching.forward import Forward
from tl_patching.metrics import LogitDiff, Metric

# How far an engine's layers may drift from the clean forward they reproduce: relative to the largest value.
VERIFY_TOLERANCE = 1e-4


class EngineMismatchError(ArithmeticError):
    """The engine's layers did not reproduce the clean forward: a fast path would compute something else."""


class PatternSeen(Exception):
    """Raised inside a layer by an engine's ``attention_pattern`` once the attention has given its pattern: the rest
    of the layer is not computed."""


@dataclass
class Run:
    """A recipient's clean run, as an engine starts from it.

    ``tokens`` ``[batch, pos]``; ``resid[j]``: the input of layer j, ``resid[n_layers]`` the output of the last
    layer (before the final norm), each ``[batch, pos, d_model]``; ``state``: what the engine needs besides (the
    clean keys and values of every layer, the arguments its layers were called with).
    """

    tokens: Int[Tensor, "batch pos"]
    resid: list[Float[Tensor, "batch pos d_model"]]
    state: Any = field(repr=False)
    engine: str = ""  # which engine made it ("tl" or "hf")


class Engine(Protocol):
    """What every sweep asks of a model (see the module docstring)."""

    name: str  # "tl" or "hf"
    n_layers: int
    n_heads: int
    d_vocab: int

    def clean_run(self, tokens: Int[Tensor, "batch pos"], verify_from: int = -1) -> Run:
        """One clean forward, keeping every layer's input and its keys/values; the engine is then `verify`-ed on it
        from position ``verify_from`` on (default: the last position only)."""

    def layer(
        self,
        run: Run,
        j: int,
        x: Float[Tensor, "rows length d_model"],
        start: int,
        edits: Sequence[Edit] = (),
        record: Sequence[str] = (),
    ) -> tuple[Float[Tensor, "rows length d_model"], dict[str, Tensor]]:
        """Layer ``j`` on rows ``x`` (variants × prompts, variant-major: row v·batch + b) holding positions
        ``start … start+length−1``, attending to the clean keys/values of positions < ``start``; ``edits`` applied at
        their hook points (TL names, positions relative to ``start``), the hook points in ``record`` read. Returns
        the layer's output and the recorded activations (TL layout)."""

    def attention_pattern(
        self, run: Run, j: int, x: Float[Tensor, "rows length d_model"], start: int
    ) -> Float[Tensor, "rows head length key"]:
        """Layer ``j``'s attention probabilities (``hook_pattern``) for rows ``x`` at positions ``start`` …, over keys
        0 … start+length−1, in the graph of ``x`` (gradients flow to it)."""

    def head_writes_are_linear(self) -> bool:
        """Whether a head's write into the residual stream (``hook_attn_out``) is linear in its ``hook_z`` (no norm
        after the attention)."""

    def layer_with_z(
        self,
        run: Run,
        j: int,
        x: Float[Tensor, "rows length d_model"],
        start: int,
        z: Float[Tensor, "rows length head d_head"],
        mlp_out: Float[Tensor, "rows length d_model"] | None = None,
    ) -> Float[Tensor, "rows length d_model"]:
        """Layer ``j`` with its heads' outputs given (``hook_z`` := ``z``) and, if given, its MLP output too (path
        patching's frozen run): the attention pattern is not needed, only the norms (and the MLP) are."""

    def W_O(self, j: int) -> Float[Tensor, "head d_head d_model"]:
        """Layer ``j``'s output projection per head (``hook_z`` → ``hook_attn_out``), detached."""

    def b_O(self, j: int) -> Float[Tensor, " d_model"] | None:
        """Layer ``j``'s output projection bias, detached (None if it has none)."""

    def logits(
        self, resid: Float[Tensor, "rows d_model"], columns: Int[Tensor, "rows k"] | None = None
    ) -> Float[Tensor, "rows vocab"]:
        """Logits from the final position's residual after the last layer, as the model's own forward computes them
        (final norm, unembedding, final soft-cap): only the vocabulary ``columns`` of each row when given."""


def engine_of(forward: Forward) -> Engine:
    """The engine that runs ``forward``: TransformerLens's blocks for a `HookedTransformer` on the tl backend; the HF
    model's layers on the hf backend and for a TransformerBridge (its plain HF twin). `NotImplementedError`, naming
    it, for what neither covers exactly (an architecture without an HF table, a bidirectional model, …)."""
    from tl_patching import lens

    if forward.backend == "hf":
        from tl_patching.backends import hf_engine

        return hf_engine.Engine(forward.hf_model)
    if lens.is_bridge(forward.model):
        from tl_patching.backends import hf_engine

        return hf_engine.Engine(lens.plain_hf(forward.model))
    from tl_patching.backends import tl_engine

    return tl_engine.Engine(forward.model)


def readout(engine: Engine, metric: Metric, batch: int):
    """A function from the final position's residual after the last layer, ``[n·batch, d_model]`` (variant-major), to
    ``metric`` per variant and prompt ``[n, batch]``: through two unembedding columns for a `LogitDiff`, the whole
    unembedding for any other metric."""
    if isinstance(metric, LogitDiff):
        if len(metric.correct) != batch:
            raise ValueError(f"{batch} prompts need one correct and one wrong id each, got {len(metric.correct)}")
        metric.check(engine.d_vocab)

        def logit_diff(resid: Tensor) -> Tensor:
            columns = metric.columns.to(resid.device).repeat(len(resid) // batch, 1)
            pair = engine.logits(resid, columns)
            return (pair[:, 0] - pair[:, 1]).reshape(-1, batch)

        return logit_diff

    def general(resid: Tensor) -> Tensor:
        logits = engine.logits(resid)
        return torch.stack([metric(part) for part in logits.reshape(-1, batch, logits.shape[-1])])

    return general


def tolerance(base: float, dtype: torch.dtype) -> float:
    """``base`` (a relative tolerance in float32) widened to 4 units of rounding of a lower-precision model (float16
    eps 9.8e-4, bfloat16 7.8e-3): a check must catch a wrong mechanism (O(0.1–1) relative), not the resolution of
    the model's own arithmetic."""
    return max(base, 4 * torch.finfo(dtype).eps) if dtype.is_floating_point else base


def verify(engine: Engine, run: Run, final_logits: Float[Tensor, "batch d_vocab"], start: int) -> float:
    """Raise `EngineMismatchError` unless the engine's own layers, called on the clean rows from layer 0 at positions
    ``start`` … last against the clean prefix, give back every layer's clean output and, through `Engine.logits`, the
    clean forward's final logits; returns the largest relative difference. Costs one forward of the positions from
    ``start`` (the engines check the last one, on every clean run)."""
    x = run.resid[0][:, start:]
    limit = tolerance(VERIFY_TOLERANCE, x.dtype)
    worst = 0.0
    for j in range(engine.n_layers):
        x, _ = engine.layer(run, j, x, start)
        worst = max(worst, _relative(x, run.resid[j + 1][:, start:]))
        if not worst <= limit:  # also NaN
            raise EngineMismatchError(
                f"the {engine.name} engine's layer {j} does not reproduce the clean forward (relative difference "
                f"{worst:.3g} > {limit:g}): the fast paths cannot run on this model; use patching.sweep"
            )
    worst = max(worst, _relative(engine.logits(x[:, -1]), final_logits))
    if not worst <= limit:
        raise EngineMismatchError(
            f"the {engine.name} engine's logits differ from the clean forward's (relative difference {worst:.3g} > "
            f"{limit:g}): the fast paths cannot run on this model; use patching.sweep"
        )
    return worst


def _relative(a: Tensor, b: Tensor) -> float:
    b = b.to(a.device).float()
    return ((a.float() - b).abs().max() / b.abs().max().clamp(min=1.0)).item()
