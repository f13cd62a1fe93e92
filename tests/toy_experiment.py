"""A toy experiment for tests/test_contributing.py, declared as CONTRIBUTING.md says and registered by that test
only: the entropy of the next-token distribution at the final position, clean and with one head silenced."""

from __future__ import annotations

from dataclasses import dataclass

import plotly.graph_objects as go

from tl_patching.edits import act_name, zero
from tl_patching.experiments.spec import Experiment, Option
from tl_patching.plotting import titled
from tl_patching.prompts import start_token_setting, to_tokens
from tl_patching.report.words import Claim
from tl_patching.results import Result, RunInfo


@dataclass
class ToyResult(Result):
    clean_entropy: float  # nats
    silenced_entropy: float  # nats, with head `head` of layer 0 zeroed at hook_z

    def reading(self) -> str:
        return f"entropy {self.clean_entropy:.3f} → {self.silenced_entropy:.3f} nats"


def run(forward, text: str = "Sam and Sally went to the park.", head: int = 0, prepend_bos: bool | None = None):
    prepend_bos = start_token_setting(forward.model, prepend_bos)
    tokens = to_tokens(forward.model, text, prepend_bos)

    def entropy(edits) -> float:
        p = forward(tokens, edits)[0, -1].float().softmax(-1)
        return float(-(p * p.log()).sum())

    return ToyResult(
        info=RunInfo.of(forward, tokens, prepend_bos, text=text),
        clean_entropy=entropy([]),
        silenced_entropy=entropy([zero(act_name("z", 0), head=head)]),
    )


def finding(r: ToyResult):
    higher = r.silenced_entropy > r.clean_entropy
    return (
        f"The entropy goes from {r.clean_entropy:.3f} to {r.silenced_entropy:.3f} nats.",
        [Claim("silencing a head makes the model less sure", "agrees" if higher else "differs", r.reading())],
    )


def figures(r: ToyResult):
    fig = go.Figure(go.Bar(x=["clean", "silenced"], y=[r.clean_entropy, r.silenced_entropy]))
    fig.update_layout(title=titled("Toy: next-token entropy (nats)", "clean vs one head silenced"))
    return {"toy_entropy": fig}


EXPERIMENT = Experiment(
    key="toy",
    title="Toy — next-token entropy with one head silenced",
    seed="no seed",
    seed_model="none",
    inputs="text",
    order=99,
    options=(Option("--head", "int", "the silenced head of layer 0 (default 0)"),),
    run=run,
    result=ToyResult,
    figures=figures,
    finding=finding,
)
