"""Nothing changes the model behind the caller's back: its weights, their ``requires_grad``, its config, its hooks
and its train/eval mode are the same before and after every experiment and every sweep — also when an exception
is raised inside one. (Anything that must change a model for a while is a context manager that restores it.)"""

import pytest
import torch

from tl_patching import attribution, fast, lens, patching, path_patching
from tl_patching.edits import Edit, act_name, zero
from tl_patching.experiments import keys, load, run_experiment
from tl_patching.forward import Forward
from tl_patching.metrics import LogitDiff
from tl_patching.prompts import seed_pair
from tl_patching.testing import tiny_pair


def _hook_counts(module: torch.nn.Module) -> dict:
    out = {}
    for name, m in module.named_modules():
        counts = (
            len(m._forward_hooks),
            len(m._forward_pre_hooks),
            len(m._backward_hooks),
            len(getattr(m, "_backward_pre_hooks", {})),
        )
        if hasattr(m, "fwd_hooks"):  # a TransformerLens HookPoint
            counts += (len(m.fwd_hooks), len(m.bwd_hooks))
        out[name] = counts
    return out


def snapshot(model: torch.nn.Module) -> dict:
    return {
        "weights": {n: t.detach().clone() for n, t in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "config": repr(getattr(model, "cfg", None)) + repr(getattr(model, "config", None)),
        "hooks": _hook_counts(model),
        "training": [m.training for m in model.modules()],
    }


def assert_same(before: dict, after: dict, what: str) -> None:
    assert before["weights"].keys() == after["weights"].keys(), what
    changed = [n for n, t in before["weights"].items() if not torch.equal(t, after["weights"][n])]
    assert not changed, f"{what} changed weights {changed[:3]}"
    for key in ("requires_grad", "config", "hooks", "training"):
        assert before[key] == after[key], f"{what} changed the model's {key}"


@pytest.fixture(scope="module")
def setup():
    hf, tl = tiny_pair("llama-3.2-1b")  # grouped-query attention, a start token, real special tokens
    pair = seed_pair(tl)
    _, donor = Forward(tl).run(pair.donor_tokens, cache=[act_name(k, l) for l in range(2) for k in ("z", "resid_post")])
    return hf, tl, pair, donor


@pytest.mark.parametrize("backend", ["tl", "hf"])
@pytest.mark.parametrize("key", keys())
def test_experiments_leave_the_model_as_it_was(setup, key, backend):
    hf, tl, _, _ = setup
    forward = Forward(tl) if backend == "tl" else Forward(tl, hf)
    if backend not in load(key).backends:
        pytest.skip(f"{key} runs on the {load(key).backends} backend only (refused by name: tests/test_cli.py)")
    before_tl, before_hf = snapshot(tl), snapshot(hf)
    try:
        run_experiment(key, forward, n_prompts=4, progress=False)
    except NotImplementedError:  # what a family cannot do on a backend is refused by name: that leaves it as it was too
        pass
    assert_same(before_tl, snapshot(tl), f"{key} ({backend})")
    assert_same(before_hf, snapshot(hf), f"{key} ({backend})")


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("key", keys())
def test_experiments_leave_the_model_as_it_was_after_an_exception(setup, key, monkeypatch):
    """The first edit raises, inside the hooks (E1, which edits nothing: its forward; the fast paths and the circuit
    step, which patch through their own hooks: the final logits): whatever the experiment had set up is undone."""
    hf, tl, _, _ = setup

    def failing(*args, **kwargs):
        raise Boom("inside the experiment")

    before = snapshot(tl)
    monkeypatch.setattr(Edit, "__call__", failing)
    if key == "e1":
        monkeypatch.setattr(Forward, "run", failing)
    monkeypatch.setattr(lens, "final_logits", failing)
    with pytest.raises(Boom):
        run_experiment(key, Forward(tl), n_prompts=4, progress=False)
    monkeypatch.undo()
    assert_same(before, snapshot(tl), f"{key} after an exception")


def sweeps(forward: Forward, pair, donor, metric):
    """Every kind of sweep, each a call that reads the model."""
    tokens = pair.tokens if pair is not None else None
    return {
        "sweep": lambda: patching.sweep(forward, tokens, [[], [zero(act_name("z", 1), head=0)]], metric),
        "head_sweep": lambda: patching.head_sweep(forward, tokens, donor, metric),
        "head_pos_sweep": lambda: patching.head_pos_sweep(forward, tokens, donor, metric),
        "final_position_head_sweep": lambda: fast.final_position_head_sweep(
            forward, tokens, donor, metric, progress=False
        ),
        "position_head_sweep": lambda: fast.position_head_sweep(forward, tokens, donor, metric, positions=[1, -1]),
        "position_sweep": lambda: fast.position_sweep(forward, tokens, donor, metric, "resid_post", positions=[1]),
        "path_patch to logits": lambda: path_patching.path_patch(forward, tokens, pair.donor_tokens, metric),
        "path_patch to values": lambda: path_patching.path_patch(
            forward, tokens, pair.donor_tokens, metric, senders=[(0, 0)], receivers=[(1, 0, "v")]
        ),
        "attribution_patch": lambda: attribution.attribution_patch(forward, tokens, pair.donor_tokens, metric),
        "atp_star": lambda: attribution.atp_star(  # the QK fix is refused on a bridge: GradDrop there
            forward, tokens, pair.donor_tokens, metric, qk_fix=not lens.is_bridge(forward.model)
        ),
    }


SWEEPS = list(sweeps(None, None, None, None))


@pytest.mark.parametrize("name", SWEEPS)
def test_sweeps_leave_the_model_as_it_was(setup, name):
    _, tl, pair, donor = setup
    before = snapshot(tl)
    sweeps(Forward(tl), pair, donor, LogitDiff(pair.correct, pair.wrong))[name]()
    assert_same(before, snapshot(tl), name)


@pytest.mark.parametrize("name", SWEEPS)
def test_sweeps_leave_the_model_as_it_was_after_an_exception(setup, name):
    """The metric raises inside the sweep (inside its hooks, its frozen weights, its gradients)."""
    _, tl, pair, donor = setup

    def metric(final_logits):
        raise Boom("inside the sweep")

    before = snapshot(tl)
    with pytest.raises(Boom):
        sweeps(Forward(tl), pair, donor, metric)[name]()
    assert_same(before, snapshot(tl), f"{name} after an exception")
