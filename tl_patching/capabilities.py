"""What runs on which architecture: one row per family tl_patching has a table for, and one per block layout of the
bridge's other architectures (TransformerLens 4), each cell asked of the code itself — the same calls the
experiments make before they run (a refusal raised is "refused", with its reason in `reasons`).

docs/models.md holds the table for each TransformerLens major (`scripts/capability_table.py` writes it;
tests/test_capabilities.py keeps it equal to this module on the major it runs on).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tl_patching import invariants, lens
from tl_patching.families import FAMILIES, UnsupportedArchitectureError

COLUMNS = ("load", "HF mirror", "invariants", "fast paths", "E1 scores", "path patching", "AtP* QK fix", "edges")
# Architectures without a tl_patching table, one per block layout (TransformerLens 4's bridge boots them).
BRIDGE_SAMPLES = ("OPTForCausalLM", "GPTJForCausalLM", "Olmo2ForCausalLM", "Qwen2MoeForCausalLM")
REFUSALS = (NotImplementedError, UnsupportedArchitectureError)


def _asked(call: Callable[[], object], ok: str = "✓") -> tuple[str, str]:
    try:
        call()
    except REFUSALS as e:
        return "refused", str(e).splitlines()[0]
    return ok, ""


def _qk_fix(model, forward) -> tuple[str, str]:
    from tl_patching import attribution, fast

    closed, why = _asked(lambda: attribution.check_qk_family(model), "closed form")
    if closed != "refused":
        return closed, ""
    reason = fast.unavailable(forward)
    return ("layer engine", why) if reason is None else ("refused", reason)


def row(hf_model, model) -> tuple[dict[str, str], dict[str, str]]:
    """The cells of one loaded pair (HF model, TL model), and the refusals' reasons."""
    from tl_patching import edges, fast, path_patching
    from tl_patching.edits import scale
    from tl_patching.forward import Forward

    forward, tokens = Forward(model), torch.tensor([[1, 2, 3, 4, 5]])

    def mirror() -> None:
        Forward(model, hf_model).run(tokens, [scale("blocks.0.hook_resid_post", 0.5)], cache=["blocks.0.attn.hook_z"])

    broken = invariants.read_failures(model)[0]
    cells = {
        "load": ("✓", ""),
        "HF mirror": _asked(mirror),
        "invariants": ("refused", "; ".join(f.invariant for f in broken)) if broken else ("✓", ""),
        "fast paths": ("✓", "") if fast.unavailable(forward) is None else ("refused", fast.unavailable(forward)),
        "E1 scores": _asked(lambda: lens.attention_config(model)),
        "path patching": _asked(lambda: path_patching.check_family(model)),
        "AtP* QK fix": _qk_fix(model, forward),
        "edges": _asked(lambda: edges.graph_of(forward)),
    }
    return {k: v[0] for k, v in cells.items()}, {k: v[1] for k, v in cells.items() if v[1]}


def table() -> dict[str, dict[str, str]]:
    """Row name -> column -> "✓" / "refused" / how (the AtP* QK fix: "closed form" or "layer engine") / "—" (not
    loaded), on the TransformerLens major installed; tiny random models (`tl_patching.testing`)."""
    from tl_patching.models import hooked_from_hf
    from tl_patching.testing import random_pair, tiny_from_config_class

    out = {}
    for name in FAMILIES:
        out[FAMILIES[name].architecture] = row(*random_pair(name, n_layers=2, n_heads=4, seed=0))[0]
    for architecture in BRIDGE_SAMPLES:
        hf = tiny_from_config_class(architecture)
        try:
            model = hooked_from_hf(hf, None, name=architecture)
        except REFUSALS:
            out[architecture] = {c: "refused" if c == "load" else "—" for c in COLUMNS}
            continue
        out[architecture] = row(hf, model)[0]
    return out


def markdown(cells: dict[str, dict[str, str]]) -> str:
    """The table as markdown, one line per row."""
    head = "| architecture | " + " | ".join(COLUMNS) + " |\n|---|" + "---|" * len(COLUMNS) + "\n"
    return head + "".join(f"| {name} | " + " | ".join(r[c] for c in COLUMNS) + " |\n" for name, r in cells.items())


def doc_markers() -> tuple[str, str]:
    """Where docs/models.md holds the table of the installed major."""
    return f"<!-- capabilities tl{lens.MAJOR} -->\n", f"<!-- /capabilities tl{lens.MAJOR} -->\n"
