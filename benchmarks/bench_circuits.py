"""Path patching, AtP and AtP*: speed on full-sized random models, accuracy on the shipped model.

    python benchmarks/bench_circuits.py speed     # random GPT-2-small- and SmolLM2-135M-sized models, batch 8 × 16
    python benchmarks/bench_circuits.py shipped   # shipped model: AtP/AtP* recall vs exact, TL's linear path patching

``speed`` runs on either TransformerLens major (on 4, a bridge around a random HF model); ``shipped`` compares with
TL 3.9's ``get_act_patch_direct_path``, which TransformerLens 4 does not ship.

Speed does not depend on the weights, so the models are TL's random init of the architectures. Each donor
differs from its recipient at one position (like IOI's S2). Lines:
``<name>: <ratio>x vs <reference>, max abs diff <d>``.

- path patching, every sender head → logits (``mlps="recompute"``), against the two-pass reference
  (``reference_to_logits``: clean and donor caches, then one hooked forward per sender with every other head's z
  frozen). The reference is timed on a sample of senders spread over the layers and scaled to all of them;
  its max abs diff is over that sample. Both sides include their clean/donor runs.
- AtP and AtP* cost in forward-pass equivalents: measured wall time / wall time of one no-grad forward of
  the same batch (donor cache given, so the donor forward is not counted; it is shared with exact patching).
- peak memory (glibc ``mallinfo2``, above the level at the call's start) vs one ``run_with_cache``.
Timings are from one run on a shared 2-core machine: read the ratios, not the seconds.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
from collections.abc import Callable

import torch

from tl_patching import attribution, lens, patching, path_patching
from tl_patching.edits import act_name
from tl_patching.forward import Forward
from tl_patching.metrics import LogitDiff, logit_diff

SIZES = {
    "gpt2-small-sized": dict(
        n_layers=12,
        d_model=768,
        n_heads=12,
        d_head=64,
        d_mlp=3072,
        d_vocab=50257,
        n_ctx=1024,
        act_fn="gelu_new",
        normalization_type="LN",
    ),
    "smollm2-135m-sized": dict(
        n_layers=30,
        d_model=576,
        n_heads=9,
        d_head=64,
        n_key_value_heads=3,
        d_mlp=1536,
        d_vocab=49152,
        n_ctx=2048,
        act_fn="silu",
        normalization_type="RMS",
        final_rms=True,
        positional_embedding_type="rotary",
        rotary_dim=64,
        gated_mlp=True,
    ),
}


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def _allocated() -> int:
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak allocated bytes above the start of a call of ``fn`` (sampled every 5 ms)."""
    start_bytes, high, done = _allocated(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            high[0] = max(high[0], _allocated())
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    fn()
    done.set()
    thread.join()
    return max(high[0], _allocated()) - start_bytes


def measure(fn: Callable[[], object]) -> tuple[float, int, object]:
    """(wall seconds, peak allocated bytes above the start, result). Timed without the memory sampler
    (``mallinfo2`` takes the allocator's lock, which slowed malloc-heavy calls several-fold), memory in a second
    call."""
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    return seconds, peak_bytes(fn), result


def reference_to_logits(model: lens.TLModel, tokens, donor_tokens, correct, wrong, senders) -> torch.Tensor:
    """The two-pass recipe: caches, then per sender one forward with every head's z frozen but the sender's."""
    _, clean = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_z"))
    _, donor = model.run_with_cache(donor_tokens, names_filter=lambda n: n.endswith("hook_z"))
    out = []
    for sl, sh in senders:

        def freeze(z, hook, sl=sl, sh=sh):
            z = clean[hook.name].clone()
            if hook.name == act_name("z", sl):
                z[:, :, sh] = donor[hook.name][:, :, sh]
            return z

        with torch.no_grad():
            logits = model.run_with_hooks(
                tokens, fwd_hooks=[(act_name("z", l), freeze) for l in range(model.cfg.n_layers)]
            )
        out.append(logit_diff(logits, correct, wrong))
    return torch.stack(out)


def random_model(name: str) -> lens.TLModel:
    """TransformerLens 3: TL's random init of the architecture. TransformerLens 4 (no HookedTransformer): a bridge
    around a random HF model of the same size (`benchmarks/harness.py`)."""
    torch.manual_seed(0)
    if lens.MAJOR >= 4:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from harness import build

        return build(name)[1]
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    return HookedTransformer(HookedTransformerConfig(**SIZES[name], seed=0)).eval()


def speed(name: str, batch: int = 8, pos: int = 16, sample: int = 24) -> None:
    model = random_model(name)
    L, H, V = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_vocab
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (batch, pos), generator=g)
    donor_tokens = tokens.clone()
    donor_tokens[:, pos - 6] = torch.randint(0, V, (batch,), generator=g)
    correct, wrong = torch.randint(0, V, (batch,), generator=g), torch.randint(0, V, (batch,), generator=g)
    forward = Forward(model)
    with torch.no_grad():
        model(tokens)  # warm-up
        t_fwd = min(measure(lambda: model(tokens))[0] for _ in range(3))  # noqa: B023
        t_cache, m_cache, _ = measure(lambda: model.run_with_cache(tokens))
    t_pp, m_pp, ours = measure(
        lambda: path_patching.path_patch(forward, tokens, donor_tokens, LogitDiff(correct, wrong))
    )
    senders = path_patching.all_heads(model)
    picked = [senders[i] for i in torch.linspace(0, len(senders) - 1, sample).round().long().tolist()]
    t_ref, _, ref = measure(lambda: reference_to_logits(model, tokens, donor_tokens, correct, wrong, picked))
    per_sender = (t_ref - 2 * t_cache) / sample
    t_ref_all = 2 * t_cache + per_sender * len(senders)
    diff = (ours[[senders.index(s) for s in picked]] - ref).abs().max()
    print(
        f"path patching all {L * H} senders → logits ({name}): {t_ref_all / t_pp:.1f}x vs two-pass reference "
        f"(timed on {sample} senders, scaled), max abs diff {diff:.2e}"
    )
    print(f"path patching peak memory ({name}): {m_pp / m_cache:.2f}x vs one run_with_cache, max abs diff {diff:.2e}")
    _, donor = forward.run(
        donor_tokens, cache=[act_name("z", l) for l in range(L)] + [act_name("resid_post", l) for l in range(L)]
    )
    t_atp, m_atp, atp = measure(
        lambda: attribution.attribution_patch(forward, tokens, donor, LogitDiff(correct, wrong))
    )
    print(f"atp cost ({name}): {t_atp / t_fwd:.2f}x vs one forward, max abs diff n/a (the estimate itself)", flush=True)
    print(f"atp peak memory ({name}): {m_atp / m_cache:.2f}x vs one run_with_cache, max abs diff n/a", flush=True)
    t_star, m_star, star = measure(lambda: attribution.atp_star(forward, tokens, donor, LogitDiff(correct, wrong)))
    consistency = (star.scores["atp"] - atp["z"]).abs().max()  # AtP*'s own AtP term vs attribution_patch
    s = star.seconds
    print(
        f"atp* cost ({name}): {t_star / t_fwd:.2f}x vs one forward, max abs diff {consistency:.2e} "
        f"(its AtP term vs attribution_patch) [forward+backward {s['forward_backward'] / t_fwd:.2f}, GradDrop {L} "
        f"backwards {s['grad_drop'] / t_fwd:.2f}, QK fix {s['qk_fix'] / t_fwd:.2f} forward equivalents]"
    )
    print(f"atp* peak memory ({name}): {m_star / m_cache:.2f}x vs one run_with_cache, max abs diff {consistency:.2e}")
    print(
        f"  ({name}: one forward {t_fwd * 1e3:.0f} ms, run_with_cache peak {m_cache / 2**20:.0f} MiB, "
        f"path patching {t_pp:.2f} s, reference {per_sender * 1e3:.0f} ms per sender)",
        file=sys.stderr,
    )


def shipped(n_prompts: int = 50) -> None:
    """AtP / AtP* vs exact head × position patching, and TL's linearised direct path patching vs ours."""
    from transformer_lens.tools.analysis.direct_path_patching import get_act_patch_direct_path

    from tl_patching.models import load_model
    from tl_patching.prompts import ioi_dataset

    model = load_model("shipped")
    forward = Forward(model)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    data = ioi_dataset(model, n_prompts)
    z_names = [act_name("z", l) for l in range(L)]
    rows, n, costs = {}, 0, {}
    for b in data:
        _, donor = forward.run(b.donor_tokens, cache=z_names)
        with torch.no_grad():
            t_fwd = min(measure(lambda b=b: model(b.tokens))[0] for _ in range(3))
        t_exact, _, exact = measure(
            lambda b=b, donor=donor: patching.head_pos_sweep(forward, b.tokens, donor, LogitDiff(b.correct, b.wrong))
        )
        t_star, _, star = measure(
            lambda b=b, donor=donor: attribution.atp_star(forward, b.tokens, donor, LogitDiff(b.correct, b.wrong))
        )
        first = (b.tokens != b.donor_tokens).float().argmax(1)
        mask = torch.arange(b.tokens.shape[1])[:, None] >= first[None, :]
        report = attribution.atp_report(star.scores, exact, mask=mask, show=False)
        for method, r in report.items():
            for key, value in r.items():
                rows.setdefault(method, {}).setdefault(key, 0.0)
                rows[method][key] += value * len(b)
        n += len(b)
        s = star.seconds
        for method, t in {
            "atp": s["forward_backward"],
            "atp_qk": s["forward_backward"] + s["qk_fix"],
            "atp_gd": s["forward_backward"] + s["grad_drop"],
            "atp_star": t_star,
        }.items():
            costs[method] = costs.get(method, 0.0) + t / t_fwd * len(b)
        costs["exact"] = costs.get("exact", 0.0) + t_exact / t_fwd * len(b)
    print(
        f"AtP / AtP* vs exact z patches, shipped model, {n} prompts, nodes = layer × head × positions from S2 on "
        "(per prompt, then averaged); cost = wall time / one no-grad forward of the batch (donor cache given)"
    )
    print(f"{'method':<10}{'spearman':>10}{'recall@5':>10}{'recall@10':>10}{'recall@20':>10}{'cost_fwd':>10}")
    for method, r in rows.items():
        print(
            f"{method:<10}"
            + "".join(f"{r[k] / n:>10.3f}" for k in ("spearman", "recall@5", "recall@10", "recall@20"))
            + f"{costs[method] / n:>10.1f}"
        )
    print(f"{'exact':<10}{'':>40}{costs['exact'] / n:>10.1f}")

    # TL 3.9's linearised direct path patching (processed weights: its formula assumes LayerNorm folded)
    # against exact path patching with the same paths (mlps="frozen": the sender's own write only).
    processed = load_model("shipped", weights="processed")
    b = data[0]
    metric = lambda logits: logit_diff(logits, b.correct, b.wrong)  # noqa: E731
    _, clean_cache = processed.run_with_cache(b.tokens)
    _, donor_cache = processed.run_with_cache(b.donor_tokens)
    clean_ld = metric(processed(b.tokens)).mean()
    for kind in ("q", "k", "v"):
        ours = {}
        for dl in range(1, L):
            for dh in range(H):
                senders = path_patching.all_heads(processed, below=dl)
                out = path_patching.path_patch(
                    Forward(processed),
                    b.tokens,
                    donor_cache,
                    LogitDiff(b.correct, b.wrong),
                    senders=senders,
                    receivers=[(dl, dh, kind)],
                    mlps="frozen",
                ).mean(-1)
                ours.update({(sl, sh, dl, dh): float(e) for (sl, sh), e in zip(senders, out)})
        lin = {}
        for sl in range(L - 1):
            for sh in range(H):
                tl_out = get_act_patch_direct_path(
                    processed,
                    b.tokens,
                    donor_cache,
                    clean_cache,
                    lambda logits: metric(logits).mean(),
                    sl,
                    sh,
                    component=kind,
                    verbose=False,
                )
                lin.update({(sl, sh, dl, dh): float(tl_out[dl, dh]) for dl in range(sl + 1, L) for dh in range(H)})
        keys = sorted(lin)
        x = torch.tensor([lin[k] for k in keys]) - clean_ld
        y = torch.tensor([ours[k] for k in keys]) - clean_ld
        worst = keys[int((x - y).abs().argmax())]
        print(
            f"TL linear direct path vs exact, receivers' {kind} ({len(keys)} edges, {len(b)} prompts): max abs diff "
            f"{(x - y).abs().max():.3f} nats (edge {worst[0]}.{worst[1]} → {worst[2]}.{worst[3]}: linear "
            f"{lin[worst] - clean_ld:+.3f}, exact {ours[worst] - clean_ld:+.3f}), largest exact |effect| "
            f"{y.abs().max():.3f}, correlation {torch.corrcoef(torch.stack([x, y]))[0, 1]:.3f}"
        )


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    what = sys.argv[1] if len(sys.argv) > 1 else "speed"
    if what == "speed":
        for size in sys.argv[2:] or SIZES:
            speed(size)
    elif what == "shipped":
        shipped()
    else:
        raise SystemExit(__doc__)
