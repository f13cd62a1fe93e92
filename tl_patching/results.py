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
from transformer_lens import HookedTransformer

from tl_patching.models import weight_mode

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
    backend: str = "transformer_lens"  # or "hf_hooks"
    seed: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, model: HookedTransformer, tokens: Tensor | list[list[int]], prepend_bos: bool, hf_model=None, seed: int = 0,
           **settings) -> RunInfo:
        """``tokens``: ``[batch, pos]`` ids, or a list of rows of any lengths (a dataset of several batches)."""
        return cls(
            model_name=model.cfg.model_name, weight_mode=weight_mode(model),
            n_layers=model.cfg.n_layers, n_heads=model.cfg.n_heads,
            token_ids=tokens.tolist() if isinstance(tokens, Tensor) else tokens, prepend_bos=prepend_bos,
            backend="transformer_lens" if hf_model is None else "hf_hooks", seed=seed, settings=settings,
        )


def _encode(value: Any) -> Any:
    if isinstance(value, Tensor):
        return {"__tensor__": value.detach().cpu().tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, np.ndarray):
        return {"__tensor__": value.tolist(), "dtype": str(value.dtype)}
    if dataclasses.is_dataclass(value):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return {"__float__": str(value)}
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

    @classmethod
    def from_json(cls: type[T], source: str | Path) -> T:
        text = Path(source).read_text() if isinstance(source, Path) or not str(source).lstrip().startswith("{") else source
        data = json.loads(text)
        if data.get("type") != cls.__name__:
            raise ValueError(f"this JSON holds a {data.get('type')}, not a {cls.__name__}")
        return _from_dict(cls, data)
