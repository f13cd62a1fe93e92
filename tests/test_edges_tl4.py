"""EAP (`edges.attribute(method="eap")`) equals TransformerLens 4's own edge attribution patching, edge by edge.

TL 4.3's ``transformer_lens.tools.analysis.attribution_patching.attribution_patch`` with
``EdgeAttributionConfig(granularity="edge")`` scores every (writer, reader) pair *per position*:
``(a_clean[w] − a_corrupt[w])[p] · ∂metric/∂(input of r)[p]``, the gradient taken on its *corrupt* run, each prompt
pair run alone and the per-pair scores averaged over the batch. Mapped onto ours:

- direction: TL differentiates at its corrupt run and takes clean − corrupt; we differentiate at our clean run and
  take donor − clean. So TL's ``clean`` is our donor and TL's ``corrupt`` is our clean tokens; no sign flip. (In
  TL's natural order, clean=tokens/corrupt=donor, the gradient is the donor run's: a different estimate, max
  |difference| 0.30 from ours even with its sign flipped, against a max score of 0.39 here.)
- positions: a writer at p only reaches the residual stream at p, so our Σ_pos is TL's per-position scores summed.
- prompts: our metric is the mean over prompts, so its gradient carries 1/batch per prompt: TL's batch mean (a sum
  would be off by up to 0.78 here).
- writers: TL's ``embed`` is ``hook_embed`` (tokens only), ours ``hook_resid_pre`` of layer 0 (plus positional
  embeddings); TL's head writer is ``attn.hook_result`` (z·W_O[h], no b_O), ours z·W_O[h]. The positional embedding
  is the same in both runs, so the differences are equal.
- readers: TL's ``q/k/v_input`` (per head) are ``hook_resid_pre``, ``mlp_in`` is ``hook_resid_mid`` and ``logits``
  the last ``hook_resid_post``: our receivers' private inputs.
- edges: the same 110 (times 6 positions = 660 TL keys); none missing on either side.

TL refuses edge granularity on grouped-query/multi-query attention (k/v inputs shared by query heads, which our graph
has as one receiver per key/value head) and on blocks with a norm or scale after the head sum; ``ig_steps > 1``
(EAP-IG) raises NotImplementedError in 4.3. So only plain EAP on a GPT-2 is compared. TL 3.9 ships the module with
node granularity only: skipped there.
"""

import pytest
import torch

pytest.importorskip("transformer_lens.tools.analysis.attribution_patching")

from transformer_lens.tools.analysis.attribution_patching import (  # noqa: E402
    EdgeAttributionConfig,
    attribution_patch,
)

# TL 3.9 ships the module too, but its edge granularity raises NotImplementedError: ask for it rather than a version
try:
    EdgeAttributionConfig(granularity="edge")
except NotImplementedError as e:
    pytest.skip(f"this TransformerLens has no edge attribution: {e}", allow_module_level=True)

from tl_patching import edges  # noqa: E402
from tl_patching.forward import Forward  # noqa: E402
from tl_patching.metrics import LogitDiff  # noqa: E402
from tl_patching.testing import random_pair  # noqa: E402

CORRECT, WRONG = 7, 11  # one answer pair for every prompt: TL's metric_fn sees one prompt and cannot tell which


@pytest.fixture(scope="module")
def setup():
    _, model = random_pair("gpt2", n_layers=2, n_heads=4, d_head=8, seed=1)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (3, 6), generator=g)
    donor = tokens.clone()
    donor[:, 2] = torch.randint(0, 64, (3,), generator=g)
    return model, tokens, donor


def test_eap_equals_transformer_lens_edge_attribution(setup):
    model, tokens, donor = setup
    forward = Forward(model)
    graph = edges.graph_of(forward)
    ours = edges.attribute(forward, tokens, donor, LogitDiff(torch.full((3,), CORRECT), torch.full((3,), WRONG)))

    # TL's clean is our donor, its corrupt our clean run (see the module docstring); one call over the batch of 3
    result = attribution_patch(
        model,
        donor,
        tokens,
        lambda logits: logits[0, -1, CORRECT] - logits[0, -1, WRONG],
        EdgeAttributionConfig(granularity="edge"),
    )

    def sender(node):
        if node.kind == "embed":
            return 0
        return graph.head(node.layer, node.head) if node.kind == "attn_head_out" else graph.mlp(node.layer)

    def receiver(node):
        if node.kind == "logits":
            return graph.logits
        if node.kind == "mlp_in":
            return graph.receiver(node.layer, "mlp")
        return graph.receiver(node.layer, node.kind[0], node.head)  # "q_input" -> "q", …

    theirs = torch.zeros_like(ours)
    seen = torch.zeros_like(graph.edges)
    before = []  # scores at positions 0, 1, where donor and clean runs are the same
    for (w, r), score in result.edge_scores.items():
        assert w.position == r.position  # TL's edges stay at one position
        theirs[sender(w), receiver(r)] += score  # Σ over positions
        seen[sender(w), receiver(r)] = True
        if w.position < 2:
            before.append(score)

    assert len(result.edge_scores) == graph.n_edges * tokens.shape[1] == 110 * 6
    assert torch.equal(seen, graph.edges)  # the same graph: every edge of ours, no other
    assert max(abs(s) for s in before) == 0.0
    scale = ours.abs().max().item()
    assert scale > 0.1  # not vacuous: measured 0.39
    assert (ours.abs() > 1e-3 * scale).sum() > 90  # nearly every edge carries a score (measured 101 of 110)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * scale)  # measured max |diff| 2.4e-7

    # TL's node scores are each writer's sum over its edges: ours summed over receivers
    node = torch.zeros(len(graph.senders))
    for w, score in result.node_scores.items():
        node[sender(w)] += score
    torch.testing.assert_close(ours.sum(1), node, rtol=1e-4, atol=1e-4 * scale)


def test_tl_writers_and_readers_are_ours_up_to_run_constants(setup):
    """Why the scores can be equal: TL's writers differ from our senders only by what both runs share (positional
    embeddings, b_O), and its readers are the same residual streams."""
    model, tokens, donor = setup
    flags = (model.cfg.use_attn_result, model.cfg.use_split_qkv_input, model.cfg.use_hook_mlp_in)
    try:  # the hooks TL's edge sweep turns on for itself
        model.set_use_attn_result(True)
        model.set_use_split_qkv_input(True)
        model.set_use_hook_mlp_in(True)
        _, clean = model.run_with_cache(tokens)
        _, other = model.run_with_cache(donor)
    finally:
        model.set_use_attn_result(flags[0])
        model.set_use_split_qkv_input(flags[1])
        model.set_use_hook_mlp_in(flags[2])

    def gap(a, b):
        return (a - b).abs().max().item()

    # "embed": tokens only; its donor − clean difference is that of hook_resid_pre (positional embeddings cancel)
    assert gap(clean["hook_embed"], clean["blocks.0.hook_resid_pre"]) > 0.1  # measured 0.58
    resid = "blocks.0.hook_resid_pre"
    assert gap(other["hook_embed"] - clean["hook_embed"], other[resid] - clean[resid]) < 1e-6
    for l in range(2):
        # a head's hook_result is z·W_O[h] without b_O: the heads sum to hook_attn_out less the bias
        result = clean[f"blocks.{l}.attn.hook_result"]
        b_O = model.blocks[l].attn.b_O.detach()
        assert b_O.abs().max() > 0.1  # the bias is there to be left out
        assert gap(result.sum(2) + b_O, clean[f"blocks.{l}.hook_attn_out"]) < 1e-5
        W_O = model.blocks[l].attn.W_O.detach()
        assert gap(result, torch.einsum("bphk,hkd->bphd", clean[f"blocks.{l}.attn.hook_z"], W_O)) < 1e-5
        # readers: every head's q/k/v input is the layer's resid_pre, the MLP's input its resid_mid
        for kind in "qkv":
            assert (
                gap(clean[f"blocks.{l}.attn.hook_{kind}_input"], clean[f"blocks.{l}.hook_resid_pre"][:, :, None]) == 0
            )
        assert gap(clean[f"blocks.{l}.hook_mlp_in"], clean[f"blocks.{l}.hook_resid_mid"]) == 0
