"""Benchmark the fast exact sweeps against the plain loops, on GPT-2-small- and SmolLM2-135M-sized random models.

    PYTHONPATH=. python benchmarks/bench_patching.py [--sizes gpt2-small-sized,smollm2-135m-sized]

Prints, per size, lines of the form ``<name>: <ratio>x vs <reference>, max abs diff <d>`` (speed and peak memory
of each fast path) and ``note:`` lines (what was sampled and scaled, TL vs HF forward time). The plain loops cost
one full forward per patch, the same for every patch, so they are timed on a stated sample of patches and scaled
to the whole sweep; the fast any-position sweep is timed at positions symmetric about the middle (their mean
suffix length is the full sweep's, and a pass's cost is affine in its suffix length) and scaled the same way.
See docs/benchmark.md for the method and the numbers.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (  # noqa: E402
    SIZES,
    Line,
    build,
    ioi_like_batch,
    llama_donor_z,
    peak_bytes,
    plain_hf_loop,
    plain_tl_loop,
    raw_llama_hf_loop,
    spread,
    timed,
    tl_get_act_patch_sample,
)

from tl_patching import fast, lens  # noqa: E402
from tl_patching.edits import act_name  # noqa: E402
from tl_patching.forward import Forward  # noqa: E402
from tl_patching.metrics import LogitDiff  # noqa: E402


def blocks_of(model) -> list[torch.nn.Module]:
    """The blocks the fast paths run: TL's own (TransformerLens 3), or the decoder layers of a bridge's plain HF twin
    (TransformerLens 4: the HF engine)."""
    if not lens.is_bridge(model):
        return list(model.blocks)
    base = lens.plain_hf(model).base_model
    return list(next(m for m in base.children() if isinstance(m, torch.nn.ModuleList)))


def time_in_blocks(model, fn):
    """(wall seconds of ``fn``, seconds spent inside the blocks it runs (`blocks_of`), result)."""
    spent, starts, handles = [0.0], {}, []
    for j, block in enumerate(blocks_of(model)):
        handles.append(block.register_forward_pre_hook(lambda m, a, j=j: starts.__setitem__(j, time.perf_counter())))
        handles.append(
            block.register_forward_hook(
                lambda m, a, o, j=j: spent.__setitem__(0, spent[0] + time.perf_counter() - starts[j])
            )
        )
    try:
        seconds, result = timed(fn)
    finally:
        for h in handles:
            h.remove()
    return seconds, spent[0], result


def bench_depth(size: str, batch: int, pos: int, head_sample: int) -> list[str]:
    """The final-position head sweep against the plain TL loop at one more depth (GPT-2 medium / large sizes)."""
    hf, model = build(size)
    tag, tl_loop = (
        (" (bridge)", "plain Bridge run_with_hooks loop")
        if lens.is_bridge(model)
        else ("", "plain TL run_with_hooks loop")
    )
    L, H = model.cfg.n_layers, model.cfg.n_heads
    tokens, donor_tokens, correct, wrong = ioi_like_batch(model.cfg.d_vocab, batch, pos)
    forward = Forward(model)
    _, donor = forward.run(donor_tokens, cache=[act_name("z", l) for l in range(L)])
    run_fast = lambda: fast.final_position_head_sweep(forward, tokens, donor, LogitDiff(correct, wrong), progress=False)  # noqa: E731
    timed(run_fast)  # warm-up
    t_fast, fast_out = timed(run_fast, repeats=2)
    pairs = spread([(l, h) for l in range(L) for h in range(H)], head_sample)
    scale = L * H / len(pairs)
    t_tl, tl_out = timed(lambda: plain_tl_loop(model, tokens, donor, correct, wrong, pairs))
    diff = max(float((fast_out[l, h] - tl_out[l, h]).abs().max()) for l, h in pairs)
    # The HF backend (raw HF hooks, the HF layer engine) against the plain raw-HF-hook loop, same heads.
    hf_forward = Forward(model, hf)
    _, hf_donor = hf_forward.run(donor_tokens, cache=[act_name("z", l) for l in range(L)])
    run_hf_fast = lambda: fast.final_position_head_sweep(  # noqa: E731
        hf_forward, tokens, hf_donor, LogitDiff(correct, wrong), progress=False
    )
    timed(run_hf_fast)  # warm-up
    t_hf_fast, hf_fast_out = timed(run_hf_fast, repeats=2)
    t_hf, hf_out = timed(lambda: plain_hf_loop(hf_forward, tokens, hf_donor, correct, wrong, pairs))
    diff_hf = max(float((hf_fast_out[l, h] - hf_out[l, h]).abs().max()) for l, h in pairs)
    lines = [
        f"note: {size}: plain loops timed on {len(pairs)} of {L * H} heads, scaled x{scale:.1f}: TL "
        f"{t_tl * scale:.1f} s, HF {t_hf * scale:.1f} s; fast final-position sweep {t_fast:.2f} s, on the HF "
        f"backend {t_hf_fast:.2f} s",
        str(Line(f"{size} ({L} layers) final-position head sweep{tag}", t_tl * scale / t_fast, tl_loop, diff)),
        str(
            Line(
                f"{size} ({L} layers) final-position head sweep (HF backend)",
                t_hf * scale / t_hf_fast,
                "plain raw-HF-hook loop (Forward(tl, hf), one forward.run per head)",
                diff_hf,
            )
        ),
    ]
    for line in lines:
        print(line, flush=True)
    return lines


def bench(
    size: str, batch: int, pos: int, head_sample: int, tl_sample: int, any_positions: list[int] | None
) -> list[str]:
    out = []
    say = lambda s: (print(s, flush=True), out.append(s))  # noqa: E731
    hf, model = build(size)
    # TransformerLens 4: the lines name the bridge, the TL loop is the bridge's own run_with_hooks
    tag, tl_loop = (
        (" (bridge)", "plain Bridge run_with_hooks loop")
        if lens.is_bridge(model)
        else ("", "plain TL run_with_hooks loop")
    )
    L, H = model.cfg.n_layers, model.cfg.n_heads
    tokens, donor_tokens, correct, wrong = ioi_like_batch(model.cfg.d_vocab, batch, pos)
    forward = Forward(model)
    with torch.no_grad():
        t_tl_fwd, tl_logits = timed(lambda: model(tokens), repeats=2)
        t_hf_fwd, hf_logits = timed(lambda: hf(tokens).logits, repeats=2)
    say(
        f"note: {size}: TL vs HF logits max abs diff {(tl_logits - hf_logits).abs().max():.1e}; one forward of "
        f"{batch}x{pos} tokens: TL {t_tl_fwd * 1e3:.0f} ms, HF {t_hf_fwd * 1e3:.0f} ms (TL/HF "
        f"{t_tl_fwd / t_hf_fwd:.2f}x)"
    )
    z_names = [act_name("z", l) for l in range(L)]
    _, donor = forward.run(donor_tokens, cache=z_names)

    # --- final-position head sweep (E5) ---
    run_fast = lambda: fast.final_position_head_sweep(forward, tokens, donor, LogitDiff(correct, wrong), progress=False)  # noqa: E731
    timed(run_fast)  # warm-up
    t_fast, t_blocks, fast_out = min(
        (time_in_blocks(model, run_fast) for _ in range(2)), key=lambda r: r[0]
    )  # best of 2
    pairs = spread([(l, h) for l in range(L) for h in range(H)], head_sample)
    scale = L * H / len(pairs)
    t_tl, tl_out = timed(lambda: plain_tl_loop(model, tokens, donor, correct, wrong, pairs))
    diff_tl = max(float((fast_out[l, h] - tl_out[l, h]).abs().max()) for l, h in pairs)
    if size.startswith("gpt2"):
        hf_forward = Forward(model, hf)
        _, hf_donor = hf_forward.run(donor_tokens, cache=z_names)
        t_hf, hf_out = timed(lambda: plain_hf_loop(hf_forward, tokens, hf_donor, correct, wrong, pairs))
        hf_ref = "plain raw-HF-hook loop (Forward(tl, hf), one forward.run per head)"
    else:  # tl_patching's HF mirror covers GPT-2 only: raw o_proj pre-hooks, written in harness.py
        donor_z = llama_donor_z(hf, donor_tokens)
        t_hf, hf_out = timed(lambda: raw_llama_hf_loop(hf, H, tokens, donor_z, correct, wrong, pairs))
        hf_ref = "plain raw-HF-hook loop (o_proj forward pre-hook, one HF forward per head)"
    diff_hf = max(float((fast_out[l, h] - hf_out[l, h]).abs().max()) for l, h in pairs)
    say(
        f"note: {size}: plain loops timed on {len(pairs)} of {L * H} heads, scaled x{scale:.1f}: "
        f"TL {t_tl * scale:.1f} s, HF {t_hf * scale:.1f} s; fast final-position sweep {t_fast:.2f} s, of which "
        f"{t_blocks / t_fast:.0%} inside the blocks it runs (largest |effect| {fast_out.abs().max():.2e})"
    )
    say(str(Line(f"{size} final-position head sweep{tag}", t_tl * scale / t_fast, tl_loop, diff_tl)))
    say(str(Line(f"{size} final-position head sweep{tag}", t_hf * scale / t_fast, hf_ref, diff_hf)))

    # --- the same sweep on the HF backend (raw HF hooks, the HF layer engine): what a raw-HF cross-check costs ---
    hf_forward = Forward(model, hf)
    _, hf_donor = hf_forward.run(donor_tokens, cache=z_names)
    run_hf_fast = lambda: fast.final_position_head_sweep(  # noqa: E731
        hf_forward, tokens, hf_donor, LogitDiff(correct, wrong), progress=False
    )
    timed(run_hf_fast)  # warm-up
    t_hf_fast, hf_fast_out = timed(run_hf_fast, repeats=2)
    diff_hf_fast = max(float((hf_fast_out[l, h] - hf_out[l, h]).abs().max()) for l, h in pairs)
    say(str(Line(f"{size} final-position head sweep (HF backend)", t_hf * scale / t_hf_fast, hf_ref, diff_hf_fast)))

    # --- any-position head sweep (layer x position x head) ---
    if not any_positions:
        m_cache, m_final = (peak_bytes(size, batch, pos, what) for what in ("run_with_cache", "final"))
        say(
            str(
                Line(
                    f"{size} final-position head sweep{tag} peak memory",
                    m_final / m_cache,
                    f"one run_with_cache ({m_final / 2**20:.0f} MB vs {m_cache / 2**20:.0f} MB)",
                    diff_tl,
                )
            )
        )
        return out
    run_any = lambda: fast.position_head_sweep(
        forward, tokens, donor, LogitDiff(correct, wrong), positions=any_positions
    )  # noqa: E731
    t_any, any_out = timed(run_any)
    any_scale = pos / len(any_positions)
    triples = spread([(l, p, h) for l in range(L) for p in any_positions for h in range(H)], tl_sample)
    t_tlfn, tlfn_out = timed(lambda: tl_get_act_patch_sample(model, tokens, donor, correct, wrong, triples))
    tl_scale = L * pos * H / len(triples)
    where = {p: i for i, p in enumerate(any_positions)}
    diff_any = max(abs(float(any_out[l, where[p], h].mean()) - float(v)) for (l, p, h), v in zip(triples, tlfn_out))
    say(
        f"note: {size}: any-position fast sweep timed at positions {any_positions} of {pos} ({t_any:.1f} s), scaled "
        f"x{any_scale:.1f} to {t_any * any_scale:.1f} s; TL's get_act_patch_attn_head_out_by_pos timed on "
        f"{len(triples)} of {L * pos * H} (layer, pos, head), scaled x{tl_scale:.0f} to {t_tlfn * tl_scale:.0f} s; "
        "diff on batch means"
    )
    say(
        str(
            Line(
                f"{size} any-position head sweep{tag}",
                t_tlfn * tl_scale / (t_any * any_scale),
                "TL get_act_patch_attn_head_out_by_pos",
                diff_any,
            )
        )
    )

    # --- peak memory, each against one clean run_with_cache of the same prompts ---
    m_cache = peak_bytes(size, batch, pos, "run_with_cache")
    m_final = peak_bytes(size, batch, pos, "final")
    m_any = peak_bytes(size, batch, pos, "any")
    m_final_hf, m_any_hf = peak_bytes(size, batch, pos, "final-hf"), peak_bytes(size, batch, pos, "any-hf")
    mb = lambda b: f"{b / 2**20:.0f} MB"  # noqa: E731
    for what, m in (("final-position head sweep", m_final_hf), ("any-position head sweep", m_any_hf)):
        say(
            str(
                Line(
                    f"{size} {what} (HF backend) peak memory" + (" (widest pass)" if what.startswith("any") else ""),
                    m / m_cache,
                    f"one run_with_cache ({mb(m)} vs {mb(m_cache)})",
                    diff_hf_fast if what.startswith("final") else diff_any,
                )
            )
        )
    say(
        str(
            Line(
                f"{size} final-position head sweep{tag} peak memory",
                m_final / m_cache,
                f"one run_with_cache ({mb(m_final)} vs {mb(m_cache)})",
                diff_tl,
            )
        )
    )
    say(
        str(
            Line(
                f"{size} any-position head sweep{tag} peak memory (widest pass, position 0)",
                m_any / m_cache,
                f"one run_with_cache ({mb(m_any)} vs {mb(m_cache)})",
                diff_any,
            )
        )
    )
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pos", type=int, default=16)
    parser.add_argument("--head-sample", type=int, default=24, help="heads the plain final-position loops are timed on")
    parser.add_argument(
        "--tl-sample", type=int, default=24, help="(layer, pos, head) patches TL's any-position sweep is timed on"
    )
    parser.add_argument(
        "--any-positions",
        default="",
        help="positions the fast any-position sweep is timed at "
        "(default: 0, P/3, 2P/3-ish and P-1, symmetric about the middle)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    parser.add_argument("--any-sizes", default="gpt2-small-sized", help="sizes to run the any-position sweep on")
    parser.add_argument(
        "--depth-sizes",
        default="gpt2-medium-sized,gpt2-large-sized",
        help="deeper sizes for the depth lines (final-position sweep vs the plain TL loop; gpt2-small-sized is in the "
        "main lines)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    P = args.pos
    positions = (
        [int(p) for p in args.any_positions.split(",")]
        if args.any_positions
        else sorted({0, P // 3, P - 1 - P // 3, P - 1})
    )
    if abs(sum(P - p for p in positions) / len(positions) - (P + 1) / 2) > 1e-9:
        sys.exit(f"--any-positions {positions}: their mean suffix length must be the full sweep's, (P + 1) / 2")
    print(
        f"note: torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} x {P} tokens; "
        "timings on a shared machine",
        flush=True,
    )
    lines = []
    for size in args.sizes.split(","):
        lines += bench(
            size,
            args.batch,
            P,
            args.head_sample,
            args.tl_sample,
            positions if size in args.any_sizes.split(",") else None,
        )
    for size in filter(None, args.depth_sizes.split(",")):
        lines += bench_depth(size, args.batch, P, args.head_sample)
    print("\n" + "\n".join(line for line in lines if not line.startswith("note:")))
