"""tl_patching: activation editing and patching on TransformerLens, cross-checked against raw HF hooks."""

from tl_patching import hf_hooks, hooks, metrics, prompts
from tl_patching.hooks import Edit, act_name, gaussian_noise, patch, patch_where, replace, scale, zero
from tl_patching.models import hooked_from_hf, load_hf, load_model, load_pair, random_gpt2

__all__ = [
    "Edit", "act_name", "gaussian_noise", "hf_hooks", "hooked_from_hf", "hooks", "load_hf", "load_model", "load_pair",
    "metrics", "patch", "patch_where", "prompts", "random_gpt2", "replace", "scale", "zero",
]
