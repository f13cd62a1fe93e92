"""An architecture tl_patching has no family row for (OPT here). On TransformerLens 4 anything its TransformerBridge
boots loads, probe-checked against HF, and runs the TransformerLens side; what needs tl_patching's own tables (the HF
mirror, E1's score formula, the fast paths' HF engine) is refused by name, and reproduce says what it did not run.
On TransformerLens 3 it is refused at load.

The config is facebook/opt-125m's published config.json (the hub file, as quoted verbatim in public repositories),
with widths, depth and vocabulary shrunk; the tokenizer is the GPT-2 fixture's byte-level BPE (OPT uses GPT-2's BPE).
"""

import json

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from tl_patching import cli, invariants, lens
from tl_patching.edits import scale
from tl_patching.experiments import e1_attention_scores as e1
from tl_patching.experiments import e5_head_token_patching as e5
from tl_patching.families import UnsupportedArchitectureError
from tl_patching.forward import Forward
from tl_patching.models import load_pair, verify_against_hf
from tl_patching.prompts import ioi_dataset
from tl_patching.results import RunInfo
from tl_patching.testing import random_pair, tiny_tokenizer

OPT_125M = {
    "_name_or_path": "facebook/opt-125m",
    "activation_dropout": 0.0,
    "activation_function": "relu",
    "architectures": ["OPTForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 2,
    "do_layer_norm_before": True,
    "dropout": 0.1,
    "eos_token_id": 2,
    "ffn_dim": 3072,
    "hidden_size": 768,
    "init_std": 0.02,
    "layerdrop": 0.0,
    "max_position_embeddings": 2048,
    "model_type": "opt",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "prefix": "</s>",
    "torch_dtype": "float16",
    "transformers_version": "4.21.0.dev0",
    "use_cache": True,
    "vocab_size": 50272,
    "word_embed_proj_dim": 768,
}
bridge_only = pytest.mark.skipif(lens.MAJOR < 4, reason="TransformerBridge (TransformerLens 4) only")


def save_opt(directory, pre_norm: bool = True):
    tokenizer = tiny_tokenizer("gpt2")
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    fields = dict(
        OPT_125M,
        hidden_size=32,
        word_embed_proj_dim=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=len(tokenizer),
        max_position_embeddings=64,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        do_layer_norm_before=pre_norm,  # False: OPT-350m's post-norm blocks
    )
    hf = OPTForCausalLM(OPTConfig.from_dict(fields)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            norm_weight = "layer_norm" in name and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2 + (1.0 if norm_weight else 0.0))
    hf.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory):
    return save_opt(tmp_path_factory.mktemp("opt"))


@pytest.fixture(scope="module")
def opt(opt_dir):
    if lens.MAJOR < 4:
        pytest.skip("TransformerBridge (TransformerLens 4) only")
    return load_pair(opt_dir)


def test_loads_on_a_bridge_and_is_refused_by_name_on_tl3(opt_dir):
    if lens.MAJOR < 4:
        with pytest.raises(UnsupportedArchitectureError, match="OPTForCausalLM is not supported"):
            load_pair(opt_dir)
        return
    hf, model = load_pair(opt_dir)
    assert lens.is_bridge(model) and lens.architecture(model) == "OPTForCausalLM"
    assert verify_against_hf(hf, model) < 1e-5


@bridge_only
def test_hf_mirror_e1_and_fast_paths_refused_by_name(opt):
    hf, model = opt
    tokens = torch.tensor([[5, 6, 7]])
    with pytest.raises(NotImplementedError, match="no HF hook map for OPTForCausalLM"):
        Forward(model, hf).run(tokens, cache=["blocks.0.hook_resid_post"])
    with pytest.raises(UnsupportedArchitectureError, match="OPTForCausalLM: tl_patching has no attention settings"):
        e1.run(Forward(model))
    from tl_patching import fast

    assert "no HF hook map for OPTForCausalLM" in fast.unavailable(Forward(model))


@bridge_only
def test_e5_equals_a_raw_hf_hook_patch(opt):
    """E5 (the sweep driver, since the fast path is refused) against the same patch written by hand on the HF model:
    head h's slice of out_proj's input at the final position replaced by the donor's."""
    hf, model = opt
    batch = ioi_dataset(model, 8)[0]
    r = e5.run(Forward(model), batch, progress=False)
    assert r.method == "sweep"
    d_head = hf.config.hidden_size // hf.config.num_attention_heads
    layers = hf.model.decoder.layers

    def logit_diff(logits):
        final = logits[:, -1]
        rows = torch.arange(len(final))
        return final[rows, batch.correct] - final[rows, batch.wrong]

    donor_z = {}
    handles = [
        layer.self_attn.out_proj.register_forward_pre_hook(
            lambda m, args, l=l: donor_z.__setitem__(l, args[0].detach().clone())
        )
        for l, layer in enumerate(layers)
    ]
    with torch.no_grad():
        hf(batch.donor_tokens)
    for h in handles:
        h.remove()
    with torch.no_grad():
        clean = logit_diff(hf(batch.tokens).logits)
    expected = torch.zeros_like(r.effect)
    for l, layer in enumerate(layers):
        for head in range(hf.config.num_attention_heads):
            cols = slice(head * d_head, (head + 1) * d_head)

            def patch(m, args, l=l, cols=cols):
                z = args[0].clone()
                z[:, -1, cols] = donor_z[l][:, -1, cols]
                return (z,)

            handle = layer.self_attn.out_proj.register_forward_pre_hook(patch)
            with torch.no_grad():
                expected[l, head] = logit_diff(hf(batch.tokens).logits) - clean
            handle.remove()
    assert expected.abs().max() > 1e-3  # the patches move the answer: the comparison can fail
    assert (r.effect - expected).abs().max().item() < 1e-4
    assert (r.clean - clean).abs().max().item() < 1e-4


@bridge_only
def test_resid_mid_write_is_the_residual_stream_or_refused(opt, opt_dir):
    """A resid_mid write equals scaling the residual stream after attention by hand (HF hooks); where resid_mid is
    not resid_pre + attn_out on the bridge, the write is refused by name."""
    hf, model = opt
    tokens = torch.tensor([[5, 9, 11, 13, 17]])
    assert invariants.read_failures(model)[0] == []
    with torch.no_grad():
        ours = Forward(model).run(tokens, [scale("blocks.0.hook_resid_mid", 0.5)])[0]
    layer = hf.model.decoder.layers[0]
    kept = {}
    pre = layer.register_forward_pre_hook(
        lambda m, args, kwargs: kept.__setitem__("x", kwargs.get("hidden_states", args[0] if args else None)),
        with_kwargs=True,
    )
    post = layer.self_attn.register_forward_hook(
        lambda m, args, out: (0.5 * (kept["x"] + out[0]) - kept["x"], *out[1:])
    )
    with torch.no_grad():
        expected = hf(tokens).logits
    pre.remove()
    post.remove()
    with torch.no_grad():
        unedited = hf(tokens).logits
    assert (expected - unedited).abs().max() > 0.1
    assert (ours - expected).abs().max().item() < 1e-4

    # The check trips where the sum does not hold (here: a permanent hook moves layer 1's resid_mid)
    _, moved = load_pair(opt_dir)
    moved.hook_dict["blocks.1.hook_resid_mid"].add_hook(lambda act, hook: act + 1.0)
    with pytest.raises(NotImplementedError, match="invariant 'resid_mid = resid_pre \\+ attn_out' at layer 1"):
        Forward(moved).run(tokens, [scale("blocks.0.hook_resid_mid", 0.5)])


@bridge_only
def test_post_norm_opt_refused_by_name(tmp_path):
    """OPT-350m's post-norm blocks (do_layer_norm_before=False): the bridge cannot build its final norm."""
    with pytest.raises(NotImplementedError, match="OPTForCausalLM: TransformerLens .* cannot run this config"):
        load_pair(save_opt(tmp_path, pre_norm=False))


@bridge_only
def test_reproduce_runs_the_rest_and_says_what_it_did_not(opt_dir, tmp_path, capsys):
    cli.main(["reproduce", "--model", str(opt_dir), "--out", str(tmp_path), "--no-png", "--n-prompts", "8"])
    (folder,) = tmp_path.iterdir()
    assert sorted(p.name for p in folder.glob("*_result.json")) == [
        f"{k}_result.json" for k in ("circuit", "e2", "e3", "e4", "e5")
    ]
    assert "no attention settings" in (folder / "e1_refused.txt").read_text()
    page = (folder / "index.html").read_text()
    assert "Not run on this model: e1 (OPTForCausalLM: tl_patching has no attention settings" in page
    assert "<b>Not cross-checked.</b> tl_patching has no raw-HF hook table" in page
    assert json.loads((folder / "e4_result.json").read_text())["info"]["hf_cross_checked"] is False
    out, err = capsys.readouterr()
    assert "e1: not run on this model: OPTForCausalLM" in out
    assert "note: OPTForCausalLM has no raw-HF hook table in tl_patching" in err
    # A single experiment that cannot run is an error, as before
    with pytest.raises(SystemExit) as stop:
        cli.main(["e1", "--model", str(opt_dir), "--out", str(tmp_path), "--no-png"])
    assert (
        stop.value.code != 0
        and "error: OPTForCausalLM: tl_patching has no attention settings" in capsys.readouterr().err
    )


def test_run_info_says_whether_the_hf_cross_check_covers_the_architecture(opt_dir):
    _, llama = random_pair("llama")
    tokens = torch.tensor([[1, 2, 3]])
    assert RunInfo.of(Forward(llama), tokens, prepend_bos=False).hf_cross_checked is True
    if lens.MAJOR >= 4:
        _, model = load_pair(opt_dir)
        assert RunInfo.of(Forward(model), tokens, prepend_bos=False).hf_cross_checked is False
