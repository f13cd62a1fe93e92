"""`Forward`: a model bound to the backend that runs it, built once by the caller and passed down.

Experiments and the patching engine call ``forward.run(tokens, edits, cache)`` and never choose a
backend themselves. The `HookedTransformer` is always there: it gives the configuration and the
tokenizer (so both backends see the same token ids). With ``hf_model`` the edits run as raw HF hooks
on that model instead (`tl_patching.backends.hf`), which must hold the same weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from tl_patching.backends import hf, tl
from tl_patching.edits import Edit
from tl_patching.lens import HookedTransformer

BACKENDS = ("tl", "hf")


@dataclass(frozen=True)
class Forward:
    """``model`` run through TL hooks, or ``hf_model`` (same weights) through HF hooks when given."""

    model: HookedTransformer
    hf_model: nn.Module | None = None
    _fingerprint: list = field(default_factory=list, repr=False, compare=False)  # [(weights version, digest)]

    @property
    def backend(self) -> str:
        return "tl" if self.hf_model is None else "hf"

    @property
    def cfg(self):
        return self.model.cfg

    @property
    def weight_mode(self) -> str:
        """ "raw" or "processed", read from the weights that actually run (an HF model is always raw)."""
        from tl_patching.provenance import weight_mode

        return "raw" if self.hf_model is not None else weight_mode(self.model)

    def weights_fingerprint(self) -> str:
        """SHA-256 of the TL model's weights (`tl_patching.provenance.weights_fingerprint`), computed once and kept
        until a tensor is replaced or changed in place (a main job saves and loads its donor cache against the same
        model several times, and hashing GPT-2 large takes seconds)."""
        from tl_patching.provenance import weights_fingerprint, weights_version

        version = weights_version(self.model)
        if not self._fingerprint or self._fingerprint[0][0] != version:
            self._fingerprint[:] = [(version, weights_fingerprint(self.model))]
        return self._fingerprint[0][1]

    def hook_names(self) -> list[str]:
        return tl.hook_names(self.model) if self.hf_model is None else hf.hook_names(self.hf_model)

    def run(
        self,
        tokens: Int[Tensor, "batch pos"],
        edits: Sequence[Edit] = (),
        cache: Sequence[str] = (),
        cache_device: str | torch.device | None = None,
    ) -> tuple[Float[Tensor, "batch pos d_vocab"], dict[str, Tensor]]:
        """Logits with ``edits`` applied, and the activations named in ``cache`` (TL layout, after the edits)."""
        if self.hf_model is None:
            return tl.run(self.model, tokens, edits, cache, cache_device)
        return hf.run(self.hf_model, tokens, edits, cache, cache_device)

    @contextlib.contextmanager
    def hooks(
        self, edits: Sequence[Edit] = (), cache: dict[str, Tensor] | None = None, names: Sequence[str] = ()
    ) -> Iterator[None]:
        """Context manager: edits applied and ``names`` recorded into ``cache`` for every forward inside."""
        backend_hooks = (
            tl.hooks(self.model, edits, cache, names)
            if self.hf_model is None
            else hf.hooks(self.hf_model, edits, cache, names)
        )
        with backend_hooks:
            yield

    def __call__(
        self, tokens: Int[Tensor, "batch pos"], edits: Sequence[Edit] = ()
    ) -> Float[Tensor, "batch pos d_vocab"]:
        return self.run(tokens, edits)[0]


def load_forward(
    name_or_path: str,
    backend: str = "tl",
    device: str = "cpu",
    dtype: str | torch.dtype = "float32",
    n_devices: int = 1,
) -> Forward:
    """Load a model with raw weights in ``dtype``, on ``n_devices`` consecutive devices from ``device``, and bind it
    to ``backend`` ("tl" or "hf").

    The weights are loaded on the CPU, cast, and only then moved (a float32 copy never reaches the GPU).
    With ``n_devices > 1`` the TL model is split by `place` and the HF mirror by accelerate with `hf_device_map`.
    """
    from tl_patching.checkpoints import display_name, load_hf
    from tl_patching.distributed import check_devices, hf_device_map, parse_dtype, place
    from tl_patching.models import hooked_from_hf

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    torch_dtype = parse_dtype(dtype)
    devices = check_devices(device, n_devices)
    hf_model, tokenizer = load_hf(name_or_path, device="cpu")
    model = hooked_from_hf(hf_model, tokenizer, weights="raw", device="cpu", name=display_name(name_or_path))
    model = place(model.to(torch_dtype, print_details=False), devices)
    if backend == "tl":
        return Forward(model)
    hf_model = hf_model.to(torch_dtype)
    if len(devices) == 1:
        hf_model = hf_model.to(devices[0])
    else:
        from accelerate import dispatch_model

        hf_model = dispatch_model(hf_model, device_map=hf_device_map(model.cfg.n_layers, devices))
    return Forward(model, hf_model.eval())
