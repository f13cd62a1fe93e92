"""The HF mirror on every family: each TL hook point mapped to an HF module boundary (or refused with a
reason), every mapped activation and every edit equal to TransformerLens's (fp32, ≤1e-4), with the
wrong-head and wrong-neuron controls; random tiny models built from each family's config."""

import pytest
import torch

from tl_patching.backends import hf as hf_backend
from tl_patching.edits import act_name, gaussian_noise, patch, scale, zero
from tl_patching.families import FAMILIES
from tl_patching.forward import Forward
from tl_patching.testing import random_pair

ATOL = 1e-4
FAMILY_NAMES = list(FAMILIES)


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family(request):
    hf, tl = random_pair(request.param, n_layers=2, seed=1)
    tokens = torch.randint(1, tl.cfg.d_vocab, (2, 7), generator=torch.Generator().manual_seed(3))
    donor_tokens = torch.randint(1, tl.cfg.d_vocab, (2, 7), generator=torch.Generator().manual_seed(4))
    return request.param, Forward(tl), Forward(tl, hf), tokens, donor_tokens


def close(a, b, atol=ATOL):
    assert a.shape == b.shape
    finite = torch.isfinite(a)
    assert torch.equal(finite, torch.isfinite(b))
    return (a[finite] - b[finite]).abs().max().item() <= atol


def test_both_backends_know_the_same_names(family):
    _, tl, hf, _, _ = family
    assert sorted(hf.hook_names()) == sorted(tl.hook_names())


def test_every_mapped_hook_point_equals_tl(family):
    name, tl, hf, tokens, _ = family
    refused = hf_backend.hook_map_of(hf.hf_model).refused
    mapped = [n for n in hf.hook_names() if n.split(".", 2)[-1] not in refused and n not in refused]
    assert len(mapped) >= 15
    _, tl_cache = tl.run(tokens, cache=mapped)
    _, hf_cache = hf.run(tokens, cache=mapped)
    for n in mapped:
        assert tl_cache[n].abs().max() > 1e-3, n  # non-trivial, so equality means something
        assert close(tl_cache[n], hf_cache[n]), (name, n)


def test_refused_points_say_why(family):
    _, _, hf, tokens, _ = family
    with pytest.raises(NotImplementedError, match="no HF counterpart"):
        hf.run(tokens, cache=["blocks.0.attn.hook_result"])


def edits(donor, cfg, head=1, neurons=slice(0, None, 2)):
    return {
        "zero head z": [zero(act_name("z", 1), head=head)],
        "zero key head": [zero(act_name("k", 0), head=head % (cfg.n_key_value_heads or cfg.n_heads))],
        "zero query head": [zero(act_name("q", 1), head=head)],
        "noise MLP neurons": [gaussian_noise(act_name("post", 0), mean=3.0, seed=0, neurons=neurons)],
        "scale resid_post": [scale(act_name("resid_post", 0), 0.5)],
        "patch head at final position": [patch(act_name("z", 0), donor, head=head, pos=-1)],
        "patch resid_pre at one position": [patch(act_name("resid_pre", 1), donor, pos=3)],
        "scale ln_final": [scale("ln_final.hook_normalized", 2.0, neurons=slice(0, 8))],
    }


def test_every_edit_equals_tl_and_the_controls_differ(family):
    name, tl, hf, tokens, donor_tokens = family
    _, donor = tl.run(donor_tokens, cache=[act_name("z", 0), act_name("resid_pre", 1)])
    clean = tl(tokens)
    right = edits(donor, tl.cfg)
    if "blocks.1.attn.q_norm.hook_normalized" in tl.hook_names():  # QK-norm families: the per-head layout on write
        right["scale q_norm"] = [scale("blocks.1.attn.q_norm.hook_normalized", 2.0)]
        right["scale k_norm"] = [scale("blocks.0.attn.k_norm.hook_normalized", 0.5)]
    for what, e in right.items():
        tl_logits = tl(tokens, e)
        assert (tl_logits - clean).abs().max() > 1e-3, (name, what)  # the edit does something
        assert close(tl_logits, hf(tokens, e)), (name, what)
    wrong = edits(donor, tl.cfg, head=2, neurons=slice(1, None, 2))
    for what in ("zero head z", "zero query head", "patch head at final position", "noise MLP neurons"):
        assert not close(tl(tokens, right[what]), hf(tokens, wrong[what]), atol=1e-3), (name, what)


def test_hook_k_head_means_the_key_value_head(family):
    """On grouped-query models hook_k has n_key_value_heads heads: head 2 is out of range with 2 KV heads."""
    name, tl, hf, tokens, _ = family
    n_kv = tl.cfg.n_key_value_heads or tl.cfg.n_heads
    assert tl.run(tokens, cache=[act_name("k", 0)])[1][act_name("k", 0)].shape[2] == n_kv
    if n_kv < tl.cfg.n_heads:
        for forward in (tl, hf):
            with pytest.raises(IndexError, match=r"head 2 out of range .*key/value heads"):
                forward.run(tokens, [zero(act_name("k", 0), head=2)])
