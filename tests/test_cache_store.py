"""Caches on disk: exact round trip, refusal of mismatches, detection of damage, reuse in E4/E5."""

import json
import os
import re
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tl_patching import cache_store, prompts
from tl_patching.backends.tl import readable_hooks
from tl_patching.cache_store import (
    CacheMismatchError,
    CorruptCacheError,
    bytes_per_token,
    cached_run,
    load_cache,
    read_header,
    save_cache,
)
from tl_patching.edits import act_name
from tl_patching.experiments import e4_ioi_patching as e4
from tl_patching.experiments import e5_head_token_patching as e5
from tl_patching.forward import Forward
from tl_patching.models import hooked_from_hf
from tl_patching.testing import random_gpt2, random_pair


@pytest.fixture()
def saved(pair, tokens, tmp_path):
    _, tl = pair
    _, cache = Forward(tl).run(tokens, cache=readable_hooks(tl))  # every hook, in HookedTransformer's layout
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

    hf, tl = random_gpt2(
        n_layers=3, tokenizer=word_tokenizer([prompts.SEED_RECIPIENT, prompts.SEED_DONOR] + [" " + n for n in NAMES])
    )
    forward = Forward(tl)
    batch = prompts.seed_pair(tl)
    path = tmp_path / "donor.safetensors"
    cached_run(path, forward, batch.donor_tokens, e4.donor_names(3), batch.prepend_bos)  # computes and saves
    reused = cached_run(path, forward, batch.donor_tokens, e4.donor_names(3), batch.prepend_bos)  # loads
    for module in (e4, e5):
        fresh, from_disk = (
            module.run(forward, batch, progress=False),
            module.run(forward, batch, donor_cache=reused, progress=False),
        )
        for field in ("clean", "heads_patched", "effect"):
            if hasattr(fresh, field):
                assert torch.equal(getattr(fresh, field), getattr(from_disk, field))


def test_bytes_per_token():
    _, tl = random_gpt2(n_layers=1, n_heads=4, d_head=8)
    assert bytes_per_token(tl.cfg, "blocks.0.attn.hook_z") == 4 * 8 * 4
    assert bytes_per_token(tl.cfg, "blocks.0.mlp.hook_post") == 4 * 32 * 4
    assert bytes_per_token(tl.cfg, "blocks.0.attn.hook_pattern", pos=10) == 4 * 10 * 4
    assert bytes_per_token(tl.cfg, "blocks.0.hook_resid_post") == 32 * 4
    assert bytes_per_token(tl.cfg, "unembed.hook_out") == 64 * 4  # logits: d_vocab wide, not d_model
    assert bytes_per_token(tl.cfg, "blocks.0.ln1.hook_scale") == 1 * 4
    with pytest.raises(ValueError, match="no known shape for the hook 'blocks.0.attn.hook_typo'"):
        bytes_per_token(tl.cfg, "blocks.0.attn.hook_typo")


@pytest.mark.tl3  # a bridge has no ungrouped view
def test_bytes_per_token_under_grouped_query_attention():
    """Keys and values have n_key_value_heads heads (2 of the 4 here), n_heads once TL's ungrouped view is on."""
    _, tl = random_pair("llama", n_layers=1, n_heads=4, d_head=8)
    assert tl.cfg.n_key_value_heads == 2
    for name in ("blocks.0.attn.hook_k", "blocks.0.attn.hook_v"):
        assert bytes_per_token(tl.cfg, name) == 2 * 8 * 4
    assert bytes_per_token(tl.cfg, "blocks.0.attn.hook_q") == 4 * 8 * 4
    tl.set_ungroup_grouped_query_attention(True)
    assert bytes_per_token(tl.cfg, "blocks.0.attn.hook_k") == 4 * 8 * 4


# ---- each check of the loader, tripped alone --------------------------------------------------------------


def doctored(path, out, header=None, tensors=None, reseal=False):
    """A copy of the cache at ``path`` whose header and/or tensors ``header(h)`` / ``tensors(t)`` edit in place.
    ``reseal``: rewrite the header's dtype and checksum of every tensor it lists, so that the file stays
    consistent with itself and only the edited field is wrong."""
    with safe_open(str(path), framework="pt") as f:
        h = json.loads(f.metadata()["tl_patching"])
    t = load_file(str(path))
    if header:
        header(h)
    if tensors:
        tensors(t)
    if reseal:
        h["dtype"] = {n: str(t[n].dtype).removeprefix("torch.") for n in h["hook_names"]}
        h["sha256"] = {n: cache_store._digest(t[n]) for n in h["hook_names"]}
    save_file({n: v.contiguous() for n, v in t.items()}, str(out), metadata={"tl_patching": json.dumps(h)})
    return out


def set_field(field, value):
    return lambda h: h.__setitem__(field, value)


MODEL_FIELDS = {
    "model_name": "another-model",
    "weight_mode": "processed",
    "n_layers": 4,
    "n_heads": 8,
    "d_model": 64,
    "d_vocab": 128,
    "weights_sha256": "0" * 64,
}


@pytest.mark.parametrize("field", MODEL_FIELDS)
def test_each_model_field_is_checked(pair, saved, tmp_path, field):
    _, tl = pair
    path = doctored(saved[0], tmp_path / "c.safetensors", header=set_field(field, MODEL_FIELDS[field]))
    load_cache(path)  # the file itself is sound: only the comparison with the model fails
    with pytest.raises(
        CacheMismatchError, match=f"another model: {field}: cache has {MODEL_FIELDS[field]!r}, model has"
    ) as e:
        load_cache(path, tl)
    assert str(e.value).count("cache has") == 1


def test_tokens_in_the_header_are_checked(pair, tokens, saved, tmp_path):
    _, tl = pair
    ids = tokens.tolist()
    ids[2][5] += 1
    path = doctored(saved[0], tmp_path / "c.safetensors", header=set_field("token_ids", ids))
    assert load_cache(path, tl).keys() == load_cache(saved[0]).keys()  # no tokens given: nothing to compare with
    expected = f"row 2, position 5: the cache has id {ids[2][5]}, the tokens given have {ids[2][5] - 1}$"
    with pytest.raises(CacheMismatchError, match=expected):
        load_cache(path, tl, tokens)


def test_token_mismatch_names_the_first_difference(pair, tmp_path):
    """Tokens that differ only at position 9: the first 8 ids of both are the same and tell the user nothing."""
    _, tl = pair
    tokens = torch.randint(2, tl.cfg.d_vocab - 1, (2, 12), generator=torch.Generator().manual_seed(5))
    other = tokens.clone()
    other[1, 9] = tokens[1, 9] + 1
    _, cache = Forward(tl).run(tokens, cache=[act_name("z", 0)])
    path = save_cache(tmp_path / "c.safetensors", cache, tl, tokens, True)
    cached_id = tokens[1, 9].item()
    expected = (
        f"other tokens: first difference at row 1, position 9: the cache has id {cached_id}, the tokens given have "
        f"{cached_id + 1}"
    )
    with pytest.raises(CacheMismatchError, match=f"{expected}$"):
        load_cache(path, tl, other)
    with pytest.raises(CacheMismatchError, match="the cache holds 2×12 token ids, the tokens given are 2×11$"):
        load_cache(path, tl, tokens[:, :11])
    with pytest.raises(CacheMismatchError, match="the cache holds 2×12 token ids, the tokens given are 24$"):
        load_cache(path, tl, tokens.flatten())
    assert torch.equal(load_cache(path, tl, tokens)[act_name("z", 0)], cache[act_name("z", 0)])


def test_a_listed_tensor_missing_from_the_file(saved, tmp_path):
    path = doctored(saved[0], tmp_path / "c.safetensors", tensors=lambda t: t.pop("blocks.1.attn.hook_z"))
    with pytest.raises(CorruptCacheError, match="lists 'blocks.1.attn.hook_z' but the file holds no such tensor"):
        load_cache(path)


def test_an_unlisted_tensor_in_the_file(saved, tmp_path):
    path = doctored(
        saved[0], tmp_path / "c.safetensors", tensors=lambda t: t.__setitem__("blocks.9.hook_extra", torch.zeros(3))
    )
    with pytest.raises(CorruptCacheError, match="holds a tensor 'blocks.9.hook_extra' that its header does not list"):
        load_cache(path)


def test_dtype_is_checked_against_the_header(saved, tmp_path):
    """The same bytes read as int32: the checksum (over bytes) passes, only the dtype check can see it."""
    name = "blocks.0.hook_resid_post"
    path = doctored(
        saved[0], tmp_path / "c.safetensors", tensors=lambda t: t.__setitem__(name, t[name].view(torch.int32))
    )
    assert cache_store._digest(load_file(str(path))[name]) == read_header(path)["sha256"][name]
    with pytest.raises(CorruptCacheError, match=f"tensor '{name}' is int32, its header says float32"):
        load_cache(path)


def test_checksum_of_each_tensor(saved, tmp_path):
    name = "blocks.2.mlp.hook_post"

    def nudge(t):
        t[name] = t[name].clone()
        t[name][1, 4, 7] += 1e-3

    path = doctored(saved[0], tmp_path / "c.safetensors", tensors=nudge)
    with pytest.raises(CorruptCacheError, match=f"tensor '{name}' does not match its checksum"):
        load_cache(path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda h: h.__setitem__("format", "tl_patching.cache/0"), "unknown cache format 'tl_patching.cache/0'"),
        (
            lambda h: h["dtype"].pop("blocks.0.attn.hook_q"),
            r"the header's dtype does not list exactly its hook_names \(differs on \['blocks.0.attn.hook_q'\]\)",
        ),
        (
            lambda h: h["sha256"].pop("blocks.0.attn.hook_q"),
            r"the header's sha256 does not list exactly its hook_names \(differs on \['blocks.0.attn.hook_q'\]\)",
        ),
        (
            lambda h: h["hook_names"].append(h["hook_names"][0]),
            "the header's hook_names are not a list of distinct names",
        ),
        (lambda h: h["token_ids"][1].pop(), "the header's token_ids are not a rectangular batch of integer ids"),
    ],
    ids=["format", "dtype-entry", "sha256-entry", "duplicate-name", "ragged-tokens"],
)
def test_header_consistency(saved, tmp_path, edit, message):
    path = doctored(saved[0], tmp_path / "c.safetensors", header=edit)
    with pytest.raises(CorruptCacheError, match=message):
        load_cache(path)


@pytest.mark.parametrize("field", cache_store._HEADER_FIELDS)
def test_every_header_field_is_required(saved, tmp_path, field):
    path = doctored(saved[0], tmp_path / "c.safetensors", header=lambda h: h.pop(field))
    with pytest.raises(CorruptCacheError, match=f"the header lacks the field '{field}'"):
        load_cache(path)


def test_a_header_that_is_not_json_or_absent(saved, tmp_path):
    t = load_file(str(saved[0]))
    save_file(t, str(tmp_path / "bad.safetensors"), metadata={"tl_patching": "{not json"})
    with pytest.raises(CorruptCacheError, match="header is not valid JSON"):
        load_cache(tmp_path / "bad.safetensors")
    save_file(t, str(tmp_path / "plain.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CorruptCacheError, match="a safetensors file without a tl_patching header"):
        load_cache(tmp_path / "plain.safetensors")


# (hook, edit of its tensor, what the error must say); the pair's model: 3 layers, 4 heads of 8, d_model 32,
# d_mlp 128, d_vocab V (its tokenizer's), and the tokens are 3×9.
SHAPE_CASES = {
    "d_head": ("blocks.0.attn.hook_z", lambda x: x[..., :4], "d_head is 4 in the cache, 8 here"),
    "n_heads": ("blocks.1.attn.hook_z", lambda x: x[:, :, :3], "n_heads is 3 in the cache, 4 here"),
    "k-heads": ("blocks.1.attn.hook_k", lambda x: x[:, :, :2], "n_heads is 2 in the cache, 4 here"),
    "d_model": ("blocks.2.hook_resid_post", lambda x: x[..., :31], "d_model is 31 in the cache, 32 here"),
    "d_mlp": ("blocks.0.mlp.hook_pre", lambda x: x[..., :96], "d_mlp is 96 in the cache, 128 here"),
    "d_vocab": ("unembed.hook_out", lambda x: x[..., :-1], "d_vocab is {V_1} in the cache, {V} here"),
    "batch": ("blocks.0.hook_resid_pre", lambda x: x[:2], "batch is 2 in the cache, 3 here"),
    "pos": ("blocks.0.attn.hook_pattern", lambda x: x[..., :8], "pos is 8 in the cache, 9 here"),
    "axes": ("blocks.2.attn.hook_v", lambda x: x.flatten(2), "3 axes, not 4"),
}


@pytest.mark.parametrize("case", SHAPE_CASES)
def test_each_tensor_shape_is_checked_against_the_model_and_tokens(pair, tokens, saved, tmp_path, case):
    """The file is consistent with itself (checksums resealed): only the comparison with the model can fail."""
    _, tl = pair
    name, edit, message = SHAPE_CASES[case]
    path = doctored(
        saved[0], tmp_path / "c.safetensors", tensors=lambda t: t.__setitem__(name, edit(t[name])), reseal=True
    )
    load_cache(path)
    expected = re.escape(str(tuple(saved[1][name].shape)))
    message = message.format(V=tl.cfg.d_vocab, V_1=tl.cfg.d_vocab - 1)
    with pytest.raises(CacheMismatchError, match=f"tensor '{name}' has shape .* give {expected} .*: {message}$"):
        load_cache(path, tl, tokens)


def test_a_tensor_of_a_hook_the_model_lacks(pair, saved, tmp_path):
    _, tl = pair

    def rename(h):
        h["hook_names"] = [n.replace("blocks.2.", "blocks.7.") for n in h["hook_names"]]

    def move(t):
        t.update({k.replace("blocks.2.", "blocks.7."): t.pop(k) for k in list(t) if k.startswith("blocks.2.")})

    path = doctored(saved[0], tmp_path / "c.safetensors", header=rename, tensors=move, reseal=True)
    with pytest.raises(CacheMismatchError, match="holds 'blocks.7.hook_resid_pre', which is not a hook of"):
        load_cache(path, tl)


@pytest.mark.tl3  # a bridge has no ungrouped view
def test_grouped_keys_are_checked_against_the_models_view(tmp_path):
    """A cache of ungrouped keys (one per query head) does not load into the grouped model, and loads once the
    model is ungrouped too: same weights, same fingerprint, only the key tensor's head count tells them apart."""
    _, tl = random_pair("llama", n_layers=1, n_heads=4, d_head=8)
    tokens = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    names = ["blocks.0.attn.hook_k", "blocks.0.attn.hook_v", "blocks.0.attn.hook_q"]
    tl.set_ungroup_grouped_query_attention(True)
    _, cache = tl.run_with_cache(tokens, names_filter=names)
    path = save_cache(tmp_path / "ungrouped.safetensors", cache, tl, tokens, True)
    tl.set_ungroup_grouped_query_attention(False)
    expected = r"'blocks.0.attn.hook_k' has shape \(2, 6, 4, 8\).*n_key_value_heads is 4 in the cache, 2 here$"
    with pytest.raises(CacheMismatchError, match=expected):
        load_cache(path, tl, tokens)
    tl.set_ungroup_grouped_query_attention(True)
    assert torch.equal(load_cache(path, tl, tokens)["blocks.0.attn.hook_k"], cache["blocks.0.attn.hook_k"])
    tl.set_ungroup_grouped_query_attention(False)
    _, grouped = tl.run_with_cache(tokens, names_filter=names)
    path = save_cache(tmp_path / "grouped.safetensors", grouped, tl, tokens, True)
    assert load_cache(path, tl, tokens)["blocks.0.attn.hook_v"].shape == (2, 6, 2, 8)


def test_cached_run_loads_for_the_same_tokens_and_refuses_others(pair, tmp_path):
    _, tl = pair
    calls = []

    class Counting(Forward):  # a Forward that counts its runs
        def run(self, tokens, *args, **kwargs):
            calls.append(tokens)
            return super().run(tokens, *args, **kwargs)

    forward = Counting(tl)
    tokens = torch.randint(2, tl.cfg.d_vocab - 1, (2, 10), generator=torch.Generator().manual_seed(8))
    other = tokens.clone()
    other[0, 3] += 1
    names = [act_name("z", 1), act_name("resid_post", 2)]
    path = tmp_path / "donor.safetensors"
    first = cached_run(path, forward, tokens, names, True)
    assert len(calls) == 1 and path.exists()
    with pytest.raises(CacheMismatchError, match="other tokens: first difference at row 0, position 3"):
        cached_run(path, forward, other, names, True)
    again = cached_run(path, forward, tokens, names, True)
    assert len(calls) == 1  # loaded, not recomputed
    assert all(torch.equal(again[n], first[n]) for n in names)


def test_cached_run_refuses_a_cache_without_the_hooks_asked_for(pair, tokens, tmp_path):
    _, tl = pair
    path = tmp_path / "donor.safetensors"
    cached_run(path, Forward(tl), tokens, [act_name("z", 1)], True)
    with pytest.raises(CacheMismatchError, match=r"holds no 'blocks.2.hook_resid_post' \(and 0 more of the 2 needed\)"):
        cached_run(path, Forward(tl), tokens, [act_name("z", 1), act_name("resid_post", 2)], True)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_cache_files_honour_the_umask(pair, tokens, tmp_path, umask, mode):
    _, tl = pair
    _, cache = Forward(tl).run(tokens, cache=[act_name("z", 0)])
    old = os.umask(umask)
    try:
        path = save_cache(tmp_path / "c.safetensors", cache, tl, tokens, True)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert os.listdir(tmp_path) == ["c.safetensors"]


def test_load_without_a_model_builds_none(saved, monkeypatch):
    """Loading a cache needs no model: nothing of the cached size is built (it was GBs for GPT-2 large)."""
    from tl_patching import lens

    path, cache = saved
    monkeypatch.setattr(
        lens.TLModel,
        "__init__",
        lambda *a, **k: (_ for _ in ()).throw(AssertionError("built a model")),
    )
    loaded = load_cache(path)
    assert torch.equal(loaded["blocks.0.hook_resid_post"], cache["blocks.0.hook_resid_post"])


def test_saving_into_a_missing_folder_is_an_error(pair, forwards, tokens, tmp_path):
    _, tl = pair
    _, cache = forwards["tl"].run(tokens, cache=[act_name("z", 0)])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_cache(tmp_path / "no" / "such" / "dir" / "c.safetensors", cache, tl, tokens, True)
    assert not (tmp_path / "no").exists()


def test_fingerprint_follows_in_place_changes_of_the_weights():
    """A Forward keeps its model's fingerprint (computed once), but an in-place edit of any weight must change it."""
    from tl_patching.provenance import weights_fingerprint

    _, tl = random_gpt2(n_layers=1, n_heads=4, d_head=8, seed=3)
    forward = Forward(tl)
    before = forward.weights_fingerprint()
    assert before == weights_fingerprint(tl) and forward.weights_fingerprint() == before
    with torch.no_grad():
        tl.blocks[0].attn.W_Q[0, 0, 0] += 1.0
    after = forward.weights_fingerprint()
    assert after != before and after == weights_fingerprint(tl)
    _, same = random_gpt2(n_layers=1, n_heads=4, d_head=8, seed=3)
    assert Forward(same).weights_fingerprint() == before  # a fresh model with the original weights


# --- several batches in one file (what --donor-cache uses: a dataset comes in several token lengths) ---


class Counting(Forward):
    """A Forward that records the tokens of every run."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def run(self, tokens, *args, **kwargs):
        self.calls.append(tokens)
        return super().run(tokens, *args, **kwargs)


def batches_of_three_lengths(tl):
    g = torch.Generator().manual_seed(3)
    return [(torch.randint(2, tl.cfg.d_vocab, (n, pos), generator=g), True) for n, pos in ((3, 7), (2, 9), (1, 12))]


def test_cached_runs_keep_every_length_in_one_file_and_load_without_running(pair, tmp_path):
    _, tl = pair
    forward, batches = Counting(tl), batches_of_three_lengths(tl)
    names = [act_name("z", 1), act_name("resid_post", 2)]
    path = tmp_path / "donor.safetensors"
    first, computed = cache_store.cached_runs(path, forward, batches, names)
    assert computed == 3 and len(forward.calls) == 3 and [f"{k}" for k in os.listdir(tmp_path)] == [path.name]
    header = json.loads(safe_open(str(path), "pt").metadata()["tl_patching"])
    assert header["format"] == cache_store.BATCHES_FORMAT
    assert [e["token_ids"] for e in header["batches"]] == [t.tolist() for t, _ in batches]
    for (tokens, _), cache in zip(batches, first):  # what a fresh run gives, the final position's logits included
        logits, acts = Forward(tl).run(tokens, cache=names)
        assert all(torch.equal(cache[n], acts[n]) for n in names)
        assert torch.equal(cache[cache_store.FINAL_LOGITS], logits[:, -1])
    stamp = path.stat().st_mtime_ns
    again, computed = cache_store.cached_runs(path, forward, batches, names)
    assert computed == 0 and len(forward.calls) == 3 and path.stat().st_mtime_ns == stamp  # loaded, nothing run
    assert all(torch.equal(a[n], b[n]) for a, b in zip(first, again) for n in a)
    other = torch.randint(2, tl.cfg.d_vocab, (2, 5), generator=torch.Generator().manual_seed(4))
    _, computed = cache_store.cached_runs(path, forward, [batches[1], (other, True)], names)  # a new length is added
    assert computed == 1 and torch.equal(forward.calls[-1], other)
    assert len(json.loads(safe_open(str(path), "pt").metadata()["tl_patching"])["batches"]) == 4


def test_cached_runs_refuse_another_model_and_damage(pair, tmp_path):
    _, tl = pair
    batches, names = batches_of_three_lengths(tl), [act_name("z", 0)]
    path = tmp_path / "donor.safetensors"
    cache_store.cached_runs(path, Forward(tl), batches, names)
    _, other_model = random_gpt2(n_layers=3, n_heads=4, d_head=8, seed=1, tokenizer=tl.tokenizer)  # other weights
    with pytest.raises(CacheMismatchError, match="was made with another model: weights_sha256: cache has"):
        cache_store.cached_runs(path, Forward(other_model), batches, names)
    tensors, meta = load_file(path), safe_open(str(path), "pt").metadata()
    altered = {**tensors, "1/blocks.0.attn.hook_z": tensors["1/blocks.0.attn.hook_z"] + 1}
    save_file(altered, tmp_path / "altered.safetensors", metadata=meta)
    with pytest.raises(
        CorruptCacheError, match=r"'blocks.0.attn.hook_z' does not match its checksum \(batch 1 of 3, 9"
    ):
        cache_store.cached_runs(tmp_path / "altered.safetensors", Forward(tl), batches, names)
    del tensors["2/final_logits"]
    save_file(tensors, tmp_path / "short.safetensors", metadata=meta)
    with pytest.raises(CorruptCacheError, match=r"lists 'final_logits' but the file holds no such tensor \(batch 2"):
        cache_store.cached_runs(tmp_path / "short.safetensors", Forward(tl), batches, names)


def test_cached_runs_take_a_one_batch_file_and_add_the_logits(pair, tokens, tmp_path):
    """A cache saved by `save_cache` (one batch, no logits) is read as a batch file: its activations are kept."""
    _, tl = pair
    names = [act_name("z", 1)]
    _, acts = Forward(tl).run(tokens, cache=names)
    path = save_cache(tmp_path / "one.safetensors", acts, tl, tokens, True)
    [cache], computed = cache_store.cached_runs(path, Forward(tl), [(tokens, True)], names)
    assert computed == 1 and torch.equal(cache[names[0]], acts[names[0]])  # run once more, for the logits
    assert read_header_format(path) == cache_store.BATCHES_FORMAT


def read_header_format(path) -> str:
    return json.loads(safe_open(str(path), "pt").metadata()["tl_patching"])["format"]


def test_e4_e5_with_a_donor_cache_of_several_lengths_run_no_donor_and_match_a_fresh_run(tmp_path):
    """The main job's path: IOI prompts of three token lengths, one donor cache file, E4 then E5, twice. The second
    time nothing runs on the donor prompts, and every number equals a run without any cache."""
    from tl_patching.experiments import ioi_data, run_experiment
    from tl_patching.forward import load_forward

    shipped = load_forward("shipped")
    forward = Counting(shipped.model)
    data = ioi_data(forward.model, 20)
    assert len(data) == 3  # three token lengths
    path, lines = tmp_path / "donor.safetensors", []

    def donor_runs():
        return sum(any(t.shape == b.donor_tokens.shape and torch.equal(t, b.donor_tokens) for b in data) for t in calls)

    runs = []
    for _ in range(2):
        calls = forward.calls = []
        runs.append(
            [
                run_experiment(k, forward, 20, donor_cache=path, progress=False, log=lines.append)
                for k in "e4 e5".split()
            ]
        )
        runs[-1].append(donor_runs())
    assert runs[0][2] == 3 and runs[1][2] == 0  # the first run computes the three batches' donor runs, the second none
    assert lines == [
        f"donor cache {path}: the donor run of 3 of 3 batches computed and saved",
        f"donor cache {path}: the donor run of 3 batches loaded",
        f"donor cache {path}: the donor run of 3 batches loaded",
        f"donor cache {path}: the donor run of 3 batches loaded",
    ]
    fresh = [run_experiment(k, Forward(shipped.model), 20, progress=False) for k in ("e4", "e5")]
    for first, second, plain in zip(runs[0][:2], runs[1][:2], fresh):
        for field in ("clean", "donor", "heads_patched", "resid_s2_patched", "resid_final_patched", "effect"):
            if hasattr(plain, field):
                assert torch.equal(getattr(first, field), getattr(plain, field)), field
                assert torch.equal(getattr(second, field), getattr(plain, field)), field
