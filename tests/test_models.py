"""Model loading: weight modes, local directories with no network, clear errors."""

import time

import pytest
import torch

from tl_patching import hooks
from tl_patching.models import ModelNotFoundError, hooked_from_hf, load_hf, load_model, load_pair, weight_mode


def test_processed_keeps_log_probs_but_changes_resid_and_z(pair, tokens):
    hf, raw = pair
    processed = hooked_from_hf(hf, raw.tokenizer, weights="processed")
    assert weight_mode(raw) == "raw" and weight_mode(processed) == "processed"
    names = ["blocks.1.hook_resid_post", "blocks.1.attn.hook_z"]
    raw_logits, raw_cache = hooks.run(raw, tokens, cache=names)
    proc_logits, proc_cache = hooks.run(processed, tokens, cache=names)
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
