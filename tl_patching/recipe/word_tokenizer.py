"""A GPT-2-style word-level tokenizer: GPT-2's byte-level pre-tokenizer, one token per word.

Words keep their leading space as GPT-2's do (" Sally" is the single token ``"ĠSally"``), so every
piece of code that works with the real GPT-2 tokenizer works unchanged. Unlike GPT-2's, it starts every
encoded text with ``<|endoftext|>`` (its post-processor adds it, as Llama 3's does): the shipped model was
trained on that start token followed by the sentence, so that is its convention. It saves as an ordinary
``tokenizer.json`` that ``AutoTokenizer.from_pretrained(directory)`` loads with no network.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

BOS = "<|endoftext|>"
UNK = "<unk>"


def pre_tokens(texts: Iterable[str]) -> list[str]:
    """The distinct byte-level pre-tokens of ``texts`` in first-seen order (``" Sally" -> "ĠSally"``)."""
    splitter = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    seen: dict[str, None] = {}
    for text in texts:
        for token, _ in splitter.pre_tokenize_str(text):
            seen.setdefault(token, None)
    return list(seen)


def word_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A tokenizer whose vocabulary is ``<|endoftext|>``, ``<unk>`` and every word (with and without a leading space) in
    ``texts``."""
    words = pre_tokens(texts)
    spaced = pre_tokens(" " + w.lstrip("Ġ") for w in words)
    bare = pre_tokens(w.lstrip("Ġ") for w in words)
    vocab = {BOS: 0, UNK: 1}
    for token in words + spaced + bare:
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=BOS, unk_token=UNK, pad_token=BOS)
