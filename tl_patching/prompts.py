"""IOI prompts: templates, name pools, recipient/donor pairs, and their tokenisation with checks.

An IOI prompt names two people, then repeats one (the subject S) and ends where the other (the
indirect object IO) is the answer: "Sam and Sally went to the park. Sam gave a gift to" → " Sally".
Its donor is the same sentence with the *other* name repeated ("… Sally gave a gift to" → " Sam"):
same tokens but one, opposite answer. ABBA / BABA is the order of the names in the first clause
relative to the repeated one.

Every pair is checked: both names single tokens (with their leading space), donor and recipient
of equal token length. Prompts of different lengths are batched per length.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer

NAMES = (
    "Sam", "Sally", "Mary", "John", "Tom", "James", "Dan", "Amy", "Anna", "Kate", "Mike", "Paul", "Lisa", "Mark",
    "Adam", "Alex", "Alice", "Andrew", "Arthur", "Brian", "Charles", "Daniel", "David", "Edward", "Emily", "Eric",
    "Frank", "George", "Henry", "Jack", "Jane", "Jason", "Kevin", "Laura", "Lewis", "Luke", "Martin", "Max",
    "Peter", "Rachel", "Robert", "Rose", "Ryan", "Sarah", "Simon", "Thomas",
)
PLACES = ("park", "store", "school", "station", "garden", "office", "restaurant", "hospital", "beach", "library", "market", "museum")
OBJECTS = ("gift", "book", "ring", "drink", "apple", "ball", "letter", "key", "bag", "flower")

# {A} and {B} are the two names in first-clause order; {S} is the repeated name.
TEMPLATES = (
    "{A} and {B} went to the {PLACE}. {S} gave a {OBJECT} to",
    "{A} and {B} walked to the {PLACE}. {S} gave the {OBJECT} to",
    "{A} and {B} were at the {PLACE}. {S} handed a {OBJECT} to",
    "{A} and {B} arrived at the {PLACE}. {S} passed the {OBJECT} to",
    "After {A} and {B} went to the {PLACE}, {S} gave a {OBJECT} to",
    "When {A} and {B} were in the {PLACE}, {S} passed a {OBJECT} to",
    "Then, {A} and {B} had a long day at the {PLACE}. {S} sent a {OBJECT} to",
    "{A} and {B} were sitting in the {PLACE}. {S} threw the {OBJECT} to",
    "While {A} and {B} were at the {PLACE}, {S} handed a {OBJECT} to",
    "When {A} and {B} arrived at the {PLACE}, {S} threw a {OBJECT} to",
    "{A} and {B} had a long day. {S} sent the {OBJECT} to",
    "After {A} and {B} walked to the {PLACE}, {S} sent a {OBJECT} to",
)
# Never used to train the shipped model: tests that it does IOI, not one memorised sentence shape.
HELD_OUT_TEMPLATES = ("While {A} and {B} were sitting in the {PLACE}, {S} threw a {OBJECT} to",)

# E3's sentences (the seed's "humorous sentence about pizza"); the first is E3's default.
PIZZA_SENTENCE = "I think that pineapple on pizza is a crime, but my friends love it."
PIZZA_SENTENCES = (
    PIZZA_SENTENCE,
    "My friends think that pizza with pineapple is the best food in the world.",
    "I love pizza with cheese, but I think that pineapple is a crime.",
    "The pizza at the restaurant was hot, and my friends ate it in the park.",
    "Pineapple on pizza is sweet, but cheese on pizza is the best.",
    "Is pineapple on pizza a crime? My friends love it, but I think it is not food.",
)


class PromptError(ValueError):
    """A prompt pair that cannot be used: a name that is not one token, unequal lengths, empty text."""


@dataclass(frozen=True)
class IOIPrompt:
    """One IOI prompt. ``io`` is the correct answer, ``s`` the repeated subject (names without the space)."""

    template: str
    io: str
    s: str
    place: str = "park"
    obj: str = "gift"
    order: str = "ABBA"  # ABBA: IO first in the first clause; BABA: S first

    @property
    def text(self) -> str:
        a, b = (self.io, self.s) if self.order == "ABBA" else (self.s, self.io)
        return self.template.format(A=a, B=b, S=self.s, PLACE=self.place, OBJECT=self.obj)

    def donor(self) -> IOIPrompt:
        """Same first clause, the other name repeated: the answer flips, the token length does not."""
        order = "BABA" if self.order == "ABBA" else "ABBA"
        return IOIPrompt(self.template, io=self.s, s=self.io, place=self.place, obj=self.obj, order=order)


def ioi_prompts(
    n: int,
    seed: int = 0,
    templates: Sequence[str] = TEMPLATES,
    names: Sequence[str] = NAMES,
    pairs: Sequence[tuple[str, str]] | None = None,
    places: Sequence[str] = PLACES,
    objects: Sequence[str] = OBJECTS,
) -> list[IOIPrompt]:
    """``n`` prompts, half ABBA and half BABA, templates cycled, names drawn (from ``pairs`` if given), seeded."""
    if n < 1:
        raise ValueError("n must be at least 1")
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        io, s = rng.choice(pairs) if pairs else rng.sample(list(names), 2)
        if pairs and rng.random() < 0.5:
            io, s = s, io
        prompts.append(IOIPrompt(
            templates[(i // 2) % len(templates)], io=io, s=s, place=rng.choice(places), obj=rng.choice(objects),
            order="ABBA" if i % 2 == 0 else "BABA",  # each template in both orders
        ))
    return prompts


def token_strings(model: HookedTransformer, ids: Tensor | Sequence[int]) -> list[str]:
    """Each token id as its text (TL's ``to_str_tokens`` fails on tokenizers whose path contains "gemma")."""
    ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    return [model.tokenizer.decode([i]) for i in ids]


def _unknown_words(model: HookedTransformer, text: str, ids: Tensor) -> list[str]:
    """The pieces of ``text`` that the tokenizer mapped to its unknown token."""
    tokenizer = model.tokenizer
    unk = tokenizer.unk_token_id
    if unk is None or not bool((ids == unk).any()):
        return []
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [text[a:b].strip() for i, (a, b) in zip(encoded["input_ids"], encoded["offset_mapping"]) if i == unk] or ["?"]


def to_tokens(model: HookedTransformer, text: str, prepend_bos: bool = True) -> Int[Tensor, "1 pos"]:
    """``text`` as ``[1, pos]`` token ids, or `PromptError` for an empty text, words the tokenizer does not know
    (it would map them to its unknown token) and a text longer than the model's context (never truncated)."""
    if not text or not text.strip():
        raise PromptError("empty text: give at least one word")
    ids = model.to_tokens(text, prepend_bos=prepend_bos, truncate=False)
    unknown = _unknown_words(model, text, ids)
    if unknown:
        raise PromptError(f"the tokenizer of {model.cfg.model_name} does not know {', '.join(repr(w) for w in unknown)}: "
                          "they would all become its unknown token")
    if ids.shape[1] > model.cfg.n_ctx:
        raise PromptError(f"the text is {ids.shape[1]} tokens, longer than the model's context of {model.cfg.n_ctx}")
    return ids


def single_token(model: HookedTransformer, word: str) -> int:
    """Token id of ``word`` (e.g. ``" Sally"``), or `PromptError` if it is not exactly one known token."""
    ids = to_tokens(model, word, prepend_bos=False)[0]
    if len(ids) != 1:
        raise PromptError(f"{word!r} is {len(ids)} tokens {token_strings(model, ids)}, not one; "
                          "logit differences need single-token names (with their leading space)")
    return int(ids[0])


@dataclass
class IOIBatch:
    """Recipient and donor prompts of one token length, with the answer token ids.

    ``tokens``/``donor_tokens``: ``[batch, pos]``; ``correct``/``wrong``: ``[batch]`` ids of the recipient's
    answer (IO) and of the repeated name (S). ``prepend_bos`` says whether ``<|endoftext|>`` leads.
    """

    tokens: Int[Tensor, "batch pos"]
    donor_tokens: Int[Tensor, "batch pos"]
    correct: Int[Tensor, " batch"]
    wrong: Int[Tensor, " batch"]
    texts: list[str] = field(default_factory=list)
    donor_texts: list[str] = field(default_factory=list)
    prepend_bos: bool = True

    def __len__(self) -> int:
        return len(self.correct)


def token_rows(batches: Sequence[IOIBatch]) -> list[list[int]]:
    """Every recipient prompt's token ids, batch after batch (rows may differ in length)."""
    return [row for b in batches for row in b.tokens.tolist()]


def ioi_pair(
    model: HookedTransformer, recipient: str, donor: str, correct: str, wrong: str, prepend_bos: bool = True
) -> IOIBatch:
    """A checked one-prompt batch from explicit text, e.g. the seed's
    ``ioi_pair(model, "Sam and Sally went to the park. Sam gave a gift to", "… Sally gave a gift to", " Sally", " Sam")``."""
    if not recipient.strip() or not donor.strip():
        raise PromptError("empty prompt")
    correct_id, wrong_id = single_token(model, correct), single_token(model, wrong)
    if correct_id == wrong_id:
        raise PromptError(f"correct and wrong answers are the same token {correct!r}")
    tokens = to_tokens(model, recipient, prepend_bos=prepend_bos)
    donor_tokens = to_tokens(model, donor, prepend_bos=prepend_bos)
    if tokens.shape != donor_tokens.shape:
        raise PromptError(
            f"recipient is {tokens.shape[1]} tokens and donor {donor_tokens.shape[1]}: patching position by "
            f"position needs equal lengths ({token_strings(model, tokens[0])} vs {token_strings(model, donor_tokens[0])})"
        )
    return IOIBatch(tokens, donor_tokens, torch.tensor([correct_id]), torch.tensor([wrong_id]), [recipient], [donor], prepend_bos)


def ioi_batches(model: HookedTransformer, prompts: Iterable[IOIPrompt], prepend_bos: bool = True) -> list[IOIBatch]:
    """Tokenise prompts and their donors, every pair checked, grouped into one batch per token length."""
    groups: dict[int, list[IOIBatch]] = defaultdict(list)
    for p in prompts:
        d = p.donor()
        pair = ioi_pair(model, p.text, d.text, " " + p.io, " " + p.s, prepend_bos)
        groups[pair.tokens.shape[1]].append(pair)
    return [
        IOIBatch(
            torch.cat([b.tokens for b in group]), torch.cat([b.donor_tokens for b in group]),
            torch.cat([b.correct for b in group]), torch.cat([b.wrong for b in group]),
            [t for b in group for t in b.texts], [t for b in group for t in b.donor_texts], prepend_bos,
        )
        for _, group in sorted(groups.items())
    ]


def ioi_dataset(model: HookedTransformer, n_prompts: int, seed: int = 0) -> list[IOIBatch]:
    """E4/E5's dataset: ``n_prompts`` seeded prompts over every template (the held-out one included), one batch per length."""
    return ioi_batches(model, ioi_prompts(n_prompts, seed=seed, templates=TEMPLATES + HELD_OUT_TEMPLATES))
