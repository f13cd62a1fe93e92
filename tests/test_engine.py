"""The layer engine: each backend's own layers, called as the sweeps call them, give back the clean forward; every
check it makes trips on exactly the fault it is for; what it cannot do exactly is refused by name."""

import pytest
import torch

from tl_patching import engine as engines
from tl_patching import fast, lens
from tl_patching.backends import hf_engine
from tl_patching.edits import act_name, patch
from tl_patching.engine import EngineMismatchError, verify
from tl_patching.forward import Forward
from tl_patching.metrics import LogitDiff
from tl_patching.testing import random_pair

FAMILIES = ["gpt2", "neox", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"]
TOKENS = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(0))  # longer than the windows (4)


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    return random_pair(request.param, n_layers=3, seed=0, weight_std=0.3)


@pytest.mark.parametrize("backend", ["tl", "hf"])
def test_the_engine_gives_back_the_clean_forward(pair, backend):
    """From every position: each layer's clean output and the final logits, against the model's own forward."""
    hf, tl = pair
    forward = Forward(tl) if backend == "tl" else Forward(tl, hf)
    engine = engines.engine_of(forward)
    assert engine.name == ("tl" if backend == "tl" and not lens.is_bridge(tl) else "hf")
    run = engine.clean_run(TOKENS, verify_from=0)
    logits = forward(TOKENS)[:, -1]
    for start in (0, 4, 10):
        assert verify(engine, run, logits, start) < 1e-5
    assert [tuple(r.shape) for r in run.resid] == [(3, 11, tl.cfg.d_model)] * 4


def test_a_wrong_prefix_or_readout_trips_the_check(pair):
    hf, tl = pair
    for forward in (Forward(tl), Forward(tl, hf)):
        engine = engines.engine_of(forward)
        run = engine.clean_run(TOKENS)
        logits = forward(TOKENS)[:, -1]
        keys = run.state.keys[1]
        run.state.keys[1] = keys * 1.5  # layer 1's clean keys, wrong
        with pytest.raises(EngineMismatchError, match="layer 1 does not reproduce the clean forward"):
            verify(engine, run, logits, 5)
        run.state.keys[1] = keys
        assert verify(engine, run, logits, 5) < 1e-5
        with pytest.raises(EngineMismatchError, match="logits differ from the clean forward"):
            verify(engine, run, logits + 0.01 * logits.abs().max(), 5)


def test_layer_calls_keep_nothing(pair):
    """A call never grows the clean run's keys/values (its cache returns the prefix and stores nothing)."""
    hf, tl = pair
    engine = engines.engine_of(Forward(tl, hf))
    run = engine.clean_run(TOKENS)
    before = [k.clone() for k in run.state.keys]
    x = run.resid[1][:, 6:].repeat(4, 1, 1)
    out, _ = engine.layer(run, 1, x, 6)
    again, _ = engine.layer(run, 1, x, 6)
    assert torch.equal(out, again) and out.shape == x.shape
    assert all(torch.equal(a, b) for a, b in zip(before, run.state.keys))
    assert (out[:3] - run.resid[2][:, 6:]).abs().max() < 1e-5  # each variant's rows: the clean rows here


def test_a_layer_argument_the_engine_cannot_cut_is_refused(monkeypatch):
    hf, tl = random_pair("llama", n_layers=2, seed=0)
    monkeypatch.delitem(hf_engine.CUT, "position_embeddings")
    with pytest.raises(NotImplementedError, match="layer 0 gets 'position_embeddings'.*cut to positions"):
        engines.engine_of(Forward(tl, hf)).clean_run(TOKENS)


def test_attention_without_a_mask_is_refused_by_name():
    """sdpa leaves causality to the kernel (no mask tensor): a suffix's queries could not be told from the whole
    sequence's, so the engine refuses, saying how to load the model."""
    hf, tl = random_pair("gpt2", n_layers=2, seed=0)
    from transformers import AutoModelForCausalLM

    sdpa = AutoModelForCausalLM.from_config(hf.config, attn_implementation="sdpa").eval()
    sdpa.load_state_dict(hf.state_dict())
    donor = Forward(tl).run(TOKENS.flip(0), cache=[act_name("z", l) for l in range(2)])[1]
    metric = LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))
    with pytest.raises(NotImplementedError, match="attn_implementation='eager'"):
        fast.final_position_head_sweep(Forward(tl, sdpa), TOKENS, donor, metric, progress=False)


def test_engine_edits_and_reads_are_the_backends_hooks(pair):
    """An edit at a hook point inside an engine call is the backend's own (the same numbers as a full forward with
    that edit), and a read records what that full forward would."""
    hf, tl = pair
    for forward in (Forward(tl), Forward(tl, hf)):
        engine = engines.engine_of(forward)
        run = engine.clean_run(TOKENS)
        donor = forward.run(TOKENS.flip(0), cache=[act_name("z", 1)])[1]
        logits, cache = forward.run(
            TOKENS, [patch(act_name("z", 1), donor, head=2, pos=-1)], cache=[act_name("resid_post", 1)]
        )
        # inside a call, positions and shapes are the call's: position 0 is the first computed (here the last, 10)
        edit = patch(act_name("z", 1), donor[act_name("z", 1)][:, -1:], head=2, pos=0)
        x, read = engine.layer(run, 1, run.resid[1][:, -1:], 10, [edit], [act_name("z", 1)])
        assert (x[:, 0] - cache[act_name("resid_post", 1)][:, -1]).abs().max() < 1e-4
        assert torch.equal(read[act_name("z", 1)][:, 0, 2], donor[act_name("z", 1)][:, -1, 2])
        x, _ = engine.layer(run, 2, x, 10)
        assert (engine.logits(x[:, 0]) - logits[:, -1]).abs().max() < 1e-4


@pytest.mark.skipif(lens.MAJOR < 4, reason="TransformerLens 4's TransformerBridge")
def test_transformer_lens_4_apis_the_toolkit_relies_on():
    """Where tl_patching reaches into TransformerLens 4 (no other public way exists), a release that moves it fails
    here, with what moved, before anything computes with it."""
    import transformer_lens.model_bridge.sources as sources

    assert hasattr(sources, "build_bridge_from_module"), (
        f"TransformerLens {lens.TL_VERSION} no longer exports model_bridge.sources.build_bridge_from_module "
        "(models._bridge wraps an already-loaded HF model with it)"
    )
    hf, bridge = random_pair("llama", n_layers=2, seed=0)
    names = list(bridge.original_model.state_dict())
    assert any("._original_component." in n for n in names), (
        f"TransformerLens {lens.TL_VERSION}'s bridge no longer keeps the HF modules as '_original_component' "
        "(lens._sharing_twin reads the bridge's HF weights by those names)"
    )
    assert callable(getattr(bridge, "get_params", None)), (
        "TransformerBridge.get_params is gone (lens._twin_from_params)"
    )
    assert lens.plain_hf(bridge) is lens.plain_hf(bridge)  # built once, checked against the bridge
