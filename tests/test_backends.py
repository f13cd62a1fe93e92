"""The two backends are mirror images: every hook point, every edit and every error equal (fp32, abs tolerance 1e-4)."""

import pytest
import torch

from tl_patching.backends import hf as hf_backend
from tl_patching.backends import tl as tl_backend
from tl_patching.edits import HookNameError, gaussian_noise, patch, replace, scale, zero

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
]


@pytest.mark.parametrize("edits, error, message", BAD)
def test_same_error_on_both_backends(forwards, tokens, edits, error, message):
    messages = []
    for backend in BACKENDS:
        with pytest.raises(error, match=message) as caught:
            forwards[backend].run(tokens, edits)
        messages.append(str(caught.value))
    assert messages[0] == messages[1]


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


def test_tl_edit_at_a_hook_that_never_fires_is_an_error(forwards, tokens):
    """TL has hook_result but fires it only with cfg.use_attn_result: an edit there must not silently do nothing."""
    with pytest.raises(RuntimeError, match="never ran"):
        forwards["tl"].run(tokens, [zero("blocks.0.attn.hook_result")])


def test_nan_after_edit_is_an_error(forwards, tokens):
    for backend in BACKENDS:
        with pytest.raises(FloatingPointError, match="NaN/inf"):
            forwards[backend].run(tokens, [replace("blocks.0.hook_resid_post", float("nan"))])
