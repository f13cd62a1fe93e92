"""Caches on disk: exact round trip, refusal of mismatches, detection of damage, reuse in E4/E5."""

import os

import pytest
import torch

from tl_patching import cache_store
from tl_patching.cache_store import CacheMismatchError, CorruptCacheError, bytes_per_token, cached_run, load_cache, save_cache
from tl_patching.edits import act_name
from tl_patching.experiments import e4_ioi_patching as e4, e5_head_token_patching as e5
from tl_patching.forward import Forward
from tl_patching.models import hooked_from_hf, random_gpt2


@pytest.fixture()
def saved(pair, tokens, tmp_path):
    _, tl = pair
    _, cache = tl.run_with_cache(tokens)
    return save_cache(tmp_path / "clean.safetensors", cache, tl, tokens, prepend_bos=False), cache


def test_round_trip_is_exact(pair, tokens, saved):
    _, tl = pair
    path, cache = saved
    loaded = load_cache(path, tl, tokens)
    assert isinstance(loaded, dict)
    assert sorted(loaded.keys()) == sorted(cache.keys())
    assert all(torch.equal(loaded[k], cache[k]) for k in cache.keys())
    header = cache_store.read_header(path)
    assert header["weight_mode"] == "raw" and header["prepend_bos"] is False and header["token_ids"] == tokens.tolist()
    assert set(header["versions"]) == {"torch", "transformer-lens", "transformers", "tl_patching"}


def test_filtered_subset(pair, forwards, tokens, tmp_path):
    _, tl = pair
    names = [act_name("z", 1), act_name("resid_post", 2)]
    _, cache = forwards["tl"].run(tokens, cache=names, cache_device="cpu")
    path = save_cache(tmp_path / "z.safetensors", cache, tl, tokens, True)
    assert sorted(load_cache(path).keys()) == sorted(names)
    with pytest.raises(KeyError, match="not in the cache"):
        save_cache(tmp_path / "x.safetensors", cache, tl, tokens, True, names=[act_name("q", 0)])


def test_mismatches_are_refused_by_name(pair, tokens, saved):
    hf, tl = pair
    path, _ = saved
    with pytest.raises(CacheMismatchError, match="weight_mode: cache has 'raw', model has 'processed'"):
        load_cache(path, hooked_from_hf(hf, weights="processed"))
    _, other = random_gpt2(n_layers=2, n_heads=4, d_head=8)
    with pytest.raises(CacheMismatchError, match="n_layers: cache has 3, model has 2"):
        load_cache(path, other)
    # Another checkpoint of the same name and shape: only the fingerprint of the weights tells them apart.
    _, retrained = random_gpt2(n_layers=3, n_heads=4, d_head=8, seed=1, tokenizer=tl.tokenizer)
    retrained.cfg.model_name = tl.cfg.model_name
    with pytest.raises(CacheMismatchError, match="weights_sha256"):
        load_cache(path, retrained)
    with pytest.raises(CacheMismatchError, match="other tokens"):
        load_cache(path, tl, tokens.flip(0))


def test_truncated_or_altered_file_is_detected(saved, tmp_path):
    path, _ = saved
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 100])
    with pytest.raises(CorruptCacheError):
        load_cache(truncated)
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF
    altered = tmp_path / "altered.safetensors"
    altered.write_bytes(bytes(flipped))
    with pytest.raises(CorruptCacheError, match="checksum"):
        load_cache(altered)
    (tmp_path / "junk.safetensors").write_bytes(b"not a cache")
    with pytest.raises(CorruptCacheError):
        load_cache(tmp_path / "junk.safetensors")


def test_failed_write_leaves_no_file(pair, forwards, tokens, tmp_path, monkeypatch):
    _, tl = pair
    _, cache = forwards["tl"].run(tokens, cache=[act_name("z", 0)])

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(cache_store, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_cache(tmp_path / "c.safetensors", cache, tl, tokens, True)
    assert os.listdir(tmp_path) == []


def test_e4_e5_from_a_saved_donor_cache_give_identical_results(tmp_path):
    from tl_patching.prompts import NAMES
    from tl_patching.recipe.word_tokenizer import word_tokenizer

    hf, tl = random_gpt2(n_layers=3, tokenizer=word_tokenizer([e4.SEED_RECIPIENT, e4.SEED_DONOR] + [" " + n for n in NAMES]))
    forward = Forward(tl)
    batch = e4.seed_pair(tl)
    path = tmp_path / "donor.safetensors"
    cached_run(path, forward, batch.donor_tokens, e4.donor_names(3), batch.prepend_bos)  # computes and saves
    reused = cached_run(path, forward, batch.donor_tokens, e4.donor_names(3), batch.prepend_bos)  # loads
    for module in (e4, e5):
        fresh, from_disk = module.run(forward, batch, progress=False), module.run(forward, batch, donor_cache=reused, progress=False)
        for field in ("clean", "heads_patched", "effect"):
            if hasattr(fresh, field):
                assert torch.equal(getattr(fresh, field), getattr(from_disk, field))


def test_bytes_per_token():
    _, tl = random_gpt2(n_layers=1, n_heads=4, d_head=8)
    assert bytes_per_token(tl.cfg, "blocks.0.attn.hook_z") == 4 * 8 * 4
    assert bytes_per_token(tl.cfg, "blocks.0.mlp.hook_post") == 4 * 32 * 4
    assert bytes_per_token(tl.cfg, "blocks.0.attn.hook_pattern", pos=10) == 4 * 10 * 4


def test_load_without_a_model_builds_none(saved, monkeypatch):
    """Loading a cache needs no model: nothing of the cached size is built (it was GBs for GPT-2 large)."""
    import transformer_lens

    path, cache = saved
    monkeypatch.setattr(transformer_lens.HookedTransformer, "__init__", lambda *a, **k: (_ for _ in ()).throw(AssertionError("built a model")))
    loaded = load_cache(path)
    assert torch.equal(loaded["blocks.0.hook_resid_post"], cache["blocks.0.hook_resid_post"])


def test_saving_into_a_missing_folder_is_an_error(pair, forwards, tokens, tmp_path):
    _, tl = pair
    _, cache = forwards["tl"].run(tokens, cache=[act_name("z", 0)])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_cache(tmp_path / "no" / "such" / "dir" / "c.safetensors", cache, tl, tokens, True)
    assert not (tmp_path / "no").exists()


def test_fingerprint_follows_in_place_changes_of_the_weights():
    """The fingerprint is remembered per model, but an in-place edit of any weight must change it."""
    _, tl = random_gpt2(n_layers=1, n_heads=4, d_head=8, seed=3)
    before = cache_store.weights_fingerprint(tl)
    assert cache_store.weights_fingerprint(tl) == before
    with torch.no_grad():
        tl.blocks[0].attn.W_Q[0, 0, 0] += 1.0
    after = cache_store.weights_fingerprint(tl)
    assert after != before
    _, same = random_gpt2(n_layers=1, n_heads=4, d_head=8, seed=3)
    assert cache_store.weights_fingerprint(same) == before  # a fresh model with the original weights
