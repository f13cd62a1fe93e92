"""Write docs/api.md: every public function and class of the library, its signature (shapes in the jaxtyping
annotations) and its docstring, read from the code.

    python scripts/api_reference.py          # rewrites docs/api.md

tests/test_docs.py keeps docs/api.md equal to what this writes, so a changed signature cannot leave it stale.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

DOC = Path(__file__).parents[1] / "docs" / "api.md"

# The library's modules, in the order a user meets them (not the recipe, the CLI or the report's internals).
MODULES = (
    "tl_patching.edits",
    "tl_patching.forward",
    "tl_patching.backends.tl",
    "tl_patching.backends.hf",
    "tl_patching.engine",
    "tl_patching.backends.tl_engine",
    "tl_patching.backends.hf_engine",
    "tl_patching.models",
    "tl_patching.checkpoints",
    "tl_patching.provenance",
    "tl_patching.prompts",
    "tl_patching.metrics",
    "tl_patching.patching",
    "tl_patching.fast",
    "tl_patching.attribution",
    "tl_patching.path_patching",
    "tl_patching.edges",
    "tl_patching.circuit",
    "tl_patching.cache_store",
    "tl_patching.distributed",
    "tl_patching.experiments",
    "tl_patching.results",
    "tl_patching.plotting",
    "tl_patching.families",
    "tl_patching.testing",
)

HEADER = """# API reference

Generated from the code by `python scripts/api_reference.py` (`tests/test_docs.py` keeps this page equal to it):
every public function and class, its signature with the shapes in its annotations (`Int[Tensor, "batch pos"]`:
a tensor of ints of shape `[batch, pos]`), and its docstring.

**The metric convention.** Every sweep takes a metric of the final position's logits:
`tl_patching.metrics.LogitDiff(correct, wrong)` or any callable `[batch, d_vocab] -> [batch]`, and returns it per
variant (or layer, position, head) and prompt, the prompt axis last, on the CPU in float32. The arguments come in
one order everywhere:

- `patching.sweep(forward, tokens, variants, metric)`, `patching.head_sweep(forward, tokens, donor, metric, pos=-1)`,
  `patching.head_pos_sweep(forward, tokens, donor, metric)`;
- `fast.final_position_head_sweep(forward, tokens, donor_cache, metric, …, recipient_run=)`,
  `fast.position_head_sweep(forward, tokens, donor_cache, metric, …, recipient_run=)`,
  `fast.position_sweep(forward, tokens, donor_cache, metric, kind, …, recipient_run=)`;
- `path_patching.path_patch(forward, tokens, donor, metric, senders, receivers, mlps, recipient_run, max_rows)`;
- `attribution.attribution_patch(forward, tokens, donor, metric)`,
  `attribution.atp_star(forward, tokens, donor, metric, qk_fix, grad_drop)`.

`donor` is the donor's token ids or a donor cache (`{hook name: activation}`, from `forward.run(donor_tokens,
cache=[…])`); `donor_cache` is the cache only.
"""


def _annotation(a) -> str:
    if a is inspect.Parameter.empty:
        return ""
    return a if isinstance(a, str) else inspect.formatannotation(a)


def _default(value, module) -> str:
    """The default as written: a module constant by its name, anything else by its repr."""
    for name, obj in vars(module).items():
        if obj is value and name.isupper():
            return name
    return repr(value)


def signature(obj, module, name: str) -> str:
    """``name(a: A, b: B = 1) -> R``, one parameter per line when long (private fields left out)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return name
    params = []
    for p in sig.parameters.values():
        if p.name.startswith("_") or p.name in ("self", "cls"):
            continue
        text = ("*" if p.kind is p.VAR_POSITIONAL else "**" if p.kind is p.VAR_KEYWORD else "") + p.name
        if p.annotation is not p.empty:
            text += f": {_annotation(p.annotation)}"
        if p.default is not p.empty:
            text += f" = {_default(p.default, module)}"
        params.append(text)
    returns = (
        f" -> {_annotation(sig.return_annotation)}"
        if sig.return_annotation is not sig.empty and not inspect.isclass(obj)
        else ""
    )
    one_line = f"{name}({', '.join(params)}){returns}"
    if len(one_line) <= 116:
        return one_line
    return f"{name}(\n" + "".join(f"    {p},\n" for p in params) + f"){returns}"


def first_paragraph(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.split("\n\n")[0].split())


def docstring(obj) -> str:
    """The whole docstring, its paragraphs kept (argument lists and shapes are often after the first)."""
    doc = inspect.getdoc(obj) or ""
    return "\n\n".join(" ".join(par.split()) for par in doc.split("\n\n") if par.strip())


def public(module) -> list[tuple[str, object]]:
    """The module's own public functions and classes: its ``__all__`` if it has one, else every name defined in it
    without a leading underscore."""
    names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
    out = []
    for n in names:
        obj = getattr(module, n, None)
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and (
            getattr(obj, "__module__", None) == module.__name__ or hasattr(module, "__all__")
        ):
            out.append((n, obj))
    return out


def methods(cls) -> list[tuple[str, object]]:
    """A class's own public methods and properties (not inherited, not dunder)."""
    return [
        (n, v)
        for n, v in vars(cls).items()
        if not n.startswith("_") and (inspect.isfunction(v) or isinstance(v, (property, classmethod, staticmethod)))
    ]


def markdown() -> str:
    import tl_patching

    exports = ", ".join(f"`{n}` (`{tl_patching._EXPORTS[n]}`)" for n in sorted(tl_patching._EXPORTS))
    out = [HEADER, f"`import tl_patching` gives, imported on first use: {exports}.\n"]
    for name in MODULES:
        module = importlib.import_module(name)
        entries = public(module)
        if not entries:
            continue
        out.append(f"## `{name}`\n\n{first_paragraph(module)}\n")
        for n, obj in entries:
            kind = "class " if inspect.isclass(obj) else ""
            out.append(f"```\n{kind}{signature(obj, module, n)}\n```\n\n{docstring(obj)}\n")
            for m, v in methods(obj) if inspect.isclass(obj) else ():
                fn = v.fget if isinstance(v, property) else getattr(v, "__func__", v)
                text = f"{n}.{m}  (property)" if isinstance(v, property) else signature(fn, module, f"{n}.{m}")
                out.append(f"```\n{text}\n```\n\n{docstring(fn)}\n" if docstring(fn) else f"```\n{text}\n```\n")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    DOC.write_text(markdown())
    print(f"wrote {DOC}")
