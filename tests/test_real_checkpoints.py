"""Real checkpoints' conventions, not ours: the fixtures of `tl_patching.testing` keep each checkpoint's published
config and its tokenizer's special tokens, and every command runs on each of them.

GPT-2's tokenizer uses ``<|endoftext|>`` as start, end *and* unknown token: before this, every text command refused
it ("does not know '?'"), because the start token the toolkit prepended was taken for an unknown word.
"""

import json
from types import SimpleNamespace

import pytest
import torch

from tl_patching import cli
from tl_patching.families import family_of
from tl_patching.prompts import PromptError, adds_start_token, answer_token, to_tokens
from tl_patching.testing import CHECKPOINTS, real_config, save_tiny_checkpoint, tiny_checkpoint, tiny_pair

NAMES = list(CHECKPOINTS)
# What a shrunk config may change: widths, depth, vocabulary (and the token ids that point into it).
SHRUNK = {
    "n_embd",
    "hidden_size",
    "n_head",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "n_inner",
    "intermediate_size",
    "n_layer",
    "num_hidden_layers",
    "layer_types",
    "max_window_layers",
    "vocab_size",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
}


@pytest.fixture(scope="module")
def directories(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: save_tiny_checkpoint(name, root / name) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_config_keeps_every_published_field(name, directories):
    real = real_config(name)
    written = json.loads((directories[name] / "config.json").read_text())
    assert set(written) == set(real)
    changed = {k for k in real if written[k] != real[k]}
    assert changed <= SHRUNK, changed - SHRUNK
    assert {"vocab_size"} <= changed  # and the vocabulary really is the tiny one
    config = tiny_checkpoint(name)[0].config
    assert family_of(config).architecture == real["architectures"][0]


# The published special tokens (tokenizer_config.json / special_tokens_map.json; GPT-2's are its class defaults,
# its tokenizer_config.json holding only model_max_length): bos, eos, unk, pad, and whether the start token is added.
PUBLISHED = {
    "gpt2": ("<|endoftext|>", "<|endoftext|>", "<|endoftext|>", None, False),
    "pythia-160m": ("<|endoftext|>", "<|endoftext|>", "<|endoftext|>", None, False),
    "llama-3.2-1b": ("<|begin_of_text|>", "<|end_of_text|>", None, None, True),
    "mistral-7b-v0.1": ("<s>", "</s>", "<unk>", None, True),
    "qwen2.5-0.5b": (None, "<|endoftext|>", None, "<|endoftext|>", False),
    "qwen3-0.6b": (None, "<|im_end|>", None, "<|endoftext|>", False),
    "gemma-2-2b": ("<bos>", "<eos>", "<unk>", "<pad>", True),
    "gemma-3-270m": ("<bos>", "<eos>", "<unk>", "<pad>", True),
}


@pytest.mark.parametrize("name", NAMES)
def test_tokenizer_has_the_published_special_tokens(name, directories):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directories[name])  # as a user's directory loads
    bos, eos, unk, pad, adds = PUBLISHED[name]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token, tokenizer.pad_token) == (bos, eos, unk, pad)
    assert adds_start_token(tokenizer) is adds
    config = json.loads((directories[name] / "config.json").read_text())
    if bos is not None and config.get("bos_token_id") is not None:
        assert config["bos_token_id"] == tokenizer.bos_token_id
    if name == "gpt2":  # one token for three roles
        assert tokenizer.bos_token_id == tokenizer.eos_token_id == tokenizer.unk_token_id
    text = "Sam and Sally went to the park. Sam gave a gift to"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


@pytest.fixture(scope="module")
def pairs():
    return {name: tiny_pair(name)[1] for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_start_token_follows_the_model_and_is_never_an_unknown_word(name, pairs):
    model = pairs[name]
    text = "Sam and Sally went to the park."
    ids = to_tokens(model, text)[0].tolist()
    plain = to_tokens(model, text, prepend_bos=False)[0].tolist()
    bos = model.tokenizer.bos_token_id
    if PUBLISHED[name][4]:
        assert ids == [bos] + plain
    else:
        assert ids == plain and bos not in plain
    if bos is not None:
        assert to_tokens(model, text, prepend_bos=True)[0].tolist() == [bos] + plain
    else:
        with pytest.raises(PromptError, match="has no start token"):
            to_tokens(model, text, prepend_bos=True)


def test_gpt2_text_naming_its_special_token_is_not_unknown(pairs):
    """<|endoftext|> typed in the text is that token, not an unknown word (it is GPT-2's unknown token too)."""
    model = pairs["gpt2"]
    ids = to_tokens(model, "Sam went.<|endoftext|>Sally went.")[0].tolist()
    assert model.tokenizer.eos_token_id in ids


@pytest.mark.parametrize("name", NAMES)
def test_answers_are_read_in_context(name, pairs):
    """The answer id is the token the model predicts after the prompt, with its leading space; without the space
    the error names the spaced form."""
    model = pairs[name]
    prompt = "Sam and Sally went to the park. Sam gave a gift to"
    sally = answer_token(model, prompt, " Sally")
    assert to_tokens(model, prompt + " Sally", prepend_bos=False)[0, -1] == sally
    with pytest.raises(PromptError, match=r"'Sally' has no leading space.*pass ' Sally'"):
        answer_token(model, prompt, "Sally")


COMMANDS = [
    ["e1", "--text", "Sam and Sally went to the park."],
    ["e2"],
    ["e3"],
    ["e4", "--n-prompts", "1"],
    ["e5", "--n-prompts", "1"],
    ["e4", "--n-prompts", "12"],
]


@pytest.mark.parametrize("name", NAMES)
def test_every_command_runs(name, directories, tmp_path, capsys):
    for command in COMMANDS:
        cli.main([*command, "--model", str(directories[name]), "--out", str(tmp_path), "--no-png"])
        out = capsys.readouterr()
        assert "error" not in out.err, (command, out.err)
        assert out.out.strip(), command  # the result line
    written = {p.name for p in (tmp_path / cli.model_folder(directories[name])).iterdir()}
    assert {f"e{i}_result.json" for i in range(1, 6)} <= written


# A norm between the heads and the residual stream (Gemma 2 and 3's post-attention norm): a head's write is not
# z · W_O, so there are no head senders to give edges to (tl_patching.edges refuses it by name).
EDGES_REFUSED = {"gemma-2-2b": "norm after attention", "gemma-3-270m": "norm after attention"}


@pytest.mark.parametrize("name", NAMES)
def test_edges_command_runs_or_refuses_by_name(name, directories, tmp_path, capsys):
    command = ["edges", "--n-prompts", "2", "--model", str(directories[name]), "--out", str(tmp_path), "--no-png"]
    if name in EDGES_REFUSED:
        with pytest.raises(SystemExit) as exit_:
            cli.main(command)
        last = capsys.readouterr().err.splitlines()[-1]
        assert exit_.value.code == 1 and last.startswith("error: ") and EDGES_REFUSED[name] in last, last
        return
    cli.main(command)
    out = capsys.readouterr()
    assert "error" not in out.err, out.err
    assert out.out.startswith("edges (") and " edges; largest exact effect " in out.out
    result = json.loads((tmp_path / cli.model_folder(directories[name]) / "edges_result.json").read_text())
    assert result["type"] == "EdgesResult" and len(result["f"]["exact"]) == len(result["sizes"])


@pytest.mark.parametrize("name", NAMES)
def test_reproduce_runs_and_says_which_start_token(name, directories, tmp_path, capsys):
    cli.main(["reproduce", "--model", str(directories[name]), "--out", str(tmp_path), "--no-png", "--n-prompts", "8"])
    assert "error" not in capsys.readouterr().err
    folder = tmp_path / cli.model_folder(directories[name])  # the directory's name and a hash of its path
    page = (folder / "index.html").read_text()
    bos = PUBLISHED[name][0]
    if PUBLISHED[name][4]:
        assert f"start token {bos} prepended (as its tokenizer does)".replace("<", "&lt;").replace(">", "&gt;") in page
    else:
        assert "no start token (as its tokenizer does)" in page
    e4 = json.loads((folder / "e4_result.json").read_text())
    assert e4["info"]["start_token_convention"] is PUBLISHED[name][4]


def test_llama_3_sized_context_loads(pairs):
    """Llama-3.2-1B's config asks for 131072 positions: loading must not allocate per-position buffers of that size."""
    assert pairs["llama-3.2-1b"].cfg.n_ctx == 131072
    assert sum(b.numel() for b in pairs["llama-3.2-1b"].buffers()) < 50_000_000


def test_family_of_each_checkpoint():
    assert {family_of(SimpleNamespace(**real_config(n))).name for n in NAMES} == {
        "gpt2",
        "neox",
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma2",
        "gemma3",
    }


def test_fixtures_are_deterministic():
    a, b = tiny_checkpoint("gemma-3-270m")[0], tiny_checkpoint("gemma-3-270m")[0]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
