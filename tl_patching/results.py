"""Typed experiment results that save to and load from JSON (tensors become nested lists)."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

T = TypeVar("T", bound="Result")


@dataclass
class RunInfo:
    """What produced a result: model, weight mode, exact token ids, BOS choice, backend, seed, settings."""

    model_name: str
    weight_mode: str
    n_layers: int
    n_heads: int
    token_ids: list[list[int]]
    prepend_bos: bool
    backend: str = "tl"  # "tl" (TransformerLens hooks) or "hf" (raw HF hooks)
    seed: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    start_token: str | None = None  # the start token's text when one was prepended ("<|endoftext|>", "<bos>", …)
    start_token_convention: bool | None = None  # whether the model's own tokenizer prepends one (None: not recorded)
    # whether tl_patching's cross-check against raw HF hooks covers this architecture (a table in backends.hf_maps);
    # False for an architecture a TransformerBridge boots without one (None: not recorded)
    hf_cross_checked: bool | None = None
    # how each kind of hook point is checked (`tl_patching.invariants.status`): "hf_table" (against HF's own
    # modules), "invariants" (facts of the transformer only), "unchecked"; on the HF backend every hook is HF's
    # (None: not recorded)
    hook_checks: dict[str, str] | None = None

    def start_token_words(self) -> str:
        """In words: which start token led the prompts, and whether that is the model's own convention."""
        if self.start_token_convention is None:
            return f"start token {'prepended' if self.prepend_bos else 'not prepended'}"
        as_own = (
            "as its tokenizer does"
            if self.prepend_bos == self.start_token_convention
            else (
                "its tokenizer would add one; set by the caller"
                if self.start_token_convention
                else "its tokenizer adds none; set by the caller"
            )
        )
        return (
            f"start token {self.start_token or '?'} prepended" if self.prepend_bos else "no start token"
        ) + f" ({as_own})"

    @classmethod
    def of(cls, forward, tokens: Tensor | list[list[int]], prepend_bos: bool, seed: int = 0, **settings) -> RunInfo:
        """``forward``: the `tl_patching.forward.Forward` that ran; ``tokens``: ``[batch, pos]`` ids, or a list of
        rows of any lengths (a dataset of several batches)."""
        from tl_patching import invariants, lens
        from tl_patching.backends import hf_maps

        tokenizer = forward.model.tokenizer
        return cls(
            model_name=forward.cfg.model_name,
            weight_mode=forward.weight_mode,
            n_layers=forward.cfg.n_layers,
            n_heads=forward.cfg.n_heads,
            token_ids=tokens.tolist() if isinstance(tokens, Tensor) else tokens,
            prepend_bos=prepend_bos,
            backend=forward.backend,
            seed=seed,
            settings=settings,
            start_token=tokenizer.bos_token if prepend_bos and tokenizer is not None else None,
            start_token_convention=bool(forward.cfg.default_prepend_bos) if tokenizer is not None else None,
            hf_cross_checked=lens.architecture(forward.model) in hf_maps.FAMILIES,
            hook_checks=(
                invariants.status(forward.model)
                if forward.backend == "tl"
                else {invariants.suffix(n): "hf_table" for n in forward.hook_names()}
            ),
        )


SIGNIFICANT_DIGITS = 6  # floats in JSON: reruns that differ in the 7th digit (thread scheduling) write the same file


def round_sig(value: Any, digits: int = SIGNIFICANT_DIGITS) -> Any:
    """A float, or an array/tensor/nested list of floats, rounded to ``digits`` significant digits
    (as Python floats / nested lists, which JSON writes in their shortest form: 9.41012, not 9.410120010375977)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if np.isfinite(value) else value
    array = value.detach().cpu().double().numpy() if isinstance(value, Tensor) else np.asarray(value, dtype=float)
    return np.array([float(f"{v:.{digits}g}") for v in array.ravel()]).reshape(array.shape).tolist()


def _encode(value: Any) -> Any:
    if isinstance(value, (Tensor, np.ndarray)):
        floating = value.is_floating_point() if isinstance(value, Tensor) else value.dtype.kind == "f"
        dtype = str(value.dtype).removeprefix("torch.")
        return {"__tensor__": round_sig(value) if floating else value.tolist(), "dtype": dtype}
    if dataclasses.is_dataclass(value):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return {"__float__": str(value)}
    if isinstance(value, float):
        return round_sig(value)
    return value


def _decode(value: Any, hint: Any = None) -> Any:
    """JSON value back to Python, guided by the field's type hint (dataclasses, lists of dataclasses)."""
    if isinstance(value, dict) and "__tensor__" in value:
        return torch.tensor(value["__tensor__"], dtype=getattr(torch, value["dtype"], torch.float32))
    if isinstance(value, dict) and "__float__" in value:
        return float(value["__float__"])
    if isinstance(hint, type) and dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return _from_dict(hint, value)
    item_hint = typing.get_args(hint)[0] if typing.get_origin(hint) is list and typing.get_args(hint) else None
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, item_hint) for v in value]
    return value


def _from_dict(cls, data: dict) -> Any:
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: _decode(data[f.name], hints.get(f.name)) for f in dataclasses.fields(cls) if f.name in data})


@dataclass
class Result:
    """Base of every experiment result: ``info`` plus the experiment's own fields."""

    info: RunInfo

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps({"type": type(self).__name__, **_encode(self)}, indent=1)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        return text

    def reading(self) -> str:
        return ""

    def _repr_html_(self) -> str:
        """How a result shows in a notebook: its reading, and what produced it."""
        import html

        info = self.info
        rows = [
            ("model", info.model_name),
            ("weights", info.weight_mode),
            ("backend", info.backend),
            ("prompts", len(info.token_ids)),
            ("BOS prepended", info.prepend_bos),
        ]
        cells = "".join(f"<tr><th style='text-align:left'>{k}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
        return f"<b>{type(self).__name__}</b><p>{html.escape(self.reading())}</p><table>{cells}</table>"

    @classmethod
    def from_json(cls: type[T], source: str | Path) -> T:
        text = (
            Path(source).read_text() if isinstance(source, Path) or not str(source).lstrip().startswith("{") else source
        )
        data = json.loads(text)
        if data.get("type") != cls.__name__:
            raise ValueError(f"this JSON holds a {data.get('type')}, not a {cls.__name__}")
        return _from_dict(cls, data)
