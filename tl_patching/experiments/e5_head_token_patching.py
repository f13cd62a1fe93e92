"""E5 — one head at one token: patching each head alone, at the final position only (seed 000).

For every layer × head, replace only that head's output z (TL ``blocks.l.attn.hook_z[:, -1, head]``;
HF: that head's d_head slice of the input of ``h[l].attn.c_proj``, last position) with the donor's,
and map the change in logit difference (patched − clean) as a layer × head heatmap.

Why the effects are small: a block computes x_out = x_in + Σ_heads attn_h(x) + MLP(…). One head at
one position is one of n_heads terms of one summand at one of the positions that later layers read,
so each patch moves the residual stream by a 1/n_heads share of one term. Seed (GPT-2 large):
effects tiny, larger in late layers, some heads raise the score and some lower it.

``method="fast"`` (default where it runs, on either backend) runs `tl_patching.fast.final_position_head_sweep`
(exact, recomputes only the final position); ``method="sweep"`` runs the reference driver
`tl_patching.patching.head_sweep`. The result says which ran.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor

from tl_patching import fast, patching
from tl_patching.distributed import map_batches
from tl_patching.edits import act_name
from tl_patching.experiments.e4_ioi_patching import as_batches, donor_names
from tl_patching.experiments.spec import Experiment, Option
from tl_patching.forward import Forward
from tl_patching.metrics import LogitDiff, logit_diff
from tl_patching.plotting import COLOURS, NEGATIVE_COLOUR, POSITIVE_COLOUR, heatmap, index_axis, titled
from tl_patching.prompts import IOIBatch, run_info
from tl_patching.report.words import Claim, listing
from tl_patching.results import Result


@dataclass
class E5Result(Result):
    clean: Float[Tensor, " prompt"]  # recipient's logit difference
    effect: Float[Tensor, "layer head prompt"]  # patched − clean logit difference, per prompt
    method: str

    @property
    def heatmap(self) -> Float[Tensor, "layer head"]:
        return self.effect.mean(-1)

    def layer_summary(self) -> dict[str, Tensor]:
        """Per layer: mean |effect|, the largest rise and fall, and how many heads raise the score."""
        m = self.heatmap
        return {
            "mean_abs": m.abs().mean(-1),
            "max": m.max(-1).values,
            "min": m.min(-1).values,
            "n_positive": (m > 0).sum(-1),
        }

    def reading(self) -> str:
        m = self.heatmap
        H = m.shape[1]
        top, bottom = int(m.argmax()), int(m.argmin())
        mean_abs = self.layer_summary()["mean_abs"]
        return (
            f"clean logit diff {self.clean.mean():.2f}; largest rise {m.max():+.3f} (layer {top // H}, head "
            f"{top % H}), largest fall {m.min():+.3f} (layer {bottom // H}, head {bottom % H}); {int((m > 0).sum())} "
            f"of {m.numel()} heads raise the score; mean |effect| {mean_abs[: len(mean_abs) // 2].mean():.3f} in the "
            f"first half of the layers, {mean_abs[len(mean_abs) // 2 :].mean():.3f} in the second"
        )


METHODS = ("fast", "sweep")


def run(
    forward: Forward,
    data: IOIBatch | Sequence[IOIBatch] | None = None,
    method: str | None = None,
    donor_cache: dict[str, Tensor] | Sequence[dict[str, Tensor]] | None = None,
    progress: bool = True,
) -> E5Result:
    """Single-head, final-position patching sweep over all layers × heads.

    ``method``: "fast" or "sweep" (either backend); default "fast" where it can run (`fast.unavailable`: not on an
    architecture without tl_patching's HF table, on a bridge or the HF backend), else "sweep".
    ``donor_cache``: the donor's ``hook_z`` for every layer (e.g. loaded from disk), one dict per batch (a list; a
    dict alone for one batch).
    """
    method = method or ("fast" if fast.unavailable(forward) is None else "sweep")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    batches = as_batches(forward.model, data, donor_cache)
    z_names = [act_name("z", l) for l in range(forward.cfg.n_layers)]

    def one_batch(b: IOIBatch, donor: dict[str, Tensor] | None) -> tuple[Tensor, Tensor]:
        donor = donor or forward.run(b.donor_tokens, cache=z_names)[1]
        clean = logit_diff(forward(b.tokens), b.correct, b.wrong).float().cpu()
        metric = LogitDiff(b.correct, b.wrong)
        if method == "fast":
            patched = fast.final_position_head_sweep(forward, b.tokens, donor, metric, progress=progress)
        else:
            patched = patching.head_sweep(forward, b.tokens, donor, metric, pos=-1, progress=progress)
        return clean, patched - clean  # both on the CPU in float32

    clean, effect = map_batches(
        one_batch, batches, donor_cache
    )  # under torchrun: this rank's prompts, then all gathered
    if not torch.isfinite(effect).all():
        raise FloatingPointError("the sweep produced NaN/inf logit differences")
    return E5Result(
        info=run_info(forward, batches),
        clean=clean,
        effect=effect,
        method=method,
    )


def conclusion(r: E5Result) -> str:
    """The heads that lower the logit difference most at the final position."""
    m = r.heatmap
    H = m.shape[1]
    order = m.flatten().argsort()[:3].tolist()
    return (
        "The heads that matter most at the final position are "
        + listing(
            [
                f"layer {i // H} head {i % H} ({float(m.flatten()[i]):+.2f} nats)"
                for i in order
                if float(m.flatten()[i]) < 0
            ],
            "none",
        )
        + " (E5)."
    )


# --- the finding in words (the report's paragraph and its claims against the seed) ---


def finding(r) -> tuple[str, list[Claim]]:
    m = r.heatmap
    L, H = m.shape
    clean = float(r.clean.mean())
    top, bottom = int(m.argmax()), int(m.argmin())
    n_pos, n_neg = int((m > 0).sum()), int((m < 0).sum())
    quiet = int((m.abs() < 0.01).sum())
    mean_abs = m.abs().mean(-1)
    early, late = float(mean_abs[: L // 2].mean()), float(mean_abs[L // 2 :].mean())
    n = len(r.clean)
    text = (
        f"Patching one head's output at the final position only, mean over {n} prompt{'s' if n != 1 else ''} "
        f"(clean logit difference {clean:.2f} nats): the largest fall is {float(m.min()):+.2f} nats at layer "
        f"{bottom // H}, head {bottom % H} ({abs(float(m.min())) / abs(clean):.0%} of the clean value), the largest "
        f"rise {float(m.max()):+.2f} at layer {top // H}, head {top % H}. {n_pos} of {m.numel()} heads raise the score "
        f"and {n_neg} lower it"
        + (f"; {quiet} change it by less than 0.01 nats" if quiet else "")
        + f". The mean |effect| per head is "
        f"{early:.2f} nats in the first half of the layers and {late:.2f} in the second."
    )
    share = (
        f"A block computes x_out = x_in + Σ_heads attn_h(x) + MLP(…): one head at one position is a 1/{H} share of one "
        f"term here (GPT-2 large: 1/20), and this model has {L * H} heads in all (GPT-2 large: 720), so each carries "
        "far more of the task."
    )
    tiny = abs(float(m.min())) < 0.1 * abs(clean) and abs(float(m.max())) < 0.1 * abs(clean)
    claims = [
        Claim(
            "single-head effects are tiny",
            "agrees" if tiny else "differs",
            f"the largest is {max(abs(float(m.min())), abs(float(m.max()))):.2f} nats against a clean {clean:.2f}."
            + ("" if tiny else " " + share),
        ),
        Claim(
            "effects are larger in late layers",
            "agrees" if late > early else "differs",
            f"mean |effect| {early:.2f} nats in the first half of the layers, {late:.2f} in the second.",
        ),
        Claim(
            "some heads raise the score and some lower it",
            "agrees" if n_pos and n_neg else "differs",
            f"{n_pos} raise it and {n_neg} lower it.",
        ),
    ]
    return text, claims


# --- figures ---


def figures(r: E5Result) -> dict[str, go.Figure]:
    n = len(r.clean)
    heat = heatmap(
        r.heatmap,
        f"E5 ({r.info.model_name}): change in logit difference (nats) from patching one head at the final position",
        f"patched − clean, mean over {n} prompt{'s' if n != 1 else ''} (clean {float(r.clean.mean()):.2f} nats); "
        f"{NEGATIVE_COLOUR} = lowers the logit difference (toward the donor's answer), {POSITIVE_COLOUR} = raises it",
        "Δ logit diff (nats)",
    )
    summary = r.layer_summary()
    L = len(summary["mean_abs"])
    layers = list(range(L))
    bars = go.Figure(
        [
            go.Bar(
                x=layers,
                y=summary["max"].numpy(),
                name="largest rise (most positive head)",
                marker_color=COLOURS["rise"],
            ),
            go.Bar(
                x=layers,
                y=summary["min"].numpy(),
                name="largest fall (most negative head)",
                marker_color=COLOURS["fall"],
            ),
            go.Scatter(
                x=layers,
                y=summary["mean_abs"].numpy(),
                name="mean |effect| over the layer's heads",
                mode="lines+markers",
                line_color="black",
            ),
        ]
    )
    bars.add_hline(y=0, line_color="grey")
    bars.update_layout(
        title=titled(
            f"E5 ({r.info.model_name}): per-layer summary of single-head, final-position patches",
            "change in logit difference (nats), patched − clean, heads' means over prompts",
        ),
        xaxis=index_axis(L, "layer"),
        yaxis_title="Δ logit difference (nats)",
        barmode="group",
    )
    return {"e5_head_heatmap": heat, "e5_layer_summary": bars}


EXPERIMENT = Experiment(
    key="e5",
    title="E5 — IOI: one head at the final position",
    seed="seed 000",
    seed_model="GPT-2 large",
    inputs="ioi",
    order=5,
    split_prompts=True,
    options=(
        Option(
            "--method",
            "str",
            "fast: recompute only the final position (tl backend); sweep: the reference driver "
            "(default: fast on tl, sweep on hf)",
            choices=("fast", "sweep"),
        ),
    ),
    run=run,
    result=E5Result,
    figures=figures,
    finding=finding,
    conclusion=conclusion,
    donor_names=donor_names,
)
