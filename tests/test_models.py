"""Model loading: weight modes, local directories with no network, clear errors."""

import dataclasses
import re
import time

import pytest
import torch

from tl_patching import lens
from tl_patching.checkpoints import ModelNotFoundError, load_hf
from tl_patching.families import FAMILIES
from tl_patching.forward import Forward
from tl_patching.models import (
    PROBE_TOLERANCE,
    ModelMismatchError,
    hooked_from_hf,
    load_model,
    load_pair,
    probe_tokens,
    verify_against_hf,
)
from tl_patching.provenance import weight_mode


def test_processed_keeps_log_probs_but_changes_resid_and_z(pair, tokens):
    hf, raw = pair
    processed = hooked_from_hf(hf, raw.tokenizer, weights="processed")
    assert weight_mode(raw) == "raw" and weight_mode(processed) == "processed"
    names = ["blocks.1.hook_resid_post", "blocks.1.attn.hook_z"]
    raw_logits, raw_cache = Forward(raw).run(tokens, cache=names)
    proc_logits, proc_cache = Forward(processed).run(tokens, cache=names)
    assert (raw_logits.log_softmax(-1) - proc_logits.log_softmax(-1)).abs().max() < 1e-4
    # Not bugs: centring writing weights shifts resid_post, folding b_V removes it from z.
    assert (raw_cache[names[0]] - proc_cache[names[0]]).abs().max() > 1e-2
    assert proc_cache[names[0]].mean(-1).abs().max() < 1e-4  # mean-centred residual stream
    assert (raw_cache[names[1]] - proc_cache[names[1]]).abs().max() > 1e-2


def test_unknown_weight_mode_rejected(pair):
    hf, _ = pair
    with pytest.raises(ValueError, match="weights must be one of"):
        hooked_from_hf(hf, weights="folded")


@pytest.fixture(scope="module")
def model_dir(pair, tokenizer, tmp_path_factory):
    hf, _ = pair
    path = tmp_path_factory.mktemp("local-gpt2")
    hf.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_local_directory_loads_with_network_blocked(model_dir, pair, tokens, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf, tl = pair
    for weights in ("raw", "processed"):
        model = load_model(model_dir, weights=weights)
        assert weight_mode(model) == weights and model.cfg.n_layers == 3
        assert (model(tokens).log_softmax(-1) - hf(tokens).logits.log_softmax(-1)).abs().max() < 1e-4
    hf2, tl2 = load_pair(model_dir)
    assert torch.equal(hf2(tokens).logits, hf(tokens).logits)
    assert hf2.config._attn_implementation == "eager"
    assert torch.equal(tl2.to_tokens("Sam and Sally"), tl.to_tokens("Sam and Sally"))
    assert tl2.to_tokens("Sam")[0, 0].item() == tl2.tokenizer.bos_token_id  # TL prepends BOS


def test_missing_model_fails_fast_and_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="not in the local HF cache"):
        load_hf("gpt2-medium")
    assert time.perf_counter() - start < 10  # no stack of retries
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_hf(tmp_path)
    with pytest.raises(ModelNotFoundError, match="no model directory"):
        load_hf(tmp_path / "missing" / "dir")


@pytest.mark.parametrize(
    "typed, meant",
    [
        ("shiped", "'shipped'"),
        ("gpt-2", "'gpt2'"),
        ("smollm2", "'smollm2-135m'"),
        ("Qwen/Qwen2.5-0.5B-Instruckt", "'Qwen/Qwen2.5-0.5B-Instruct'"),  # a model in the local HF cache
    ],
)
def test_a_misspelt_model_name_gets_a_suggestion(tmp_path, monkeypatch, typed, meant):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    (tmp_path / "hf" / "hub" / "models--Qwen--Qwen2.5-0.5B-Instruct").mkdir(parents=True)
    with pytest.raises(
        ModelNotFoundError, match=re.escape(f"is set). Did you mean {meant}") + "( or '[^']+')*\\? Pass"
    ):
        load_hf(typed)
    with pytest.raises(ModelNotFoundError, match=re.escape("is set). Pass a local")) as caught:
        load_hf("xyzzy")  # nothing close: no suggestion
    assert "Did you mean" not in str(caught.value)


@pytest.mark.parametrize("name", ["gpt2", "GPT2-XL"])
def test_a_known_hub_name_not_cached_says_so_and_suggests_nothing(tmp_path, monkeypatch, name):
    """It once answered "Did you mean 'gpt2' or 'gpt2-xl'?" to gpt2 itself."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(ModelNotFoundError) as caught:
        load_hf(name)
    message = str(caught.value)
    assert "Did you mean" not in message
    assert f"{name.lower()!r} is a hub name: download it once where the hub is reachable" in message
    assert f"huggingface-cli download {name.lower()}" in message and "pass its files as a directory" in message


# ---- the probe check after loading ------------------------------------------------------------------------


def probe_scale(hf):
    """max(1, max|HF logit|) on the probe input: what PROBE_TOLERANCE is relative to."""
    with torch.no_grad():
        return max(1.0, hf(probe_tokens(hf.config.vocab_size, hf.config.n_positions)).logits.abs().max().item())


def unembed_bias(model) -> torch.Tensor:
    """The unembedding's bias, to shift logits in place (a bridge's b_U is a read-only view of its HF module's)."""
    return model.unembed._original_component.bias if lens.is_bridge(model) else model.unembed.b_U


def test_probe_boundary_and_message(pair):
    """Every logit shifted by the same amount: the measured relative difference is that amount over the
    scale (plus float32 noise, 0.4% of the tolerance on this model), just under the tolerance or just over."""
    hf, _ = pair
    scale = probe_scale(hf)
    under, over = hooked_from_hf(hf, name="probe-under"), hooked_from_hf(hf, name="probe-over")
    with torch.no_grad():
        unembed_bias(under).add_(0.98 * PROBE_TOLERANCE * scale)
        unembed_bias(over).add_(1.02 * PROBE_TOLERANCE * scale)
    assert 0.97 * PROBE_TOLERANCE < verify_against_hf(hf, under) <= PROBE_TOLERANCE
    with pytest.raises(
        ModelMismatchError,
        match=r"^probe-over \(GPT2LMHeadModel, raw\): TransformerLens logits differ "
        r"from HF's by ([0-9.e-]+) \(relative ([0-9.e-]+) > 0.0001\) on the probe input$",
    ) as e:
        verify_against_hf(hf, over)
    diff, relative = map(float, re.search(r"by (\S+) \(relative (\S+) ", str(e.value)).groups())
    assert diff == pytest.approx(1.02 * PROBE_TOLERANCE * scale, rel=0.01)
    assert relative == pytest.approx(1.02 * PROBE_TOLERANCE, rel=0.01)


def test_processed_model_is_compared_on_log_probs(pair):
    """A shift of every logit leaves log-probs alone: a processed model passes with it, a raw one does not;
    a change of one logit fails the processed model too."""
    hf, _ = pair
    processed, raw = hooked_from_hf(hf, weights="processed"), hooked_from_hf(hf)
    with torch.no_grad():
        unembed_bias(processed).add_(1.0)
        unembed_bias(raw).add_(1.0)
    assert verify_against_hf(hf, processed) < 1e-5
    with pytest.raises(ModelMismatchError, match=r"raw\): TransformerLens logits differ from HF's by 1 "):
        verify_against_hf(hf, raw)
    with torch.no_grad():
        unembed_bias(processed)[5] += 0.5
    with pytest.raises(ModelMismatchError, match=r"processed\): TransformerLens log-probs differ from HF's by 0.\d+ "):
        verify_against_hf(hf, processed)


def test_nan_weight_fails_the_probe(pair):
    hf, _ = pair
    model = hooked_from_hf(hf, name="with-nan")
    with torch.no_grad():
        model.blocks[1].mlp.W_out[3, 7] = float("nan")
    with pytest.raises(
        ModelMismatchError, match=r"^with-nan \(GPT2LMHeadModel, raw\): TransformerLens logits differ from HF's by nan"
    ):
        verify_against_hf(hf, model)


def test_hooked_from_hf_verifies_by_default(pair, monkeypatch):
    """A conversion that gets one weight wrong is refused at load time; verify=False is the only way past."""
    hf, _ = pair
    if lens.is_bridge(_):  # TL 4: the bridge built around the HF model gets the weight wrong
        import tl_patching.models as models

        build = models._bridge

        def nudged_bridge(*args):
            bridge = build(*args)
            with torch.no_grad():
                bridge.blocks[2].attn.W_O[1, 2, 3] += 0.5
            return bridge

        monkeypatch.setattr(models, "_bridge", nudged_bridge)
    else:
        family = FAMILIES["gpt2"]

        def nudged(hf_model, cfg):
            state = family.convert_weights(hf_model, cfg)
            state["blocks.2.attn.W_O"] = state["blocks.2.attn.W_O"].clone()
            state["blocks.2.attn.W_O"][1, 2, 3] += 0.5
            return state

        monkeypatch.setitem(FAMILIES, "gpt2", dataclasses.replace(family, convert_weights=nudged))
    for weights, what in (("raw", "logits"), ("processed", "log-probs")):
        with pytest.raises(
            ModelMismatchError, match=f"^wrong \\(GPT2LMHeadModel, {weights}\\): TransformerLens {what} differ"
        ):
            hooked_from_hf(hf, weights=weights, name="wrong")
        unchecked = hooked_from_hf(hf, weights=weights, name="wrong", verify=False)
        with pytest.raises(ModelMismatchError):
            verify_against_hf(hf, unchecked)


def test_a_directory_under_home_given_with_a_tilde_loads(tmp_path, monkeypatch):
    """``--model=~/models/tiny`` reaches the toolkit unexpanded (the shell expands ``~`` only at a word's start): it
    was refused as "no model directory"; the command line's early check said the same."""
    from tl_patching.cli import check_model
    from tl_patching.testing import save_tiny_checkpoint

    monkeypatch.setenv("HOME", str(tmp_path))
    save_tiny_checkpoint("gpt2", tmp_path / "models" / "tiny")
    check_model("~/models/tiny")  # exists: no ArgumentError
    hf_model, _ = load_hf("~/models/tiny")
    assert type(hf_model).__name__ == "GPT2LMHeadModel"
    with pytest.raises(ModelNotFoundError, match=re.escape(f"no model directory at {tmp_path / 'models' / 'none'}")):
        load_hf("~/models/none")


def test_a_hub_name_with_its_organisation_loads_from_the_local_cache(tmp_path, monkeypatch):
    """ "org/name" was taken for a path (it has a "/" and, in "Qwen2.5-0.5B", a "suffix"): a model in the HF cache
    could not be loaded by its hub name. Misspelt, that name is suggested."""
    import huggingface_hub.constants

    from tl_patching.testing import save_tiny_checkpoint

    repo = tmp_path / "hub" / "models--org--tiny-gpt2.5-0.5B"
    save_tiny_checkpoint("gpt2", repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hf_model, tokenizer = load_hf("org/tiny-gpt2.5-0.5B")
    assert type(hf_model).__name__ == "GPT2LMHeadModel" and tokenizer is not None
    with pytest.raises(ModelNotFoundError, match=re.escape("Did you mean 'org/tiny-gpt2.5-0.5B'?")):
        load_hf("org/tiny-gtp2.5-0.5B")
    with pytest.raises(ModelNotFoundError, match="no model directory at"):
        load_hf("./org/tiny-gpt2.5-0.5B")  # a path stays a path
