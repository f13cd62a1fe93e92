"""CONTRIBUTING.md's three checklists, followed step by step: a toy experiment, a new family (Gemma 1, added here
only) and a new kind of sweep. If a step stops being enough, these tests say so."""

import json

import pytest
import torch

from tl_patching import cli, families, fast, patching, testing
from tl_patching.backends import hf_maps
from tl_patching.edits import act_name, patch
from tl_patching.experiments import load, run_experiment, spec
from tl_patching.forward import Forward
from tl_patching.metrics import LogitDiff

# ---- a new experiment: its module (tests/toy_experiment.py), registered ----


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(spec, "_EXTRA", ["toy_experiment"])  # register("toy_experiment"), undone after the test
    return load("toy")


def test_a_new_experiment_reaches_the_cli_and_the_report(toy, tmp_path, capsys):
    command = cli.parser()._subparsers._group_actions[0].choices["toy"]
    assert toy.title in cli.parser().format_help()
    assert any(a.option_strings == ["--head"] for a in command._actions)
    cli.main(["toy", "--head", "1", "--out", str(tmp_path), "--no-png"])
    assert "entropy" in capsys.readouterr().out
    result = json.loads((tmp_path / "shipped" / "toy_result.json").read_text())
    assert result["type"] == "ToyResult"
    cli.main(["reproduce", "--experiments", "e1,toy", "--out", str(tmp_path / "job"), "--no-png"])
    page = (tmp_path / "job" / "shipped" / "index.html").read_text()
    assert toy.title in page and "silencing a head makes the model less sure" in page and "toy_entropy" in page


def test_a_new_experiment_runs_on_both_backends_with_the_same_numbers(toy):
    hf, tl = testing.tiny_pair("gpt2")
    a, b = (run_experiment("toy", f, head=1) for f in (Forward(tl), Forward(tl, hf)))
    assert a.clean_entropy == pytest.approx(b.clean_entropy, abs=1e-5)
    assert a.silenced_entropy == pytest.approx(b.silenced_entropy, abs=1e-5) and a.silenced_entropy != a.clean_entropy


# ---- a new model family: Gemma 1, added as CONTRIBUTING.md says, here only ----


def gemma1_config(c):
    """Step 1's row: Gemma 1 is RMSNorm (1 + w), full RoPE, a gated GELU MLP, √d_model-scaled embeddings (in TL's
    convert_gemma_weights), no windows, no soft-caps, scores scaled by 1/√head_dim."""
    families._no_biases(c, "attention_bias")
    out = families._rms_rotary(c, always_kv_heads=True, windows="none", act_name="hidden_activation")
    return dict(out, default_prepend_bos=True)


def tiny_gemma1(n_layers, n_heads, n_kv_heads, d_head, d_vocab, n_ctx, d_mlp, window):
    return dict(
        vocab_size=d_vocab,
        max_position_embeddings=n_ctx,
        hidden_size=n_heads * d_head,
        head_dim=d_head,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        intermediate_size=d_mlp or 3 * n_heads * d_head,
        hidden_activation="gelu_pytorch_tanh",
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


@pytest.fixture
def gemma1(monkeypatch):
    row = families.Family(
        "gemma1",
        "GemmaForCausalLM",
        "gemma",
        gemma1_config,
        families.tl_conversion("convert_gemma_weights"),
        norm_weight_is_offset=True,
    )
    monkeypatch.setitem(families.FAMILIES, "gemma1", row)  # step 1
    monkeypatch.setitem(
        hf_maps.FAMILIES, "GemmaForCausalLM", hf_maps.llama_like("GemmaForCausalLM", norm_offset=1.0)
    )  # 2
    monkeypatch.setitem(testing.RANDOM_CONFIGS, "gemma1", tiny_gemma1)  # step 3 (the tiny random config)
    return row


def test_a_new_family_is_exact_or_refused_everywhere(gemma1, ioi_tokenizer):
    hf, tl = testing.random_pair("gemma1", n_layers=2, seed=1, tokenizer=ioi_tokenizer)  # the probe check passes
    tokens = torch.randint(2, tl.cfg.d_vocab, (2, 7), generator=torch.Generator().manual_seed(3))
    tl_forward, hf_forward = Forward(tl), Forward(tl, hf)
    refused = hf_maps.FAMILIES["GemmaForCausalLM"].refused
    mapped = [n for n in hf_forward.hook_names() if n.split(".", 2)[-1] not in refused and n not in refused]
    assert sorted(hf_forward.hook_names()) == sorted(tl_forward.hook_names())
    _, a = tl_forward.run(tokens, cache=mapped)
    _, b = hf_forward.run(tokens, cache=mapped)
    for n in mapped:  # every mapped hook read the same
        finite = torch.isfinite(a[n])
        assert (a[n][finite] - b[n][finite]).abs().max() < 1e-4, n
    edit = [patch(act_name("resid_mid", 0), a, pos=3)]  # and written the same
    assert (tl_forward(tokens, edit) - hf_forward(tokens, edit)).abs().max() < 1e-4
    for key in ("e1", "e2", "e3", "e4", "e5"):  # the experiments run, on both backends where they can
        for forward in (tl_forward, hf_forward):
            try:
                run_experiment(key, forward, n_prompts=4, progress=False)
            except NotImplementedError as e:  # refused by name, never silently different
                assert key == "e1" and forward is hf_forward and "rotary" in str(e)


# ---- a new kind of sweep: variants + the driver, and a fast path tested equal to it on every family ----


def final_position_resid_variants(donor, n_layers):
    """Step 1: one variant per layer, the residual stream after that block patched at the final position."""
    return [[patch(act_name("resid_post", l), donor, pos=-1)] for l in range(n_layers)]


@pytest.mark.parametrize("family", list(families.FAMILIES))
def test_a_new_sweep_and_its_fast_path_equal_the_driver(family):
    _, tl = testing.random_pair(family, n_layers=3, seed=2)
    forward = Forward(tl)
    g = torch.Generator().manual_seed(4)
    tokens, donor_tokens = (torch.randint(1, tl.cfg.d_vocab, (2, 6), generator=g) for _ in range(2))
    _, donor = forward.run(donor_tokens, cache=[act_name("resid_post", l) for l in range(3)])
    metric = LogitDiff(torch.tensor([1, 2]), torch.tensor([3, 4]))
    reference = patching.sweep(forward, tokens, final_position_resid_variants(donor, 3), metric)  # step 1
    fast_path = fast.position_sweep(forward, tokens, donor, metric, "resid_post", positions=[-1])[:, 0]  # step 2
    assert fast_path.shape == reference.shape and fast_path.dtype == torch.float32 and fast_path.device.type == "cpu"
    assert (fast_path - reference).abs().max() < 1e-4
    assert (reference - metric(forward(tokens)[:, -1])).abs().max() > 1e-3  # the patches do something
