"""Side-by-side timing and memory of the head-sweep implementations, on GPT-2-sized random-weight models.

Speed does not depend on the weights, so the architectures are GPT-2 small (12 × 12, d_model 768) and
large (36 × 20, d_model 1280) with the full 50257-token vocabulary, initialised at random. The prompts
are batch × pos random token ids; each donor differs from its recipient at one position (like IOI's S2).

Peak memory is the peak of the bytes glibc's allocator has handed out (``mallinfo2``: heap in use plus
mmapped blocks) above the level at the start of the call, sampled every millisecond. Unlike the resident
set size it falls when torch frees memory, so calls measured one after another do not inherit peaks.
"""

from __future__ import annotations

import ctypes
import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import torch
from transformer_lens import ActivationCache, HookedTransformer, HookedTransformerConfig
from transformer_lens import patching as tl_patching_module

from tl_patching import hooks, patching
from tl_patching.hooks import act_name
from tl_patching.metrics import logit_diff

SIZES = {
    "gpt2-small-sized": dict(n_layers=12, n_heads=12, d_model=768),
    "gpt2-large-sized": dict(n_layers=36, n_heads=20, d_model=1280),
}


def random_hooked(n_layers: int, n_heads: int, d_model: int, d_vocab: int = 50257, seed: int = 0) -> HookedTransformer:
    """A GPT-2-architecture `HookedTransformer` with random weights (TL's own init)."""
    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(
        n_layers=n_layers, n_heads=n_heads, d_model=d_model, d_head=d_model // n_heads, d_mlp=4 * d_model,
        d_vocab=d_vocab, n_ctx=1024, act_fn="gelu_new", normalization_type="LN", seed=seed,
    )
    return HookedTransformer(cfg).eval()


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def _allocated_bytes() -> int:
    """Bytes in use from malloc: small-block heap plus mmapped large blocks (glibc ≥ 2.33)."""
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd


def measure(fn: Callable[[], object], repeats: int = 1) -> tuple[float, int, object]:
    """(best wall seconds over ``repeats``, peak allocated bytes above the start, result of the last call)."""
    best, peak, result = float("inf"), 0, None
    for _ in range(repeats):
        start_bytes, high, done = _allocated_bytes(), [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                high[0] = max(high[0], _allocated_bytes())
                time.sleep(0.001)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
        done.set()
        sampler.join()
        peak = max(peak, max(high[0], _allocated_bytes()) - start_bytes)
    return best, peak, result


@dataclass
class Row:
    method: str
    seconds: float  # for the whole L × H sweep (scaled from a sample where ``note`` says so)
    peak_mb: float
    ratio: float  # plain loop seconds / this method's seconds
    max_abs_diff: float  # vs the plain loop on the heads both computed (batch-mean for TL's, which averages)
    note: str = ""


def ioi_like_batch(model: HookedTransformer, batch: int, pos: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=g)
    donor = tokens.clone()
    donor[:, pos // 2] = torch.randint(0, model.cfg.d_vocab, (batch,), generator=g)
    correct, wrong = torch.randint(0, model.cfg.d_vocab, (2, batch), generator=g)
    return tokens, donor, correct, wrong


def bench_size(name: str, batch: int = 8, pos: int = 16, sample_heads: int | None = None, log=print) -> list[Row]:
    """All methods on one model size. ``sample_heads``: time the plain loop and TL's sweep on this many
    (layer, head) pairs spread over the model, and scale per head."""
    model = random_hooked(**SIZES[name])
    L, H = model.cfg.n_layers, model.cfg.n_heads
    tokens, donor_tokens, correct, wrong = ioi_like_batch(model, batch, pos)
    z_names = [act_name("z", l) for l in range(L)]
    _, donor_cache = hooks.run(model, donor_tokens, cache=z_names)
    pairs = [(l, h) for l in range(L) for h in range(H)]
    if sample_heads and sample_heads < len(pairs):
        step = len(pairs) / sample_heads
        pairs = [pairs[int(i * step)] for i in range(sample_heads)]
    scale = L * H / len(pairs)
    note = f"timed on {len(pairs)} of {L * H} heads, scaled ×{scale:.1f}" if scale > 1 else ""

    def plain() -> dict:
        return {(l, h): patching.plain_head_sweep(model, tokens, donor_cache, correct, wrong, layers=[l], heads=[h], progress=False)[0, 0]
                for l, h in pairs}

    def tl_sweep() -> torch.Tensor:
        # TL's get_act_patch_attn_head_out_by_pos, restricted to the final position: its own driver and
        # setter with an explicit index (the partial fixes index_axis_names, which excludes index_df).
        tl_fn = tl_patching_module.get_act_patch_attn_head_out_by_pos
        index = pd.DataFrame({"layer": [l for l, _ in pairs], "pos": [pos - 1] * len(pairs), "head": [h for _, h in pairs]})
        metric = lambda logits: logit_diff(logits, correct, wrong).mean()  # noqa: E731 (TL averages the batch)
        with torch.no_grad():
            return tl_fn.func(model, tokens, ActivationCache(donor_cache, model), metric,
                              **{**tl_fn.keywords, "index_axis_names": None, "index_df": index})

    clean_cache_run = functools.partial(model.run_with_cache, tokens)
    t_plain, m_plain, ref = measure(plain)
    t_plain *= scale
    rows = [Row("plain run_with_hooks loop", t_plain, m_plain / 2**20, 1.0, 0.0, note)]
    log(f"{name}: plain loop {t_plain:.1f}s {note}")
    t_tl, m_tl, tl_out = measure(tl_sweep)
    ref_mean = torch.stack([ref[p].mean() for p in pairs])  # TL's metric averages the batch
    rows.append(Row("transformer_lens.patching get_act_patch_attn_head_out_by_pos (final pos)", t_tl * scale, m_tl / 2**20,
                    t_plain / (t_tl * scale), float((tl_out.flatten() - ref_mean).abs().max()), note))
    # The batched path still recomputes every later position: on the large model, time it on sampled
    # layers and scale by their share of the work (layer l costs L − l block passes).
    batched_layers = sorted({pairs[i][0] for i in range(0, len(pairs), max(1, len(pairs) // 3))}) if scale > 1 else list(range(L))
    layer_scale = sum(L - l for l in range(L)) / sum(L - l for l in batched_layers)
    batched_note = f"timed on layers {batched_layers}, scaled ×{layer_scale:.1f} by cost (L − l)" if layer_scale > 1 else ""
    for label, fn, factor, method_note in (
        ("batched + start_at_layer", lambda: patching.batched_head_sweep(model, tokens, donor_cache, correct, wrong, layers=batched_layers, progress=False),
         layer_scale, batched_note),
        ("final position, clean K/V reused", lambda: patching.final_position_head_sweep(model, tokens, donor_cache, correct, wrong, progress=False), 1.0, ""),
    ):
        t, m, out = measure(fn, repeats=2 if factor == 1 else 1)
        t *= factor
        rows_of = {l: i for i, l in enumerate(batched_layers)} if factor != 1 else {l: l for l in range(L)}
        diff = max(float((out[rows_of[l], h] - ref[(l, h)]).abs().max()) for l, h in pairs if l in rows_of)
        rows.append(Row(label, t, m / 2**20, t_plain / t, diff, method_note))
        log(f"{name}: {label} {t:.2f}s")
    t_fwd, m_cache, _ = measure(lambda: model(tokens), repeats=2)
    _, m_cache, _ = measure(clean_cache_run)
    t_attr, m_attr, _ = measure(lambda: patching.attribution_patch(model, tokens, donor_tokens, correct, wrong), repeats=2)
    rows.append(Row("attribution patching (all heads × positions)", t_attr, m_attr / 2**20, t_plain / t_attr, float("nan"),
                    f"{t_attr / t_fwd:.2f} forward-equivalents"))
    rows.append(Row("reference: one forward (time), one clean run_with_cache (memory)", t_fwd, m_cache / 2**20, float("nan"), float("nan"), "memory reference"))
    return rows


def report(results: dict[str, list[Row]]) -> str:
    """A table per size, then one machine-readable line per size."""
    lines = []
    for name, rows in results.items():
        lines.append(f"\n## {name}\n")
        lines.append("| method | seconds | peak MB | × vs plain | max abs diff | note |")
        lines.append("|---|---:|---:|---:|---:|---|")
        for r in rows:
            lines.append(f"| {r.method} | {r.seconds:.2f} | {r.peak_mb:.0f} | {r.ratio:.1f} | {r.max_abs_diff:.1e} | {r.note} |")
        cache_mb = rows[-1].peak_mb
        fast = next(r for r in rows if r.method.startswith("final position"))
        lines.append(f"\nfast sweep peak memory / clean run_with_cache memory: {fast.peak_mb / cache_mb:.2f}")
    lines.append("")
    for name, rows in results.items():
        fast = next(r for r in rows if r.method.startswith("final position"))
        lines.append(f"{name} final-token head sweep: {fast.ratio:.1f}x vs plain loop, max abs diff {fast.max_abs_diff:.0e}")
    return "\n".join(lines)
