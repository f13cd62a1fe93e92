"""Model cards: what a model is, in a table, read from its files or its config — never from a label.

The shipped model's card comes from its config.json, tokenizer.json and training.json (docs/model_card.md holds
it as Markdown); another model's from its HF config.json, or from a loaded model's config. Nothing here imports
torch.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from tl_patching.report.words import CI, SHIPPED_NAME

SHIPPED_DIR = Path(__file__).parents[1] / "assets" / "ioi-gpt2"


def safetensors_parameters(path: Path) -> int | None:
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


def hf_config_rows(config: dict, parameters: int | None) -> list[tuple[str, str]]:
    layers, heads = _first(config, "n_layer", "num_hidden_layers"), _first(config, "n_head", "num_attention_heads")
    d_model = _first(config, "n_embd", "hidden_size")
    d_mlp = config.get("n_inner") or config.get("intermediate_size") or (4 * d_model if d_model else None)
    # Qwen3 and Gemma set head_dim apart from d_model / n_heads; Gemma's MLP reads hidden_activation, not hidden_act.
    d_head = config.get("head_dim") or (d_model // heads if d_model and heads else "?")
    activation = _first(config, "activation_function", "hidden_activation", "hidden_act") or "?"
    rows = [
        (
            "architecture",
            f"{', '.join(config.get('architectures') or []) or config.get('model_type', '?')} "
            f"({config.get('model_type', '?')}, activation {activation})",
        ),
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
    rows = hf_config_rows(config, safetensors_parameters(SHIPPED_DIR / "model.safetensors"))
    vocab = len(tokenizer["model"]["vocab"])
    rows[3] = (
        "vocabulary",
        f"{vocab} {tokenizer['model']['type']} tokens: one per word (with and without a leading space, as "
        f'GPT-2 writes " Sally"), plus <|endoftext|> (BOS) and <unk>; any other word becomes <unk>',
    )
    held_out, train = training["ioi_held_out_template"], training["ioi_train_templates"]
    rows += [
        (
            "trained on",
            f"a generated corpus: {t['n_ioi']:,} IOI sentences with their answer (both name orders, "
            f"{t['prefix_fraction']:.0%} preceded by a filler sentence), {t['n_pizza']:,} sentences about pizza (the "
            f"cosine-similarity sentence among them) and {t['n_filler']:,} filler sentences over the same names, "
            f"places and objects; {t['n_held_out_pairs']} name pairs and one IOI template are never used in training",
        ),
        (
            "training",
            f"{t['steps']:,} steps of {t['batch_size']} sequences, AdamW (lr {t['lr']:g}, weight decay "
            f"{t['weight_decay']:g}), seed {t['seed']}, {training['train_seconds'] / 60:.0f} min on CPU "
            "(tl_patching/recipe/training.py)",
        ),
        (
            "IOI, held-out names",
            f"held-out template: accuracy {held_out['accuracy']:.0%}, mean logit difference "
            f"{held_out['mean_logit_diff']:.2f} nats ({CI} [{held_out['ci95'][0]:.2f}, {held_out['ci95'][1]:.2f}], "
            f"{held_out['n']} prompts); training templates: {train['accuracy']:.0%}, {train['mean_logit_diff']:.2f} "
            f"nats ({CI} [{train['ci95'][0]:.2f}, {train['ci95'][1]:.2f}], {train['n']} prompts)",
        ),
        (
            "language modelling",
            f"held-out filler sentences: {training['held_out_filler_loss']:.2f} nats/token "
            f"(unigram baseline {training['unigram_baseline_loss']:.2f})",
        ),
        (
            "not for",
            "conclusions about GPT-2: it is a 4-layer model of a tiny synthetic language, so it has one job (IOI) and "
            "few heads to do it with; run the experiments with --model gpt2… to test the seeds' claims on GPT-2 itself",
        ),
    ]
    return rows


def model_card(model_name: str, info=None, model=None) -> list[tuple[str, str]]:
    """The shipped model's card; for another model what its config says (a loaded ``model``'s cfg, a directory's
    config.json) or, failing both, the depth and width recorded in the results."""
    if str(model_name) == SHIPPED_NAME:
        return shipped_model_card()
    directory = Path(str(model_name))
    if (directory / "config.json").is_file():
        return hf_config_rows(
            json.loads((directory / "config.json").read_text()), safetensors_parameters(directory / "model.safetensors")
        )
    if model is not None:
        c = model.cfg
        return [
            ("architecture", f"{c.original_architecture or '?'} (activation {c.act_fn})"),
            ("layers × heads", f"{c.n_layers} × {c.n_heads} (d_head {c.d_head})"),
            ("d_model / d_mlp", f"{c.d_model} / {c.d_mlp}"),
            ("vocabulary", f"{c.d_vocab} tokens"),
            ("context", f"{c.n_ctx} tokens"),
            ("parameters", f"{sum(p.numel() for p in model.parameters()):,}"),
        ]
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
