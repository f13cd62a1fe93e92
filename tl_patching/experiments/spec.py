"""What an experiment declares, once, in its own module: ``EXPERIMENT = Experiment(...)``.

The command line, the figures, the report and the main job loop over the experiments of this package (and any
module added with `register`); none of them names an experiment. A declaration is read twice:

- statically (`catalog`), without importing the module: its key, title, seed, inputs, order and command-line
  options, written as plain literals, are all ``tl-patching --help`` needs, so the help stays instant (importing
  an experiment imports torch);
- by importing the module (`load`): the rest — ``run``, the result class, the figures, the finding in words.

Adding an experiment: its module (method, result, finding, figures, ``EXPERIMENT``), its doc page, its tests
(CONTRIBUTING.md has the checklist).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

INPUTS = ("text", "ioi")  # one sentence (--text), or an IOI dataset (--n-prompts, --donor-cache)
_TYPES = {"int": int, "float": float, "str": str}


@dataclass(frozen=True)
class Option:
    """A command-line option of one experiment, passed to its ``run`` as the keyword named after the flag."""

    flag: str  # "--noise-mean" -> run(..., noise_mean=…)
    type: str  # "int", "float" or "str": a literal, so that `catalog` can read it without importing anything
    help: str
    choices: tuple[str, ...] | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def argparse_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(type=_TYPES[self.type], help=self.help)
        if self.choices:
            kwargs["choices"] = list(self.choices)
        return kwargs


@dataclass(frozen=True)
class Experiment:
    """One experiment. The fields above ``run`` must be literals (read by `catalog` without importing)."""

    key: str  # the command ("tl-patching e1"), the results file (e1_result.json), the report's anchor
    title: str  # the report's section title and the command's help
    seed: str  # the seed report it redoes ("seed 003")
    seed_model: str  # the model that seed used ("GPT-2 small")
    inputs: str  # "text" or "ioi" (see INPUTS)
    order: int  # position in the main job and in the report
    options: tuple[Option, ...] = ()
    max_prompts: int | None = None  # "ioi": at most this many of the main job's prompts (a slow step)
    backends: tuple[str, ...] = ("tl", "hf")  # the backends it runs on (others are refused by name)
    split_prompts: bool = False  # under torchrun: each process takes its share of the prompts (else rank 0 runs it)
    # --- read by importing the module ---
    run: Callable[..., Any] | None = (
        None  # text: run(forward, **options); ioi: run(forward, data, donor_cache=, progress=, **options)
    )
    result: type | None = None  # the `tl_patching.results.Result` subclass ``run`` returns
    figures: Callable[[Any], dict] | None = None  # result -> {file stem: plotly Figure}
    finding: Callable[[Any], tuple] | None = None  # result -> (paragraph, [report.words.Claim])
    data_note: Callable[[Any], str] | None = None  # result -> a sentence for the report's data paragraph
    conclusion: Callable[[Any], str | None] | None = None  # result -> a point for the report's conclusion
    donor_names: Callable[[int], list[str]] | None = (
        None  # n_layers -> hooks a --donor-cache must hold (None: no cache)
    )

    def __post_init__(self):
        if self.inputs not in INPUTS:
            raise ValueError(f"experiment {self.key!r}: inputs must be one of {INPUTS}, got {self.inputs!r}")


_LITERAL_FIELDS = [
    f.name
    for f in fields(Experiment)
    if f.name not in ("run", "result", "figures", "finding", "data_note", "conclusion", "donor_names")
]
_EXTRA: list[str] = []  # modules added with `register`, e.g. a user's own experiment


def register(module: str) -> None:
    """Add the experiment declared in ``module`` (an importable name, e.g. "my_lab.my_experiment") to the catalog,
    as if it were in this package: the command line, the main job and the report then include it."""
    if module not in _EXTRA:
        _EXTRA.append(module)


def _modules() -> list[str]:
    package = __name__.rsplit(".", 1)[0]
    here = importlib.import_module(package).__path__
    own = [f"{package}.{m.name}" for m in pkgutil.iter_modules(here) if not m.name.startswith("_") and m.name != "spec"]
    return own + _EXTRA


def _literal(node: ast.AST) -> Any:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Option":
        return Option(*[_literal(a) for a in node.args], **{k.arg: _literal(k.value) for k in node.keywords})
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(_literal(e) for e in node.elts)
    return ast.literal_eval(node)


def declared(module: str) -> Experiment | None:
    """The literal part of ``module``'s ``EXPERIMENT = Experiment(...)``, read from its source (nothing is run);
    None if the module declares no experiment."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"no module {module!r}")
    tree = ast.parse(open(spec.origin, encoding="utf-8").read(), spec.origin)
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and [getattr(t, "id", None) for t in node.targets] == ["EXPERIMENT"]
            and isinstance(node.value, ast.Call)
        ):
            given = {k.arg: k.value for k in node.value.keywords if k.arg in _LITERAL_FIELDS}
            try:
                return Experiment(**{k: _literal(v) for k, v in given.items()})
            except (ValueError, TypeError) as e:
                raise TypeError(
                    f"{module}: EXPERIMENT's fields {', '.join(_LITERAL_FIELDS)} must be literals ({e})"
                ) from None
    return None


def catalog() -> dict[str, tuple[str, Experiment]]:
    """Every experiment, in main-job order: key -> (module, literal declaration)."""
    found = [(m, d) for m in _modules() if (d := declared(m)) is not None]
    keys = [d.key for _, d in found]
    if len(set(keys)) != len(keys):
        raise ValueError(f"two experiments share a key: {sorted(k for k in keys if keys.count(k) > 1)}")
    return {d.key: (m, d) for m, d in sorted(found, key=lambda md: (md[1].order, md[1].key))}


def keys() -> list[str]:
    return list(catalog())


def load(key: str) -> Experiment:
    """The full declaration of experiment ``key`` (imports its module)."""
    entries = catalog()
    if key not in entries:
        raise ValueError(f"unknown experiment {key!r}; choose from {', '.join(entries)}")
    module, light = entries[key]
    experiment = importlib.import_module(module).EXPERIMENT
    if (
        replace(
            experiment,
            **{f: None for f in ("run", "result", "figures", "finding", "data_note", "conclusion", "donor_names")},
        )
        != light
    ):
        raise TypeError(f"{module}: EXPERIMENT differs from what its source declares (build it from literals only)")
    return experiment
