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

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from tl_patching.distributed import map_batches
from tl_patching.edits import act_name, patch, patch_where
from tl_patching.forward import Forward
from tl_patching.metrics import Summary, logit_diff, summarize
from tl_patching.patching import layer_variants, sweep
from tl_patching.prompts import IOIBatch, ioi_pair, token_rows
from tl_patching.results import Result, RunInfo

SEED_RECIPIENT = "Sam and Sally went to the park. Sam gave a gift to"
SEED_DONOR = "Sam and Sally went to the park. Sally gave a gift to"


def seed_pair(model) -> IOIBatch:
    return ioi_pair(model, SEED_RECIPIENT, SEED_DONOR, " Sally", " Sam")


def as_batches(model, data: IOIBatch | Sequence[IOIBatch] | None, donor_cache=None) -> list[IOIBatch]:
    """E4/E5 input as a list of batches (default: the seed's pair); a donor cache fits one batch only."""
    batches = [seed_pair(model)] if data is None else [data] if isinstance(data, IOIBatch) else list(data)
    if donor_cache is not None and len(batches) != 1:
        raise ValueError("a donor cache belongs to one batch of donor prompts; pass a single IOIBatch")
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

    def prob_ratio(self, which: str = "heads_patched", with_ci: bool = False) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """P(correct)/P(wrong) per layer as exp(mean logit difference): the geometric mean of the per-prompt
        ratios (an arithmetic mean of exp(·) lets a few confident prompts dominate). ``which``: a per-layer
        field (``heads_patched``, ``resid_s2_patched``, ``resid_final_patched``) or ``clean`` / ``donor``.
        ``with_ci``: also the 95% bootstrap CI, exp of the CI of the mean logit difference (its ``*_summary``)."""
        summary = getattr(self, which.removesuffix("_patched") + "_summary")
        single = not isinstance(summary, list)
        exp = lambda end: torch.tensor([getattr(s, end) for s in ([summary] if single else summary)], dtype=torch.float64).exp()  # noqa: E731
        ratio, low, high = (x[0] if single else x for x in (exp("mean"), exp("ci_low"), exp("ci_high")))
        return (ratio, low, high) if with_ci else ratio

    def reading(self) -> str:
        def flips(summaries) -> str:
            at = [str(l) for l, x in enumerate(summaries) if x.mean < 0]
            return f"at layer{'s' if len(at) > 1 else ''} {', '.join(at)}" if at else "at no layer"

        heads_move = max(abs(s.mean - self.clean_summary.mean) for s in self.heads_summary)
        c = self.clean_summary
        return (f"clean logit diff {c.mean:.2f} nats (95% bootstrap CI [{c.ci_low:.2f}, {c.ci_high:.2f}]), donor "
                f"{self.donor_summary.mean:.2f}; hook_resid_post patched at S2 flips the mean {flips(self.resid_s2_summary)}, "
                f"at the final position {flips(self.resid_final_summary)}; patching all heads of one layer moves it "
                f"by at most {heads_move:.2f} nats and flips it {flips(self.heads_summary)}")


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


def patch_layer_sweep(forward: Forward, batch: IOIBatch, donor: dict[str, Tensor] | None = None, progress: bool = True) -> tuple[Tensor, ...]:
    """Logit differences for one batch: clean [N], donor [N], then per layer [L, N]: heads, resid at S2, resid at final."""
    L = forward.cfg.n_layers
    donor_logits, fresh = forward.run(batch.donor_tokens, cache=[] if donor else donor_names(L))
    donor = donor or fresh
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
    ld = sweep(forward, batch.tokens, variants, lambda logits: logit_diff(logits, batch.correct, batch.wrong),
               progress=progress, desc="E4 variants")
    return ld[0], logit_diff(donor_logits, batch.correct, batch.wrong), ld[1 : L + 1], ld[L + 1 : 2 * L + 1], ld[2 * L + 1 :]


def run(
    forward: Forward, data: IOIBatch | Sequence[IOIBatch] | None = None, donor_cache: dict[str, Tensor] | None = None,
    progress: bool = True,
) -> E4Result:
    """Per-layer patching curves over one prompt pair (default: the seed's) or a dataset of batches.

    ``donor_cache``: the donor's hook_z and hook_resid_post for every layer (e.g. loaded from disk); one batch only.
    """
    batches = as_batches(forward.model, data, donor_cache)
    clean, donor, heads, resid_s2, resid_final = map_batches(  # under torchrun: this rank's prompts, then all gathered
        lambda b, d: patch_layer_sweep(forward, b, d, progress), batches, donor_cache)
    return E4Result(
        info=RunInfo.of(forward, token_rows(batches), batches[0].prepend_bos, n_prompts=len(clean),
                        n_batches=len(batches), texts=[t for b in batches for t in b.texts][:10]),
        clean=clean, donor=donor, heads_patched=heads, resid_s2_patched=resid_s2, resid_final_patched=resid_final,
        clean_summary=summarize(clean), donor_summary=summarize(donor), heads_summary=[summarize(x) for x in heads],
        resid_s2_summary=[summarize(x) for x in resid_s2], resid_final_summary=[summarize(x) for x in resid_final],
    )
