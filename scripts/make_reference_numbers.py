"""Regenerate tests/reference/main_job_numbers.json, the main job's key numbers on the shipped model.

    python scripts/make_reference_numbers.py

tests/test_main_job.py runs the main job's experiments and compares their numbers with these to 1e-5 (relative above
1, absolute below): numbers, not bytes, because the same run on another CPU (AVX2 rather than AVX-512, say) adds
float32 numbers in another order and differs in the 7th significant digit. Bytes are compared between two runs on the
same machine instead. A change in these numbers is a change in the results: say why in the commit that makes it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "reference" / "main_job_numbers.json"
PROMPTS = (20, 100)  # the fast test's run (three token lengths), and the main job's default
MAX_NUMBERS = 64  # per tensor; a larger one is kept as its means over the last axis (the prompts), repeatedly
TOLERANCE = 1e-5


def _numbers(value, path: str, out: dict[str, float]) -> None:
    import torch

    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().double().numpy()
    if isinstance(value, np.ndarray):
        while value.size > MAX_NUMBERS:
            value = value.mean(axis=-1)
        value = value.tolist()
    if dataclasses.is_dataclass(value):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        for k, v in value.items():
            _numbers(v, f"{path}.{k}" if path else str(k), out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _numbers(v, f"{path}[{i}]", out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[path] = value


# Counts decided by ranking near-tied scores: edges' circuits after pruning (``kept``) changed by one edge between two
# CPUs (exact[8]: 237 vs 238 at 50% of 479 edges) while every score and f stayed within 1e-5; f is still compared.
RANKED = ("kept",)


def key_numbers(results: dict) -> dict[str, dict[str, float]]:
    """Per experiment: every number of its result outside ``info`` (what produced it: token ids, settings) and
    ``RANKED``, at full precision, by its path; a tensor of more than 64 numbers as its means over the last axis."""
    out = {}
    for key, result in results.items():
        numbers: dict[str, float] = {}
        fields = [f.name for f in dataclasses.fields(result) if f.name not in ("info", *RANKED)]
        _numbers({name: getattr(result, name) for name in fields}, "", numbers)
        out[key] = numbers
    return out


def main_job_results(n_prompts: int) -> dict:
    """What ``tl-patching reproduce --n-prompts N`` computes: every experiment with its defaults on the shipped model
    (TransformerLens backend, CPU, float32)."""
    sys.path.insert(0, str(ROOT))  # this checkout's tl_patching
    from tl_patching.experiments import keys, run_experiment
    from tl_patching.forward import load_forward

    forward = load_forward("shipped", "tl", "cpu", "float32")
    return {key: run_experiment(key, forward, n_prompts, progress=False) for key in keys()}


def differences(got: dict, reference: dict, tolerance: float = TOLERANCE) -> list[str]:
    """Where ``got`` differs from ``reference`` by more than ``tolerance`` (relative above 1, absolute below), or lacks
    or adds a number; empty if none."""
    out = []
    for key in sorted(set(got) | set(reference)):
        a, b = got.get(key, {}), reference.get(key, {})
        for name in sorted(set(a) | set(b)):
            if name not in a or name not in b:
                out.append(f"{key}: {name} {'missing' if name not in a else 'not in the reference'}")
            elif not (math.isnan(a[name]) and math.isnan(b[name])) and not (
                abs(a[name] - b[name]) <= tolerance * max(1.0, abs(b[name]))
            ):
                out.append(f"{key}: {name} is {a[name]!r}, the reference {b[name]!r}")
    return out


if __name__ == "__main__":
    reference = {str(n): key_numbers(main_job_results(n)) for n in PROMPTS}
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    REFERENCE.write_text(json.dumps(reference, indent=1, sort_keys=True) + "\n")
    print(f"wrote {REFERENCE}: {sum(len(v) for r in reference.values() for v in r.values())} numbers")
