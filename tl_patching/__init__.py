"""tl_patching: activation editing and patching on TransformerLens, cross-checked against raw HF hooks.

Names are imported on first use (PEP 562), so ``tl-patching --help`` needs neither torch nor transformers.
"""

import importlib

_EXPORTS = {
    "Edit": "edits",
    "act_name": "edits",
    "gaussian_noise": "edits",
    "patch": "edits",
    "patch_where": "edits",
    "replace": "edits",
    "scale": "edits",
    "zero": "edits",
    "Forward": "forward",
    "load_forward": "forward",
    "hooked_from_hf": "models",
    "load_model": "models",
    "load_pair": "models",
    "load_hf": "checkpoints",
    "weight_mode": "provenance",
    "weight_processing": "provenance",
    "random_gpt2": "testing",
    "random_pair": "testing",
    "sweep": "patching",
    "head_sweep": "patching",
}
_MODULES = (
    "attribution",
    "backends",
    "cache_store",
    "checkpoints",
    "edits",
    "experiments",
    "fast",
    "forward",
    "metrics",
    "models",
    "patching",
    "plotting",
    "prompts",
    "provenance",
    "results",
)

__all__ = sorted(_EXPORTS) + list(_MODULES)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"tl_patching.{_EXPORTS[name]}"), name)
    if name in _MODULES:
        return importlib.import_module(f"tl_patching.{name}")
    raise AttributeError(f"module 'tl_patching' has no attribute {name!r}")
