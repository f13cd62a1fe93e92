"""TransformerLens plumbing, in one place: everything the library needs to know about TransformerLens's model
beyond its hook points — on both majors. TransformerLens 3.x has `HookedTransformer` (its own modules, its weights
converted); 4.x removed it for `TransformerBridge`, which wraps the HF model itself and, in compatibility mode,
exposes the same hook names and shapes. The installed TransformerLens decides (`MAJOR`, `is_bridge`).

- `TLModel`: the type of the TransformerLens model on this install; `attention_config`: the attention's settings
  (scale, soft-cap, windows, rotary) read from the HF config on a bridge, whose cfg leaves several unset;
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
import copy
import importlib.metadata
import weakref
from collections.abc import Iterator

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.utilities.activation_functions import apply_softcap

TL_VERSION = importlib.metadata.version("transformer-lens")
MAJOR = int(TL_VERSION.split(".")[0])
if MAJOR >= 4:
    from transformer_lens.model_bridge import TransformerBridge as TLModel
else:
    from transformer_lens import HookedTransformer as TLModel

HookedTransformer = TLModel  # the name most annotations use: "the TransformerLens model"


def is_bridge(model) -> bool:
    """Whether ``model`` is a TransformerLens 4 `TransformerBridge` (else a 3.x `HookedTransformer`)."""
    return MAJOR >= 4 and isinstance(model, TLModel)


def architecture(model) -> str:
    """The HF architecture of a TransformerLens model ("LlamaForCausalLM")."""
    return model.cfg.architecture if is_bridge(model) else model.cfg.original_architecture


def bridged_architectures() -> frozenset[str]:
    """The HF architectures TransformerLens 4's bridge boots (its adapter registry); none on TransformerLens 3."""
    if MAJOR < 4:
        return frozenset()
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    return frozenset(SUPPORTED_ARCHITECTURES)


def hf_config(model):
    """The HF config of the checkpoint behind a TransformerLens model (a bridge wraps the HF model; a
    `HookedTransformer` loaded by tl_patching keeps it as ``cfg.hf_config``), or None."""
    if is_bridge(model):
        return model.original_model.config
    return getattr(model.cfg, "hf_config", None)


def attention_config(model):
    """The attention's settings as `HookedTransformerConfig` names them (``attn_scale``, ``attn_scores_soft_cap``,
    ``window_size``, ``attn_types``, ``scale_attn_by_inverse_layer_idx``, ``positional_embedding_type``, heads): the
    model's cfg on TransformerLens 3; on a bridge, whose cfg leaves the scale, windows and QK-norm unset (it
    computes with the HF modules' own), the same fields derived from the HF config by `tl_patching.families`
    (`UnsupportedArchitectureError` for an architecture it has no row for)."""
    if not is_bridge(model):
        return model.cfg
    from types import SimpleNamespace

    from tl_patching.families import SUPPORTED_ARCHITECTURES, UnsupportedArchitectureError, family_of

    config = hf_config(model)
    fields = dict(
        attn_scale=config.head_dim**0.5 if getattr(config, "head_dim", None) else None,
        attn_scores_soft_cap=-1.0,
        window_size=None,
        attn_types=None,
        use_local_attn=False,
        scale_attn_by_inverse_layer_idx=False,
        use_attn_scale=True,
        positional_embedding_type="standard",
    )
    try:
        family = family_of(config)
    except UnsupportedArchitectureError:
        raise UnsupportedArchitectureError(
            f"{architecture(model)}: tl_patching has no attention settings for it (the families it has: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}); what reads them (E1's scores) cannot run"
        ) from None
    fields.update(family.hooked_config(config), original_architecture=architecture(model))
    if fields.get("use_attn_scale", True) and fields.get("attn_scale") is None:
        fields["attn_scale"] = fields["d_head"] ** 0.5
    if not fields.get("use_attn_scale", True):
        fields["attn_scale"] = 1.0
    return SimpleNamespace(**fields)


def tl_model(forward, what: str) -> TLModel:
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


_PLAIN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # bridge -> its plain HF twin


def plain_hf(model) -> torch.nn.Module:
    """A plain HF model computing what a bridge computes: the bridge wraps and changes its HF model in place (its
    attention is TransformerLens's own, and with transformers 5.2x it keeps no key/value cache), so what needs HF's own
    modules — raw HF hooks, the HF layer engine — runs on this twin. Usually it shares the bridge's very tensors;
    a processed GPT-2 or NeoX bridge keeps its folded weights in copies of its own (split q/k/v) that HF's fused
    modules cannot hold, and its twin is built from them instead (`_FROM_TL`). Either way the twin's logits are
    checked equal to the bridge's on a probe input, or `NotImplementedError`."""
    if not is_bridge(model):
        raise TypeError("plain_hf takes a TransformerBridge")
    # Rebuilt (and checked again) whenever a weight of the bridge was changed in place or replaced since: the twin
    # reads HF's modules, which some of the bridge's own copies (GPT-2's split q/k/v) do not write back to.
    stamp = tuple((p.data_ptr(), p._version) for p in model.parameters())
    if model in _PLAIN and _PLAIN[model][1] != stamp:
        del _PLAIN[model]
    if model not in _PLAIN:
        plain = _sharing_twin(model)
        gap, tolerance = _twin_gap(model, plain)
        if not gap <= tolerance and architecture(model) in _FROM_TL:
            plain = _twin_from_params(model)
            gap, tolerance = _twin_gap(model, plain)
        if not gap <= tolerance:
            from tl_patching.provenance import weight_mode

            raise NotImplementedError(
                f"this TransformerBridge's weights ({weight_mode(model)}, {architecture(model)}) do not make a plain "
                f"HF model that computes the same (logits differ by {gap:.3g} > {tolerance:.3g})"
            )
        _PLAIN[model] = (plain, stamp)
    return _PLAIN[model][0]


def _meta_model(config) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def _fill_buffers(plain: torch.nn.Module, wrapped: torch.nn.Module) -> None:
    """Non-persistent buffers (rotary frequencies) are left on meta by a state dict: take the wrapped model's."""
    buffers = {k.replace("._original_component", ""): v for k, v in wrapped.named_buffers()}
    for name, buffer in list(plain.named_buffers()):
        if buffer.is_meta:
            owner, _, attr = name.rpartition(".")
            plain.get_submodule(owner).register_buffer(attr, buffers[name], persistent=False)
    still_meta = [n for n, t in (*plain.named_parameters(), *plain.named_buffers()) if t.is_meta]
    if still_meta:
        raise RuntimeError(f"the bridge's weights do not fill a plain {type(plain).__name__}: left {still_meta[:3]}")
    plain.eval()


def _sharing_twin(model) -> torch.nn.Module:
    """The twin over the bridge's own tensors (nothing copied)."""
    wrapped = model.original_model
    strip = lambda name: name.replace("._original_component", "")  # noqa: E731
    plain = _meta_model(copy.deepcopy(wrapped.config))
    # The bridge's components are also reachable under TransformerLens's names (ln1, attn.q, …): keep HF's.
    wanted = set(plain.state_dict())
    state = {strip(k): v for k, v in wrapped.state_dict(keep_vars=True).items() if strip(k) in wanted}
    missing, _ = plain.load_state_dict(state, assign=True, strict=False)
    if missing:
        raise RuntimeError(f"the bridge's weights do not fill a plain {type(plain).__name__}: left {missing[:3]}")
    _fill_buffers(plain, wrapped)
    return plain


def _twin_from_params(model) -> torch.nn.Module:
    """The twin built from the bridge's HookedTransformer-layout weights (``get_params``, folded where processed), with
    its own unembedding bias (processing folds the final norm's bias into one) and untied embeddings."""
    wrapped = model.original_model
    config = copy.deepcopy(wrapped.config)
    config.tie_word_embeddings = False  # processing centres W_U and W_E differently
    plain = _meta_model(config)
    d_model, d_vocab = model.cfg.d_model, model.cfg.d_vocab_out
    with torch.device("meta"):
        plain.set_output_embeddings(torch.nn.Linear(d_model, d_vocab, bias=True))
    with torch.no_grad():
        params = {k: v.detach().clone() for k, v in model.get_params().items()}
    head = next(n for n, m in plain.named_modules() if m is plain.get_output_embeddings())  # lm_head, embed_out, …
    state = {
        k.replace("HEAD.", f"{head}."): v for k, v in _FROM_TL[architecture(model)](params, model.cfg.n_layers).items()
    }
    plain.load_state_dict(state, assign=True, strict=True)
    _fill_buffers(plain, wrapped)
    return plain


def _twin_gap(model, plain: torch.nn.Module) -> tuple[float, float]:
    """Max |twin − bridge| logits on a probe input, and the tolerance: in half precision the two differ by rounding
    (bf16: 0.06 on logits of 10, measured), so it follows the dtype."""
    tokens = torch.arange(8, device=model.cfg.device)[None].remainder(model.cfg.d_vocab)
    with torch.no_grad():
        logits = model(tokens).float()
        gap = (plain(tokens).logits.float() - logits).abs().max().item()
    dtype = next(model.parameters()).dtype
    return gap, max(1e-4, 16 * torch.finfo(dtype).eps) * max(1.0, logits.abs().max().item())


def _norms(p: dict, tl: str, hf: str) -> dict[str, Tensor]:
    """A norm's weight and bias (1 and 0 where processing folded them away)."""
    d = p["embed.W_E"].shape[1]
    return {f"{hf}.weight": p.get(f"{tl}.w", torch.ones(d)), f"{hf}.bias": p.get(f"{tl}.b", torch.zeros(d))}


def _gpt2_from_tl(p: dict, n_layers: int) -> dict[str, Tensor]:
    """HookedTransformer-layout weights as a GPT2LMHeadModel's (``Conv1D`` stores ``[in, out]``; ``HEAD``: the output
    embedding's name)."""
    s = {"transformer.wte.weight": p["embed.W_E"], "transformer.wpe.weight": p["pos_embed.W_pos"]}
    s |= _norms(p, "ln_final", "transformer.ln_f") | {
        "lm_head.weight": p["unembed.W_U"].T,
        "lm_head.bias": p["unembed.b_U"],
    }
    for l in range(n_layers):
        a, h = f"blocks.{l}.", f"transformer.h.{l}."
        s |= _norms(p, a + "ln1", h + "ln_1") | _norms(p, a + "ln2", h + "ln_2")
        s[h + "attn.c_attn.weight"] = torch.cat(
            [einops.rearrange(p[a + f"attn.W_{x}"], "h d dh -> d (h dh)") for x in "QKV"], dim=1
        )
        s[h + "attn.c_attn.bias"] = torch.cat([p[a + f"attn.b_{x}"].flatten() for x in "QKV"])
        s[h + "attn.c_proj.weight"] = einops.rearrange(p[a + "attn.W_O"], "h dh d -> (h dh) d")
        s[h + "attn.c_proj.bias"] = p[a + "attn.b_O"]
        s[h + "mlp.c_fc.weight"], s[h + "mlp.c_fc.bias"] = p[a + "mlp.W_in"], p[a + "mlp.b_in"]
        s[h + "mlp.c_proj.weight"], s[h + "mlp.c_proj.bias"] = p[a + "mlp.W_out"], p[a + "mlp.b_out"]
    return s


def _neox_from_tl(p: dict, n_layers: int) -> dict[str, Tensor]:
    """HookedTransformer-layout weights as a GPTNeoXForCausalLM's (q, k, v interleaved per head)."""
    s = {"gpt_neox.embed_in.weight": p["embed.W_E"], "HEAD.weight": p["unembed.W_U"].T, "HEAD.bias": p["unembed.b_U"]}
    s |= _norms(p, "ln_final", "gpt_neox.final_layer_norm")
    for l in range(n_layers):
        a, h = f"blocks.{l}.", f"gpt_neox.layers.{l}."
        s |= _norms(p, a + "ln1", h + "input_layernorm") | _norms(p, a + "ln2", h + "post_attention_layernorm")
        qkv = torch.stack([p[a + f"attn.W_{x}"] for x in "QKV"])
        s[h + "attention.query_key_value.weight"] = einops.rearrange(qkv, "three h d dh -> (h three dh) d")
        qkv_bias = torch.stack([p[a + f"attn.b_{x}"] for x in "QKV"])
        s[h + "attention.query_key_value.bias"] = einops.rearrange(qkv_bias, "three h dh -> (h three dh)")
        s[h + "attention.dense.weight"] = einops.rearrange(p[a + "attn.W_O"], "h dh d -> d (h dh)")
        s[h + "attention.dense.bias"] = p[a + "attn.b_O"]
        s[h + "mlp.dense_h_to_4h.weight"], s[h + "mlp.dense_h_to_4h.bias"] = p[a + "mlp.W_in"].T, p[a + "mlp.b_in"]
        s[h + "mlp.dense_4h_to_h.weight"], s[h + "mlp.dense_4h_to_h.bias"] = p[a + "mlp.W_out"].T, p[a + "mlp.b_out"]
    return s


# The architectures whose processed bridges keep folded weights their HF modules cannot hold: their twins are built
# from the bridge's HookedTransformer-layout weights by these.
_FROM_TL = {"GPT2LMHeadModel": _gpt2_from_tl, "GPTNeoXForCausalLM": _neox_from_tl}
