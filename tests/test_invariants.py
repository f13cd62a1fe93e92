"""Hook invariants (`tl_patching.invariants`): every family's tiny model passes them, read and written, on both
TransformerLens majors; each invariant has a model that breaks exactly it, and the hook is then refused by name; an
architecture without an HF table (OPT, TransformerLens 4) gets its hooks checked by the invariants alone."""

import pytest
import torch

from tl_patching import invariants, lens
from tl_patching.backends import tl as tl_backend
from tl_patching.edits import scale
from tl_patching.families import FAMILIES
from tl_patching.forward import Forward
from tl_patching.testing import random_pair

TOKENS = torch.tensor([[3, 9, 11, 13, 17, 19]])


def model(family: str = "gpt2", n_layers: int = 3):
    return random_pair(family, n_layers=n_layers, n_heads=4, seed=2)[1]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_passes_read_and_written(family):
    tl = model(family)
    broken, covered = invariants.read_failures(tl)
    assert broken == []
    parallel = invariants.parallel(tl)
    expected = set(invariants.CHECKED) - ({"hook_resid_mid"} if parallel else set())
    if invariants.norm_after_sublayers(tl):  # Gemma 2/3: attn_out, mlp_out normed: z, neurons have no invariant
        expected -= {"attn.hook_z", "mlp.hook_post"}
    assert expected <= covered, expected - covered
    for l in (0, tl.cfg.n_layers - 1):
        for suffix in sorted(covered - {"attn.hook_pattern"}):
            assert invariants.write_failure(tl, f"blocks.{l}.{suffix}") is None, (l, suffix)
    status = invariants.status(tl)
    assert status["hook_resid_post"] == "hf_table" and status["attn.hook_q"] == "hf_table"


def refused(tl, name: str, match: str, write: bool = False) -> None:
    edits = [scale(name, 0.5)] if write else []
    with pytest.raises(NotImplementedError, match=match):
        Forward(tl).run(TOKENS, edits, cache=[] if write else [name])


def doctor(monkeypatch, hook: str, change) -> None:
    """The invariants see ``change`` applied to the activation at ``hook`` (and nothing downstream of it): a model
    whose hook point is not what it claims, the same way on both majors."""
    measure = invariants.failures

    def doctored(model, logits, cache, written=None):
        return measure(model, logits, {**cache, hook: change(cache[hook])}, written)

    monkeypatch.setattr(invariants, "failures", doctored)


PRE, MID, POST = (
    "resid_mid = resid_pre + attn_out",
    "resid_post = resid_mid + mlp_out",
    "resid_pre[l+1] = resid_post[l]",
)
Z, NEURONS = "attn_out = Σ_h z · W_O + b_O", "mlp_out = mlp.hook_post · W_out + b_out"
READOUT, SUMS, CAUSAL = (
    "logits = unembed(ln_final(resid_post[L-1]))",
    "pattern rows sum to 1",
    "pattern is 0 outside the causal mask",
)


@pytest.mark.parametrize(
    "hook, change, broken",
    [
        ("blocks.1.hook_resid_pre", lambda a: a + 1.0, {(POST, 0), (PRE, 1)}),
        ("blocks.1.hook_attn_out", lambda a: a + 1.0, {(PRE, 1), (Z, 1)}),
        ("blocks.1.hook_resid_mid", lambda a: a + 1.0, {(PRE, 1), (MID, 1)}),
        ("blocks.1.hook_mlp_out", lambda a: a + 1.0, {(MID, 1), (NEURONS, 1)}),
        ("blocks.1.attn.hook_z", lambda a: a * 2.0, {(Z, 1)}),
        ("blocks.1.mlp.hook_post", lambda a: a * 2.0, {(NEURONS, 1)}),
        # not a constant shift: the final LayerNorm removes one
        ("blocks.2.hook_resid_post", lambda a: a + torch.linspace(0, 1, a.shape[-1]), {(MID, 2), (READOUT, 2)}),
        ("blocks.1.attn.hook_pattern", lambda a: a * 0.5, {(SUMS, 1)}),
        ("blocks.1.attn.hook_pattern", lambda a: torch.ones_like(a) / a.shape[-1], {(CAUSAL, 1)}),
    ],
)
def test_each_invariant_has_a_model_that_breaks_exactly_it(monkeypatch, hook, change, broken):
    tl = model()
    doctor(monkeypatch, hook, change)
    assert {(f.invariant, f.layer) for f in invariants.read_failures(tl)[0]} == broken
    refused(tl, hook, f"{hook} fails the hook invariant")
    refused(tl, hook, f"{hook} fails the hook invariant", write=True)
    assert invariants.status(tl)[hook.split(".", 2)[2]] == "refused"
    if hook.endswith("resid_mid"):
        Forward(tl).run(TOKENS, cache=["blocks.0.attn.hook_q"])  # a hook no failing invariant involves still reads


def test_the_readout_invariant(monkeypatch):
    """logits = unembed(ln_final(resid_post[L-1])): a readout that skips the final norm breaks exactly it."""
    tl = model()
    monkeypatch.setattr(invariants, "_readout", lambda m, resid: m.unembed(resid))
    [failure] = invariants.read_failures(tl)[0]
    assert failure.invariant.startswith("logits = unembed") and failure.layer == 2
    refused(tl, "blocks.2.hook_resid_post", "logits = unembed")


def test_a_write_that_never_takes_is_refused(monkeypatch):
    """The edit runs but its result is dropped (the model keeps its own activation): nothing downstream changes."""
    tl = model()
    monkeypatch.setattr(tl_backend, "model_layout", lambda model, name, new, act: act)
    failure = invariants.write_failure(tl, "blocks.1.hook_resid_post")
    assert failure is not None and failure.invariant == "a write takes at its hook point"
    refused(tl, "blocks.1.hook_resid_post", "with blocks.1.hook_resid_post written", write=True)


@pytest.mark.skipif(lens.MAJOR < 4, reason="the bridge's hook_resid_mid alias (TransformerLens 4)")
def test_the_bridge_resid_mid_alias_is_caught_by_the_write_check():
    """Written at the bridge's own hook_resid_mid (the MLP norm's input), a change never reaches the residual
    stream: resid_post = resid_mid + mlp_out breaks in that run. tl_patching writes resid_mid through attn_out (the
    write check passes); the bridge's raw hook point, written as TransformerLens offers it, fails it."""
    tl = model("llama")
    assert invariants.write_failure(tl, "blocks.1.hook_resid_mid") is None  # through attn_out: fine
    cache: dict = {}

    def saver(name: str):  # the bridge's hook.name is its own alias (hook_in, hook_out): key by the name asked
        return lambda act, hook: cache.__setitem__(name, act.detach())

    raw = [("blocks.1.hook_resid_mid", lambda act, hook: act + torch.linspace(0, 1, act.shape[-1]))]
    with torch.no_grad():
        logits = tl.run_with_hooks(TOKENS, fwd_hooks=raw + [(n, saver(n)) for n in invariants._names(tl)])
    broken, _ = invariants.failures(tl, logits, cache, written="blocks.1.hook_resid_mid")
    assert [(f.invariant, f.layer) for f in broken] == [(MID, 1)]
    assert broken[0].gap > 0.01


def test_half_precision_passes_with_the_dtype_tolerance():
    tl = model("llama").to(torch.bfloat16)
    assert invariants.read_failures(tl)[0] == []


@pytest.mark.skipif(lens.MAJOR < 4, reason="architectures only TransformerLens 4's bridge boots")
@pytest.mark.parametrize(
    "architecture, layout, not_covered",
    [
        # the bridge's attn.hook_pattern never fires on OPT and GPT-J (silent: refused by name by the backend)
        ("OPTForCausalLM", "sequential", {"attn.hook_pattern"}),
        ("GPTJForCausalLM", "parallel", {"hook_resid_mid", "attn.hook_pattern"}),
        ("Olmo2ForCausalLM", "norm after sublayers", {"attn.hook_z", "mlp.hook_post"}),
        ("Qwen2MoeForCausalLM", "mixture of experts", {"mlp.hook_post"}),
    ],
)
def test_a_bridge_architecture_without_a_table_per_block_layout(architecture, layout, not_covered):
    """No tl_patching table: the invariants are the check. Each holds, read and written at the first and last layer,
    and the results record the hooks as checked by the invariants (not hf_table)."""
    from tl_patching.models import hooked_from_hf
    from tl_patching.testing import tiny_from_config_class

    tl = hooked_from_hf(tiny_from_config_class(architecture), None, name=architecture)
    assert invariants.block_layout(tl) == layout
    broken, covered = invariants.read_failures(tl)
    assert broken == [] and covered == set(invariants.CHECKED) - not_covered
    for l in (0, tl.cfg.n_layers - 1):
        for kind in sorted(covered - {"attn.hook_pattern"}):
            assert invariants.write_failure(tl, f"blocks.{l}.{kind}") is None, (l, kind)
    status = invariants.status(tl)
    assert {status[k] for k in covered} == {"invariants"} and "hf_table" not in status.values()


def test_results_and_page_say_how_each_hook_was_checked():
    """RunInfo.hook_checks: on a family with a table its hooks are hf_table on both backends; the page counts them
    and names the unchecked ones."""
    from types import SimpleNamespace

    from tl_patching.report.page import _hook_checks
    from tl_patching.results import RunInfo

    hf, tl = random_pair("llama", n_layers=2, n_heads=4, seed=2)
    checks = RunInfo.of(Forward(tl), TOKENS, prepend_bos=False).hook_checks
    assert checks["hook_resid_post"] == checks["attn.hook_z"] == "hf_table" and checks["ln1.hook_scale"] == "unchecked"
    assert set(RunInfo.of(Forward(tl, hf), TOKENS, prepend_bos=False).hook_checks.values()) == {"hf_table"}
    line = _hook_checks({"e1": SimpleNamespace(info=SimpleNamespace(hook_checks=checks))})
    n_table = sum(v == "hf_table" for v in checks.values())
    assert f"Hook checks: {n_table} kinds of hook point against HF's own modules, 0 by the hook invariants" in line
    assert "unchecked: " in line and "ln1.hook_scale" in line
