"""``tl-patching``: the main job (every experiment, figures, results JSON, an index page) and small helpers.

    tl-patching reproduce                           # E1–E5 on the shipped model, offline
    tl-patching reproduce --model gpt2-large --experiments e5 --device cuda
    tl-patching reproduce --model /path/to/hf-dir   # any local HF-format GPT-2 directory
    tl-patching e3 --model gpt2-medium --layer 3 --head 0 --text "…"   # one experiment, its own settings
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tl_patching import hooks, plotting
from tl_patching.cache_store import load_cache, save_cache
from tl_patching.experiments import (
    e1_attention_scores as e1,
    e2_activation_editing as e2,
    e3_cosine_similarity as e3,
    e4_ioi_patching as e4,
    e5_head_token_patching as e5,
)
from tl_patching.hooks import act_name
from tl_patching.models import SHIPPED_MODEL_NAME, display_name, load_model
from tl_patching.prompts import HELD_OUT_TEMPLATES, TEMPLATES, ioi_batches, ioi_prompts
from tl_patching.report import write_index

EXPERIMENTS = ("e1", "e2", "e3", "e4", "e5")
TITLES = {
    "e1": "E1 — attention heads and raw-score distributions",
    "e2": "E2 — editing attention, MLP and hidden states",
    "e3": "E3 — head silencing and cosine similarity",
    "e4": "E4 — head vs hidden-state patching in IOI",
    "e5": "E5 — one head at one token",
}


def model_slug(name: str) -> str:
    """Folder name under figures/ for a model name or directory."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", display_name(name)).strip("-") or "model"


def ioi_dataset(model, n_prompts: int, seed: int = 0):
    """IOI batches for E4/E5: seeded prompts over every template (the held-out one included)."""
    return ioi_batches(model, ioi_prompts(n_prompts, seed=seed, templates=TEMPLATES + HELD_OUT_TEMPLATES))


def run_experiment(key: str, model, n_prompts: int = 100, progress: bool = True, donor_cache: Path | None = None, **options):
    """One experiment with its defaults, overridden by ``options`` (None = default). E4/E5 run over an IOI
    dataset of ``n_prompts`` (1: the seed's single pair), optionally from a saved donor cache."""
    options = {k: v for k, v in options.items() if v is not None}
    if key == "e1":
        return e1.run(model, **options)
    if key == "e2":
        return e2.run(model, **options)
    if key == "e3":
        options.setdefault("layer", 3 if model.cfg.n_layers == 24 else round(model.cfg.n_layers / 8))  # the seed's 3 of 24
        return e3.run(model, **options)
    data = ioi_dataset(model, n_prompts) if n_prompts > 1 else e4.seed_pair(model)
    cache = None
    if donor_cache is not None:
        if n_prompts > 1 and len(data) > 1:
            raise SystemExit("--donor-cache needs prompts of one token length; use --n-prompts 1 or a one-length dataset")
        batch = data if n_prompts == 1 else data[0]
        cache = load_cache(donor_cache, model, batch.donor_tokens) if donor_cache.exists() else None
        if cache is None:  # first use: compute the donor run once and save it for the next process
            names = [act_name(kind, l) for l in range(model.cfg.n_layers) for kind in ("z", "resid_post")]
            save_cache(donor_cache, hooks.run(model, batch.donor_tokens, cache=names)[1], model, batch.donor_tokens, batch.prepend_bos)
            cache = load_cache(donor_cache, model, batch.donor_tokens)
        data = batch
    module = e4 if key == "e4" else e5
    return module.run(model, data, donor_cache=cache, progress=progress, **options)


FIGURES = {"e1": plotting.e1_figures, "e2": plotting.e2_figures, "e3": plotting.e3_figures, "e4": plotting.e4_figures, "e5": plotting.e5_figures}


def save_result(key: str, result, out_dir: Path, png: bool = True) -> list[Path]:
    result.to_json(out_dir / f"{key}_result.json")
    return [f for name, fig in FIGURES[key](result).items() for f in plotting.save(fig, out_dir, name, png=png)]


def reproduce(model_name: str, experiments: list[str], out_root: Path, device: str, n_prompts: int, png: bool = True) -> Path:
    """Every experiment with its defaults; figures, results JSON and index.html under ``out_root/<model>/``."""
    model = load_model(model_name, weights="raw", device=device)
    out_dir = out_root / model_slug(model_name)
    sections = []
    for key in tqdm(experiments, desc="experiments"):
        start = time.perf_counter()
        result = run_experiment(key, model, n_prompts)
        seconds = time.perf_counter() - start
        sections.append((key, result.reading(), save_result(key, result, out_dir, png), seconds))
        tqdm.write(f"{key} ({seconds:.1f} s): {result.reading()}")
    return write_index(out_dir, model_name, sections, model=model)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tl-patching", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=SHIPPED_MODEL_NAME, help="'shipped', a hub name (gpt2, gpt2-medium, gpt2-large) or a local HF directory")
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    common.add_argument("--out", type=Path, default=Path("figures"), help="figures go to OUT/<model>/")
    common.add_argument("--no-png", action="store_true", help="write interactive HTML only")
    ioi = argparse.ArgumentParser(add_help=False)
    ioi.add_argument("--n-prompts", type=int, default=100, help="IOI prompts (1: the seed's single pair)")
    ioi.add_argument("--donor-cache", type=Path, help="safetensors file: loaded if it exists, else computed and saved")

    rep = sub.add_parser("reproduce", parents=[common, ioi], help="run E1–E5 and write figures, results JSON and an index page")
    rep.add_argument("--experiments", default=",".join(EXPERIMENTS), help="comma-separated subset, e.g. e3,e5")
    p1 = sub.add_parser("e1", parents=[common], help=TITLES["e1"])
    p1.add_argument("--text")
    p2 = sub.add_parser("e2", parents=[common], help=TITLES["e2"])
    p2.add_argument("--text")
    p2.add_argument("--layer", type=int, help="default: 9 on 12-layer models (the seed), else 3/4 of the depth")
    p2.add_argument("--head", type=int)
    p2.add_argument("--noise-mean", type=float)
    p2.add_argument("--seed", type=int)
    p3 = sub.add_parser("e3", parents=[common], help=TITLES["e3"])
    p3.add_argument("--text")
    p3.add_argument("--layer", type=int, help="silenced layer (default: 3 on 24-layer models, the seed; else n_layers/8)")
    p3.add_argument("--head", type=int)
    sub.add_parser("e4", parents=[common, ioi], help=TITLES["e4"])
    p5 = sub.add_parser("e5", parents=[common, ioi], help=TITLES["e5"])
    p5.add_argument("--method", choices=["fast", "plain"])
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    model_name, device, out_root, png = args.pop("model"), args.pop("device"), args.pop("out"), not args.pop("no_png")
    if command == "reproduce":
        experiments = [e.strip().lower() for e in args.pop("experiments").split(",") if e.strip()]
        unknown = sorted(set(experiments) - set(EXPERIMENTS))
        if unknown:
            parser.error(f"unknown experiment(s) {unknown}; choose from {', '.join(EXPERIMENTS)}")
        index = reproduce(model_name, experiments, out_root, device, args["n_prompts"], png=png)
        print(f"wrote {index}", file=sys.stderr)
        return
    model = load_model(model_name, weights="raw", device=device)
    result = run_experiment(command, model, **args)
    files = save_result(command, result, out_root / model_slug(model_name), png)
    print(result.reading())
    print("wrote " + ", ".join(str(f) for f in files), file=sys.stderr)


if __name__ == "__main__":
    main()
