"""The layer engine on a TransformerLens 3 `HookedTransformer` (`tl_patching.engine`): its own blocks.

Mirror of `tl_patching.backends.hf_engine`. Each call runs ``model.blocks[j]`` with a frozen
`TransformerLensKeyValueCacheEntry` holding the clean prefix's keys and values (as TransformerLens's attention caches
them: after QK-norm, before RoPE, which the attention applies on use at the cache's offset), repeated over the
variants: TransformerLens's text-generation path, so whatever the family's block does is TransformerLens's own code.
The clean run calls the blocks as ``HookedTransformer.forward`` does (embeddings, padding mask, shortformer positional
embedding), each filling a fresh cache entry. Edits and reads go through the TL backend's hooks
(`tl_patching.backends.tl.hooks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

from tl_patching import lens
from tl_patching.backends import tl as tl_backend
from tl_patching.edits import Edit
from tl_patching.engine import PatternSeen, Run, verify
from tl_patching.lens import HookedTransformer


def check_causal(model: HookedTransformer) -> None:
    """Raise `NotImplementedError` where the engine's premise (a change at p leaves positions < p alone) fails."""
    lens.refuse(
        "the fast paths",
        {
            f"{model.cfg.attention_dir} attention (a patch changes earlier positions too, so there is no "
            "clean prefix to reuse; use patching.sweep)": model.cfg.attention_dir != "causal"
        },
    )


@dataclass
class _State:
    keys: list[Tensor]  # [batch, pos, kv_head, d_head] per layer, as the block's attention cached them
    values: list[Tensor]
    attention_mask: Tensor | None  # [batch, pos] padding mask (None unless the tokenizer pads on the left)
    shortformer_pos_embed: Tensor | None


def _rows(t: Tensor, n: int) -> Tensor:
    """``t`` [batch, ...] repeated for n variants, variant-major: row v·batch + b."""
    return t.repeat(n, *[1] * (t.ndim - 1))


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


class Engine:
    """The blocks of a `HookedTransformer` (causal attention)."""

    name = "tl"

    def __init__(self, model: HookedTransformer):
        check_causal(model)
        self.model = model
        self.n_layers = model.cfg.n_layers
        self.n_heads = model.cfg.n_heads
        self.d_vocab = model.cfg.d_vocab_out

    def clean_run(self, tokens: Int[Tensor, "batch pos"], verify_from: int = -1) -> Run:
        """One clean forward through ``model.blocks``, each filling a fresh key/value cache entry; the engine is then
        checked against it from position ``verify_from`` on (default: the last position)."""
        model, cfg = self.model, self.model.cfg
        kv_heads = lens.kv_heads(cfg)
        resid, keys, values = [], [], []
        with torch.no_grad():
            # Exactly how HookedTransformer.forward starts: embeddings, padding mask (None unless the tokenizer pads
            # on the left), shortformer positional embedding.
            residual, tokens, shortformer, mask = model.input_to_embed(tokens)
            for block in model.blocks:
                residual = residual.to(_device(block))  # blocks split over devices (n_devices > 1), as TL's forward
                empty = torch.empty(len(tokens), 0, kv_heads, cfg.d_head, dtype=cfg.dtype, device=residual.device)
                entry = TransformerLensKeyValueCacheEntry(empty, empty.clone())
                resid.append(residual)
                residual = block(
                    residual, shortformer_pos_embed=shortformer, past_kv_cache_entry=entry, attention_mask=mask
                )
                keys.append(entry.past_keys)
                values.append(entry.past_values)
            resid.append(residual)
            run = Run(tokens, resid, _State(keys, values, mask, shortformer), self.name)
            verify(self, run, self.logits(residual[:, -1]), verify_from % tokens.shape[1])
        return run

    def layer(
        self,
        run: Run,
        j: int,
        x: Float[Tensor, "rows length d_model"],
        start: int,
        edits: Sequence[Edit] = (),
        record: Sequence[str] = (),
    ) -> tuple[Float[Tensor, "rows length d_model"], dict[str, Tensor]]:
        state: _State = run.state
        n = len(x) // len(run.tokens)
        end = start + x.shape[1]
        block = self.model.blocks[j]
        device = _device(block)
        entry = TransformerLensKeyValueCacheEntry(
            _rows(state.keys[j][:, :start], n), _rows(state.values[j][:, :start], n), frozen=True
        )
        mask = None if state.attention_mask is None else _rows(state.attention_mask[:, :end], n).to(device)
        shortformer = state.shortformer_pos_embed
        shortformer = None if shortformer is None else _rows(shortformer[:, start:end], n).to(device)
        recorded: dict[str, Tensor] = {}
        with tl_backend.hooks(self.model, edits, recorded if record else None, record):
            out = block(x.to(device), shortformer_pos_embed=shortformer, past_kv_cache_entry=entry, attention_mask=mask)
        return out, recorded

    def attention_pattern(
        self, run: Run, j: int, x: Float[Tensor, "rows length d_model"], start: int
    ) -> Float[Tensor, "rows head length key"]:
        """Layer ``j``'s attention pattern (``hook_pattern``) for rows ``x`` at positions ``start`` …, over keys
        0 … end−1, in the graph of ``x`` (gradients flow)."""
        seen: list[Tensor] = []

        def stop(act: Tensor, hook) -> None:  # the rest of the block (output projection, MLP) is not needed
            seen.append(act)
            raise PatternSeen

        try:
            with self.model.hooks(fwd_hooks=[(f"blocks.{j}.attn.hook_pattern", stop)]):
                self.layer(run, j, x, start)
        except PatternSeen:
            pass
        return seen[0]

    def head_writes_are_linear(self) -> bool:
        """Whether ``hook_attn_out`` is ``hook_z`` through W_O alone (no norm after attention)."""
        return not self.model.cfg.use_normalization_before_and_after

    def layer_with_z(
        self,
        run: Run,
        j: int,
        x: Float[Tensor, "rows length d_model"],
        start: int,
        z: Float[Tensor, "rows length head d_head"],
        mlp_out: Float[Tensor, "rows length d_model"] | None = None,
    ) -> Float[Tensor, "rows length d_model"]:
        # No attention pattern is needed: the block's output from the given z through W_O (as TransformerLens sums
        # the heads), its post-attention norm where the family has one, and the rest of the block.
        block, cfg = self.model.blocks[j], self.model.cfg
        x = x.to(_device(block))
        w = einops.rearrange(block.attn.W_O, "head d_head d_model -> d_model (head d_head)")
        attn_out = F.linear(z.to(x).flatten(-2), w, block.attn.b_O)
        if cfg.use_normalization_before_and_after:
            attn_out = block.ln1_post(attn_out)
        if cfg.attn_only:
            return x + attn_out
        if cfg.parallel_attn_mlp:
            mlp = block.apply_mlp(block.ln2(x)) if mlp_out is None else mlp_out.to(x)
            return x + attn_out + mlp
        mid = x + attn_out
        mlp = block.apply_mlp(block.ln2(mid)) if mlp_out is None else mlp_out.to(x)
        return mid + mlp

    def W_O(self, j: int) -> Float[Tensor, "head d_head d_model"]:
        """Layer ``j``'s output projection per head."""
        return self.model.blocks[j].attn.W_O.detach()

    def b_O(self, j: int) -> Float[Tensor, " d_model"] | None:
        """Layer ``j``'s output projection bias (None if it has none)."""
        return self.model.blocks[j].attn.b_O.detach()

    def logits(
        self, resid: Float[Tensor, "rows d_model"], columns: Int[Tensor, "rows k"] | None = None
    ) -> Float[Tensor, "rows vocab"]:
        return lens.final_logits(self.model, resid, columns)
