"""The main job's ``index.html``, assembled: the model card, then per experiment its data, its finding in words
with the seed's claims beside it, its figures, and a conclusion.

Built only from the ``<key>_result.json`` files in the output folder, every one present whichever command wrote it
(each experiment's own ``finding``, ``figures`` and ``conclusion`` read its result), so the page always matches the
folder and can be rebuilt without rerunning anything::

    python -m tl_patching.report figures/shipped

The page holds nothing that changes between identical runs (no timings, no dates).
"""

from __future__ import annotations

import html
import os
import sys
from pathlib import Path

from tl_patching.experiments import spec
from tl_patching.report.cards import model_card
from tl_patching.report.words import SHIPPED_NAME, Claim, token_count

BACKENDS = {"tl": "TransformerLens", "hf": "raw HuggingFace"}
STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1040px;margin:2em auto;padding:0 1em;line-height:1.5;color:#222}\n"
    "img,iframe{width:100%;max-width:1000px;border:0}iframe{height:640px}"
    "figure{margin:1.2em 0}figcaption{font-size:.9em;color:#555}\n"
    "table{border-collapse:collapse;margin:1em 0}th{white-space:nowrap}"
    "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}\n"
    ".agrees{color:#1a7f37}.differs{color:#b3261e}.partly,.not{color:#9a6700}code{background:#f4f4f4;padding:0 .2em}\n"
    ".incomplete{background:#fff4e5;border-left:4px solid #b3261e;padding:.5em 1em}"
)


def data_description(experiment: spec.Experiment, r) -> str:
    """The report's data paragraph: the sentence and its tokens, or the IOI prompts."""
    info = r.info
    note = (" " + experiment.data_note(r)) if experiment.data_note else ""
    if experiment.inputs == "text":
        return f"Text: “{info.settings.get('text', '?')}” ({token_count(info)}).{note}"
    from tl_patching.prompts import HELD_OUT_TEMPLATES, TEMPLATES

    n = int(info.settings.get("n_prompts", len(info.token_ids)))
    examples = info.settings.get("texts", [])[:2]
    if n == 1:
        return (
            f"The seed's single prompt pair: “{examples[0] if examples else '?'}” (donor: the other name "
            f"repeated).{note}"
        )
    start = info.start_token_words()
    return (
        f"{n} IOI prompts, each with a donor (the same sentence with the other name repeated, so the answer flips and "
        f"the token length does not), half with the names in ABBA order and half BABA, built from the "
        f"{len(TEMPLATES) + len(HELD_OUT_TEMPLATES)} templates in tl_patching.prompts"
        + (" (the last is never used to train the shipped model)" if info.model_name == SHIPPED_NAME else "")
        + f"; e.g. “{'”, “'.join(examples)}”. {start[0].upper() + start[1:]}.{note}"
    )


def _figures(files: list[Path]) -> str:
    out = []
    for f in files:
        if f.suffix != ".html":
            continue
        png = f.with_suffix(".png")
        if png in files or png.exists():
            out.append(
                f'<figure><a href="{f.name}"><img src="{png.name}" alt="{f.stem}"></a>'
                f'<figcaption><a href="{f.name}">{f.stem}</a> (interactive)</figcaption></figure>'
            )
        else:
            out.append(
                f'<figure><iframe src="{f.name}" title="{f.stem}"></iframe>'
                f'<figcaption><a href="{f.name}">{f.stem}</a> (open full page)</figcaption></figure>'
            )
    return "\n".join(out)


def _claims_table(experiment: spec.Experiment, claims: list[Claim]) -> str:
    rows = "".join(
        f'<tr><td>{html.escape(c.seed_says)}</td><td class="{c.verdict.split()[0]}"><b>{c.verdict}</b></td>'
        f"<td>{html.escape(c.because)}</td></tr>"
        for c in claims
    )
    return (
        f"<p><b>Against the seed</b> ({experiment.seed}, {experiment.seed_model}):</p><table><tr><th>the seed's "
        f"claim</th><th>here</th><th>why</th></tr>{rows}</table>"
    )


def conclusion(
    model_name: str, experiments: dict[str, spec.Experiment], found: dict[str, tuple[str, list[Claim]]], results: dict
) -> str:
    """How many of the seeds' claims agree, each experiment's point for the conclusion, and the caveat."""
    claims = [c for _, cs in found.values() for c in cs]
    counts = {v: sum(c.verdict == v for c in claims) for v in ("agrees", "partly", "differs", "not tested")}
    points = [
        point for key, r in results.items() if experiments[key].conclusion and (point := experiments[key].conclusion(r))
    ]
    shipped = str(model_name) == SHIPPED_NAME
    caveat = (
        "These are findings about the shipped 4-layer model of a synthetic IOI language, with few heads, each a large "
        "share of the computation; where they differ from the seeds' GPT-2 findings, the reasons above are about depth "
        "and width. Run <code>tl-patching reproduce --model gpt2</code> (or gpt2-medium, gpt2-large) to test the "
        "seeds' claims on the models they were made on."
        if shipped
        else "Where the findings differ from the seeds, compare the model's depth and width with the seed's model "
        "before reading it as a contradiction."
    )
    return (
        f"<h2>Conclusion</h2><p>Of {len(claims)} claims from the seed reports, {counts['agrees']} agree, "
        f"{counts['partly']} partly agree and {counts['differs']} differ here"
        + (f" ({counts['not tested']} not tested)" if counts["not tested"] else "")
        + ". "
        + " ".join(points)
        + f"</p><p>{caveat}</p>"
    )


def load_result(out_dir: Path, experiment: spec.Experiment):
    return experiment.result.from_json(Path(out_dir) / f"{experiment.key}_result.json")


INCOMPLETE = "INCOMPLETE.txt"  # written by the command line while a run into the folder has not finished
REFUSED = "refused.txt"  # <key>_refused.txt: why an experiment cannot run on the folder's model


def _runs(results: dict) -> str:
    """How the results were run: one weight mode and backend for all, or which for which (a folder can hold results
    of several commands)."""
    ways = {key: (r.info.weight_mode, BACKENDS.get(r.info.backend, r.info.backend)) for key, r in results.items()}
    if len(set(ways.values())) == 1:
        mode, backend = next(iter(ways.values()))
        return f" with {mode} weights through {backend} hooks"
    groups = {}
    for key, way in ways.items():
        groups.setdefault(way, []).append(key)
    return (
        " (results of several runs: "
        + "; ".join(
            f"{', '.join(keys)} with {mode} weights through {backend} hooks" for (mode, backend), keys in groups.items()
        )
        + ")"
    )


def _hook_checks(results: dict) -> str:
    """One line: how the TransformerLens hook points of this run are checked (`RunInfo.hook_checks`)."""
    checks = next((r.info.hook_checks for r in results.values() if r.info.hook_checks), None)
    if not checks:
        return ""
    by = {how: sorted(k for k, v in checks.items() if v == how) for how in ("hf_table", "invariants", "unchecked")}
    return (
        f"<p>Hook checks: {len(by['hf_table'])} kinds of hook point against HF's own modules, "
        f"{len(by['invariants'])} by the hook invariants alone (the residual stream adds up, the readout gives the "
        "logits, attention and MLP outputs are their heads' and neurons' writes, patterns are causal softmaxes; "
        "docs/invariants.md)"
        + (f"; unchecked: {html.escape(', '.join(by['unchecked']))}" if by["unchecked"] else "")
        + ".</p>\n"
    )


def write_report(out_dir: Path, model_name: str, model=None, incomplete: str | None = None) -> Path:
    """Write ``out_dir/index.html`` covering every ``<key>_result.json`` in ``out_dir`` (whichever commands wrote them),
    each with its figures found beside it. ``model``: the loaded model, for the card of a model other than the shipped
    one; ``incomplete``: a note for the top of the page, for a run that stopped early."""
    out_dir = Path(out_dir)
    experiments, results, found, blocks, unreadable = {}, {}, {}, [], []
    for key in spec.keys():
        if not (out_dir / f"{key}_result.json").exists():
            continue
        experiment = spec.load(key)
        try:
            r = load_result(out_dir, experiment)
        except Exception as e:  # e.g. written by an older version: named on the page, not a failed page
            unreadable.append(f"{key}_result.json ({type(e).__name__}: {e})")
            continue
        experiments[key], results[key] = experiment, r
        found[key] = text, claims = experiment.finding(r)
        figures = [out_dir / f"{name}.html" for name in experiment.figures(r)]
        blocks.append(
            f'<h2 id="{key}">{html.escape(experiment.title)}</h2>'
            f"<p><b>Data.</b> {html.escape(data_description(experiment, r))}</p>"
            f"<p><b>Finding.</b> {html.escape(text)}</p>{_claims_table(experiment, claims)}"
            f"{_figures([f for f in figures if f.exists()])}"
            f'<p>Numbers: <a href="{key}_result.json">{key}_result.json</a> '
            "(token ids, settings, every per-prompt value).</p>"
        )
    info = next(iter(results.values())).info if results else None
    card = model_card(model_name, info, model)
    name = "the shipped model" if str(model_name) == SHIPPED_NAME else model_name
    intro = (
        f"<p>Activation-editing and patching experiments, redone on TransformerLens hook points and cross-checked "
        f"against raw HuggingFace hooks (the tests), run on {html.escape(str(name))}"
        + html.escape(_runs(results) if results else "")
        + ". Each section gives the data, the finding in words with its numbers, the seed report's claim beside it, "
        "and the figures (click one for the interactive version). Intervals are 95% bootstrap confidence intervals of "
        "the mean over prompts; logit differences are in nats.</p>"
    )
    notes = {k: out_dir / f"{k}_{REFUSED}" for k in spec.keys() if k not in results}
    refused = {k: note.read_text().strip() for k, note in notes.items() if note.exists()}
    absent = [k for k in spec.keys() if k not in results and k not in refused]
    status = (
        (f'<p class="incomplete"><b>Incomplete.</b> {html.escape(incomplete)}</p>\n' if incomplete else "")
        + "".join(
            f"<p>Not run on this model: {html.escape(k)} ({html.escape(why)}).</p>\n" for k, why in refused.items()
        )
        + (
            "<p><b>Not cross-checked.</b> tl_patching has no raw-HF hook table for this model's architecture: its hook "
            "points are TransformerLens's bridge's own, checked at load on the logits and for hooks that never fire, "
            "not against raw HF hooks (docs/transformerlens4.md).</p>\n"
            if any(r.info.hf_cross_checked is False for r in results.values())
            else ""
        )
        + _hook_checks(results)
        + (
            f"<p>Not in this folder: {html.escape(', '.join(absent))} (<code>tl-patching reproduce</code> runs them "
            "all).</p>\n"
            if absent
            else ""
        )
        + "".join(f"<p>Could not be read: {html.escape(u)}.</p>\n" for u in unreadable)
    )
    card_html = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in card)
    model_section = (
        "<h2>The model</h2>"
        + (
            "<p>A small GPT-2-architecture model the project trained itself, so that everything runs offline "
            "(full card: docs/model_card.md).</p>"
            if str(model_name) == SHIPPED_NAME
            else ""
        )
        + f"<table>{card_html}</table>"
    )
    contents = "".join(f'<li><a href="#{k}">{html.escape(experiments[k].title)}</a></li>' for k in results)
    page = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>tl_patching — '
        f"{html.escape(str(model_name))}</title><style>{STYLE}</style></head><body>\n"
        "<h1>tl_patching: what the experiments found on "
        f"{html.escape(str(name))}</h1>\n{status}{intro}\n"
        f'<ul>{contents}<li><a href="#conclusion">Conclusion</a></li></ul>\n'
        f"{model_section}\n"
        + "\n".join(blocks)
        + f'\n<div id="conclusion">{conclusion(model_name, experiments, found, results)}</div>\n</body></html>\n'
    )
    index = out_dir / "index.html"
    tmp = out_dir / ".index.html.partial"
    tmp.write_text(page)
    os.replace(tmp, index)  # never a half page
    return index


def main(argv: list[str] | None = None) -> None:
    """``python -m tl_patching.report DIR [MODEL]``: rebuild DIR/index.html from the results JSON and figures in DIR
    (and DIR/INCOMPLETE.txt, if a run left one)."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        raise SystemExit("usage: python -m tl_patching.report DIR [MODEL]  (MODEL: 'shipped' by default)")
    out_dir = Path(args[0])
    model_name = args[1] if len(args) > 1 else SHIPPED_NAME
    marker = out_dir / INCOMPLETE
    print(write_report(out_dir, model_name, incomplete=marker.read_text().strip() if marker.exists() else None))
