"""The main job's ``index.html``: a short report of what was run and what it found.

Sections: the model (a model card: the shipped model's from its config and training record, any other
model's from its config), the data each experiment ran on, then per experiment one paragraph of findings
with their numbers and labelled intervals, the seed's claim beside it (agrees / partly / differs, and why),
the figures at full width, and an overall conclusion. Built only from the ``eN_result.json`` files in the
output folder, so it can be rebuilt without rerunning anything::

    python -m tl_patching.report figures/shipped

The page holds nothing that changes between identical runs (no timings, no dates), so a rerun leaves a
clean checkout. Nothing here imports torch at import time.
"""

from __future__ import annotations

import html
import json
import math
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tl_patching.experiments import STEPS as EXPERIMENTS  # light: imports no torch

SHIPPED_DIR = Path(__file__).parent / "assets" / "ioi-gpt2"
SHIPPED_NAME = "shipped"
HEADINGS = {
    "e1": "E1 — raw attention scores per head and their distribution per layer",
    "e2": "E2 — editing a key, MLP neurons and a block's output",
    "e3": "E3 — silencing one head: cosine similarity between token vectors",
    "e4": "E4 — IOI: patching all heads of a layer vs the hidden state",
    "e5": "E5 — IOI: one head at the final position",
    "circuit": "The IOI circuit — exact path patching from the answer back",
}
SEEDS = {  # the seed report each experiment redoes, and the model it used
    "e1": ("seed 003", "GPT-2 small"), "e2": ("seed 004", "GPT-2 small"), "e3": ("seed 002", "GPT-2 medium"),
    "e4": ("seed 001", "GPT-2 small and medium"), "e5": ("seed 000", "GPT-2 large"), "circuit": ("seed 000", "GPT-2 large"),
}
CI = "95% bootstrap CI"
BACKENDS = {"tl": "TransformerLens", "hf": "raw HuggingFace"}


# ---------------------------------------------------------------------------------------------- words


def listing(items: list[Any], none: str = "none") -> str:
    """``[2, 3] -> "2 and 3"``, ``[0, 1, 2] -> "0, 1 and 2"``, ``[] -> none``: never a raw ``[]``."""
    items = [str(i) for i in items]
    if not items:
        return none
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def at_layers(layers: list[int]) -> str:
    """``"at layer 2"``, ``"at layers 2 and 3"``, ``"at no layer"``."""
    if not layers:
        return "at no layer"
    return f"at layer{'s' if len(layers) > 1 else ''} {listing(layers)}"


def with_ci(summary, unit: str = " nats", brackets: bool = True) -> str:
    """``9.41 nats (95% bootstrap CI [8.91, 9.92])``, or with ``brackets=False`` (inside parentheses)
    ``9.41 nats, 95% bootstrap CI [8.91, 9.92]``; a single prompt has no interval."""
    if summary.n < 2:
        return f"{summary.mean:.2f}{unit}" + (" (one prompt, no interval)" if brackets else ", one prompt, no interval")
    interval = f"{CI} [{summary.ci_low:.2f}, {summary.ci_high:.2f}]"
    return f"{summary.mean:.2f}{unit} ({interval})" if brackets else f"{summary.mean:.2f}{unit}, {interval}"


def ratio_text(x: float) -> str:
    """A probability ratio readable at any size: 0.37, 12, 1.2 × 10⁴."""
    if 0.01 <= x < 1000:
        return f"{x:.3g}"
    exponent = math.floor(math.log10(x))
    return f"{x / 10**exponent:.1f} × 10^{exponent}"


@dataclass
class Claim:
    seed_says: str
    verdict: str  # "agrees", "partly" or "differs" (or "not tested")
    because: str


# ------------------------------------------------------------------------------------------ model card


def _safetensors_parameters(path: Path) -> int | None:
    """Parameter count from a safetensors header (no tensors read)."""
    try:
        with open(path, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    except (OSError, ValueError, struct.error):
        return None
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def _first(config: dict, *keys: str) -> Any:
    """The first of ``keys`` the config sets: families name the same quantity differently."""
    return next((config[k] for k in keys if config.get(k) is not None), None)


def _hf_config_rows(config: dict, parameters: int | None) -> list[tuple[str, str]]:
    layers, heads = _first(config, "n_layer", "num_hidden_layers"), _first(config, "n_head", "num_attention_heads")
    d_model = _first(config, "n_embd", "hidden_size")
    d_mlp = config.get("n_inner") or config.get("intermediate_size") or (4 * d_model if d_model else None)
    # Qwen3 and Gemma set head_dim apart from d_model / n_heads; Gemma's MLP reads hidden_activation, not hidden_act.
    d_head = config.get("head_dim") or (d_model // heads if d_model and heads else "?")
    activation = _first(config, "activation_function", "hidden_activation", "hidden_act") or "?"
    rows = [
        ("architecture", f"{', '.join(config.get('architectures') or []) or config.get('model_type', '?')} "
                         f"({config.get('model_type', '?')}, activation {activation})"),
        ("layers × heads", f"{layers} × {heads} (d_head {d_head})"),
        ("d_model / d_mlp", f"{d_model} / {d_mlp}"),
        ("vocabulary", f"{config.get('vocab_size')} tokens"),
        ("context", f"{config.get('n_positions', config.get('max_position_embeddings'))} tokens"),
    ]
    if parameters:
        rows.append(("parameters", f"{parameters:,} ({parameters / 1e6:.2f} M)"))
    return rows


def shipped_model_card() -> list[tuple[str, str]]:
    """(field, value) rows for the shipped model, read from its config.json, tokenizer.json and training.json."""
    config = json.loads((SHIPPED_DIR / "config.json").read_text())
    training = json.loads((SHIPPED_DIR / "training.json").read_text())
    tokenizer = json.loads((SHIPPED_DIR / "tokenizer.json").read_text())
    t = training["config"]
    rows = _hf_config_rows(config, _safetensors_parameters(SHIPPED_DIR / "model.safetensors"))
    vocab = len(tokenizer["model"]["vocab"])
    rows[3] = ("vocabulary", f"{vocab} {tokenizer['model']['type']} tokens: one per word (with and without a leading space, as "
                             f"GPT-2 writes \" Sally\"), plus <|endoftext|> (BOS) and <unk>; any other word becomes <unk>")
    held_out, train = training["ioi_held_out_template"], training["ioi_train_templates"]
    rows += [
        ("trained on", f"a generated corpus: {t['n_ioi']:,} IOI sentences with their answer (both name orders, "
                       f"{t['prefix_fraction']:.0%} preceded by a filler sentence), {t['n_pizza']:,} sentences about pizza (E3's text "
                       f"among them) and {t['n_filler']:,} filler sentences over the same names, places and objects; "
                       f"{t['n_held_out_pairs']} name pairs and one IOI template are never used in training"),
        ("training", f"{t['steps']:,} steps of {t['batch_size']} sequences, AdamW (lr {t['lr']:g}, weight decay {t['weight_decay']:g}), "
                     f"seed {t['seed']}, {training['train_seconds'] / 60:.0f} min on CPU (tl_patching/training.py)"),
        ("IOI, held-out names", f"held-out template: accuracy {held_out['accuracy']:.0%}, mean logit difference "
                                f"{held_out['mean_logit_diff']:.2f} nats ({CI} [{held_out['ci95'][0]:.2f}, {held_out['ci95'][1]:.2f}], "
                                f"{held_out['n']} prompts); training templates: {train['accuracy']:.0%}, {train['mean_logit_diff']:.2f} nats "
                                f"({CI} [{train['ci95'][0]:.2f}, {train['ci95'][1]:.2f}], {train['n']} prompts)"),
        ("language modelling", f"held-out filler sentences: {training['held_out_filler_loss']:.2f} nats/token "
                               f"(unigram baseline {training['unigram_baseline_loss']:.2f})"),
        ("not for", "conclusions about GPT-2: it is a 4-layer model of a tiny synthetic language, so it has one job (IOI) and "
                    "few heads to do it with; run the experiments with --model gpt2… to test the seeds' claims on GPT-2 itself"),
    ]
    return rows


def model_card(model_name: str, info=None, model=None) -> list[tuple[str, str]]:
    """The shipped model's card; for another model what its config says (a loaded ``model``'s cfg, a directory's
    config.json) or, failing both, the depth and width recorded in the results."""
    if str(model_name) == SHIPPED_NAME:
        return shipped_model_card()
    directory = Path(str(model_name))
    if (directory / "config.json").is_file():
        return _hf_config_rows(json.loads((directory / "config.json").read_text()),
                               _safetensors_parameters(directory / "model.safetensors"))
    if model is not None:
        c = model.cfg
        return [("architecture", f"{c.original_architecture or '?'} (activation {c.act_fn})"),
                ("layers × heads", f"{c.n_layers} × {c.n_heads} (d_head {c.d_head})"), ("d_model / d_mlp", f"{c.d_model} / {c.d_mlp}"),
                ("vocabulary", f"{c.d_vocab} tokens"), ("context", f"{c.n_ctx} tokens"),
                ("parameters", f"{sum(p.numel() for p in model.parameters()):,}")]
    if info is not None:
        return [("layers × heads", f"{info.n_layers} × {info.n_heads}")]
    return []


def card_markdown(rows: list[tuple[str, str]]) -> str:
    """The card as a Markdown table (``docs/model_card.md`` holds the shipped model's)."""
    def cell(text: str) -> str:
        text = text.replace("|", "\\|")
        for token in ("<\\|endoftext\\|>", "<unk>"):
            text = text.replace(token, f"`{token}`")
        return text

    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {cell(v)} |" for k, v in rows) + "\n"


# ------------------------------------------------------------------------------------------ findings


def _tokens(info) -> str:
    n = len(info.token_ids[0])  # the ids the model ran on: the start token among them when one was prepended
    return f"{n} tokens, {info.start_token_words()}"


def e1_finding(r) -> tuple[str, list[Claim]]:
    L, H = r.mean_score.shape
    layer_means = r.mean_score.mean(-1)
    lo, hi = int(layer_means.argmin()), int(layer_means.argmax())
    flat = r.mean_score.flatten()
    hmin, hmax = int(flat.argmin()), int(flat.argmax())
    mean, frac = float(r.mean_score.mean()), float(r.frac_negative.mean())
    self_attention = float(r.first_token_self_attention.min())
    text = (f"Over the visible (query, key) pairs of the sentence, the mean raw score {r.score_formula} of all {L * H} heads is "
            f"{mean:.2f}, and {frac:.0%} of the scores are below zero. Layer means run from {float(layer_means[lo]):.2f} "
            f"(layer {lo}) to {float(layer_means[hi]):.2f} (layer {hi}); single heads from {float(flat[hmin]):.2f} (layer {hmin // H}, "
            f"head {hmin % H}) to {float(flat[hmax]):.2f} (layer {hmax // H}, head {hmax % H}). The density plot shows each "
            f"layer's distribution on one scale. The first token attends to itself with probability {self_attention:.4f} in every "
            f"head: the causal mask leaves it nothing else to attend to, so this is true by construction (a check of the hooks, "
            f"not a finding). Scores computed from the split Q and K equal TransformerLens's hook_attn_scores to "
            f"{r.max_diff_split_vs_hook:.1e}.")
    if mean < 0 and frac >= 0.6:
        verdict, because = "agrees", f"the scores are shifted below zero ({frac:.0%} negative)."
    elif mean < 0:
        verdict, because = "partly", (f"the mean is below zero but only slightly: {frac:.0%} of the scores are negative, close to "
                                      "the 50% of a distribution centred on zero.")
    else:
        verdict, because = "differs", f"the scores are not shifted negative (mean {mean:.2f}, {frac:.0%} negative)."
    if verdict != "agrees":
        because += (" Softmax is unchanged when a constant is added to all of one query's scores, so training does not fix "
                    "their overall level; whether it drifts negative depends on the weights and their training"
                    + (", and this model's training is far shorter and on far less varied text than GPT-2's."
                       if r.info.model_name == SHIPPED_NAME else "."))
    return text, [Claim("raw scores over visible positions are shifted strongly negative rather than centred on zero", verdict, because)]


def e2_finding(r) -> tuple[str, list[Claim]]:
    L, l = len(r.clean_resid_std), r.layer
    last = L - 1
    clean = r.clean_resid_std
    sentences, by_factor = [], {}
    for iv in r.interventions:
        at, end = float(iv.resid_std[l] / clean[l]), float(iv.resid_std[last] / clean[last])
        top = (f"the next-token prediction stays {r.clean_top_tokens[0]!r}" if iv.top_tokens[0] == r.clean_top_tokens[0]
               else f"the next-token prediction changes from {r.clean_top_tokens[0]!r} to {iv.top_tokens[0]!r}")
        sentences.append(f"{iv.label[0].upper() + iv.label[1:]}: the spread at layer {l} goes from {float(clean[l]):.2f} to "
                         f"{float(iv.resid_std[l]):.2f} (×{at:.2f}), at the last layer ({last}) from {float(clean[last]):.2f} to "
                         f"{float(iv.resid_std[last]):.2f} (×{end:.2f}); {top} (KL(clean‖edited) = {iv.kl_from_clean:.3f} nats).")
        for factor in (0.1, 10.0):
            if iv.label.endswith(f"× {factor:g}"):
                by_factor[factor] = (at, end)
    text = (f"The spread is the standard deviation of hook_resid_post (over positions and d_model, before the final layer norm) "
            f"per layer; every edit is at layer {l} of {L}. " + " ".join(sentences))
    after = last - l
    where = (f"Here the spread is measured before ln_final; HF's hidden_states[-1], which the seed's hooks may have read, "
             f"is after the final layer norm, which rescales every position to unit variance and so \"compresses\" any spread "
             f"by itself. Only {after} block{'s' if after != 1 else ''} follow{'s' if after == 1 else ''} the edit in this model.")
    claims = []
    if after == 0:
        claims.append(Claim("at ×0.1 the spread collapses at the edited layer and recovers later; at ×10 it explodes and the "
                            "last layer compresses it", "not tested", "the edit is at the last layer: nothing follows it."))
        return text, claims
    if 0.1 in by_factor:
        at, end = by_factor[0.1]
        recovers = abs(math.log(end)) < 0.5 * abs(math.log(at))
        claims.append(Claim("at ×0.1 the spread collapses at the edited layer and recovers later",
                            "agrees" if recovers else "differs",
                            f"it falls to ×{at:.2f} of clean at layer {l} and is at ×{end:.2f} by the last layer"
                            + (" — much closer to clean." if recovers else f" — no recovery. {where}")))
    if 10.0 in by_factor:
        at, end = by_factor[10.0]
        compresses = abs(math.log(end)) < 0.5 * abs(math.log(at))
        claims.append(Claim("at ×10 the spread explodes and the last layer compresses it",
                            "agrees" if compresses else "partly",
                            f"it rises to ×{at:.1f} of clean at layer {l} and is still ×{end:.1f} at the last layer"
                            + (". " if compresses else ": it explodes, but is not compressed. ") + where))
    return text, claims


def e3_finding(r) -> tuple[str, list[Claim]]:
    L = len(r.clean_pairs)
    clean, silenced = r.clean_pairs.mean(1), r.silenced_pairs.mean(1)
    m = round((1 + math.sqrt(1 + 8 * r.n_pairs)) / 2)
    lo = int(clean.argmin())
    sig = [l for l, s in enumerate(r.significant) if s]
    diff = silenced - clean
    big = int(diff.abs().argmax())
    alpha = r.info.settings.get("alpha", 0.05)  # E3's family-wise level (a run option)
    text = (f"On the sentence ({m} tokens) every pair of token vectors is compared: M(M−1)/2 = {r.n_pairs} pairs for M = {m} "
            f"tokens. The clean mean cosine similarity is {float(clean[0]):.2f} at layer 0, lowest ({float(clean[lo]):.2f}) at "
            f"layer {lo}, and {float(clean[-1]):.2f} at the last layer ({L - 1}). Silencing head {r.head} of layer {r.layer} "
            f"changes the mean similarity by at most {float(diff[big]):+.3f} (layer {big}); a paired t-test over the same pairs, "
            f"significant below the Bonferroni threshold {alpha:g}/{L} = {r.threshold:.4g}, finds a difference {at_layers(sig)}"
            + (f" and none {at_layers([l for l in range(L) if l not in sig])}" if sig and len(sig) < L else "") + ".")
    falls = float(clean[: max(1, L // 2) + 1].min()) < float(clean[0]) - 0.02
    rises = float(clean[-1]) - float(clean.min()) > 0.1
    shape_verdict = "agrees" if falls and rises else "partly" if falls or rises else "differs"
    claims = [Claim("similarity falls in early layers and rises toward 1 late", shape_verdict,
                    f"here it {'falls' if falls else 'does not fall'} early and {'rises' if rises else 'does not rise again'} late "
                    f"({float(clean[0]):.2f} → {float(clean.min()):.2f} → {float(clean[-1]):.2f})."
                    + ("" if rises or L >= 24 else f" The seed's rise was over the last layers of a 24-layer model; this one "
                                                    f"has {L} layers in all, so it has no such late stretch."))]
    at_silenced, at_end = r.layer in sig, (L - 1) in sig
    ripple = (not at_silenced) and at_end
    why = [f"significant {at_layers(sig)}"]
    if at_silenced:
        why.append(f"hook_resid_post of layer {r.layer} already contains the head's output, so silencing it shows at once"
                   + (f"; with {r.info.n_heads} heads per layer one head is a large share of that layer's attention "
                      "(GPT-2 medium: 1 of 16)" if r.info.n_heads < 16 else ""))
    if not at_end:
        why.append("the effect fades before the last layer instead of spreading"
                   + (f"; with {L} layers there is little depth to ripple through" if L < 24 else ""))
    claims.append(Claim("silencing differs little at the silenced layer and consistently in the last layers (a ripple effect)",
                        "agrees" if ripple else "partly" if at_end or not at_silenced else "differs", "; ".join(why) + "."))
    return text, claims


E4_LABELS = {"heads": "patching all heads of the layer (hook_z, every position)",
             "resid_s2": "patching hook_resid_post at the repeated name (S2)",
             "resid_final": "patching hook_resid_post at the final position"}


def e4_finding(r) -> tuple[str, list[Claim]]:
    c, d = r.clean_summary, r.donor_summary
    n = c.n
    parts = [f"Over {n} IOI prompt{'s' if n != 1 else ''}, the unpatched model prefers the correct name by {with_ci(c)} in "
             f"logit difference, a probability ratio P(correct)/P(wrong) of {ratio_text(math.exp(c.mean))} (exp of the mean, i.e. "
             f"the geometric mean over prompts); {c.accuracy:.0%} of prompts are right. The donor prompts give {with_ci(d)}."]
    flipped = {}
    for key, label in E4_LABELS.items():
        summaries = getattr(r, f"{key}_summary")
        flips = [l for l, s in enumerate(summaries) if s.mean < 0]
        flipped[key] = flips
        if flips:
            worst = min(range(len(summaries)), key=lambda l: summaries[l].mean)
            parts.append(f"{label[0].upper() + label[1:]} flips the mean {at_layers(flips)} (lowest at layer {worst}: "
                         f"{with_ci(summaries[worst], brackets=False)}).")
        else:
            low = min(range(len(summaries)), key=lambda l: summaries[l].mean)
            parts.append(f"{label[0].upper() + label[1:]} flips it at no layer (lowest at layer {low}: {with_ci(summaries[low], brackets=False)}).")
    heads_move = [abs(s.mean - c.mean) for s in r.heads_summary]
    span = abs(c.mean - d.mean) or 1.0
    hidden = sorted(set(flipped["resid_s2"]) | set(flipped["resid_final"]))
    claims = [Claim("patching the hidden state flips the answer at some layers", "agrees" if hidden else "differs",
                    f"hook_resid_post flips the mean {at_layers(hidden)}."
                    + ("" if hidden else " The donor's answer never reaches a single position's hidden state whole."))]
    small = max(heads_move) < 0.25 * span
    big = max(range(len(heads_move)), key=heads_move.__getitem__)
    claims.append(Claim("patching all heads of one layer moves the logit difference only a little", "agrees" if small else "differs",
                        f"the largest move is {heads_move[big]:.2f} nats at layer {big}, {heads_move[big] / span:.0%} of the way from "
                        f"the recipient's to the donor's value."
                        + ("" if small else f" In a {r.info.n_layers}-layer model each layer holds 1/{r.info.n_layers} of all heads "
                                            "(GPT-2 small: 1/12), so one layer's heads can carry a whole step of the task.")))
    return " ".join(parts), claims


def e5_finding(r) -> tuple[str, list[Claim]]:
    m = r.heatmap
    L, H = m.shape
    clean = float(r.clean.mean())
    top, bottom = int(m.argmax()), int(m.argmin())
    n_pos, n_neg = int((m > 0).sum()), int((m < 0).sum())
    quiet = int((m.abs() < 0.01).sum())
    mean_abs = m.abs().mean(-1)
    early, late = float(mean_abs[: L // 2].mean()), float(mean_abs[L // 2:].mean())
    n = len(r.clean)
    text = (f"Patching one head's output at the final position only, mean over {n} prompt{'s' if n != 1 else ''} "
            f"(clean logit difference {clean:.2f} nats): the largest fall is {float(m.min()):+.2f} nats at layer {bottom // H}, "
            f"head {bottom % H} ({abs(float(m.min())) / abs(clean):.0%} of the clean value), the largest rise {float(m.max()):+.2f} "
            f"at layer {top // H}, head {top % H}. {n_pos} of {m.numel()} heads raise the score and {n_neg} lower it"
            + (f"; {quiet} change it by less than 0.01 nats" if quiet else "") + f". The mean |effect| per head is "
            f"{early:.2f} nats in the first half of the layers and {late:.2f} in the second.")
    share = (f"A block computes x_out = x_in + Σ_heads attn_h(x) + MLP(…): one head at one position is a 1/{H} share of one "
             f"term here (GPT-2 large: 1/20), and this model has {L * H} heads in all (GPT-2 large: 720), so each carries far "
             f"more of the task.")
    tiny = abs(float(m.min())) < 0.1 * abs(clean) and abs(float(m.max())) < 0.1 * abs(clean)
    claims = [
        Claim("single-head effects are tiny", "agrees" if tiny else "differs",
              f"the largest is {max(abs(float(m.min())), abs(float(m.max()))):.2f} nats against a clean {clean:.2f}." + ("" if tiny else " " + share)),
        Claim("effects are larger in late layers", "agrees" if late > early else "differs",
              f"mean |effect| {early:.2f} nats in the first half of the layers, {late:.2f} in the second."),
        Claim("some heads raise the score and some lower it", "agrees" if n_pos and n_neg else "differs",
              f"{n_pos} raise it and {n_neg} lower it."),
    ]
    return text, claims


def circuit_finding(r) -> tuple[str, list[Claim]]:
    """The circuit in words: who writes the answer, who steers them and through which input, who those read from."""

    def heads(level: str, tables: dict) -> list[str]:
        out = []
        for l, h in r.heads.get(level, []):
            kind, effect = max(((k, float(t[l, h])) for k, t in tables.items()), key=lambda ke: abs(ke[1]))
            out.append(f"layer {l} head {h} ({effect:+.2f} nats{'' if kind == 'direct' else ' through their ' + kind + ' inputs'})")
        return out

    movers, steering, sources = heads("name mover", {"direct": r.direct}), heads("steering", r.steer), heads("source", r.read)
    cut = r.settings.get("cut_nats", float("nan"))
    text = (f"Exact path patching (every other head frozen at its clean output, MLPs recomputed), mean over {len(r.clean)} "
            f"prompts; clean logit difference {float(r.clean.mean()):.2f} nats, donor {float(r.donor.mean()):.2f}; a head counts "
            f"when its path moves the logit difference by at least {cut:.2f} nats. Heads writing the answer directly "
            f"(to the logits): {listing(movers)}. Heads steering them: {listing(steering)}. Heads those read from: "
            f"{listing(sources)}. {len(r.edges)} edges of at least {r.settings.get('edge_min', 0):.2f} nats are drawn.")
    direct_total = sum(abs(float(r.direct[l, h])) for l, h in r.heads.get("name mover", []))
    claims = [Claim("to get a large effect, find and patch a group of heads with the same function",
                    "agrees" if len(movers) >= 2 else "partly",
                    f"{len(movers)} heads write the answer directly, {direct_total:.2f} nats together against "
                    f"{max((abs(float(x)) for x in r.direct.flatten()), default=0):.2f} for the largest alone; path patching "
                    "then finds which earlier heads feed them.")]
    return text, claims


FINDINGS = {"e1": e1_finding, "e2": e2_finding, "e3": e3_finding, "e4": e4_finding, "e5": e5_finding, "circuit": circuit_finding}


def data_description(key: str, r) -> str:
    info = r.info
    if key in ("e1", "e2", "e3"):
        extra = {"e1": "", "e2": f" Edits at layer {getattr(r, 'layer', '?')} (head {getattr(r, 'head', '?')} for the key).",
                 "e3": f" Silenced: head {getattr(r, 'head', '?')} of layer {getattr(r, 'layer', '?')}."}[key]
        return f"Text: “{info.settings.get('text', '?')}” ({_tokens(info)}).{extra}"
    from tl_patching.prompts import HELD_OUT_TEMPLATES, TEMPLATES

    n = int(info.settings.get("n_prompts", len(r.clean)))
    examples = info.settings.get("texts", [])[:2]
    if n == 1:
        return f"The seed's single prompt pair: “{examples[0] if examples else '?'}” (donor: the other name repeated)."
    return (f"{n} IOI prompts, each with a donor (the same sentence with the other name repeated, so the answer flips and "
            f"the token length does not), half with the names in ABBA order and half BABA, built from the "
            f"{len(TEMPLATES) + len(HELD_OUT_TEMPLATES)} templates in tl_patching.prompts"
            + (" (the last is never used to train the shipped model)" if info.model_name == SHIPPED_NAME else "")
            + f"; e.g. “{'”, “'.join(examples)}”. {info.start_token_words()[0].upper() + info.start_token_words()[1:]}.")


# ------------------------------------------------------------------------------------------------ page


def _load(out_dir: Path, key: str):
    from tl_patching.experiments import (
        e1_attention_scores, e2_activation_editing, e3_cosine_similarity, e4_ioi_patching, e5_head_token_patching,
    )

    from tl_patching.circuit import CircuitResult

    cls = {"e1": e1_attention_scores.E1Result, "e2": e2_activation_editing.E2Result, "e3": e3_cosine_similarity.E3Result,
           "e4": e4_ioi_patching.E4Result, "e5": e5_head_token_patching.E5Result, "circuit": CircuitResult}[key]
    return cls.from_json(out_dir / f"{key}_result.json")


def _figures(files: list[Path]) -> str:
    out = []
    for f in files:
        if f.suffix != ".html":
            continue
        png = f.with_suffix(".png")
        if png in files or png.exists():
            out.append(f'<figure><a href="{f.name}"><img src="{png.name}" alt="{f.stem}"></a>'
                       f'<figcaption><a href="{f.name}">{f.stem}</a> (interactive)</figcaption></figure>')
        else:
            out.append(f'<figure><iframe src="{f.name}" title="{f.stem}"></iframe>'
                       f'<figcaption><a href="{f.name}">{f.stem}</a> (open full page)</figcaption></figure>')
    return "\n".join(out)


STYLE = """body{font-family:system-ui,sans-serif;max-width:1040px;margin:2em auto;padding:0 1em;line-height:1.5;color:#222}
img,iframe{width:100%;max-width:1000px;border:0}iframe{height:640px}figure{margin:1.2em 0}figcaption{font-size:.9em;color:#555}
table{border-collapse:collapse;margin:1em 0}th{white-space:nowrap}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
.agrees{color:#1a7f37}.differs{color:#b3261e}.partly,.not{color:#9a6700}code{background:#f4f4f4;padding:0 .2em}"""


def _claims_table(key: str, claims: list[Claim]) -> str:
    seed, seed_model = SEEDS[key]
    rows = "".join(f'<tr><td>{html.escape(c.seed_says)}</td><td class="{c.verdict.split()[0]}"><b>{c.verdict}</b></td>'
                   f"<td>{html.escape(c.because)}</td></tr>" for c in claims)
    return (f"<p><b>Against the seed</b> ({seed}, {seed_model}):</p><table><tr><th>the seed's claim</th><th>here</th>"
            f"<th>why</th></tr>{rows}</table>")


def _conclusion(model_name: str, found: dict[str, tuple[str, list[Claim]]], results: dict) -> str:
    claims = [c for _, cs in found.values() for c in cs]
    counts = {v: sum(c.verdict == v for c in claims) for v in ("agrees", "partly", "differs", "not tested")}
    points = []
    if "e4" in results:
        r = results["e4"]
        final = [l for l, s in enumerate(r.resid_final_summary) if s.mean < 0]
        if not final:
            points.append("No single layer's hidden state at the final position carries the donor's answer (E4).")
        elif final == list(range(final[0], len(r.resid_final_summary))):  # "from layer l on" only if every later layer flips too
            points.append(f"The answer is carried by the final position's hidden state from layer {final[0]} on: patching it "
                          f"there gives the donor's answer (E4).")
        else:
            points.append(f"The final position's hidden state carries the donor's answer {at_layers(final)}: patching it there "
                          f"gives the donor's answer (E4).")
    if "e5" in results:
        m = results["e5"].heatmap
        H = m.shape[1]
        order = m.flatten().argsort()[:3].tolist()
        points.append("The heads that matter most at the final position are "
                      + listing([f"layer {i // H} head {i % H} ({float(m.flatten()[i]):+.2f} nats)" for i in order if float(m.flatten()[i]) < 0], "none")
                      + " (E5).")
    if "e2" in results:
        r = results["e2"]
        last = len(r.clean_resid_std) - 1
        scaled = [(iv.label.rsplit(" ", 1)[-1], float(iv.resid_std[last] / r.clean_resid_std[last]))
                  for iv in r.interventions if "output ×" in iv.label]
        if scaled and r.layer < last:
            points.append(f"After block {r.layer}'s output is scaled, the spread of the residual stream at the last layer is "
                          + listing([f"×{end:.2f} of clean after ×{factor} ("
                                     + ("partly restored by the later blocks" if abs(math.log(end)) < 0.5 * abs(math.log(float(factor)))
                                        else "not restored") + ")" for factor, end in scaled]) + " (E2).")
    shipped = str(model_name) == SHIPPED_NAME
    caveat = ("These are findings about the shipped 4-layer model of a synthetic IOI language, with few heads, each a large "
              "share of the computation; where they differ from the seeds' GPT-2 findings, the reasons above are about depth and "
              "width. Run <code>tl-patching reproduce --model gpt2</code> (or gpt2-medium, gpt2-large) to test the seeds' claims "
              "on the models they were made on." if shipped else
              "Where the findings differ from the seeds, compare the model's depth and width with the seed's model before "
              "reading it as a contradiction.")
    return (f"<h2>Conclusion</h2><p>Of {len(claims)} claims from the seed reports, {counts['agrees']} agree, {counts['partly']} "
            f"partly agree and {counts['differs']} differ here"
            + (f" ({counts['not tested']} not tested)" if counts["not tested"] else "") + ". "
            + " ".join(points) + f"</p><p>{caveat}</p>")


def write_report(out_dir: Path, model_name: str, sections: list[tuple], model=None) -> Path:
    """Write ``out_dir/index.html``. ``sections``: ``(key, reading, files, seconds)`` per experiment, as the main job
    collects them (the reading and time are not used: the page is rebuilt from ``key_result.json`` and is the same on
    every identical run); ``model``: the loaded model, for the card of a model other than the shipped one."""
    out_dir = Path(out_dir)
    results, found, blocks = {}, {}, []
    for key, _reading, files, *_ in sections:
        results[key] = r = _load(out_dir, key)
        found[key] = text, claims = FINDINGS[key](r)
        blocks.append(
            f'<h2 id="{key}">{html.escape(HEADINGS[key])}</h2>'
            f"<p><b>Data.</b> {html.escape(data_description(key, r))}</p>"
            f"<p><b>Finding.</b> {html.escape(text)}</p>{_claims_table(key, claims)}"
            f"{_figures([Path(f) for f in files])}"
            f'<p>Numbers: <a href="{key}_result.json">{key}_result.json</a> (token ids, settings, every per-prompt value).</p>')
    info = next(iter(results.values())).info if results else None
    card = model_card(model_name, info, model)
    name = "the shipped model" if str(model_name) == SHIPPED_NAME else model_name
    intro = (f"<p>Activation-editing and patching experiments E1–E5, redone on TransformerLens hook points and cross-checked "
             f"against raw HuggingFace hooks (the tests), run on {html.escape(str(name))}"
             + (f" with {info.weight_mode} weights through {BACKENDS.get(info.backend, info.backend)} hooks" if info else "") + ". Each "
             "section gives the data, the finding in words with its numbers, the seed report's claim beside it, and the figures "
             "(click one for the interactive version). Intervals are 95% bootstrap confidence intervals of the mean over prompts; "
             "logit differences are in nats.</p>")
    card_html = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in card)
    model_section = ("<h2>The model</h2>"
                     + ("<p>A small GPT-2-architecture model the project trained itself, so that everything runs offline "
                        "(full card: docs/model_card.md).</p>" if str(model_name) == SHIPPED_NAME else "")
                     + f"<table>{card_html}</table>")
    contents = "".join(f'<li><a href="#{k}">{html.escape(HEADINGS[k])}</a></li>' for k in results)
    page = (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>tl_patching — {html.escape(str(model_name))}"
            f"</title><style>{STYLE}</style></head><body>\n<h1>tl_patching: what the experiments found on "
            f"{html.escape(str(name))}</h1>\n{intro}\n<ul>{contents}<li><a href=\"#conclusion\">Conclusion</a></li></ul>\n"
            f"{model_section}\n" + "\n".join(blocks)
            + f'\n<div id="conclusion">{_conclusion(model_name, found, results)}</div>\n</body></html>\n')
    index = out_dir / "index.html"
    index.write_text(page)
    return index


write_index = write_report  # the main job's name for it


def main(argv: list[str] | None = None) -> None:
    """``python -m tl_patching.report DIR [MODEL]``: rebuild DIR/index.html from the results JSON and figures in DIR."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        raise SystemExit("usage: python -m tl_patching.report DIR [MODEL]  (MODEL: 'shipped' by default)")
    out_dir = Path(args[0])
    model_name = args[1] if len(args) > 1 else SHIPPED_NAME
    sections = [(k, "", sorted(out_dir.glob(f"{k}_*.html")), 0.0) for k in EXPERIMENTS if (out_dir / f"{k}_result.json").exists()]
    print(write_report(out_dir, model_name, sections))


if __name__ == "__main__":
    main()
