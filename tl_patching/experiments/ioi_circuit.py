"""The IOI circuit, the main job's last step (seed 000's suggestion): the heads that write the answer, the heads that
steer them and the heads those read from, found by exact path patching over the first of the main job's IOI
prompts (`tl_patching.circuit` has the method).

TransformerLens hooks: ``blocks.l.attn.hook_z`` (senders), the receivers' ``hook_q``/``hook_k``/``hook_v`` and the
final residual stream; on a HookedTransformer the path patches run through TransformerLens's own blocks, elsewhere
(a TransformerBridge, the HF backend) through those hook points (`tl_patching.path_patching`).
"""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go

from tl_patching import circuit
from tl_patching.circuit import CircuitResult
from tl_patching.experiments.spec import Experiment
from tl_patching.forward import Forward
from tl_patching.prompts import IOIBatch
from tl_patching.report.words import Claim, listing


def run(forward: Forward, data: Sequence[IOIBatch], donor_cache=None, progress: bool = True) -> CircuitResult:
    """The circuit over ``data`` (its donors are run here: no donor cache)."""
    return circuit.run(forward, data)


def finding(r) -> tuple[str, list[Claim]]:
    """The circuit in words: who writes the answer, who steers them and through which input, who those read from."""

    def heads(level: str, tables: dict) -> list[str]:
        out = []
        for l, h in r.heads.get(level, []):
            kind, effect = max(((k, float(t[l, h])) for k, t in tables.items()), key=lambda ke: abs(ke[1]))
            out.append(
                f"layer {l} head {h} ({effect:+.2f} nats"
                f"{'' if kind == 'direct' else ' through their ' + kind + ' inputs'})"
            )
        return out

    movers, steering, sources = (
        heads("name mover", {"direct": r.direct}),
        heads("steering", r.steer),
        heads("source", r.read),
    )
    cut = r.settings.get("cut_nats", float("nan"))
    text = (
        f"Exact path patching (every other head frozen at its clean output, MLPs recomputed), mean over {len(r.clean)} "
        f"prompts; clean logit difference {float(r.clean.mean()):.2f} nats, donor {float(r.donor.mean()):.2f}; a head "
        f"counts when its path moves the logit difference by at least {cut:.2f} nats. Heads writing the answer "
        f"directly (to the logits): {listing(movers)}. Heads steering them: {listing(steering)}. Heads those read "
        f"from: {listing(sources)}. {len(r.edges)} edges of at least {r.settings.get('edge_min', 0):.2f} nats are "
        "drawn."
    )
    direct_total = sum(abs(float(r.direct[l, h])) for l, h in r.heads.get("name mover", []))
    claims = [
        Claim(
            "to get a large effect, find and patch a group of heads with the same function",
            "agrees" if len(movers) >= 2 else "partly",
            f"{len(movers)} heads write the answer directly, {direct_total:.2f} nats together against "
            f"{max((abs(float(x)) for x in r.direct.flatten()), default=0):.2f} for the largest alone; path patching "
            "then finds which earlier heads feed them.",
        )
    ]
    return text, claims


def figures(r: CircuitResult) -> dict[str, go.Figure]:
    return {"circuit_graph": circuit.circuit_figure(r)}


EXPERIMENT = Experiment(
    key="circuit",
    title="The IOI circuit — exact path patching from the answer back",
    seed="seed 000",
    seed_model="GPT-2 large",
    inputs="ioi",
    order=6,
    max_prompts=50,  # path patching is the slow step: at most 50 of the main job's prompts
    run=run,
    result=CircuitResult,
    figures=figures,
    finding=finding,
)
