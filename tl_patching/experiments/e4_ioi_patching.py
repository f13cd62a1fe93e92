"""E4 — patching attention heads vs hidden states in IOI (seed 001).

Recipient "Sam and Sally went to the park. Sam gave a gift to" (answer " Sally"); donor of the same
token length with the other name repeated (answer " Sam"). Cache the donor's per-head outputs
``blocks.l.attn.hook_z`` (HF: the input of ``h[l].attn.c_proj``, split into heads) and its
``blocks.l.hook_resid_post`` (HF: the output of ``h[l]``). For every layer, run the recipient with
(a) all heads of that layer replaced by the donor's (all positions, as the seed), (b) the block output
replaced at the position where donor and recipient differ (the repeated name, S2), (c) the block output
replaced at the final position; read the logit difference correct − wrong (and the probability ratio,
its exponential). Replacing the block output at *every* position would reproduce the donor run
exactly at every layer, which localises nothing.

Seed (GPT-2 small and medium): hidden-state patching flips the answer at some layers; patching all
heads of a layer moves it only a little. Sanity check, asserted in code: the patched z equals the donor's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor

from tl_patching.cache_store import FINAL_LOGITS
from tl_patching.distributed import map_batches
from tl_patching.edits import act_name, patch, patch_where
from tl_patching.experiments.spec import Experiment
from tl_patching.forward import Forward
from tl_patching.metrics import LogitDiff, Summary, logit_diff, summarize
from tl_patching.patching import layer_variants, sweep
from tl_patching.plotting import index_axis, reference_line, titled
from tl_patching.prompts import IOIBatch, run_info, seed_pair
from tl_patching.report.words import Claim, at_layers, ratio_text, with_ci
from tl_patching.results import Result


def as_batches(model, data: IOIBatch | Sequence[IOIBatch] | None, donor_cache=None) -> list[IOIBatch]:
    """E4/E5 input as a list of batches (default: the seed's pair); a donor cache is one dict for a single batch, or
    a list of dicts, one per batch."""
    batches = [seed_pair(model)] if data is None else [data] if isinstance(data, IOIBatch) else list(data)
    if isinstance(donor_cache, dict) and len(batches) != 1:
        raise ValueError(
            f"a donor cache as one dict belongs to one batch of donor prompts, and there are {len(batches)}: "
            "pass a list of caches, one per batch"
        )
    if donor_cache is not None and not isinstance(donor_cache, dict) and len(donor_cache) != len(batches):
        raise ValueError(f"{len(donor_cache)} donor caches for {len(batches)} batches: one per batch")
    return batches


@dataclass
class E4Result(Result):
    clean: Float[Tensor, " prompt"]  # recipient's logit difference, unpatched
    donor: Float[Tensor, " prompt"]  # donor run's logit difference (same correct/wrong ids: negative if it flips)
    heads_patched: Float[Tensor, "layer prompt"]  # all heads of the layer patched, all positions
    resid_s2_patched: Float[Tensor, "layer prompt"]  # hook_resid_post patched where donor ≠ recipient
    resid_final_patched: Float[Tensor, "layer prompt"]  # hook_resid_post patched at the final position
    clean_summary: Summary
    donor_summary: Summary
    heads_summary: list[Summary]
    resid_s2_summary: list[Summary]
    resid_final_summary: list[Summary]

    @classmethod
    def of(cls, info, clean: Tensor, donor: Tensor, heads: Tensor, resid_s2: Tensor, resid_final: Tensor) -> E4Result:
        """The result of these per-prompt logit differences, with their summaries (mean, 95% bootstrap CI) computed."""
        return cls(
            info=info,
            clean=clean,
            donor=donor,
            heads_patched=heads,
            resid_s2_patched=resid_s2,
            resid_final_patched=resid_final,
            clean_summary=summarize(clean),
            donor_summary=summarize(donor),
            heads_summary=[summarize(x) for x in heads],
            resid_s2_summary=[summarize(x) for x in resid_s2],
            resid_final_summary=[summarize(x) for x in resid_final],
        )

    def prob_ratio(self, which: str = "heads_patched", with_ci: bool = False) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """P(correct)/P(wrong) per layer as exp(mean logit difference): the geometric mean of the per-prompt
        ratios (an arithmetic mean of exp(·) lets a few confident prompts dominate). ``which``: a per-layer
        field (``heads_patched``, ``resid_s2_patched``, ``resid_final_patched``) or ``clean`` / ``donor``.
        ``with_ci``: also the 95% bootstrap CI, exp of the CI of the mean logit difference (its ``*_summary``)."""
        summary = getattr(self, which.removesuffix("_patched") + "_summary")
        single = not isinstance(summary, list)
        exp = lambda end: torch.tensor(
            [getattr(s, end) for s in ([summary] if single else summary)], dtype=torch.float64
        ).exp()  # noqa: E731
        ratio, low, high = (x[0] if single else x for x in (exp("mean"), exp("ci_low"), exp("ci_high")))
        return (ratio, low, high) if with_ci else ratio

    def reading(self) -> str:
        def flips(summaries) -> str:
            at = [str(l) for l, x in enumerate(summaries) if x.mean < 0]
            return f"at layer{'s' if len(at) > 1 else ''} {', '.join(at)}" if at else "at no layer"

        heads_move = max(abs(s.mean - self.clean_summary.mean) for s in self.heads_summary)
        c = self.clean_summary
        return (
            f"clean logit diff {with_ci(c)}, donor "
            f"{self.donor_summary.mean:.2f}; hook_resid_post patched at S2 flips the mean "
            f"{flips(self.resid_s2_summary)}, at the final position {flips(self.resid_final_summary)}; patching all "
            f"heads of one layer moves it by at most {heads_move:.2f} nats and flips it {flips(self.heads_summary)}"
        )


def donor_names(n_layers: int) -> list[str]:
    """What E4 and E5 read from the donor run: every layer's hook_z and hook_resid_post."""
    return [act_name(kind, l) for l in range(n_layers) for kind in ("z", "resid_post")]


def check_patch_lands(forward: Forward, tokens: Tensor, donor: dict[str, Tensor]) -> None:
    """Sanity check: with every layer's z patched, the model's hook_z *is* the donor's (one forward)."""
    names = [act_name("z", l) for l in range(forward.cfg.n_layers)]
    _, patched = forward.run(tokens, [patch(n, donor) for n in names], cache=names)
    for n in names:
        if not torch.equal(patched[n], donor[n].expand_as(patched[n]).to(patched[n])):
            raise AssertionError(f"patched {n} is not the donor's")


def patch_layer_sweep(
    forward: Forward, batch: IOIBatch, donor: dict[str, Tensor] | None = None, progress: bool = True
) -> tuple[Tensor, ...]:
    """Logit differences for one batch: clean [N], donor [N], then per layer [L, N]: heads, resid at S2, resid at
    final."""
    L = forward.cfg.n_layers
    if donor is not None and FINAL_LOGITS in donor:  # a saved donor run holds its logits too: no donor forward
        donor_ld = LogitDiff(batch.correct, batch.wrong)(donor[FINAL_LOGITS])
    else:
        donor_logits, fresh = forward.run(batch.donor_tokens, cache=[] if donor else donor_names(L))
        donor = donor or fresh
        donor_ld = logit_diff(donor_logits, batch.correct, batch.wrong)
    check_patch_lands(forward, batch.tokens, donor)
    differs = batch.tokens != batch.donor_tokens
    final = torch.zeros_like(differs)
    final[:, -1] = True
    resid = [act_name("resid_post", l) for l in range(L)]
    variants = (
        [[]]  # clean
        + layer_variants(donor, range(L), "z")  # all heads of the layer, every position
        + [[patch_where(n, donor, differs)] for n in resid]  # the block output where donor ≠ recipient (S2)
        + [[patch_where(n, donor, final)] for n in resid]  # the block output at the final position
    )
    ld = sweep(
        forward, batch.tokens, variants, LogitDiff(batch.correct, batch.wrong), progress=progress, desc="E4 variants"
    )
    return (
        ld[0],
        donor_ld,
        ld[1 : L + 1],
        ld[L + 1 : 2 * L + 1],
        ld[2 * L + 1 :],
    )


def run(
    forward: Forward,
    data: IOIBatch | Sequence[IOIBatch] | None = None,
    donor_cache: dict[str, Tensor] | Sequence[dict[str, Tensor]] | None = None,
    progress: bool = True,
) -> E4Result:
    """Per-layer patching curves over one prompt pair (default: the seed's) or a dataset of batches.

    ``donor_cache``: the donor's hook_z and hook_resid_post for every layer (e.g. loaded from disk), one dict per
    batch (a list; a dict alone for one batch); with the donor's final-position logits (`cache_store.FINAL_LOGITS`, as
    `cache_store.cached_runs` saves them) the donor is not run at all.
    """
    batches = as_batches(forward.model, data, donor_cache)
    clean, donor, heads, resid_s2, resid_final = map_batches(  # under torchrun: this rank's prompts, then all gathered
        lambda b, d: patch_layer_sweep(forward, b, d, progress), batches, donor_cache
    )
    return E4Result.of(run_info(forward, batches, n_batches=len(batches)), clean, donor, heads, resid_s2, resid_final)


def conclusion(r: E4Result) -> str:
    """Where the final position's hidden state carries the donor's answer."""
    final = [l for l, s in enumerate(r.resid_final_summary) if s.mean < 0]
    if not final:
        return "No single layer's hidden state at the final position carries the donor's answer (E4)."
    if final == list(
        range(final[0], len(r.resid_final_summary))
    ):  # "from layer l on" only if every later layer flips too
        return (
            f"The answer is carried by the final position's hidden state from layer {final[0]} on: patching it "
            f"there gives the donor's answer (E4)."
        )
    return (
        f"The final position's hidden state carries the donor's answer {at_layers(final)}: patching it there "
        f"gives the donor's answer (E4)."
    )


# --- the finding in words (the report's paragraph and its claims against the seed) ---


E4_LABELS = {
    "heads": "patching all heads of the layer (hook_z, every position)",
    "resid_s2": "patching hook_resid_post at the repeated name (S2)",
    "resid_final": "patching hook_resid_post at the final position",
}


def finding(r) -> tuple[str, list[Claim]]:
    c, d = r.clean_summary, r.donor_summary
    n = c.n
    parts = [
        f"Over {n} IOI prompt{'s' if n != 1 else ''}, the unpatched model prefers the correct name by {with_ci(c)} in "
        f"logit difference, a probability ratio P(correct)/P(wrong) of {ratio_text(math.exp(c.mean))} (exp of the "
        f"mean, i.e. the geometric mean over prompts); {c.accuracy:.0%} of prompts are right. The donor prompts give "
        f"{with_ci(d)}."
    ]
    flipped = {}
    for key, label in E4_LABELS.items():
        summaries = getattr(r, f"{key}_summary")
        flips = [l for l, s in enumerate(summaries) if s.mean < 0]
        flipped[key] = flips
        if flips:
            worst = min(range(len(summaries)), key=lambda l: summaries[l].mean)
            parts.append(
                f"{label[0].upper() + label[1:]} flips the mean {at_layers(flips)} (lowest at layer {worst}: "
                f"{with_ci(summaries[worst], brackets=False)})."
            )
        else:
            low = min(range(len(summaries)), key=lambda l: summaries[l].mean)
            parts.append(
                f"{label[0].upper() + label[1:]} flips it at no layer (lowest at layer {low}: "
                f"{with_ci(summaries[low], brackets=False)})."
            )
    heads_move = [abs(s.mean - c.mean) for s in r.heads_summary]
    span = abs(c.mean - d.mean) or 1.0
    hidden = sorted(set(flipped["resid_s2"]) | set(flipped["resid_final"]))
    claims = [
        Claim(
            "patching the hidden state flips the answer at some layers",
            "agrees" if hidden else "differs",
            f"hook_resid_post flips the mean {at_layers(hidden)}."
            + ("" if hidden else " The donor's answer never reaches a single position's hidden state whole."),
        )
    ]
    small = max(heads_move) < 0.25 * span
    big = max(range(len(heads_move)), key=heads_move.__getitem__)
    claims.append(
        Claim(
            "patching all heads of one layer moves the logit difference only a little",
            "agrees" if small else "differs",
            f"the largest move is {heads_move[big]:.2f} nats at layer {big}, {heads_move[big] / span:.0%} of the way "
            "from the recipient's to the donor's value."
            + (
                ""
                if small
                else f" In a {r.info.n_layers}-layer model each layer holds 1/{r.info.n_layers} of all heads "
                "(GPT-2 small: 1/12), so one layer's heads can carry a whole step of the task."
            ),
        )
    )
    return " ".join(parts), claims


# --- figures ---


E4_CURVES = (  # (field of E4Result, legend label)
    ("heads_patched", "all heads of the layer (hook_z, all positions)"),
    ("resid_s2_patched", "hook_resid_post at the repeated name (S2)"),
    ("resid_final_patched", "hook_resid_post at the final position"),
)


def figures(r: E4Result) -> dict[str, go.Figure]:
    L = r.heads_patched.shape[0]
    layers = list(range(L))
    n = int(r.info.settings.get("n_prompts", len(r.clean)))
    prompts = f"{n} prompt{'s' if n != 1 else ''}"
    fig = go.Figure()
    for which, label in E4_CURVES:
        summaries = getattr(r, which.removesuffix("_patched") + "_summary")
        fig.add_trace(
            go.Scatter(
                x=layers,
                y=[s.mean for s in summaries],
                name=label,
                mode="lines+markers",
                error_y=dict(
                    type="data",
                    symmetric=False,
                    array=[s.ci_high - s.mean for s in summaries],
                    arrayminus=[s.mean - s.ci_low for s in summaries],
                    visible=n > 1,  # one prompt has no interval
                ),
            )
        )
    reference_line(fig, r.clean_summary.mean, f"recipient, unpatched<br>({r.clean_summary.mean:.2f})", "green")
    reference_line(fig, r.donor_summary.mean, f"donor ({r.donor_summary.mean:.2f})", "red")
    reference_line(fig, 0.0, "0: indifferent", "black", dash=None)
    fig.update_layout(
        title=titled(
            f"E4 ({r.info.model_name}, {prompts}): logit difference correct − wrong (nats) after patching one layer "
            "from the donor",
            ("mean over prompts; bars: 95% bootstrap CI" if n > 1 else "one prompt: no interval")
            + "; below 0 = the answer flipped to the donor's",
        ),
        xaxis=index_axis(L, "patched layer"),
        yaxis_title="logit difference (nats)",
    )

    ratio = go.Figure()
    for which, label in E4_CURVES:
        value, low, high = (x.numpy() for x in r.prob_ratio(which, with_ci=True))
        ratio.add_trace(
            go.Scatter(
                x=layers,
                y=value,
                name=label,
                mode="lines+markers",
                error_y=dict(type="data", symmetric=False, array=high - value, arrayminus=value - low, visible=n > 1),
            )
        )
    clean, donor = float(r.prob_ratio("clean")), float(r.prob_ratio("donor"))
    reference_line(ratio, clean, f"recipient, unpatched<br>({clean:.3g})", "green", log=True)
    reference_line(ratio, donor, f"donor ({donor:.3g})", "red", log=True)
    reference_line(ratio, 1.0, "1: P(correct) = P(wrong)", "black", dash=None, log=True)
    ratio.update_layout(
        title=titled(
            f"E4 ({r.info.model_name}, {prompts}): probability ratio P(correct) / P(wrong) after patching one layer",
            "exp(mean logit difference) = geometric mean of the per-prompt ratios; "
            + ("bars: 95% bootstrap CI; " if n > 1 else "one prompt: no interval; ")
            + "log scale; below 1 = the answer flipped",
        ),
        xaxis=index_axis(L, "patched layer"),
        yaxis=dict(title="P(correct) / P(wrong) (log scale)", type="log", exponentformat="power"),
    )
    return {"e4_logit_diff_by_layer": fig, "e4_prob_ratio_by_layer": ratio}


EXPERIMENT = Experiment(
    key="e4",
    title="E4 — IOI: patching all heads of a layer vs the hidden state",
    seed="seed 001",
    seed_model="GPT-2 small and medium",
    inputs="ioi",
    order=4,
    split_prompts=True,
    run=run,
    result=E4Result,
    figures=figures,
    finding=finding,
    conclusion=conclusion,
    donor_names=donor_names,
)
