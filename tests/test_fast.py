"""The fast paths equal the sweep driver on a tiny model of every family TransformerLens runs, raw and processed.

TransformerLens 3: each family is a `HookedTransformerConfig` with the block features that family has (no HF model
needed: the fast paths only ever see TL's blocks), with every weight, bias and norm gain drawn at random with enough
spread that soft-caps bite and attention is far from uniform, and sequences longer than the sliding windows.
TransformerLens 4: the fast paths run HF's own modules with HF's key/value cache, so each family is a random HF model
of tl_patching's families (`random_pair`, same spread, windows of 4 positions) in a TransformerBridge.
"""

import math

import pytest
import torch
from transformer_lens import patching as tl_patching

from tl_patching import fast, lens, patching
from tl_patching.edits import act_name, patch
from tl_patching.forward import Forward
from tl_patching.metrics import LogitDiff, logit_diff
from tl_patching.testing import random_pair

ATOL = 1e-4
B, P, VOCAB = 3, 9, 40
BASE = dict(n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=48, d_vocab=VOCAB, n_ctx=32, act_fn="gelu_new")
ROPE = dict(positional_embedding_type="rotary", rotary_adjacent_pairs=False)
LLAMA = dict(
    ROPE, normalization_type="RMS", rotary_dim=8, n_key_value_heads=2, gated_mlp=True, act_fn="silu", final_rms=True
)
GEMMA = dict(
    LLAMA, act_fn="gelu_pytorch_tanh", use_normalization_before_and_after=True, window_size=3, use_local_attn=True
)
FAMILIES = {
    "gpt2": dict(normalization_type="LN"),
    "neox": dict(ROPE, normalization_type="LN", rotary_dim=4, parallel_attn_mlp=True, act_fn="gelu"),  # partial rotary
    "gptj": dict(ROPE, normalization_type="LN", rotary_dim=4, rotary_adjacent_pairs=True, parallel_attn_mlp=True),
    "llama": LLAMA,
    "mistral": dict(LLAMA, use_local_attn=True, window_size=4, attn_types=["local"] * 3),
    "qwen2": dict(LLAMA, rotary_base=1000),  # q/k/v biases: drawn at random below like every bias
    "qwen3": dict(LLAMA, use_qk_norm=True),
    "gemma2": dict(
        GEMMA,
        attn_types=["local", "global", "local"],
        attn_scores_soft_cap=3.0,
        output_logits_soft_cap=4.0,
        attn_scale=math.sqrt(12.0),
    ),  # query_pre_attn_scalar = 12 instead of d_head
    "gemma3": dict(
        GEMMA,
        n_key_value_heads=1,
        use_qk_norm=True,
        attn_types=["local", "local", "global"],
        rotary_base=1_000_000,
        rotary_base_local=10_000,
    ),
}
# LayerNorm folding needs a norm before each sublayer's input only (TL skips the post-norms), and no logit soft-cap
# with centred unembedding: every family but the Gemmas is also run processed.
PROCESSED = ["gpt2", "neox", "llama", "qwen3"]


def tiny(family: str, seed: int = 0):
    """The TransformerLens model of ``family``, 3 layers of 4 heads of 8: a random HookedTransformer (TL 3), or
    a bridge around a random HF model of that family (TL 4; gptj has no HF family in tl_patching)."""
    if lens.MAJOR >= 4:
        return random_pair(family, n_layers=3, d_vocab=VOCAB, d_mlp=48, seed=seed, weight_std=0.3)[1]
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(**{**BASE, **FAMILIES[family]}, seed=seed)
    model = HookedTransformer(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.split(".")[-1] == "w":  # norm gains around 1
                p.copy_(1 + 0.3 * noise)
            elif name.split(".")[-1].startswith(("b", "_b")):
                p.copy_(0.3 * noise)
            else:  # [.., fan_in, fan_out] matrices, a little hotter than 1/√fan_in
                p.copy_(1.5 * noise / math.sqrt(p.shape[-2]))
    return model


def processed(model):
    if lens.is_bridge(model):
        from tl_patching.models import hooked_from_hf

        return hooked_from_hf(lens.plain_hf(model), weights="processed")
    from transformer_lens import HookedTransformer

    out = HookedTransformer(
        model.cfg.__class__(**{**model.cfg.to_dict(), "normalization_type": model.cfg.normalization_type + "Pre"})
    ).eval()
    out.load_and_process_state_dict(
        model.state_dict(), fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True
    )
    return out


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is fastest, and on a shared machine more threads only contend."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


BRIDGED = [f for f in FAMILIES if f != "gptj"] if lens.MAJOR >= 4 else list(FAMILIES)
# A processed GPT-2 or NeoX bridge keeps folded weights its HF modules cannot hold: the HF engine runs a twin built
# from the bridge's own weights (lens.plain_hf), checked against the bridge.
# The HF backend (raw HF hooks, the HF layer engine) on every family of tl_patching, on both majors.
HF_FAMILIES = ["gpt2", "neox", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"]
CASES = [(f, "raw") for f in BRIDGED] + [(f, "processed") for f in PROCESSED] + [(f, "hf") for f in HF_FAMILIES]


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{m}" for f, m in CASES])
def case(request):
    family, mode = request.param
    if mode == "hf":
        forward = Forward(*reversed(random_pair(family, n_layers=3, d_vocab=VOCAB, d_mlp=48, seed=0, weight_std=0.3)))
    else:
        forward = Forward(processed(tiny(family)) if mode == "processed" else tiny(family))
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (B, P), generator=g)
    donor_tokens = torch.randint(0, VOCAB, (B, P), generator=g)
    correct, wrong = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    kinds = [k for k in fast.KINDS if act_name(k, 0) in forward.hook_names()]
    _, donor = forward.run(donor_tokens, cache=[act_name(k, l) for l in range(3) for k in kinds])
    return forward, tokens, donor, correct, wrong, LogitDiff(correct, wrong), kinds


def test_final_position_head_sweep_equals_the_driver(case):
    forward, tokens, donor, correct, wrong, metric, _ = case
    reference = patching.head_sweep(forward, tokens, donor, metric)
    out = fast.final_position_head_sweep(forward, tokens, donor, LogitDiff(correct, wrong), progress=False)
    assert out.shape == reference.shape == (3, 4, B)
    assert (out - reference).abs().max() < ATOL
    assert (reference - metric(forward(tokens)[:, -1])).abs().max() > 1e-2  # the patches do something


def test_donor_equal_to_recipient_has_no_effect(case):
    forward, tokens, _, correct, wrong, metric, kinds = case
    _, same = forward.run(tokens, cache=[act_name(k, l) for l in range(3) for k in kinds])
    clean = metric(forward(tokens)[:, -1])
    out = fast.final_position_head_sweep(forward, tokens, same, LogitDiff(correct, wrong), progress=False)
    assert (out - clean).abs().max() < ATOL
    out = fast.position_head_sweep(forward, tokens, same, LogitDiff(correct, wrong), positions=[0, 4])
    assert (out - clean).abs().max() < ATOL


def test_any_position_sweeps_equal_the_driver(case):
    forward, tokens, donor, correct, wrong, metric, kinds = case
    positions = [0, 3, P - 2, P - 1]
    heads = fast.position_head_sweep(
        forward, tokens, donor, LogitDiff(correct, wrong), positions=positions, max_rows=20
    )
    variants = [[patch(act_name("z", l), donor, pos=p, head=h)] for l in range(3) for p in positions for h in range(4)]
    reference = patching.sweep(forward, tokens, variants, metric).reshape(3, len(positions), 4, B)
    assert (heads - reference).abs().max() < ATOL
    clean = fast.clean_run(forward, tokens)
    general = lambda final: final.log_softmax(-1)[:, 3]  # noqa: E731  (not a LogitDiff: the whole unembedding)
    for kind in kinds[1:]:
        out = fast.position_sweep(forward, tokens, donor, general, kind, positions=positions, recipient_run=clean)
        variants = [[patch(act_name(kind, l), donor, pos=p)] for l in range(3) for p in positions]
        reference = patching.sweep(forward, tokens, variants, general).reshape(3, len(positions), B)
        assert (out - reference).abs().max() < ATOL, kind
        assert (reference - metric(forward(tokens)[:, -1])).abs().max() > 1e-2, kind


@pytest.fixture(scope="module")
def gpt2():
    forward = Forward(tiny("gpt2", seed=3))
    g = torch.Generator().manual_seed(4)
    tokens, donor_tokens = torch.randint(0, VOCAB, (2, B, 6), generator=g)
    correct, wrong = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    return forward, tokens, donor_tokens, correct, wrong


@pytest.mark.parametrize("kind", ["z", "resid_pre", "resid_mid", "attn_out", "mlp_out"])
def test_equal_to_transformer_lens_get_act_patch(gpt2, kind):
    """TL's own sweeps, a second reference: its "corrupted" run is our recipient, its "clean" cache our donor,
    and its metric is one number per run (here the batch mean); layout [layer, pos(, head)]."""
    forward, tokens, donor_tokens, correct, wrong = gpt2
    model = forward.model
    _, donor_cache = model.run_with_cache(donor_tokens)
    tl_fn = {
        "z": tl_patching.get_act_patch_attn_head_out_by_pos,
        "resid_pre": tl_patching.get_act_patch_resid_pre,
        "resid_mid": tl_patching.get_act_patch_resid_mid,
        "attn_out": tl_patching.get_act_patch_attn_out,
        "mlp_out": tl_patching.get_act_patch_mlp_out,
    }[kind]
    expected = tl_fn(model, tokens, donor_cache, lambda logits: logit_diff(logits, correct, wrong).mean())
    donor = dict(donor_cache.cache_dict)
    if kind == "z":
        out = fast.position_head_sweep(forward, tokens, donor, LogitDiff(correct, wrong))
    else:
        out = fast.position_sweep(forward, tokens, donor, LogitDiff(correct, wrong), kind)
    assert out.shape[:-1] == expected.shape
    if lens.is_bridge(model) and kind == "resid_mid":
        # TL 4's own get_act_patch_resid_mid writes the bridge's hook_resid_mid, the next norm's input, and so
        # leaves the residual stream alone (docs/transformerlens4.md): ours equals the driver instead, and TL's is off.
        variants = [[patch(act_name(kind, l), donor, pos=p)] for l in range(3) for p in range(6)]
        reference = patching.sweep(forward, tokens, variants, LogitDiff(correct, wrong)).reshape(3, 6, B)
        assert (out - reference).abs().max() < ATOL
        assert (out.mean(-1) - expected).abs().max() > 0.1
        return
    assert (out.mean(-1) - expected).abs().max() < ATOL


def test_options_and_refusals(gpt2):
    forward, tokens, donor_tokens, correct, wrong = gpt2
    _, donor = forward.run(donor_tokens, cache=[act_name(k, l) for l in range(3) for k in ("z", "resid_post")])
    full = fast.position_head_sweep(forward, tokens, donor, LogitDiff(correct, wrong))
    part = fast.position_head_sweep(
        forward, tokens, donor, LogitDiff(correct, wrong), layers=[2, 0], positions=[-1, 1], heads=[3, 1]
    )
    assert torch.allclose(part, full[[2, 0]][:, [5, 1]][:, :, [3, 1]], atol=1e-5)
    final = fast.final_position_head_sweep(
        forward, tokens, donor, LogitDiff(correct, wrong), layers=[1], max_rows=1, progress=False
    )
    assert torch.allclose(final, full[[1], -1], atol=1e-5)
    metric = LogitDiff(correct, wrong)
    with pytest.raises(ValueError, match="the final position's logits"):  # a metric fed every position's logits
        metric(forward(tokens))
    with pytest.raises(ValueError, match="kind must be one of"):
        fast.position_sweep(forward, tokens, donor, metric, "z")
    with pytest.raises(TypeError, match=r"position_sweep\(forward, tokens, donor_cache, metric, kind, …\)"):
        fast.position_sweep(forward, tokens, donor, "resid_post", metric)  # the order before every sweep agreed
    with pytest.raises(KeyError, match="holds no 'blocks.0.hook_mlp_out'"):
        fast.position_sweep(forward, tokens, donor, metric, "mlp_out")
    with pytest.raises(IndexError, match="position 6 out of range"):
        fast.position_head_sweep(forward, tokens, donor, LogitDiff(correct, wrong), positions=[6])
    with pytest.raises(TypeError, match="clean_run"):
        fast.final_position_head_sweep(forward, tokens, donor, LogitDiff(correct, wrong), recipient_run={})
    neox = Forward(tiny("neox"))
    with pytest.raises(NotImplementedError, match="parallel attention and MLP: no resid_mid"):
        fast.position_sweep(
            neox,
            tokens,
            {act_name("resid_mid", l): donor[act_name("resid_post", l)] for l in range(3)},
            metric,
            "resid_mid",
        )
    if lens.is_bridge(forward.model):
        return  # a bridge's attention is its HF CausalLM's: causal, whatever cfg.attention_dir says
    bidirectional = tiny("gpt2")
    bidirectional.cfg.attention_dir = "bidirectional"  # a patch there reaches earlier positions: nothing to reuse
    with pytest.raises(NotImplementedError, match="bidirectional attention"):
        fast.final_position_head_sweep(Forward(bidirectional), tokens, donor, LogitDiff(correct, wrong))
