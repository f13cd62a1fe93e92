"""The layer engine on an HF model (`tl_patching.engine`): its own decoder layers, called directly.

Mirror of `tl_patching.backends.tl_engine`. HF's forward cannot start at a layer, but its layers can be called one
by one — with exactly what the model's forward gives them. So the clean run records, for every decoder layer, the
arguments it was called with (bound to the layer's signature: hidden states, attention mask, rotary position
embeddings — both of Gemma 3's, whichever the layer's type takes —, position ids, GPT-2's positional arguments,
the key/value cache), and the keys and values its attention put in the cache (after rotary and QK-norm, as the
attention uses them). A later call on positions ``start … start+S−1`` of n·batch rows gets the same arguments cut
to those positions — mask rows ``start … start+S−1`` over keys ``0 … start+S−1``, position embeddings and ids of
those positions — repeated for the n variants, and a cache (`_Prefix`) whose ``update`` returns the clean keys and
values of positions < ``start`` followed by the rows' own, and keeps nothing. The mask the model built for the
whole sequence already holds its sliding windows and causality, and the prefix is never truncated, so every layer
kind is cut the same way.

Which arguments the engine knows how to cut is the table `CUT`; a layer that gets any other tensor is refused by
name, as is a model without a family table (`tl_patching.backends.hf_maps`: where its layers and final norm are) or
whose attention builds no mask (not eager). Edits and reads go through the HF backend's hooks
(`tl_patching.backends.hf.hooks`), which fire inside the called layer as in a full forward. Every clean run is
checked: the layers called this way must give back the clean forward's residual stream and logits
(`tl_patching.engine.verify`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformers import DynamicCache

from tl_patching.backends import hf as hf_backend
from tl_patching.backends.hf_maps import hook_map_of
from tl_patching.edits import Edit, act_name, replace
from tl_patching.engine import PatternSeen, Run, verify


def _cut_mask(mask: Tensor, start: int, end: int, keys_from: int) -> Tensor:
    return mask[:, :, start:end, keys_from:end]  # [b, 1, query, key]: the rows' queries over keys keys_from … end−1


def _cut_positions(t: Tensor, start: int, end: int, keys_from: int) -> Tensor:
    return t[:, start:end]  # [b, pos, …]


# Layer arguments holding positions, and how to cut them to queries start … end−1 over keys keys_from … end−1 (0:
# the clean prefix and the rows' own positions).
CUT = {
    "attention_mask": _cut_mask,
    "position_embeddings": _cut_positions,  # (cos, sin), each [b, pos, rotary dims]
    "position_ids": _cut_positions,
    "cache_position": lambda t, start, end, keys_from: t[start:end],  # [pos] (transformers before 5.2x)
}


class _Recording(DynamicCache):
    """The clean run's key/value cache: HF's own (so the masks are built as for any first forward), but it only
    notes each layer's keys and values ``[batch, kv_head, pos, d_head]`` and stores nothing."""

    def __init__(self, config):
        super().__init__(config=config)
        self.recorded: dict[int, tuple[Tensor, Tensor]] = {}

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        self.recorded[layer_idx] = (key_states, value_states)
        return key_states, value_states


class _Prefix:
    """The cache one layer call sees: ``update`` returns the clean keys/values of positions < start (``[batch, kv_head,
    start, d_head]``, shared by the n variants, copied into the result once) followed by the rows' own; it keeps
    nothing, so calls never grow it. Anything else a layer asks of it is an error (AttributeError), not a guess."""

    def __init__(self, layer: int, keys: Tensor, values: Tensor):
        self.layer, self.keys, self.values = layer, keys, values

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx != self.layer:
            raise RuntimeError(f"layer {layer_idx} wrote into layer {self.layer}'s key/value cache")
        return _join(self.keys, key_states), _join(self.values, value_states)


def _join(prefix: Tensor, new: Tensor) -> Tensor:
    """``[prefix for each of the n variants ; new]`` along positions: ``[n·batch, kv_head, start + S, d_head]``."""
    B, s = prefix.shape[0], prefix.shape[2]
    out = new.new_empty(new.shape[0], new.shape[1], s + new.shape[2], new.shape[3])
    out.view(-1, B, *out.shape[1:])[:, :, :, :s] = prefix.to(new)
    out[:, :, s:] = new
    return out


def _tile(t: Tensor, n: int, batch: int) -> Tensor:
    """``t`` [batch, …] repeated for n variants (variant-major); a batch of 1 broadcasts and stays as it is."""
    if t.shape[0] == 1 and batch != 1:
        return t
    return t.repeat(n, *[1] * (t.ndim - 1))


@dataclass
class _Call:
    """How the model's forward called one layer: its signature and the bound arguments."""

    signature: inspect.Signature
    arguments: dict


@dataclass
class _State:
    calls: list[_Call]
    keys: list[Tensor]  # [batch, kv_head, pos, d_head] per layer
    values: list[Tensor]
    cache: _Recording


class Engine:
    """The layers of ``hf_model`` (an HF causal LM of a family in `tl_patching.backends.hf_maps`, eager attention)."""

    name = "hf"

    def __init__(self, hf_model: nn.Module):
        self.hf = hf_model
        self.map = hook_map_of(hf_model)  # NotImplementedError naming an architecture without a table
        config = hf_model.config
        self.n_layers = self.map.n_layers(config)
        self.n_heads = config.num_attention_heads
        self.d_vocab = hf_model.get_output_embeddings().weight.shape[0]
        layer = self.map.sites["hook_resid_pre"].module
        self.layers = [hf_model.get_submodule(layer.format(l=j)) for j in range(self.n_layers)]
        self.norm = hf_model.get_submodule(self.map.sites["ln_final.hook_normalized"].module)
        forward = type(hf_model).forward
        # transformers ≥ 5.2x names the key/value cache argument ``cache`` (``past_key_values`` deprecated)
        self.cache_kw = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"

    def clean_run(self, tokens: Int[Tensor, "batch pos"], verify_from: int = -1) -> Run:
        """One clean forward of the HF model, recording each layer's call and keys/values; the engine is then checked
        against it from position ``verify_from`` on (default: the last position)."""
        B, P = tokens.shape
        cache = _Recording(self.hf.config)
        calls: list[_Call | None] = [None] * self.n_layers
        last: list[Tensor] = []

        def capture(j: int):
            def hook(module, args, kwargs):
                signature = inspect.signature(module.forward)
                calls[j] = _Call(signature, dict(signature.bind(*args, **kwargs).arguments))

            return hook

        handles = [layer.register_forward_pre_hook(capture(j), with_kwargs=True) for j, layer in enumerate(self.layers)]
        handles.append(self.layers[-1].register_forward_hook(lambda m, a, out: last.append(_hidden(out))))
        try:
            with torch.no_grad():
                out = self.hf(
                    input_ids=tokens.to(self.hf.device), **{self.cache_kw: cache}, use_cache=True, logits_to_keep=1
                )
        finally:
            for handle in handles:
                handle.remove()
        for j, call in enumerate(calls):
            self._check_call(j, call, cache, B)
        if sorted(cache.recorded) != list(range(self.n_layers)):
            raise NotImplementedError(
                f"{type(self.hf).__name__}: not every layer's attention wrote its keys/values into the cache "
                f"(wrote: {sorted(cache.recorded)}): the HF engine cannot freeze the clean prefix"
            )
        resid = [next(iter(call.arguments.values())) for call in calls] + last
        state = _State(
            calls,
            [cache.recorded[j][0] for j in range(self.n_layers)],
            [cache.recorded[j][1] for j in range(self.n_layers)],
            cache,
        )
        run = Run(tokens, resid, state, self.name)
        verify(self, run, out.logits[:, -1], verify_from % P)
        return run

    def _check_call(self, j: int, call: _Call | None, cache: _Recording, batch: int) -> None:
        """Refuse, by name, a layer call the engine cannot cut to positions exactly."""
        what = f"{type(self.hf).__name__}'s layer {j}"
        if call is None:
            raise NotImplementedError(f"{what} was never called by the model's forward")
        hidden, *rest = call.arguments.items()
        for name, value in _flat(dict(rest)):
            if value is cache or not isinstance(value, Tensor) and not _tensors(value):
                continue
            if name not in CUT:
                raise NotImplementedError(
                    f"{what} gets {name!r}, which the HF engine does not know how to cut to positions "
                    f"(it knows {', '.join(CUT)})"
                )
            if any(t.ndim > 1 and t.shape[0] not in (1, batch) for t in _tensors(value)):
                raise NotImplementedError(f"{what} gets {name!r} without a batch axis it can repeat")
        if not isinstance(call.arguments.get("attention_mask"), Tensor) or call.arguments["attention_mask"].ndim != 4:
            raise NotImplementedError(
                f"{what} gets no [batch, 1, query, key] attention mask (attention "
                f"{self.hf.config._attn_implementation!r} leaves causality to the kernel, which cannot tell a "
                "suffix's queries from the whole sequence's): load the model with attn_implementation='eager'"
            )
        if not any(value is cache for _, value in _flat(call.arguments)):
            raise NotImplementedError(f"{what} is not given the model's key/value cache: no clean prefix to freeze")

    def layer(
        self,
        run: Run,
        j: int,
        x: Float[Tensor, "rows length d_model"],
        start: int,
        edits: Sequence[Edit] = (),
        record: Sequence[str] = (),
        alone: bool = False,
    ) -> tuple[Float[Tensor, "rows length d_model"], dict[str, Tensor]]:
        """``alone``: without the clean prefix (the rows attend to their own positions only), for a call whose
        attention output is replaced anyway (`layer_with_z`): no prefix is copied for it."""
        state: _State = run.state
        B = len(run.tokens)
        n, end = len(x) // B, start + x.shape[1]
        call = state.calls[j]
        keys_from = start if alone else 0
        prefix = _Prefix(j, state.keys[j][:, :, keys_from:start], state.values[j][:, :, keys_from:start])
        layer = self.layers[j]
        x = x.to(next(layer.parameters()).device)

        def cut(name: str, value):
            if value is state.cache:
                return prefix
            if name in CUT and value is not None:
                if isinstance(value, (tuple, list)):
                    return type(value)(_tile(CUT[name](t, start, end, keys_from), n, B) for t in value)
                return _tile(CUT[name](value, start, end, keys_from), n, B)
            return value

        hidden, *rest = call.arguments.items()
        arguments = {hidden[0]: x}
        for name, value in rest:
            if isinstance(value, dict) and call.signature.parameters[name].kind == inspect.Parameter.VAR_KEYWORD:
                arguments[name] = {k: cut(k, v) for k, v in value.items()}
            else:
                arguments[name] = cut(name, value)
        bound = inspect.BoundArguments(call.signature, arguments)
        recorded: dict[str, Tensor] = {}
        with hf_backend.hooks(self.hf, edits, recorded if record else None, record):
            out = _hidden(layer(*bound.args, **bound.kwargs))
        return out, recorded

    def attention_pattern(
        self, run: Run, j: int, x: Float[Tensor, "rows length d_model"], start: int
    ) -> Float[Tensor, "rows head length key"]:
        """Layer ``j``'s attention pattern (``hook_pattern``) for rows ``x`` at positions ``start`` …, over keys
        0 … end−1, in the graph of ``x`` (gradients flow): the attention module's own probabilities (eager)."""
        module = self.hf.get_submodule(self.map.sites["attn.hook_pattern"].module.format(l=j))
        element = self.map.sites["attn.hook_pattern"].element
        seen: list[Tensor] = []

        def stop(m, a, out):  # the rest of the layer (output projection, MLP) is not needed: ~3x less work
            seen.append(out[element])
            raise PatternSeen

        handle = module.register_forward_hook(stop)
        try:
            self.layer(run, j, x, start)
        except PatternSeen:
            pass
        finally:
            handle.remove()
        if not seen or seen[0] is None:
            raise NotImplementedError(f"{type(self.hf).__name__}'s attention returned no probabilities")
        return seen[0]

    def head_writes_are_linear(self) -> bool:
        """Whether ``hook_attn_out`` is the output projection of ``hook_z`` itself (no norm after attention), so a
        head's write into the residual stream is linear in its z."""
        return self.map.sites["hook_attn_out"].module == self.map.sites["attn.hook_z"].module

    def layer_with_z(
        self,
        run: Run,
        j: int,
        x: Float[Tensor, "rows length d_model"],
        start: int,
        z: Float[Tensor, "rows length head d_head"],
        mlp_out: Float[Tensor, "rows length d_model"] | None = None,
    ) -> Float[Tensor, "rows length d_model"]:
        # HF's layer computes an attention pattern all the same (of the rows alone: no prefix to copy); the edit then
        # replaces what it gives the output projection, and (frozen MLPs) the MLP's output.
        edits = [replace(act_name("z", j), z)]
        if mlp_out is not None:
            edits.append(replace(act_name("mlp_out", j), mlp_out))
        return self.layer(run, j, x, start, edits, alone=True)[0]

    def _out_projection(self, j: int) -> nn.Module:
        return self.hf.get_submodule(self.map.sites["attn.hook_z"].module.format(l=j))

    def W_O(self, j: int) -> Float[Tensor, "head d_head d_model"]:
        """Layer ``j``'s output projection per head: the weight of the module whose input is ``hook_z`` (an
        ``nn.Linear`` holds it as [d_model, head·d_head], GPT-2's ``Conv1D`` as [head·d_head, d_model])."""
        module = self._out_projection(j)
        weight = module.weight.detach()
        if isinstance(module, nn.Linear):
            weight = weight.T
        elif type(module).__name__ != "Conv1D":
            raise NotImplementedError(f"{type(self.hf).__name__}'s output projection is a {type(module).__name__}")
        return einops.rearrange(weight, "(head d_head) d_model -> head d_head d_model", head=self.n_heads)

    def b_O(self, j: int) -> Float[Tensor, " d_model"] | None:
        """Layer ``j``'s output projection bias (None if it has none)."""
        bias = self._out_projection(j).bias
        return None if bias is None else bias.detach()

    def logits(
        self, resid: Float[Tensor, "rows d_model"], columns: Int[Tensor, "rows k"] | None = None
    ) -> Float[Tensor, "rows vocab"]:
        head = self.hf.get_output_embeddings()
        h = self.norm(resid[:, None].to(head.weight.device))[:, 0]
        if columns is None:
            out = head(h)
        else:
            out = torch.einsum("rd,rkd->rk", h, head.weight[columns])
            if head.bias is not None:
                out = out + head.bias[columns]
        cap = getattr(self.hf.config, "final_logit_softcapping", None)
        return cap * torch.tanh(out / cap) if cap else out


def _hidden(out) -> Tensor:
    return out[0] if isinstance(out, tuple) else out  # a tuple before transformers 5, a tensor since


def _flat(arguments: dict):
    """(name, value) of every argument, the var-keyword ones (``**kwargs``) by their own names."""
    for name, value in arguments.items():
        if isinstance(value, dict):
            yield from value.items()
        else:
            yield name, value


def _tensors(value) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for t in value if isinstance(t, Tensor)]
    return []
