"""Timing and peak memory of the fast exact sweeps against the plain loops they replace (benchmark code, not library).

Models: random-weight HF models built from their configs — GPT-2 small (12 × 12 heads, d_model 768, vocab 50257)
and SmolLM2-135M (Llama: 30 × 9 heads, 3 KV heads, d_model 576, d_mlp 1536, vocab 49152) — and the same weights
in TransformerLens's model: on TransformerLens 3 a `HookedTransformer`, converted with TL's own
``convert_gpt2_weights`` / ``convert_llama_weights`` under a `HookedTransformerConfig` built here; on TransformerLens 4
a `TransformerBridge` around a copy of the HF model (`tl_patching.models.hooked_from_hf`); raw weights either way.
Speed does not depend on the weights. Prompts: batch × pos random token ids; each donor differs from its recipient
at one position (as IOI's S2).

Peak memory: the process's peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs``) above its
size at the start, measured in a fresh process after the same setup (model, prompts, donor cache), so every
measurement starts from the same state. Resident memory
also counts freed memory the allocator keeps, so it is an upper bound on what a call needs; the ratio to one
``run_with_cache`` of the same prompts, measured the same way, is the number reported.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, LlamaForCausalLM

from tl_patching import fast, lens
from tl_patching.edits import act_name, patch
from tl_patching.forward import Forward
from tl_patching.metrics import LogitDiff, logit_diff

SIZES = ("gpt2-small-sized", "smollm2-135m-sized")
# GPT-2 small, medium and large: 12, 24 and 36 layers (the seeds' E5 runs on GPT-2 large)
GPT2_SIZES = {
    "gpt2-small-sized": (12, 12, 768),
    "gpt2-medium-sized": (24, 16, 1024),
    "gpt2-large-sized": (36, 20, 1280),
}


HookedTransformer = lens.TLModel


def build(size: str, seed: int = 0) -> tuple[torch.nn.Module, HookedTransformer]:
    """(HF model, TransformerLens model) with the same random weights, raw."""
    torch.manual_seed(seed)
    hf = _hf(size)
    if lens.MAJOR >= 4:
        from tl_patching.models import hooked_from_hf

        return hf, hooked_from_hf(hf, weights="raw", name=size)
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights, convert_llama_weights

    if size in GPT2_SIZES:
        n_layers, n_heads, d_model = GPT2_SIZES[size]
        cfg = HookedTransformerConfig(
            d_model=d_model,
            d_head=64,
            n_heads=n_heads,
            d_mlp=4 * d_model,
            n_layers=n_layers,
            n_ctx=1024,
            eps=1e-5,
            d_vocab=50257,
            act_fn="gelu_new",
            normalization_type="LN",
            original_architecture="GPT2LMHeadModel",
        )
        state = convert_gpt2_weights(hf, cfg)
    else:
        cfg = HookedTransformerConfig(
            d_model=576,
            d_head=64,
            n_heads=9,
            n_key_value_heads=3,
            d_mlp=1536,
            n_layers=30,
            n_ctx=2048,
            eps=1e-5,
            d_vocab=49152,
            act_fn="silu",
            normalization_type="RMS",
            positional_embedding_type="rotary",
            rotary_dim=64,
            rotary_base=100000,
            rotary_adjacent_pairs=False,
            gated_mlp=True,
            final_rms=True,
            original_architecture="LlamaForCausalLM",
        )
        state = convert_llama_weights(hf, cfg)
    model = HookedTransformer(cfg).eval()
    model.load_and_process_state_dict(
        state, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    return hf, model


def _hf(size: str) -> torch.nn.Module:
    """The HF model, with eager attention (what tl_patching loads, and what a bridge runs)."""
    if size in GPT2_SIZES:
        n_layers, n_heads, d_model = GPT2_SIZES[size]
        config = GPT2Config(n_layer=n_layers, n_head=n_heads, n_embd=d_model, vocab_size=50257, n_positions=1024)
        return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    if size == "smollm2-135m-sized":
        config = LlamaConfig(
            hidden_size=576,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            intermediate_size=1536,
            vocab_size=49152,
            rms_norm_eps=1e-5,
            rope_theta=100000.0,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            hidden_act="silu",
        )
        return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    raise ValueError(f"size must be one of {SIZES + tuple(GPT2_SIZES)}")


def ioi_like_batch(d_vocab: int, batch: int, pos: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, d_vocab, (batch, pos), generator=g)
    donor = tokens.clone()
    donor[:, pos // 2] = torch.randint(0, d_vocab, (batch,), generator=g)
    correct, wrong = torch.randint(0, d_vocab, (2, batch), generator=g)
    return tokens, donor, correct, wrong


def timed(fn: Callable[[], object], repeats: int = 1) -> tuple[float, object]:
    """(best wall seconds over ``repeats``, result of the last call)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _peak_child(size: str, batch: int, pos: int, what: str, threads: int, queue) -> None:
    """In a fresh process: build the model and prompts, then measure the peak of one call of ``what``."""
    torch.set_num_threads(threads)
    hf, model = build(size)
    backend = what.endswith("-hf")
    if not backend:
        del hf
    tokens, donor_tokens, correct, wrong = ioi_like_batch(model.cfg.d_vocab, batch, pos)
    forward = Forward(model, hf) if backend else Forward(model)
    _, donor = forward.run(donor_tokens, cache=[act_name("z", l) for l in range(model.cfg.n_layers)])
    calls = {
        "run_with_cache": lambda: model.run_with_cache(tokens),
        "final": lambda: fast.final_position_head_sweep(
            forward, tokens, donor, LogitDiff(correct, wrong), progress=False
        ),
        "any": lambda: fast.position_head_sweep(forward, tokens, donor, LogitDiff(correct, wrong), positions=[0]),
    }
    calls["final-hf"], calls["any-hf"] = calls["final"], calls["any"]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size to the current one
    start = _status_kb("VmRSS")
    with torch.no_grad():
        calls[what]()
    queue.put((_status_kb("VmHWM") - start) * 1024)


def peak_bytes(size: str, batch: int, pos: int, what: str) -> int:
    """Peak resident bytes above the start while ``what`` runs ("run_with_cache"; "final": the final-position sweep;
    "any": the any-position sweep's widest pass, position 0; "final-hf", "any-hf": the same on the HF backend), in a
    fresh (spawned) process after the same setup. Not forked: a fork of a process that has used torch's thread pool
    can deadlock."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_peak_child, args=(size, batch, pos, what, torch.get_num_threads(), queue))
    child.start()
    result = queue.get()
    child.join()
    return result


@dataclass
class Line:
    """One result line: ``<name>: <ratio>x vs <reference>, max abs diff <d>``."""

    name: str
    ratio: float
    reference: str
    diff: float

    def __str__(self) -> str:
        return f"{self.name}: {self.ratio:.1f}x vs {self.reference}, max abs diff {self.diff:.1e}"


def spread(items: list, n: int) -> list:
    """``n`` items spread evenly over ``items``."""
    if n >= len(items):
        return list(items)
    return [items[int(i * len(items) / n)] for i in range(n)]


def plain_tl_loop(model: HookedTransformer, tokens, donor, correct, wrong, pairs) -> dict:
    """One ``run_with_hooks`` per (layer, head): head h's z at the final position from the donor."""
    out = {}
    for l, h in pairs:

        def hook(z, hook, h=h, l=l):
            z = z.clone()
            z[:, -1, h] = donor[act_name("z", l)][:, -1, h]
            return z

        out[l, h] = logit_diff(model.run_with_hooks(tokens, fwd_hooks=[(act_name("z", l), hook)]), correct, wrong)
    return out


def plain_hf_loop(forward: Forward, tokens, donor, correct, wrong, pairs) -> dict:
    """One HF forward per (layer, head) through tl_patching's raw-HF-hook backend (GPT-2 mirror)."""
    return {
        (l, h): logit_diff(forward(tokens, [patch(act_name("z", l), donor, head=h, pos=-1)]), correct, wrong)
        for l, h in pairs
    }


def raw_llama_hf_loop(hf: LlamaForCausalLM, n_heads: int, tokens, donor_z: dict, correct, wrong, pairs) -> dict:
    """One HF forward per (layer, head), with a raw forward pre-hook on ``o_proj`` (its input is z, heads
    concatenated) writing head h at the final position; ``donor_z[l]``: [batch, pos, d_model] o_proj input."""
    out = {}
    for l, h in pairs:
        o_proj = hf.model.layers[l].self_attn.o_proj
        d_head = o_proj.in_features // n_heads

        def pre_hook(module, args, l=l, h=h, d_head=d_head):
            x = args[0].clone()
            x[:, -1, h * d_head : (h + 1) * d_head] = donor_z[l][:, -1, h * d_head : (h + 1) * d_head]
            return (x,)

        handle = o_proj.register_forward_pre_hook(pre_hook, prepend=True)
        try:
            out[l, h] = logit_diff(hf(tokens).logits, correct, wrong)
        finally:
            handle.remove()
    return out


def llama_donor_z(hf: LlamaForCausalLM, tokens) -> dict:
    """Each layer's o_proj input (z, heads concatenated) on ``tokens``, recorded with raw HF hooks."""
    z, handles = {}, []
    for l, layer in enumerate(hf.model.layers):
        handles.append(
            layer.self_attn.o_proj.register_forward_pre_hook(
                lambda m, args, l=l: z.__setitem__(l, args[0].detach().clone())
            )
        )
    try:
        with torch.no_grad():
            hf(tokens)
    finally:
        for handle in handles:
            handle.remove()
    return z


def tl_get_act_patch_sample(
    model: HookedTransformer, tokens, donor_cache: dict, correct, wrong, triples
) -> torch.Tensor:
    """TransformerLens's ``get_act_patch_attn_head_out_by_pos`` on the (layer, pos, head) rows of ``triples``
    (its own driver and setter, one full forward per row; the metric is the batch mean, as TL's is one number)."""
    import pandas as pd  # TL's driver takes its index as a DataFrame
    from transformer_lens import ActivationCache
    from transformer_lens import patching as tl_patching

    tl_fn = tl_patching.get_act_patch_attn_head_out_by_pos
    index = pd.DataFrame(triples, columns=["layer", "pos", "head"])
    metric = lambda logits: logit_diff(logits, correct, wrong).mean()  # noqa: E731
    return tl_fn.func(
        model,
        tokens,
        ActivationCache(donor_cache, model),
        metric,
        **{**tl_fn.keywords, "index_axis_names": None, "index_df": index},
    )
