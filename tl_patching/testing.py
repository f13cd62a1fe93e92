"""Test models shaped like real checkpoints: for your own tests, and ours.

Bugs hide in the conventions fixtures invent. A real GPT-2's tokenizer uses one token, ``<|endoftext|>``,
as its start, end *and* unknown token; Qwen2.5's has no start token and no unknown token; Llama 3's adds a
start token in its post-processor, Mistral's and Gemma's through ``add_bos_token``; Qwen's model vocabulary
is larger than its tokenizer's; Gemma 3 divides its hidden size unevenly between heads (``head_dim`` ≠
``hidden_size / num_attention_heads``). A fixture that shares one invented tokenizer and config across
families sees none of this.

`tiny_checkpoint(name)` builds a tiny random model of a real checkpoint (`CHECKPOINTS`): its ``config.json``
is the checkpoint's published config (``tl_patching/assets/checkpoints/<name>/``, with its source) with only
the widths, the depth and the vocabulary shrunk — grouped-query ratios, ``head_dim`` ≠ ``hidden/heads``,
rope settings, soft-caps, windows, tied or untied embeddings and every other field kept; its tokenizer has
the checkpoint's tokenizer class, pipeline (byte-level BPE, or sentencepiece-style BPE with byte fallback)
and special tokens (strings, roles, whether the start token is added), with a small vocabulary trained here
on the toolkit's sentences (every IOI name a single token, with and without its leading space).
`save_tiny_checkpoint(name, directory)` writes it as an HF-format directory that ``--model DIR`` loads.

`random_pair(family)` is the quicker fixture, with the invented conventions warned of above: a tiny random
model of a family (a key of `tl_patching.families.FAMILIES`) from a small invented config (`random_config`),
every other field at the HF config class's default; `random_gpt2` is its GPT-2 shorthand. Each comes as (HF
model, `HookedTransformer` with the same weights, probe-checked).

Weights are drawn the same way in both (every parameter with std 0.2, norm weights around 1), so heads
differ and weight processing is not the identity. Deterministic: same name and seed, same bytes.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from tl_patching.lens import HookedTransformer
    from tl_patching.provenance import WeightMode

CHECKPOINTS_DIR = Path(__file__).parent / "assets" / "checkpoints"


@dataclass(frozen=True)
class Checkpoint:
    """A real checkpoint, as far as a tiny copy of it needs: where its config lies, its tokenizer's conventions,
    and the tiny sizes that keep its proportions (grouped-query ratio, head_dim against hidden size)."""

    name: str  # folder under tl_patching/assets/checkpoints
    hub_name: str
    tokenizer_class: str  # as tokenizer_config.json names it (GPT-2's names none: its class by model_type)
    style: str  # "byte-level" (GPT-2 BPE) or "sentencepiece" (Metaspace BPE with byte fallback)
    special: dict[str, str | None]  # bos / eos / unk / pad strings, None where the checkpoint has none
    extra_special: tuple[str, ...] = ()  # other special tokens the vocabulary holds (Pythia's <|padding|>, …)
    specials_first: bool = False  # special tokens at the start of the vocabulary (else after the learned pieces)
    adds_bos: bool = False  # tokenizer(text) starts with the start token
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: no grouped-query attention (n_key_value_heads = n_heads, or absent)
    padded_vocab: bool = False  # the model's vocab_size is the tokenizer's rounded up (Pythia, Qwen)
    notes: tuple[str, ...] = field(default=())


_EOT = "<|endoftext|>"
CHECKPOINTS: dict[str, Checkpoint] = {
    c.name: c
    for c in (
        Checkpoint(
            "gpt2", "openai-community/gpt2", "GPT2Tokenizer", "byte-level", dict(bos=_EOT, eos=_EOT, unk=_EOT, pad=None)
        ),
        Checkpoint(
            "pythia-160m",
            "EleutherAI/pythia-160m",
            "GPTNeoXTokenizer",
            "byte-level",
            dict(bos=_EOT, eos=_EOT, unk=_EOT, pad=None),
            extra_special=("<|padding|>",),
            specials_first=True,
            padded_vocab=True,
        ),
        Checkpoint(
            "llama-3.2-1b",
            "meta-llama/Llama-3.2-1B",
            "PreTrainedTokenizerFast",
            "byte-level",
            dict(bos="<|begin_of_text|>", eos="<|end_of_text|>", unk=None, pad=None),
            extra_special=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
            adds_bos=True,
            n_kv_heads=1,
        ),
        Checkpoint(
            "mistral-7b-v0.1",
            "mistralai/Mistral-7B-v0.1",
            "LlamaTokenizer",
            "sentencepiece",
            dict(bos="<s>", eos="</s>", unk="<unk>", pad=None),
            specials_first=True,
            adds_bos=True,
            n_kv_heads=1,
        ),
        Checkpoint(
            "qwen2.5-0.5b",
            "Qwen/Qwen2.5-0.5B",
            "Qwen2Tokenizer",
            "byte-level",
            dict(bos=None, eos=_EOT, unk=None, pad=_EOT),
            extra_special=("<|im_start|>", "<|im_end|>"),
            n_heads=7,
            n_kv_heads=1,
            padded_vocab=True,
        ),
        Checkpoint(
            "qwen3-0.6b",
            "Qwen/Qwen3-0.6B",
            "Qwen2Tokenizer",
            "byte-level",
            dict(bos=None, eos="<|im_end|>", unk=None, pad=_EOT),
            extra_special=("<|im_start|>",),
            n_kv_heads=2,
            padded_vocab=True,
        ),
        Checkpoint(
            "gemma-2-2b",
            "google/gemma-2-2b",
            "GemmaTokenizer",
            "sentencepiece",
            dict(bos="<bos>", eos="<eos>", unk="<unk>", pad="<pad>"),
            extra_special=("<mask>",),
            specials_first=True,
            adds_bos=True,
            n_kv_heads=2,
        ),
        Checkpoint(
            "gemma-3-270m",
            "google/gemma-3-270m",
            "GemmaTokenizer",
            "sentencepiece",
            dict(bos="<bos>", eos="<eos>", unk="<unk>", pad="<pad>"),
            extra_special=("<mask>",),
            specials_first=True,
            adds_bos=True,
            n_kv_heads=1,
        ),
    )
}

TINY = dict(n_layers=2, d_head=8, vocab_size=1000)


def real_config(name: str) -> dict:
    """The published ``config.json`` of checkpoint ``name``, as collected (see its ``SOURCE.md``)."""
    return json.loads((CHECKPOINTS_DIR / name / "config.json").read_text())


def tiny_config(name: str, vocab_size: int, n_layers: int = TINY["n_layers"], d_head: int = TINY["d_head"]) -> dict:
    """The real config with only widths, depth and vocabulary shrunk (every other field kept, ids remapped to the
    tiny tokenizer's by the caller)."""
    c = real_config(name)
    ck = CHECKPOINTS[name]
    out = dict(c)
    heads_key = "n_head" if "n_head" in c else "num_attention_heads"
    real_heads = c[heads_key]
    hidden_key = "n_embd" if "n_embd" in c else "hidden_size"
    real_hidden = c[hidden_key]
    real_d_head = c.get("head_dim") or real_hidden // real_heads
    # Keep how the hidden size relates to the heads (Gemma 2: 2304 = 1.125 · 8 · 256; Qwen3: 1024 = 0.5 · 16 · 128).
    hidden = 2 * round(real_hidden / (real_heads * real_d_head) * ck.n_heads * d_head / 2)
    out[heads_key] = ck.n_heads
    out[hidden_key] = hidden
    if "head_dim" in c:
        out["head_dim"] = d_head
    if "num_key_value_heads" in c:
        out["num_key_value_heads"] = ck.n_kv_heads or ck.n_heads
    for key in ("n_inner", "intermediate_size"):
        if c.get(key):
            out[key] = 2 * round(c[key] / real_hidden * hidden / 2)
    layers_key = "n_layer" if "n_layer" in c else "num_hidden_layers"
    out[layers_key] = n_layers
    if c.get("layer_types"):  # keep both kinds of layer: the last sliding one and the first full one
        kinds = c["layer_types"]
        out["layer_types"] = (
            [kinds[kinds.index("full_attention") - 1], "full_attention"][-n_layers:]
            if n_layers == 2
            else (kinds * n_layers)[:n_layers]
        )
    if "max_window_layers" in c:
        out["max_window_layers"] = min(c["max_window_layers"], n_layers)
    out["vocab_size"] = vocab_size
    return out


# ---- the tokenizer ------------------------------------------------------------------------------------------


def training_corpus() -> list[str]:
    """Every sentence the toolkit's experiments use, and each IOI name many times with and without a leading
    space, so the trained vocabulary makes each of them one token."""
    import inspect

    from tl_patching.experiments import keys, load
    from tl_patching.prompts import (
        HELD_OUT_TEMPLATES,
        NAMES,
        OBJECTS,
        PIZZA_SENTENCES,
        PLACES,
        SEED_DONOR,
        SEED_RECIPIENT,
        TEMPLATES,
        ioi_prompts,
    )

    names = [" ".join(NAMES), " ".join(f"{n}." for n in NAMES), " ".join(f"{n} and {n}" for n in NAMES)] * 40
    words = [" ".join(PLACES), " ".join(OBJECTS)] * 20
    defaults = [inspect.signature(e.run).parameters["text"].default for e in map(load, keys()) if e.inputs == "text"]
    texts = [*defaults, SEED_RECIPIENT, SEED_DONOR, *PIZZA_SENTENCES] * 20
    ioi = [p.text + " " + p.io for p in ioi_prompts(600, templates=TEMPLATES + HELD_OUT_TEMPLATES)]
    return names + words + texts + ioi


@cache
def _trained(style: str, vocab_size: int, prefix_space: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(learned pieces in id order, merges) of a BPE trained on `training_corpus` in the pipeline of ``style``;
    ``prefix_space``: sentencepiece-style tokenizers that write a space before the first word (Llama, Mistral; not
    Gemma)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if style == "byte-level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # words split at spaces, a space written ▁ and kept with the word after it (sentencepiece's pieces)
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first" if prefix_space else "never", split=True
        )
        alphabet = []
    tok.train_from_iterator(
        training_corpus(), trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False)
    )
    model = json.loads(tok.to_str())["model"]
    pieces = tuple(sorted(model["vocab"], key=model["vocab"].get))
    merges = tuple(" ".join(m) if isinstance(m, list) else m for m in model["merges"])
    return pieces, merges


def _vocabulary(ck: Checkpoint, pieces: tuple[str, ...]) -> dict[str, int]:
    specials = list(dict.fromkeys(t for t in (*ck.special.values(), *ck.extra_special) if t))
    if ck.name.startswith("gemma"):  # Gemma's fixed order: <pad> 0, <eos> 1, <bos> 2, <unk> 3, <mask> 4
        specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    elif ck.style == "sentencepiece":  # Llama/Mistral: <unk> 0, <s> 1, </s> 2
        specials = [ck.special["unk"], ck.special["bos"], ck.special["eos"]]
    bytes_ = [f"<0x{b:02X}>" for b in range(256)] if ck.style == "sentencepiece" else []  # byte fallback
    learned = [p for p in pieces if p not in specials]
    ordered = specials + bytes_ + learned if ck.specials_first else bytes_ + learned + specials
    return {token: i for i, token in enumerate(ordered)}


def tiny_tokenizer(name: str, vocab_size: int = TINY["vocab_size"]):
    """The tokenizer of checkpoint ``name`` with a small trained vocabulary (see the module docstring)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    ck = CHECKPOINTS[name]
    pieces, merges = _trained(ck.style, vocab_size, not ck.name.startswith("gemma"))
    vocab = _vocabulary(ck, pieces)
    special = {f"{k}_token": v for k, v in ck.special.items()}
    extra = [t for t in ck.extra_special if t not in ck.special.values()]
    if ck.tokenizer_class == "PreTrainedTokenizerFast":  # Llama 3: byte-level BPE, start token in the post-processor
        core = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], ignore_merges=True))
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        bos = ck.special["bos"]
        core.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
        tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core, **special)
    else:
        cls = getattr(transformers, ck.tokenizer_class)
        kwargs = dict(special)
        if ck.style == "sentencepiece":
            kwargs["add_bos_token"] = ck.adds_bos
        tokenizer = cls(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], **kwargs)
    tokenizer.add_special_tokens({"additional_special_tokens": extra} if extra else {})
    if len(tokenizer) != len(vocab):
        raise AssertionError(f"{name}: tokenizer has {len(tokenizer)} tokens, vocabulary {len(vocab)}")
    return tokenizer


# ---- the model ----------------------------------------------------------------------------------------------


def tiny_checkpoint(name: str, seed: int = 0, weight_std: float = 0.2, n_layers: int = TINY["n_layers"]):
    """(HF model in eval mode with eager attention, tokenizer) of a tiny random copy of checkpoint ``name``, and
    the config dict its ``config.json`` holds."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    from tl_patching.families import family_of

    tokenizer = tiny_tokenizer(name)
    n_tokens = len(tokenizer)
    vocab_size = -(-n_tokens // 64) * 64 if CHECKPOINTS[name].padded_vocab else n_tokens
    fields = tiny_config(name, vocab_size, n_layers=n_layers)
    for role in ("bos", "eos", "pad"):  # the ids follow the tokens into the tiny vocabulary
        key = f"{role}_token_id"
        if fields.get(key) is not None:
            token = CHECKPOINTS[name].special[role] or CHECKPOINTS[name].special["eos"]
            fields[key] = tokenizer.convert_tokens_to_ids(token)
    config = CONFIG_MAPPING[fields["model_type"]].from_dict(copy.deepcopy(fields))  # HF edits nested dicts in place
    family = family_of(config)
    generator = torch.Generator().manual_seed(seed)
    # float32 whatever the config's dtype says (bfloat16 / float16 on most real checkpoints), as load_hf loads them.
    hf_model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        for pname, param in hf_model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * weight_std
            is_norm_weight = ("norm" in pname or ".ln_" in pname) and pname.endswith("weight")
            param.copy_(1.0 + noise if is_norm_weight and not family.norm_weight_is_offset else noise)
    return hf_model, tokenizer, fields


def save_tiny_checkpoint(name: str, directory: str | Path, seed: int = 0) -> Path:
    """Write `tiny_checkpoint` ``name`` as an HF-format directory (config.json as the real checkpoint writes it,
    model.safetensors, tokenizer files); returns the directory."""
    directory = Path(directory)
    hf_model, tokenizer, fields = tiny_checkpoint(name, seed=seed)
    hf_model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    # The real files' fields, not transformers' rewrite of them (which names its own classes).
    (directory / "config.json").write_text(json.dumps(fields, indent=2) + "\n")
    tokenizer_config = directory / "tokenizer_config.json"
    written = json.loads(tokenizer_config.read_text())
    if name == "gpt2":  # GPT-2 publishes only this: the rest comes from GPT2Tokenizer's defaults
        written = {"model_max_length": 1024}
    else:
        written["tokenizer_class"] = CHECKPOINTS[name].tokenizer_class
    tokenizer_config.write_text(json.dumps(written, indent=2) + "\n")
    return directory


def tiny_pair(name: str, seed: int = 0, weights: str = "raw"):
    """(HF model, TransformerLens model with the same weights, probe-checked) of `tiny_checkpoint` ``name``."""
    from tl_patching.models import hooked_from_hf

    hf_model, tokenizer, _ = tiny_checkpoint(name, seed=seed)
    return hf_model, hooked_from_hf(hf_model, tokenizer, weights=weights, name=f"tiny-{name}")


def checkpoint_of_family(family: str) -> str:
    """The real checkpoint that stands for ``family`` (a key of `tl_patching.families.FAMILIES`) in the tests."""
    from types import SimpleNamespace

    from tl_patching.families import family_of

    for name in CHECKPOINTS:
        if family_of(SimpleNamespace(**real_config(name))).name == family:
            return name
    raise KeyError(f"no checkpoint of family {family!r}")


# ---- tiny random models of a family -------------------------------------------------------------------------
# One function per family: (n_layers, n_heads, n_kv_heads, d_head, d_vocab, n_ctx, d_mlp, window) -> HF config
# kwargs: the family's shape at test size, plus what a test model should exercise (NeoX's partial rotary, windows,
# Gemma's soft caps and attention scale).


def _tiny_gpt2(n_layers, n_heads, n_kv_heads, d_head, d_vocab, n_ctx, d_mlp, window):
    return dict(
        vocab_size=d_vocab,
        n_positions=n_ctx,
        n_embd=n_heads * d_head,
        n_layer=n_layers,
        n_head=n_heads,
        n_inner=d_mlp,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )


def _tiny_neox(n_layers, n_heads, n_kv_heads, d_head, d_vocab, n_ctx, d_mlp, window):
    return dict(
        vocab_size=d_vocab,
        max_position_embeddings=n_ctx,
        hidden_size=n_heads * d_head,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        intermediate_size=d_mlp or 4 * n_heads * d_head,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5),
        use_parallel_residual=True,
        bos_token_id=0,
        eos_token_id=0,
    )


def _tiny_rms(n_layers, n_heads, n_kv_heads, d_head, d_vocab, n_ctx, d_mlp, window, **extra):
    return dict(
        vocab_size=d_vocab,
        max_position_embeddings=n_ctx,
        hidden_size=n_heads * d_head,
        head_dim=d_head,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        intermediate_size=d_mlp or 3 * n_heads * d_head,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        **extra,
    )


def _tiny_llama(*args):
    return _tiny_rms(*args, rope_parameters=dict(rope_type="default", rope_theta=10000.0))


def _tiny_mistral(*args):
    return _tiny_rms(*args, sliding_window=args[-1], rope_parameters=dict(rope_type="default", rope_theta=10000.0))


def _tiny_qwen(*args):
    # The window applies only with use_sliding_window=True (then on layers >= max_window_layers).
    return _tiny_rms(*args, sliding_window=args[-1], rope_parameters=dict(rope_type="default", rope_theta=1000000.0))


def _tiny_gemma2(*args):
    n_layers, d_head, window = args[0], args[3], args[-1]
    # Soft caps low enough to bind on a random model, query_pre_attn_scalar ≠ d_head so the scale is tested.
    return _tiny_rms(
        *args,
        sliding_window=window,
        query_pre_attn_scalar=d_head + 4,
        attn_logit_softcapping=3.0,
        final_logit_softcapping=4.0,
        hidden_activation="gelu_pytorch_tanh",
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)],
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
    )


def _tiny_gemma3(*args):
    n_layers, d_head, window = args[0], args[3], args[-1]
    return _tiny_rms(
        *args,
        sliding_window=window,
        query_pre_attn_scalar=d_head + 4,
        hidden_activation="gelu_pytorch_tanh",
        layer_types=["full_attention" if i % 2 else "sliding_attention" for i in range(n_layers)],
        rope_parameters={
            "sliding_attention": dict(rope_type="default", rope_theta=10000.0),
            "full_attention": dict(rope_type="default", rope_theta=1000000.0),
        },
    )


RANDOM_CONFIGS = {
    "gpt2": _tiny_gpt2,
    "neox": _tiny_neox,
    "llama": _tiny_llama,
    "mistral": _tiny_mistral,
    "qwen2": _tiny_qwen,
    "qwen3": _tiny_qwen,
    "gemma2": _tiny_gemma2,
    "gemma3": _tiny_gemma3,
}


def random_config(
    family: str,
    n_layers: int = 2,
    n_heads: int = 4,
    d_head: int = 8,
    n_kv_heads: int | None = None,
    d_vocab: int = 64,
    n_ctx: int = 64,
    d_mlp: int | None = None,
    sliding_window: int = 4,
    **config_overrides,
) -> PretrainedConfig:
    """The tiny HF config of ``family`` (a key of `tl_patching.families.FAMILIES`) that `random_pair` builds its
    model from, with the same arguments. ``config_overrides`` are HF config fields."""
    from transformers import CONFIG_MAPPING

    from tl_patching.families import FAMILIES

    fam = FAMILIES[family]
    if n_kv_heads is None:
        n_kv_heads = n_heads if family in ("gpt2", "neox") else max(1, n_heads // 2)
    kwargs = RANDOM_CONFIGS[family](n_layers, n_heads, n_kv_heads, d_head, d_vocab, n_ctx, d_mlp, sliding_window)
    kwargs.update(config_overrides)
    return CONFIG_MAPPING[fam.model_type](**kwargs)


def random_pair(
    family: str,
    n_layers: int = 2,
    n_heads: int = 4,
    d_head: int = 8,
    n_kv_heads: int | None = None,
    d_vocab: int = 64,
    n_ctx: int = 64,
    d_mlp: int | None = None,
    sliding_window: int = 4,
    seed: int = 0,
    weight_std: float = 0.2,
    tokenizer: PreTrainedTokenizerBase | None = None,
    weights: WeightMode = "raw",
    **config_overrides,
) -> tuple[PreTrainedModel, HookedTransformer]:
    """A tiny randomly initialised HF model of ``family`` (a key of `FAMILIES`) and the same weights in a
    `HookedTransformer`, verified against each other.

    ``n_kv_heads`` defaults to n_heads // 2 (grouped-query attention) on the families that have it.
    Sliding-window layers (Mistral, Gemma 2/3) get a window of ``sliding_window`` positions, shorter
    than a test sequence. Unlike HF's init (std 0.02, norms at identity) every parameter is drawn with
    ``weight_std`` and norm weights around 1 (Gemma: its offset w in (1 + w) around 0), so heads differ
    and weight processing is non-trivial. ``config_overrides`` go to the HF config class.
    """
    from transformers import AutoModelForCausalLM

    from tl_patching.families import FAMILIES
    from tl_patching.models import hooked_from_hf

    fam = FAMILIES[family]
    if tokenizer is not None:
        d_vocab = len(tokenizer)
    config = random_config(
        family,
        n_layers=n_layers,
        n_heads=n_heads,
        d_head=d_head,
        n_kv_heads=n_kv_heads,
        d_vocab=d_vocab,
        n_ctx=n_ctx,
        d_mlp=d_mlp,
        sliding_window=sliding_window,
        **config_overrides,
    )
    config._attn_implementation = "eager"
    generator = torch.Generator().manual_seed(seed)
    hf_model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * weight_std
            is_norm_weight = ("norm" in name or ".ln_" in name) and name.endswith("weight")
            param.copy_(1.0 + noise if is_norm_weight and not fam.norm_weight_is_offset else noise)
    name = f"random-{family}-L{n_layers}H{n_heads}"
    return hf_model, hooked_from_hf(hf_model, tokenizer, weights=weights, name=name)


def random_gpt2(
    n_layers: int = 3,
    n_heads: int = 4,
    d_head: int = 8,
    d_vocab: int = 64,
    n_ctx: int = 64,
    d_mlp: int | None = None,
    seed: int = 0,
    weight_std: float = 0.2,
    tokenizer: PreTrainedTokenizerBase | None = None,
    weights: WeightMode = "raw",
) -> tuple[PreTrainedModel, HookedTransformer]:
    """A randomly initialised GPT-2 as (HF model, `HookedTransformer` with the very same weights)."""
    return random_pair(
        "gpt2",
        n_layers=n_layers,
        n_heads=n_heads,
        d_head=d_head,
        d_vocab=d_vocab,
        n_ctx=n_ctx,
        d_mlp=d_mlp,
        seed=seed,
        weight_std=weight_std,
        tokenizer=tokenizer,
        weights=weights,
    )


# Config fields shrunk wherever a config class has them (names differ per family); every other field keeps the
# class's default, which is the family's reference checkpoint in transformers.
TINY_DEFAULTS = {
    "hidden_size": 64,
    "n_embd": 64,
    "d_model": 64,
    "dim": 64,
    "intermediate_size": 128,
    "ffn_dim": 128,
    "n_inner": 128,
    "ffn_hidden_size": 128,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 64,
    "num_hidden_layers": 2,
    "n_layer": 2,
    "num_layers": 2,
    "n_layers": 2,
    "num_attention_heads": 4,
    "n_head": 4,
    "n_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 128,
    "max_position_embeddings": 128,
    "n_positions": 128,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "sliding_window": 4,
    "rotary_dim": 8,
    "pad_token_id": 0,  # the defaults' special-token ids lie past the tiny vocabulary
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def tiny_from_config_class(architecture: str):
    """A tiny random HF model of ``architecture`` (an HF class name) from its config class's defaults — the
    family's reference checkpoint in transformers — with the `TINY_DEFAULTS` fields shrunk: 2 layers, width 64.
    For architectures without a hand-kept fixture (`tiny_config`); seeded."""
    import transformers

    cls = getattr(transformers, architecture)
    default = cls.config_class()
    derived = {k for k, v in vars(type(default)).items() if isinstance(v, property) and v.fset is None}
    fields = {k: v for k, v in TINY_DEFAULTS.items() if hasattr(default, k) and k not in derived}
    config = cls.config_class(**fields)
    if getattr(config, "layer_types", None):  # keep the class's pattern of sliding and full layers, cut to depth
        config.layer_types = list(config.layer_types)[: config.num_hidden_layers]
    with torch.random.fork_rng():  # HF initialises from the global generator: seed it without touching the caller's
        torch.manual_seed(0)
        return cls(config).eval()
