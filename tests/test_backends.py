"""The two backends are mirror images: every hook point, every edit and every error equal (fp32, abs tolerance 1e-4)."""

import pytest
import torch

from tl_patching import lens
from tl_patching.backends import hf as hf_backend
from tl_patching.backends import tl as tl_backend
from tl_patching.edits import HookNameError, gaussian_noise, patch, patch_where, replace, scale, zero

ATOL = 1e-4
BACKENDS = ["tl", "hf"]


def assert_close(a, b, atol=ATOL):
    """Equal values; -inf (masked attention scores) in the same places on both sides."""
    assert a.shape == b.shape
    finite = torch.isfinite(a)
    assert torch.equal(finite, torch.isfinite(b))
    assert (a[finite] - b[finite]).abs().max().item() <= atol


def test_both_backends_know_the_same_names(pair):
    """Every TL hook point is either mapped to an HF boundary or refused with a reason: none is forgotten."""
    hf, tl = pair
    assert sorted(hf_backend.hook_names(hf)) == sorted(tl_backend.hook_names(tl))


def mapped_names(hf):
    family_refused = hf_backend.hook_map_of(hf).refused
    return [
        n for n in hf_backend.hook_names(hf) if n.split(".", 2)[-1] not in family_refused and n not in family_refused
    ]


@pytest.mark.parametrize(
    "name", mapped_names(__import__("tl_patching.testing", fromlist=["random_gpt2"]).random_gpt2(n_layers=3)[0])
)
def test_cached_activation_equals_hf(forwards, tokens, name):
    _, tl_cache = forwards["tl"].run(tokens, cache=[name])
    _, hf_cache = forwards["hf"].run(tokens, cache=[name])
    assert tl_cache[name].abs().max() > 1e-2  # a non-trivial activation, so equality means something
    assert_close(tl_cache[name], hf_cache[name])


def test_logits_equal_hf(forwards, tokens):
    assert_close(forwards["tl"](tokens), forwards["hf"](tokens))


def edits_for(donor, head=2):
    """The seeds' interventions, addressed at ``head`` where they are head-level."""
    return {
        "zero head z": [zero("blocks.1.attn.hook_z", head=head)],
        "zero head key": [zero("blocks.1.attn.hook_k", head=head)],
        "noise even MLP neurons": [
            gaussian_noise("blocks.1.mlp.hook_post", mean=10.0, std=1.0, seed=0, neurons=slice(0, None, 2))
        ],
        "scale block output 0.1": [scale("blocks.1.hook_resid_post", 0.1)],
        "scale block output 10": [scale("blocks.1.hook_resid_post", 10.0)],
        "patch one head at one position": [patch("blocks.1.attn.hook_z", donor, head=head, pos=-1)],
        "patch whole resid_post": [patch("blocks.1.hook_resid_post", donor)],
        "scale ln_final normalized": [scale("ln_final.hook_normalized", 0.5, neurons=slice(0, 5))],
        "scale ln1 normalized": [scale("blocks.1.ln1.hook_normalized", 3.0)],
    }


@pytest.fixture(scope="module")
def donor(forwards, donor_tokens):
    return forwards["tl"].run(donor_tokens, cache=["blocks.1.attn.hook_z", "blocks.1.hook_resid_post"])[1]


@pytest.mark.parametrize("what", list(edits_for({"blocks.1.attn.hook_z": None, "blocks.1.hook_resid_post": None})))
def test_edit_equals_hf(forwards, tokens, donor, what):
    edits = edits_for(donor)[what]
    clean = forwards["tl"](tokens)
    tl_logits = forwards["tl"](tokens, edits)
    assert (tl_logits - clean).abs().max() > 1e-2  # the edit does something
    assert_close(tl_logits, forwards["hf"](tokens, edits))


@pytest.mark.parametrize("what", ["zero head z", "zero head key", "patch one head at one position"])
def test_hf_side_on_neighbouring_head_differs(forwards, tokens, donor, what):
    """The equivalence above could not pass if the HF side read the wrong head slice."""
    tl_logits = forwards["tl"](tokens, edits_for(donor, head=2)[what])
    for wrong in (1, 3):
        assert (tl_logits - forwards["hf"](tokens, edits_for(donor, head=wrong)[what])).abs().max() > 1e-2


def test_hf_noise_on_odd_neurons_differs(forwards, tokens):
    even = gaussian_noise("blocks.1.mlp.hook_post", mean=10.0, seed=0, neurons=slice(0, None, 2))
    odd = gaussian_noise("blocks.1.mlp.hook_post", mean=10.0, seed=0, neurons=slice(1, None, 2))
    assert (forwards["tl"](tokens, [even]) - forwards["hf"](tokens, [odd])).abs().max() > 1e-2


def test_ln_final_write_keeps_the_bias(pair, forwards, tokens):
    """Writing ln_final.hook_normalized unchanged must leave HF's logits unchanged (w·x + b, bias included)."""
    hf, _ = pair
    identity = scale("ln_final.hook_normalized", 1.0)
    assert_close(forwards["hf"](tokens, [identity]), forwards["hf"](tokens), atol=1e-5)
    assert hf.transformer.ln_f.bias.abs().max() > 0.05  # a bias that matters, so dropping it would fail above


@pytest.mark.parametrize("backend", BACKENDS)
def test_edited_activation_is_what_the_cache_and_downstream_see(forwards, tokens, donor, backend):
    name = "blocks.1.attn.hook_z"
    edit = patch(name, donor, head=2, pos=-1)
    clean = forwards[backend].run(tokens, cache=[name])[1][name]
    patched = forwards[backend].run(tokens, [edit], cache=[name])[1][name]
    assert torch.equal(patched[:, -1, 2], donor[name][:, -1, 2])
    assert torch.equal(patched[:, :-1], clean[:, :-1]) and torch.equal(patched[:, :, [0, 1, 3]], clean[:, :, [0, 1, 3]])


def test_hf_edit_is_visible_in_hidden_states_after_recorder_installed(pair, tokens):
    """transformers 5 records hidden_states with its own hooks; ours must run before them (prepend=True)."""
    hf, _ = pair
    with torch.no_grad():
        clean = hf(tokens, output_hidden_states=True).hidden_states  # installs the recorder first
        with hf_backend.hooks(hf, [scale("blocks.1.hook_resid_post", 0.1)]):
            edited = hf(tokens, output_hidden_states=True).hidden_states
    assert torch.allclose(edited[2], 0.1 * clean[2], atol=1e-6)


def n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("backend", BACKENDS)
def test_hooks_removed_even_when_forward_raises(pair, forwards, tokens, backend):
    model = pair[0] if backend == "hf" else pair[1]
    forwards[backend].run(tokens)  # let transformers install whatever hooks of its own it keeps
    before = n_hooks(model)
    with pytest.raises(ValueError, match="does not fit"):
        forwards[backend].run(tokens, [replace("blocks.0.attn.hook_z", torch.zeros(5))])  # d_head is 8
    assert n_hooks(model) == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_hooks_context_manager_records_and_edits(forwards, tokens, backend):
    cache = {}
    with forwards[backend].hooks(
        [zero("blocks.0.hook_resid_post")], cache, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"]
    ):
        forwards[backend].model(tokens) if backend == "tl" else forwards[backend].hf_model(tokens)
    assert torch.equal(cache["blocks.0.hook_resid_post"], torch.zeros_like(cache["blocks.0.hook_resid_post"]))
    assert torch.equal(cache["blocks.1.hook_resid_pre"], torch.zeros_like(cache["blocks.1.hook_resid_pre"]))


# --- the same bad input, the same error on both backends ---

BAD = [
    (
        [zero("blocks.1.attn.hook_zz")],
        HookNameError,
        r"unknown hook name 'blocks\.1\.attn\.hook_zz'; did you mean 'blocks\.1\.attn\.hook_z'",
    ),
    ([zero("nonsense")], HookNameError, "unknown hook name 'nonsense'"),
    ([zero("blocks.7.attn.hook_z")], IndexError, r"layer 7 out of range, the model has 3 layers \(0\.\.2\)"),
    ([zero("blocks.0.attn.hook_z", head=4)], IndexError, "head 4 out of range for blocks.0.attn.hook_z: size 4"),
    ([zero("blocks.0.attn.hook_z", head=-5)], IndexError, "head -5 out of range"),
    ([zero("blocks.0.attn.hook_z", pos=9)], IndexError, "pos 9 out of range"),
    ([zero("blocks.0.attn.hook_z", head=0, neurons=[8])], IndexError, "neurons 8 out of range"),
    ([zero("blocks.0.mlp.hook_post", neurons=slice(200, None))], IndexError, "selects nothing"),
    ([zero("blocks.0.hook_resid_post", head=1)], ValueError, "has no head axis"),
    ([replace("blocks.0.hook_resid_post", torch.zeros(7))], ValueError, r"replacement of shape \(7,\) does not fit"),
    ([zero("blocks.0.attn.hook_z", head=[])], IndexError, "head index of blocks.0.attn.hook_z is empty"),
    (
        [zero("blocks.0.mlp.hook_post", neurons=torch.tensor([], dtype=torch.long))],
        IndexError,
        "neurons index .* empty",
    ),
    ([zero("blocks.0.attn.hook_z", pos=slice(5, 2))], IndexError, r"pos slice\(5, 2, None\) selects nothing"),
    (
        [zero("blocks.0.hook_resid_post").on_rows(slice(5, 9))],
        IndexError,
        "rows slice.* select nothing of a batch of 3",
    ),
    (
        [patch("blocks.0.attn.hook_z", {"blocks.0.attn.hook_z": torch.zeros(2, 9, 4, 8)}, head=1)],
        ValueError,
        r"donor activation \(2, 9, 4, 8\) does not match the recipient's \(3, 9, 4, 8\)",
    ),
    (
        [
            patch_where(
                "blocks.0.hook_resid_post", {"blocks.0.hook_resid_post": torch.zeros(3, 9, 32)}, torch.ones(3, 5) > 0
            )
        ],
        ValueError,
        r"mask \(3, 5\) does not match \[batch, pos\] = \(3, 9\)",
    ),
]


@pytest.mark.parametrize("edits, error, message", BAD)
def test_same_error_on_both_backends(forwards, tokens, edits, error, message):
    messages = []
    for backend in BACKENDS:
        with pytest.raises(error, match=message) as caught:
            forwards[backend].run(tokens, edits)
        messages.append(str(caught.value))
    assert messages[0] == messages[1]


@pytest.mark.parametrize(
    "name, error, message",
    [
        ("blocks.1.attn.hook_zz", HookNameError, r"unknown hook name 'blocks\.1\.attn\.hook_zz'; did you mean"),
        ("blocks.9.hook_resid_post", IndexError, r"layer 9 out of range, the model has 3 layers"),
    ],
)
def test_same_error_for_a_bad_read_on_both_backends(forwards, tokens, name, error, message):
    messages = []
    for backend in BACKENDS:
        with pytest.raises(error, match=message) as caught:
            forwards[backend].run(tokens, cache=[name])
        messages.append(str(caught.value))
    assert messages[0] == messages[1]


@pytest.mark.parametrize(
    "where",
    [dict(pos=1.5), dict(pos=[1.5]), dict(head=True), dict(neurons=torch.tensor([True, False])), dict(head="1")]
    + [dict(pos=iter([1])), dict(neurons=torch.tensor([0.0]))],
)
def test_an_index_that_is_not_ints_is_refused_when_the_edit_is_made(where):
    """A float or a boolean index was truncated to ints (pos=[1.5] edited position 1; a mask edited positions 0
    and 1) or failed deep inside with "'float' object is not iterable"."""
    what = next(iter(where))
    with pytest.raises(TypeError, match=f"{what} of blocks.0.attn.hook_z must be an int, a list or integer tensor"):
        zero("blocks.0.attn.hook_z", **where)


def test_numpy_and_tensor_ints_index_like_python_ints(forwards, tokens):
    import numpy as np

    name = "blocks.1.attn.hook_z"
    for backend in BACKENDS:
        plain = forwards[backend](tokens, [zero(name, head=2, pos=[0, 3])])
        for head, pos in ((np.int64(2), np.array([0, 3])), (torch.tensor(2), torch.tensor([0, 3]))):
            assert torch.equal(forwards[backend](tokens, [zero(name, head=head, pos=pos)]), plain)
        assert not torch.equal(forwards[backend](tokens, [zero(name, head=1, pos=[0, 3])]), plain)


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "llama"])
def test_same_error_on_grouped_query_and_qk_norm_models(family):
    """Grouped-query key/value heads and TL's flattened QK-norm hooks: the same bad edit, the same error."""
    from tl_patching.forward import Forward
    from tl_patching.testing import random_pair

    hf, tl = random_pair(family, n_layers=2)  # 4 query heads, 2 key/value heads
    forwards = {"tl": Forward(tl), "hf": Forward(tl, hf)}
    tokens = torch.randint(2, 60, (2, 7), generator=torch.Generator().manual_seed(1))
    bad = [
        (zero("blocks.0.attn.hook_k", head=2), IndexError, "head 2 out of range for blocks.0.attn.hook_k: size 2 "),
        (zero("blocks.0.attn.hook_v", head=[0, 3]), IndexError, "head 3 out of range .*key/value heads"),
    ]
    if family != "llama":
        norm = "blocks.0.attn.q_norm.hook_normalized"
        bad += [
            (zero(norm, pos=1), ValueError, r"is \[\(batch pos head\), d_head\] in TransformerLens.*no position"),
            (zero(norm, head=1), ValueError, "has no head axis"),
            (zero(norm).on_rows(slice(0, 1)), ValueError, "its rows are not prompts"),
            (zero(norm, neurons=[tl.cfg.d_head]), IndexError, f"neurons {tl.cfg.d_head} out of range"),
        ]
    for edit, error, message in bad:
        messages = []
        for backend in BACKENDS:
            with pytest.raises(error, match=message) as caught:
                forwards[backend].run(tokens, [edit])
            messages.append(str(caught.value))
        assert messages[0] == messages[1], messages


@pytest.mark.parametrize("backend", BACKENDS)
def test_donor_of_other_length_or_batch(forwards, tokens, backend):
    name = "blocks.0.attn.hook_z"
    short = forwards["tl"].run(tokens[:, :5], cache=[name])[1]
    with pytest.raises(ValueError, match="same token length"):
        forwards[backend].run(tokens, [patch(name, short, head=1, pos=-1)])
    with pytest.raises(ValueError, match="same token length"):
        forwards[backend].run(tokens, [patch(name, {name: torch.zeros(2, 9, 4, 8)}, head=1)])
    with pytest.raises(KeyError, match="holds no"):
        patch("blocks.1.attn.hook_z", short)


def test_hf_refuses_points_without_a_boundary(forwards, tokens):
    with pytest.raises(NotImplementedError, match="read-only"):
        forwards["hf"].run(tokens, [zero("blocks.0.attn.hook_pattern", head=1)])
    with pytest.raises(NotImplementedError, match="no HF counterpart.*summed inside c_proj"):
        forwards["hf"].run(tokens, cache=["blocks.0.attn.hook_result"])


# TL creates these hook points but fires them only under a config flag; HF has no boundary for them. An edit there
# would do nothing and a read would return nothing: both backends raise NotImplementedError.
NEVER_COMPUTED = [
    "blocks.0.attn.hook_result",
    "blocks.1.hook_attn_in",
    "blocks.0.hook_q_input",
    "blocks.2.hook_v_input",
    "blocks.0.hook_mlp_in",
]


@pytest.mark.parametrize("name", NEVER_COMPUTED)
@pytest.mark.parametrize("how", ["edit", "read"])
def test_a_hook_that_never_fires_is_the_same_error_on_both_backends(forwards, tokens, name, how):
    """The same bad edit raised RuntimeError on TL and NotImplementedError on HF; a read on TL returned a cache
    without the name."""
    messages = {}
    for backend in BACKENDS:
        with pytest.raises(NotImplementedError) as caught:
            if how == "edit":
                forwards[backend].run(tokens, [zero(name, head=1) if "attn.hook_result" in name else zero(name)])
            else:
                forwards[backend].run(tokens, cache=[name])
        messages[backend] = str(caught.value)
    assert messages["tl"].startswith(f"{name} never ran: this model does not compute that hook point")
    assert messages["hf"].startswith(f"{name} has no HF counterpart in GPT2LMHeadModel: ")


def test_tl_reads_a_flagged_hook_once_its_flag_is_set(pair, tokens):
    """The refusal above is about the flag, not the name: with cfg.use_attn_result TL computes hook_result."""
    _, tl = pair
    tl.set_use_attn_result(True)
    try:
        _, cache = tl_backend.run(tl, tokens, cache=["blocks.0.attn.hook_result"])
    finally:
        tl.set_use_attn_result(False)
    assert cache["blocks.0.attn.hook_result"].shape == (3, 9, 4, tl.cfg.d_model)


def test_nan_after_edit_is_an_error(forwards, tokens):
    for backend in BACKENDS:
        with pytest.raises(FloatingPointError, match="NaN/inf"):
            forwards[backend].run(tokens, [replace("blocks.0.hook_resid_post", float("nan"))])


# --- every hook point of every family: the same outcome on both backends, or a difference named here ---

# TL fires these only under a config flag that the toolkit never sets; HF has no boundary for them.
TL_FLAGGED = {"attn.hook_result", "hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input", "hook_mlp_in"}


def outcome(forward, tokens, name: str, how: str):
    """ "ok", or the class of what the backend raised (with "read-only" / "no HF counterpart" marked)."""
    try:
        if how == "read":
            _, cache = forward.run(tokens, cache=[name])
            assert cache[name].isfinite().any()
        else:
            forward.run(tokens, [scale(name, 1.0)])
        return "ok"
    except Exception as e:  # noqa: BLE001 - the class is what is compared
        tag = " (read-only)" if "read-only on the HF backend" in str(e) else ""
        tag += " (no HF counterpart)" if "has no HF counterpart" in str(e) else ""
        return type(e).__name__ + tag


@pytest.mark.parametrize("family", list(__import__("tl_patching.families", fromlist=["FAMILIES"]).FAMILIES))
def test_every_hook_reads_and_writes_alike_or_raises_the_same_class(family):
    """Over every hook name (layer 0 and the model-level ones), a read and an (identity) edit on each backend: the
    same outcome, except the hook points only TransformerLens computes, which HF refuses with NotImplementedError
    naming why. Nothing raises one class on one backend and another class on the other."""
    from tl_patching.backends.hf_maps import Site, hook_map_of
    from tl_patching.forward import Forward
    from tl_patching.testing import random_pair

    hf, tl = random_pair(family, n_layers=2)
    forwards = {"tl": Forward(tl), "hf": Forward(tl, hf)}
    tokens = torch.randint(2, 60, (2, 7), generator=torch.Generator().manual_seed(1))
    table = hook_map_of(hf)
    names = [n for n in forwards["tl"].hook_names() if not n.startswith("blocks.1.")]
    tl_only, both_refuse = set(), set()
    for name in names:
        suffix = name.removeprefix("blocks.0.")
        for how in ("read", "edit"):
            got = {b: outcome(forwards[b], tokens, name, how) for b in BACKENDS}
            if got["tl"] == got["hf"] == "ok":
                continue
            if got["tl"] == "ok":  # computed by TL only: HF must refuse it by name, as NotImplementedError
                read_only = how == "edit" and suffix in table.sites  # mapped, but not writable
                assert got["hf"] == (
                    "NotImplementedError (read-only)" if read_only else "NotImplementedError (no HF counterpart)"
                ), (name, how, got)
                tl_only.add((suffix, how))
            else:
                assert got == {"tl": "NotImplementedError", "hf": "NotImplementedError (no HF counterpart)"}, (
                    name,
                    how,
                    got,
                )
                both_refuse.add(suffix)
    # A bridge (TL 4) also refuses, by name, the points it lists but never fires (measured: NeoX's rot_q/rot_k).
    from tl_patching.backends.tl import silent_hooks

    silent = {n.removeprefix("blocks.0.") for n in silent_hooks(tl) if not n.startswith("blocks.1.")}
    assert silent == ({"attn.hook_rot_q", "attn.hook_rot_k"} if lens.is_bridge(tl) and family == "neox" else set())
    assert both_refuse == TL_FLAGGED | silent
    # What only TL computes: the refused table (norm scales, rotated q/k, scores on rotary models, the unembedding's
    # hooks, GPT-2's position embedding) for reads and edits, plus the read-only sites for edits.
    expected = {(s, how) for s in table.refused if s not in TL_FLAGGED | silent for how in ("read", "edit")}
    expected |= {(s, "edit") for s, site in table.sites.items() if isinstance(site, Site) and site.view.write is None}
    assert tl_only == expected
    assert ("attn.hook_pattern", "edit") in tl_only and ("ln_final.hook_scale", "read") in tl_only
