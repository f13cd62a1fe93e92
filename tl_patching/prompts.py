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
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from dataclasses import replace as dataclass_replace

import torch
from jaxtyping import Int
from torch import Tensor

from tl_patching.lens import HookedTransformer

NAMES = (
    "Sam",
    "Sally",
    "Mary",
    "John",
    "Tom",
    "James",
    "Dan",
    "Amy",
    "Anna",
    "Kate",
    "Mike",
    "Paul",
    "Lisa",
    "Mark",
    "Adam",
    "Alex",
    "Alice",
    "Andrew",
    "Arthur",
    "Brian",
    "Charles",
    "Daniel",
    "David",
    "Edward",
    "Emily",
    "Eric",
    "Frank",
    "George",
    "Henry",
    "Jack",
    "Jane",
    "Jason",
    "Kevin",
    "Laura",
    "Lewis",
    "Luke",
    "Martin",
    "Max",
    "Peter",
    "Rachel",
    "Robert",
    "Rose",
    "Ryan",
    "Sarah",
    "Simon",
    "Thomas",
)
PLACES = (
    "park",
    "store",
    "school",
    "station",
    "garden",
    "office",
    "restaurant",
    "hospital",
    "beach",
    "library",
    "market",
    "museum",
)
# "pizza" took the place of "apple" (in the shipped model's training objects, `tl_patching.recipe.training`): with its
# article fixed, "an apple" needs " an", a word the shipped model's vocabulary does not have.
OBJECTS = ("gift", "book", "ring", "drink", "pizza", "ball", "letter", "key", "bag", "flower")

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

# Seed 001's IOI pair: the IOI experiments' data when asked for one prompt.
SEED_RECIPIENT = "Sam and Sally went to the park. Sam gave a gift to"
SEED_DONOR = "Sam and Sally went to the park. Sally gave a gift to"

# Seed 002's "humorous sentence about pizza", and more like it; the first is the cosine-similarity default.
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
        """The template filled in, its "a" before the object made "an" when the object starts with a vowel letter
        ("gave an apple", never "gave a apple")."""
        return (
            re.sub(rf"\b([Aa]) (?={re.escape(self.obj)}\b)", r"\1n ", self.filled())
            if _vowel(self.obj)
            else self.filled()
        )

    def filled(self) -> str:
        """The template filled in, its words as written."""
        a, b = (self.io, self.s) if self.order == "ABBA" else (self.s, self.io)
        return self.template.format(A=a, B=b, S=self.s, PLACE=self.place, OBJECT=self.obj)

    def donor(self) -> IOIPrompt:
        """Same first clause, the other name repeated: the answer flips, the token length does not."""
        return dataclass_replace(self, io=self.s, s=self.io, order="BABA" if self.order == "ABBA" else "ABBA")


def _vowel(word: str) -> bool:
    return word[:1].lower() in ("a", "e", "i", "o", "u")


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
        prompts.append(
            IOIPrompt(
                templates[(i // 2) % len(templates)],
                io=io,
                s=s,
                place=rng.choice(places),
                obj=rng.choice(objects),
                order="ABBA" if i % 2 == 0 else "BABA",  # each template in both orders
            )
        )
    return prompts


def token_strings(model: HookedTransformer, ids: Tensor | Sequence[int]) -> list[str]:
    """Each token id as its text (TL's ``to_str_tokens`` fails on tokenizers whose path contains "gemma")."""
    ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    return [model.tokenizer.decode([i]) for i in ids]


def adds_start_token(tokenizer) -> bool:
    """The model's own convention: whether its tokenizer starts an encoded text with its start (BOS) token
    (Llama, Mistral, Gemma, SmolLM2's GGUF: yes; GPT-2, Pythia, Qwen: no)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a")["input_ids"]
    return with_special[:1] == [bos] and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos]


def start_token_setting(model: HookedTransformer, prepend_bos: bool | None) -> bool:
    """``prepend_bos`` as given, or the model's own convention when None: ``cfg.default_prepend_bos``, which
    `tl_patching.models.hooked_from_hf` sets to what the model's tokenizer does (`adds_start_token`)."""
    return bool(model.cfg.default_prepend_bos) if prepend_bos is None else bool(prepend_bos)


def _unknown_words(tokenizer, text: str, ids: list[int], offsets: list[tuple[int, int]]) -> list[str]:
    """The pieces of ``text`` the tokenizer mapped to its unknown token. A piece that *is* the token's own text is
    not unknown: GPT-2's and Pythia's unknown token is also their start and end token, ``<|endoftext|>``."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return []
    return [
        text[a:b].strip() for i, (a, b) in zip(ids, offsets) if i == unk and text[a:b].strip() != tokenizer.unk_token
    ]


def _normalised(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split())


def _first_word_lost(text: str, decoded: str) -> str:
    """The first word of ``text`` that ``decoded`` does not give back."""
    given, back = _normalised(text).split(), _normalised(decoded).split()
    for i, word in enumerate(given):
        if i >= len(back) or back[i] != word:
            return word
    return given[-1] if given else text


def to_tokens(model: HookedTransformer, text: str, prepend_bos: bool | None = None) -> Int[Tensor, "1 pos"]:
    """``text`` as ``[1, pos]`` token ids, with the start token if ``prepend_bos`` (None: the model's own
    convention, `adds_start_token`), or `PromptError` for an empty text, words the tokenizer does not know (it
    would map them to its unknown token), a text it cannot give back (decoding the ids, up to whitespace, is
    not the text: the model would see other words), and a text longer than the model's context (never
    truncated). Special tokens the toolkit adds are never taken for words of the text."""
    if not text or not text.strip():
        raise PromptError("empty text: give at least one word")
    tokenizer = model.tokenizer
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    unknown = _unknown_words(tokenizer, text, ids, encoded["offset_mapping"])
    if unknown:
        raise PromptError(
            f"the tokenizer of {model.cfg.model_name} does not know {', '.join(repr(w) for w in unknown)}: "
            "they would all become its unknown token"
        )
    decoded = tokenizer.decode(ids)
    if _normalised(decoded) != _normalised(text):
        raise PromptError(
            f"the tokenizer of {model.cfg.model_name} cannot give this text back: {_first_word_lost(text, decoded)!r} "
            f"is lost (the ids decode to {decoded!r}), so the model would see other words"
        )
    if start_token_setting(model, prepend_bos):
        if tokenizer.bos_token_id is None:
            raise PromptError(f"the tokenizer of {model.cfg.model_name} has no start token: use prepend_bos=False")
        ids = [tokenizer.bos_token_id] + ids
    if len(ids) > model.cfg.n_ctx:
        raise PromptError(f"the text is {len(ids)} tokens, longer than the model's context of {model.cfg.n_ctx}")
    return torch.tensor([ids], dtype=torch.long)


def answer_token(model: HookedTransformer, prompt: str, word: str) -> int:
    """The token id of ``word`` said right after ``prompt`` (e.g. ``" Sally"`` after "… gave a gift to"), or
    `PromptError` unless it is exactly one token there. Read in context, so it is the id the model predicts
    whatever the tokenizer does with a word alone (sentencepiece tokenizers add a space before a text's first
    word)."""
    if not word[:1].isspace() and not prompt[-1:].isspace():
        # "…gave a gift toSally" may well be one token more, but not the one the model predicts for the name.
        try:
            spaced = answer_token(model, prompt, " " + word)
        except PromptError:
            spaced = None
        if spaced is not None:
            raise PromptError(
                f"{word!r} has no leading space: after {prompt[-20:]!r} the tokenizer reads {' ' + word!r}, "
                f"token {spaced} {token_strings(model, [spaced])}; pass {' ' + word!r}"
            )
    before = to_tokens(model, prompt, prepend_bos=False)[0].tolist()
    after = to_tokens(model, prompt + word, prepend_bos=False)[0].tolist()
    if after[: len(before)] == before and len(after) == len(before) + 1:
        return after[-1]
    extra = after[len(before) :] if after[: len(before)] == before else after
    raise PromptError(
        f"{word!r} after the prompt is {len(extra)} tokens {token_strings(model, extra)}, not one; "
        "logit differences need single-token answers (with their leading space)"
    )


def single_token(model: HookedTransformer, word: str) -> int:
    """Token id of ``word`` (e.g. ``" Sally"``) on its own, or `PromptError` if it is not exactly one known token."""
    ids = to_tokens(model, word, prepend_bos=False)[0]
    if len(ids) != 1:
        raise PromptError(
            f"{word!r} is {len(ids)} tokens {token_strings(model, ids)}, not one; "
            "logit differences need single-token names (with their leading space)"
        )
    return int(ids[0])


@dataclass
class IOIBatch:
    """Recipient and donor prompts of one token length, with the answer token ids.

    ``tokens``/``donor_tokens``: ``[batch, pos]``; ``correct``/``wrong``: ``[batch]`` ids of the recipient's
    answer (IO) and of the repeated name (S). ``prepend_bos`` says whether the start token leads.
    """

    tokens: Int[Tensor, "batch pos"]
    donor_tokens: Int[Tensor, "batch pos"]
    correct: Int[Tensor, " batch"]
    wrong: Int[Tensor, " batch"]
    texts: list[str] = field(default_factory=list)
    donor_texts: list[str] = field(default_factory=list)
    prepend_bos: bool = False

    def __len__(self) -> int:
        return len(self.correct)


def run_info(forward, batches: Sequence[IOIBatch], **settings):
    """The `tl_patching.results.RunInfo` of a run over IOI ``batches``: every prompt's token ids, the start-token
    choice, the number of prompts and the first ten texts."""
    from tl_patching.results import RunInfo

    return RunInfo.of(
        forward,
        token_rows(batches),
        batches[0].prepend_bos,
        n_prompts=sum(len(b) for b in batches),
        **settings,
        texts=[t for b in batches for t in b.texts][:10],
    )


def token_rows(batches: Sequence[IOIBatch]) -> list[list[int]]:
    """Every recipient prompt's token ids, batch after batch (rows may differ in length)."""
    return [row for b in batches for row in b.tokens.tolist()]


def ioi_pair(
    model: HookedTransformer, recipient: str, donor: str, correct: str, wrong: str, prepend_bos: bool | None = None
) -> IOIBatch:
    """A checked one-prompt batch from explicit text, e.g. the seed's ``ioi_pair(model,
    "Sam and Sally went to the park. Sam gave a gift to", "… Sally gave a gift to", " Sally", " Sam")``."""
    if not recipient.strip() or not donor.strip():
        raise PromptError("empty prompt")
    correct_id, wrong_id = answer_token(model, recipient, correct), answer_token(model, recipient, wrong)
    if correct_id == wrong_id:
        raise PromptError(f"correct and wrong answers are the same token {correct!r}")
    prepend_bos = start_token_setting(model, prepend_bos)
    tokens = to_tokens(model, recipient, prepend_bos=prepend_bos)
    donor_tokens = to_tokens(model, donor, prepend_bos=prepend_bos)
    if tokens.shape != donor_tokens.shape:
        raise PromptError(
            f"recipient is {tokens.shape[1]} tokens and donor {donor_tokens.shape[1]}: patching position by "
            f"position needs equal lengths ({token_strings(model, tokens[0])} vs "
            f"{token_strings(model, donor_tokens[0])})"
        )
    return IOIBatch(
        tokens, donor_tokens, torch.tensor([correct_id]), torch.tensor([wrong_id]), [recipient], [donor], prepend_bos
    )


def ioi_batches(
    model: HookedTransformer, prompts: Iterable[IOIPrompt], prepend_bos: bool | None = None
) -> list[IOIBatch]:
    """Tokenise prompts and their donors, every pair checked, grouped into one batch per token length."""
    prepend_bos = start_token_setting(model, prepend_bos)
    groups: dict[int, list[IOIBatch]] = defaultdict(list)
    for p in prompts:
        d = p.donor()
        pair = ioi_pair(model, p.text, d.text, " " + p.io, " " + p.s, prepend_bos)
        groups[pair.tokens.shape[1]].append(pair)
    return [
        IOIBatch(
            torch.cat([b.tokens for b in group]),
            torch.cat([b.donor_tokens for b in group]),
            torch.cat([b.correct for b in group]),
            torch.cat([b.wrong for b in group]),
            [t for b in group for t in b.texts],
            [t for b in group for t in b.donor_texts],
            prepend_bos,
        )
        for _, group in sorted(groups.items())
    ]


def ioi_dataset(model: HookedTransformer, n_prompts: int, seed: int = 0) -> list[IOIBatch]:
    """The IOI experiments' dataset: ``n_prompts`` seeded prompts over every template (the held-out one included), one
    batch per length."""
    return ioi_batches(model, ioi_prompts(n_prompts, seed=seed, templates=TEMPLATES + HELD_OUT_TEMPLATES))


def seed_pair(model: HookedTransformer) -> IOIBatch:
    """Seed 001's pair: "Sam and Sally went to the park. Sam gave a gift to" → " Sally", its donor → " Sam"."""
    return ioi_pair(model, SEED_RECIPIENT, SEED_DONOR, " Sally", " Sam")
