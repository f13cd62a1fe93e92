"""The shipped model: a small GPT-2-architecture LM trained on a corpus this module generates.

The corpus has three parts:

- IOI sentences with the answer, in both name orders, over name pairs *except* a held-out set that
  never occurs together in any training IOI sentence. Their shapes are composed at random (opener ×
  activity × transfer verb × article, ~1,100 shapes, plus `prompts.TEMPLATES`), never the held-out
  template, and some are preceded by a filler sentence. With a dozen fixed templates the model learned
  template-specific shortcuts (31%, then 60% accuracy on the held-out template); with composed shapes
  and names at varying positions, only the general rule fits;
- sentences about pizza (the experiments' pizza sentence among them);
- filler sentences from a small grammar over the same names, places and objects, so that it is a
  language model and every word of the held-out template is known.

Evaluation: IOI accuracy and mean logit difference on prompts built only from held-out pairs, half in a
template never seen in training; loss on held-out filler sentences beside a unigram baseline.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from tl_patching.metrics import logit_diff, summarize
from tl_patching.prompts import (
    HELD_OUT_TEMPLATES,
    NAMES,
    PIZZA_SENTENCES,
    PLACES,
    TEMPLATES,
    IOIPrompt,
    ioi_prompts,
)
from tl_patching.recipe.word_tokenizer import word_tokenizer

# The objects and texts the shipped model was trained on. prompts.OBJECTS had "apple" then, and the templates' "a" was
# written as it is ("gave a apple"); prompts now says "an apple" and has "pizza" instead (the shipped vocabulary has no
# " an"). Kept here so that this recipe still makes the model that ships.
TRAINED_OBJECTS = ("gift", "book", "ring", "drink", "apple", "ball", "letter", "key", "bag", "flower")


@dataclass(frozen=True)
class TrainedPrompt(IOIPrompt):
    """An IOI prompt as the shipped model's corpus has it: the template's article as written."""

    @property
    def text(self) -> str:
        return self.filled()


def trained_prompts(n: int, seed: int, templates, pairs) -> list[TrainedPrompt]:
    return [
        TrainedPrompt(**asdict(p))
        for p in ioi_prompts(n, seed=seed, templates=templates, pairs=pairs, objects=TRAINED_OBJECTS)
    ]


ADJECTIVES = ("old", "new", "big", "small", "quiet", "long", "hot", "sweet", "red", "happy")
VERBS = ("liked", "found", "saw", "took", "threw", "had", "sent", "read", "passed", "handed")
FILLER = (
    "{N} {V} the {ADJ} {OBJ} in the {PLACE}.",
    "The {PLACE} was {ADJ}, and {N} was sitting in it.",
    "While {N} was sitting in the {PLACE}, it was {ADJ}.",
    "{N} and the {ADJ} {OBJ} were in the {PLACE}.",
    "Then, {N} had a long day at the {PLACE}.",
    "After the {PLACE}, {N} {V} a {OBJ}.",
    "When it was {ADJ}, {N} went to the {PLACE}.",
    "{N} threw a {ADJ} {OBJ} in the {PLACE}, and {N2} saw it.",
    "{N} said that the {OBJ} was {ADJ}.",
    "The {ADJ} {OBJ} is in the {PLACE}, and {N} {V} it.",
    "{N} walked to the {PLACE} with a {OBJ}.",
    "Were {N} and {N2} at the {PLACE}? {N} said that they were.",
)


OPENERS = (
    ("", ". "),
    ("Then, ", ". "),
    ("Later, ", ". "),
    ("When ", ", "),
    ("After ", ", "),
    ("While ", ", "),
    ("Once ", ", "),
    ("Yesterday ", ". "),
)  # (opener, what separates the second clause)
ACTIVITIES = (
    "went to the",
    "walked to the",
    "were at the",
    "arrived at the",
    "were sitting in the",
    "had a long day at the",
    "met at the",
    "were working at the",
    "stayed in the",
)
TRANSFERS = ("gave", "handed", "passed", "sent", "threw", "showed", "brought")


def composed_templates() -> list[str]:
    """Every IOI sentence shape of the training grammar plus `prompts.TEMPLATES`, minus the held-out template."""
    shapes = {
        f"{opener}{{A}} and {{B}} {activity} {{PLACE}}{sep}{{S}} {verb} {article} {{OBJECT}} to"
        for opener, sep in OPENERS
        for activity in ACTIVITIES
        for verb in TRANSFERS
        for article in ("a", "the")
    }
    shapes = sorted(shapes | set(TEMPLATES))
    return [t for t in shapes if t not in HELD_OUT_TEMPLATES]


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    n_layers: int = 4
    n_heads: int = 4
    d_model: int = 128
    n_ctx: int = 48
    prefix_fraction: float = 0.3  # IOI sentences preceded by a filler sentence: names at varying positions
    n_ioi: int = 60_000
    n_pizza: int = 3_000
    n_filler: int = 40_000
    n_held_out_pairs: int = 120
    steps: int = 4_000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05


@dataclass
class Corpus:
    train: list[str]
    held_out_pairs: list[tuple[str, str]]
    held_out_filler: list[str]


def held_out_pairs(n: int, seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train pairs, held-out pairs) of distinct names; every name keeps training pairs."""
    rng = random.Random(seed)
    pairs = list(itertools.combinations(NAMES, 2))
    rng.shuffle(pairs)
    held = pairs[:n]
    train = pairs[n:]
    assert {x for p in train for x in p} == set(NAMES)
    return train, held


def filler_sentences(n: int, rng: random.Random) -> list[str]:
    out = []
    for _ in range(n):
        n1, n2 = rng.sample(NAMES, 2)
        out.append(
            rng.choice(FILLER).format(
                N=n1,
                N2=n2,
                V=rng.choice(VERBS),
                ADJ=rng.choice(ADJECTIVES),
                OBJ=rng.choice(TRAINED_OBJECTS),
                PLACE=rng.choice(PLACES),
            )
        )
    return out


def shuffled(items: list, rng: random.Random) -> list:
    items = list(items)
    rng.shuffle(items)
    return items


def make_corpus(cfg: TrainConfig) -> Corpus:
    rng = random.Random(cfg.seed)
    train_pairs, held = held_out_pairs(cfg.n_held_out_pairs, cfg.seed)
    ioi = [
        (filler_sentences(1, rng)[0] + " " if rng.random() < cfg.prefix_fraction else "") + p.text + " " + p.io + "."
        for p in trained_prompts(cfg.n_ioi, cfg.seed, shuffled(composed_templates(), rng), train_pairs)
    ]
    pizza = [rng.choice(PIZZA_SENTENCES) for _ in range(cfg.n_pizza)]
    train = ioi + pizza + filler_sentences(cfg.n_filler, rng)
    rng.shuffle(train)
    return Corpus(train, held, filler_sentences(500, random.Random(cfg.seed + 1)))


def eval_prompts(held: list[tuple[str, str]], n: int = 200, seed: int = 1) -> list[TrainedPrompt]:
    """``n`` prompts from held-out pairs only: half in the held-out template, half in training templates."""
    return trained_prompts(n // 2, seed, HELD_OUT_TEMPLATES, held) + trained_prompts(
        n - n // 2, seed + 1, TEMPLATES, held
    )


def encode(tokenizer: PreTrainedTokenizerFast, texts: list[str], n_ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BOS + sentence, right-padded: (ids ``[n, n_ctx]``, mask of real tokens)."""
    ids = torch.full((len(texts), n_ctx), tokenizer.bos_token_id, dtype=torch.long)
    mask = torch.zeros((len(texts), n_ctx), dtype=torch.bool)
    for i, text in enumerate(texts):
        row = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False).input_ids
        if len(row) > n_ctx:
            raise ValueError(f"sentence longer than n_ctx={n_ctx}: {text!r}")
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = True
    return ids, mask


def masked_loss(model: GPT2LMHeadModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logits = model(ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    )
    target_mask = mask[:, 1:].reshape(-1).float()
    return (nll * target_mask).sum() / target_mask.sum()


def evaluate(model: GPT2LMHeadModel, tokenizer, corpus: Corpus, train_ids: torch.Tensor, n_ctx: int) -> dict:
    """IOI on held-out pairs (accuracy, mean logit diff) and held-out filler loss vs a unigram baseline."""
    model.eval()
    prompts = eval_prompts(corpus.held_out_pairs)
    results = {}
    with torch.no_grad():
        for name, group in (("held_out_template", prompts[:100]), ("train_templates", prompts[100:]), ("all", prompts)):
            diffs = []
            for p in group:
                ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(p.text, add_special_tokens=False).input_ids])
                io, s = (tokenizer(" " + x, add_special_tokens=False).input_ids for x in (p.io, p.s))
                assert len(io) == len(s) == 1 and tokenizer.unk_token_id not in ids
                diffs.append(logit_diff(model(ids).logits, torch.tensor(io), torch.tensor(s)))
            summary = summarize(torch.cat(diffs))
            results[f"ioi_{name}"] = {
                "accuracy": summary.accuracy,
                "mean_logit_diff": summary.mean,
                "ci95": [summary.ci_low, summary.ci_high],
                "n": summary.n,
            }
        ids, mask = encode(tokenizer, corpus.held_out_filler, n_ctx)
        counts = torch.bincount(
            train_ids[:, 1:][train_ids[:, 1:] != tokenizer.bos_token_id], minlength=len(tokenizer)
        ).double()
        unigram = (counts + 1) / (counts + 1).sum()
        targets = ids[:, 1:][mask[:, 1:]]
        results["held_out_filler_loss"] = float(masked_loss(model, ids, mask))
        results["unigram_baseline_loss"] = float(-unigram.log()[targets].mean())
    return results


def train(cfg: TrainConfig, out_dir: Path, log=print) -> dict:
    """Train, evaluate and save in HF format (config.json, model.safetensors, tokenizer files, training.json)."""
    torch.manual_seed(cfg.seed)
    corpus = make_corpus(cfg)
    eval_texts = [p.text for p in eval_prompts(corpus.held_out_pairs)]
    tokenizer = word_tokenizer(corpus.train + eval_texts + [" " + n for n in NAMES])
    ids, mask = encode(tokenizer, corpus.train, cfg.n_ctx)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.n_ctx,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    warmup = cfg.steps // 20
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps))
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    model.train()
    for step in range(cfg.steps):
        batch = torch.randint(0, len(ids), (cfg.batch_size,), generator=generator)
        loss = masked_loss(model, ids[batch], mask[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 500 == 0 or step == cfg.steps - 1:
            log(f"step {step:5d}  loss {loss.item():.3f}  {time.perf_counter() - start:.0f}s")
    results = evaluate(model, tokenizer, corpus, ids, cfg.n_ctx)
    results.update(
        train_seconds=round(time.perf_counter() - start, 1),
        config=asdict(cfg),
        held_out_pairs=[list(p) for p in corpus.held_out_pairs],
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "training.json").write_text(json.dumps(results, indent=1))
    return results
