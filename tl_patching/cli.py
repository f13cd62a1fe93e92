"""``tl-patching``: the main job (every experiment, figures, results JSON, an index page) and one command per
experiment.

    tl-patching reproduce                           # every experiment on the shipped model, offline
    tl-patching reproduce --model gpt2-large --experiments KEY,KEY --device cuda
    tl-patching reproduce --model /path/to/hf-dir   # a local HF-format directory
    tl-patching KEY --model gpt2-medium --text "…"  # one experiment (commands below), its own settings
    tl-patching KEY --backend hf                    # the same experiment through raw HF hooks
    torchrun --nproc_per_node=4 -m tl_patching.cli KEY --n-prompts 1000   # IOI prompts split over 4 processes

Errors are one line (``error: …``, exit status 1); ``--debug`` shows the traceback. Nothing heavy
(torch, transformers) is imported until a command runs, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from tl_patching.experiments import spec  # light: reads the experiments' declarations without importing them

SHIPPED_MODEL_NAME = "shipped"  # = tl_patching.checkpoints.SHIPPED_MODEL_NAME (not imported: keeps --help light)


def model_slug(name: str) -> str:
    """Folder name under figures/ for a model name or directory."""
    path = Path(str(name))
    shown = path.name if path.is_dir() else str(name)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", shown).strip("-") or "model"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: this PyTorch has no CUDA device available (use --device cpu)")
    return device


def save_result(key: str, result, out_dir: Path, png=True) -> list[Path]:
    from tl_patching import plotting
    from tl_patching.experiments import load

    result.to_json(out_dir / f"{key}_result.json")
    return [f for name, fig in load(key).figures(result).items() for f in plotting.save(fig, out_dir, name, png=png)]


def reproduce(
    forward,
    model_name: str,
    experiments: list[str],
    out_dir: Path,
    n_prompts: int,
    donor_cache: Path | None = None,
    png=True,
) -> Path:
    """Every experiment with its defaults; figures, results JSON and index.html under ``out_dir``."""
    from tqdm.auto import tqdm

    from tl_patching.distributed import is_main
    from tl_patching.experiments import run_experiment
    from tl_patching.report import write_report

    sections = []
    for key in tqdm(experiments, desc="experiments", disable=not is_main()):
        start = time.perf_counter()
        result = run_experiment(key, forward, n_prompts, donor_cache=donor_cache)
        seconds = time.perf_counter() - start
        if is_main():  # under torchrun every rank holds the gathered result; rank 0 alone writes
            sections.append((key, result, save_result(key, result, out_dir, png), seconds))
            tqdm.write(f"{key} ({seconds:.1f} s): {result.reading()}")
    return write_report(out_dir, model_name, sections, model=forward.model) if is_main() else out_dir


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="tl-patching", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = top.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--model",
        default=SHIPPED_MODEL_NAME,
        help="'shipped' (the bundled model, offline), a hub name (gpt2, gpt2-medium, …) or a local HF directory",
    )
    common.add_argument(
        "--backend",
        default="tl",
        choices=["tl", "hf"],
        help="run the edits as TransformerLens hooks (tl) or as raw HF hooks on the same weights (hf)",
    )
    common.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where the model runs (auto: cuda if available)",
    )
    common.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the weights and activations (tolerances against float32: docs/scaling.md)",
    )
    common.add_argument(
        "--n-devices",
        type=positive_int,
        default=1,
        help="split the model's blocks over this many CUDA devices (model parallel; per torchrun process)",
    )
    common.add_argument("--out", type=Path, default=Path("figures"), help="figures and results go to OUT/<model>/")
    common.add_argument("--no-png", action="store_true", help="write interactive HTML only (no static PNG)")
    common.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    ioi = argparse.ArgumentParser(add_help=False)
    ioi.add_argument(
        "--n-prompts", type=positive_int, default=100, help="IOI prompts, at least 1 (1: the seed's single pair)"
    )
    ioi.add_argument(
        "--donor-cache",
        type=Path,
        help="safetensors file of the donor run: loaded if it exists (checked against model and tokens), "
        "else computed and saved",
    )
    text = argparse.ArgumentParser(add_help=False)
    text.add_argument("--text", help="the sentence to run (default: the experiment's own)")
    experiments = spec.catalog()
    rep = sub.add_parser(
        "reproduce",
        parents=[common, ioi],
        help="run every experiment and write figures, results JSON and an index page",
    )
    rep.add_argument(
        "--experiments",
        default=",".join(experiments),
        help=f"comma-separated subset of {','.join(experiments)}, (default: all; on --backend hf, "
        "those that run there)",
    )
    for key, (_, experiment) in experiments.items():
        command = sub.add_parser(
            key, parents=[common, text if experiment.inputs == "text" else ioi], help=experiment.title
        )
        for option in experiment.options:
            command.add_argument(option.flag, **option.argparse_kwargs())
    return top


def run(args: dict) -> None:
    from tl_patching import distributed
    from tl_patching.experiments import run_experiment
    from tl_patching.forward import load_forward

    command = args.pop("command")
    from tl_patching.plotting import PngExport

    model_name, backend, out_root = args.pop("model"), args.pop("backend"), args.pop("out")
    png = PngExport(not args.pop("no_png"))  # one per run: a failed export is noted once
    donor_cache = args.pop("donor_cache", None)
    if donor_cache is not None and not donor_cache.parent.is_dir():
        raise FileNotFoundError(f"--donor-cache {donor_cache}: the folder {donor_cache.parent} does not exist")
    dtype, n_devices = args.pop("dtype"), args.pop("n_devices")
    device = distributed.setup(resolve_device(args.pop("device")), n_devices)  # under torchrun: this rank's device
    if command == "reproduce":
        given = args.pop("experiments")
        known = spec.catalog()
        experiments = [e.strip().lower() for e in given.split(",") if e.strip()]
        unknown = sorted(set(experiments) - set(known))
        if unknown or not experiments:
            raise ValueError(f"unknown experiment(s) {unknown or experiments}; choose from {', '.join(known)}")
        if given == ",".join(known):  # the default list: leave out what this backend cannot run, and say so
            skipped = [k for k in experiments if backend not in known[k][1].backends]
            experiments = [k for k in experiments if k not in skipped]
            for k in skipped:
                print(
                    f"note: {k} runs on the {' or '.join(known[k][1].backends)} backend only; "
                    f"skipped with --backend {backend}",
                    file=sys.stderr,
                )
    forward = load_forward(model_name, backend, device, dtype, n_devices)
    out_dir = out_root / model_slug(model_name)
    if command == "reproduce":
        index = reproduce(forward, model_name, experiments, out_dir, args["n_prompts"], donor_cache, png=png)
        if distributed.is_main():
            print(f"wrote {index}", file=sys.stderr)
        return
    result = run_experiment(command, forward, donor_cache=donor_cache, **args)
    if not distributed.is_main():
        return
    files = save_result(command, result, out_dir, png)
    print(result.reading())
    print("wrote " + ", ".join(str(f) for f in files), file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    args = vars(parser().parse_args(argv))
    debug = args.pop("debug")
    try:
        run(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # every library error reaches the user as one line
        if debug:
            raise
        message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {message or type(e).__name__}", file=sys.stderr)
        sys.exit(1)
    finally:
        if "tl_patching.distributed" in sys.modules:  # end a torchrun process group cleanly (never imported for --help)
            sys.modules["tl_patching.distributed"].teardown()


if __name__ == "__main__":
    main()
