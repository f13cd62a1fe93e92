"""The write matrix: every hook each family's HF table maps × every edit kind × every index form, on every
family's tiny model shaped like a real checkpoint (`tl_patching.testing`: GPT-2, Pythia-160m, Llama-3.2-1B,
Mistral-7B, Qwen2.5-0.5B, Qwen3-0.6B, Gemma-2-2b, Gemma-3-270m).

Each cell is checked three ways (fp32, ≤1e-4 relative to max(1, max |value|)): the TL backend, the HF backend (the
logits and every mapped activation, so the effect downstream of the edit is compared too), and a plain TransformerLens
hook written here with explicit loops over the selected positions, heads and neurons — what the edit *means*, so an
index semantics wrong on both backends at once is caught as well. The cells are generated from the tables in
`tl_patching.backends.hf_maps`: a new family or a new hook is covered without new test code. A hook the HF backend
cannot write (read-only: no module boundary holds it) must say so when written.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from tl_patching import lens
from tl_patching.backends import hf_maps
from tl_patching.backends.tl import ht_layout, model_layout, readable_hooks
from tl_patching.edits import (
    HEAD_HOOKS,
    act_name,
    gaussian_noise,
    hook_suffix,
    patch,
    patch_where,
    replace,
    scale,
    zero,
)
from tl_patching.families import FAMILIES
from tl_patching.forward import Forward
from tl_patching.testing import checkpoint_of_family, tiny_pair

ATOL = 1e-4
KINDS = ("zero", "scale", "replace", "noise", "patch", "patch_where")
LAYER = 0  # block hooks are written at layer 0 of 2, so a whole block runs downstream of every edit
N_POS = 7


def _table(family: str) -> hf_maps.HookMap:
    return hf_maps.FAMILIES[FAMILIES[family].architecture]


def _cells() -> list[tuple[str, str]]:
    """(family, TL hook name) for every site of every family's table."""
    top = ("hook_embed", "hook_pos_embed", "ln_final.hook_normalized")
    return [
        (family, suffix if suffix in top else f"blocks.{LAYER}.{suffix}")
        for family in FAMILIES
        for suffix in _table(family).sites
    ]


_MODELS: dict[str, tuple] = {}


def setup(family: str):
    """(TL forward, HF forward, tokens, donor cache of every TL hook, patch_where mask), built once per family."""
    if family not in _MODELS:
        hf, tl = tiny_pair(checkpoint_of_family(family), seed=1)
        g = torch.Generator().manual_seed(3)
        tokens = torch.randint(1, tl.cfg.d_vocab, (2, N_POS), generator=g)
        donor_tokens = torch.randint(1, tl.cfg.d_vocab, (2, N_POS), generator=g)
        _, donor = Forward(tl).run(donor_tokens, cache=readable_hooks(tl))  # HookedTransformer's layout on a bridge too
        mask = torch.zeros(2, N_POS, dtype=torch.bool)
        mask[0, 2], mask[1, 5] = True, True
        _MODELS[family] = (Forward(tl), Forward(tl, hf), tokens, donor, mask)
    return _MODELS[family]


def plain_run(model, tokens: torch.Tensor, name: str, fn, names: list[str]):
    """``model`` with ``fn`` written at ``name`` as a plain TransformerLens hook; the logits and the activations at
    ``names``, all in HookedTransformer's layout. A bridge's hook_resid_mid is the next norm's input (a write there
    leaves the residual stream alone): the residual stream after attention is written as HookedTransformer's is, the
    attention output made up to the edited value."""
    if lens.is_bridge(model) and name.endswith(".hook_resid_mid"):
        layer, seen = name.split(".")[1], {}
        attn_out = f"blocks.{layer}.hook_attn_out"

        def via_attn_out(a, hook):
            seen[attn_out] = a.clone()  # HookedTransformer's attn_out, which a resid_mid write leaves alone
            return fn(seen["resid_pre"] + a, hook) - seen["resid_pre"]

        hooks = [
            (f"blocks.{layer}.hook_resid_pre", lambda a, hook: seen.__setitem__("resid_pre", a)),
            (attn_out, via_attn_out),
        ]
    else:
        seen, hooks = {}, [(name, lambda a, hook: model_layout(model, name, fn(ht_layout(model, name, a), hook), a))]
    with model.hooks(fwd_hooks=hooks):
        logits, cache = model.run_with_cache(tokens, names_filter=names)
    return logits, {n: seen[n] if n in seen else ht_layout(model, n, cache[n]) for n in names}


def forms(name: str, act: torch.Tensor) -> dict[str, dict]:
    """Every index form that applies to the hook's layout: all, one/several positions, one/several heads,
    neurons (a slice, a list), and the outer products list × list."""
    suffix = hook_suffix(name)
    if act.ndim == 2:  # QK-norm hooks: [(batch pos head), d_head], only the last axis has a meaning
        return {"all": {}, "neurons slice": {"neurons": slice(0, None, 2)}, "neurons list": {"neurons": [0, 3]}}
    out = {"all": {}, "one position": {"pos": 3}, "positions list": {"pos": [1, 4]}}
    if suffix in HEAD_HOOKS:
        n = act.shape[2]  # a single key/value head on Llama-3.2-1B-, Mistral- and Gemma-3-shaped fixtures
        heads = [0, n - 1] if n > 1 else [0]
        out |= {
            "one head": {"head": min(1, n - 1)},
            "heads list": {"head": heads},
            "positions × heads": {"pos": [1, 4], "head": heads},
            "positions × heads × neurons": {"pos": [1, 4], "head": heads, "neurons": [0, 3]},
        }
    out |= {
        "neurons slice": {"neurons": slice(0, None, 2)},
        "neurons list": {"neurons": [0, 3]},
        "positions × neurons": {"pos": [1, 4], "neurons": [0, 3]},
    }
    return out


def make_edit(kind: str, where: dict, name: str, donor: dict, mask: torch.Tensor):
    if kind == "zero":
        return zero(name, **where)
    if kind == "scale":
        return scale(name, 1.7, **where)
    if kind == "replace":
        return replace(name, 0.3, **where)
    if kind == "noise":
        return gaussian_noise(name, mean=1.0, std=0.5, seed=5, **where)
    if kind == "patch":
        return patch(name, donor, **where)
    return patch_where(name, donor, mask)


def expected(
    act: torch.Tensor, name: str, kind: str, where: dict, donor: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """What the edit means, written out: every (position, head) of the outer product of the given lists, the
    selected neurons of each; noise drawn in that row-major order (batch, position, head, neuron)."""
    out = act.clone()
    if kind == "patch_where":
        for b, p in mask.nonzero().tolist():
            out[b, p] = donor[b, p]
        return out
    if act.ndim == 2:
        dims = {"neurons": 1}
    elif hook_suffix(name) in HEAD_HOOKS:
        dims = {"pos": 1, "head": 2, "neurons": 3}
    else:
        dims = {"pos": 1, "neurons": act.ndim - 1}

    def chosen(what: str) -> list[int]:
        size = act.shape[dims[what]]
        value = where.get(what)
        if value is None:
            return list(range(size))
        if isinstance(value, slice):
            return list(range(size))[value]
        return [value % size] if isinstance(value, int) else [v % size for v in value]

    outer = [w for w in dims if w != "neurons"]
    neurons = chosen("neurons")
    lists = [chosen(w) for w in outer]
    noise = None
    if kind == "noise":
        shape = (act.shape[0], *[len(x) for x in lists], len(neurons))
        noise = (torch.randn(shape, generator=torch.Generator().manual_seed(5)) * 0.5 + 1.0).to(act.dtype)
    for combo in itertools.product(*[list(enumerate(x)) for x in lists]):
        index = [slice(None)] * act.ndim
        for w, (_, i) in zip(outer, combo):
            index[dims[w]] = i
        index[dims["neurons"]] = neurons
        index = tuple(index)
        if kind == "zero":
            out[index] = 0.0
        elif kind == "scale":
            out[index] = act[index] * 1.7
        elif kind == "replace":
            out[index] = 0.3
        elif kind == "noise":
            out[index] = noise[(slice(None), *[j for j, _ in combo], slice(None))]
        elif kind == "patch":
            out[index] = donor.expand_as(act)[index]
    return out


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max |a − b| over finite entries relative to max(1, max |a|) (fp32 rounding grows with the values, e.g.
    after a LayerNorm of a near-constant vector); inf if the shapes or the −inf (masked) entries differ."""
    if a.shape != b.shape or not torch.equal(torch.isfinite(a), torch.isfinite(b)):
        return float("inf")
    finite = torch.isfinite(a)
    if not finite.any():
        return 0.0
    return (a[finite] - b[finite]).abs().max().item() / max(1.0, a[finite].abs().max().item())


def readable(hf: Forward) -> list[str]:
    refused = _table_of(hf).refused
    return [n for n in hf.hook_names() if n.split(".", 2)[-1] not in refused and n not in refused]


def _table_of(forward: Forward) -> hf_maps.HookMap:
    return hf_maps.hook_map_of(forward.hf_model)


def cells_of(name: str, act: torch.Tensor) -> list[tuple[str, str, dict]]:
    """(kind, index form, where) of every cell of one hook."""
    out = []
    for kind in KINDS:
        if kind == "patch_where":
            out += [] if act.ndim == 2 else [(kind, "mask", {})]
        else:
            out += [(kind, form, where) for form, where in forms(name, act).items()]
    return out


@pytest.mark.parametrize("family,name", _cells(), ids=[f"{f}-{n}" for f, n in _cells()])
def test_write_matrix(family, name):
    """All cells of one hook in one forward per backend: cell i edits batch rows i·B … (i+1)·B − 1 only (as the
    sweep driver stacks variants), and a plain, unstacked run checks one edit of each kind too."""
    tl, hf, tokens, donor, mask = setup(family)
    model = tl.model
    site = _table_of(hf).sites[name.split(".", 2)[-1] if name.startswith("blocks.") else name]
    if isinstance(site, hf_maps.Site) and site.view.write is None:
        with pytest.raises(NotImplementedError, match="read-only on the HF backend"):
            hf.run(tokens, [scale(name, 2.0)])
        return
    names = readable(hf)
    B = len(tokens)
    cells = cells_of(name, donor[name])
    assert len(cells) >= 7
    flat = donor[name].ndim == 2  # QK-norm hooks: rows are (batch pos head), so each cell runs on its own
    groups = [[i] for i in range(len(cells))] if flat else [list(range(len(cells)))]
    clean_logits, clean_cache = tl.run(tokens, cache=[name])
    failures = []
    for group in groups:
        stacked = tokens.repeat(len(group), 1)
        rows_of = {i: slice(k * B, (k + 1) * B) for k, i in enumerate(group)}
        edits = [make_edit(*_spec(cells[i]), name=name, donor=donor, mask=mask) for i in group]
        if not flat:
            edits = [e.on_rows(rows_of[i]) for e, i in zip(edits, group)]
        tl_logits, tl_cache = tl.run(stacked, edits, cache=names)
        hf_logits, hf_cache = hf.run(stacked, edits, cache=names)

        def oracle(a, hook, group=group, rows_of=rows_of):
            if flat:
                return expected(a, name, *_spec(cells[group[0]]), donor[name], mask)
            return torch.cat([expected(a[rows_of[i]], name, *_spec(cells[i]), donor[name], mask) for i in group])

        plain_logits, plain_cache = plain_run(model, stacked, name, oracle, names)
        for i in group:
            kind, form, _ = cells[i]
            rows = slice(None) if flat else rows_of[i]
            label = f"{kind} / {form}"
            own = tl_cache[name] if flat else tl_cache[name][rows]
            if _close(own, clean_cache[name]) == 0.0:
                failures.append(f"{label}: the edit leaves {name} as it was")
            # A scaling just before a norm (QK-norm, Gemma's sandwich norms) is undone by it: the logits may stay.
            if kind != "scale" and (tl_logits[rows] - clean_logits).abs().max() <= 1e-3:
                failures.append(f"{label}: the edit does not move the logits")
            for what, d in [
                ("logits TL vs HF", _close(tl_logits[rows], hf_logits[rows])),
                ("logits TL vs plain hook", _close(tl_logits[rows], plain_logits[rows])),
            ]:
                if not d <= ATOL:
                    failures.append(f"{label}: {what} differ by {d:.3g}")
            for n in names:
                at = slice(None) if flat or tl_cache[n].shape[0] != len(stacked) else rows
                for what, d in [
                    ("HF", _close(tl_cache[n][at], hf_cache[n][at])),
                    ("plain hook", _close(tl_cache[n][at], plain_cache[n][at])),
                ]:
                    if not d <= ATOL:
                        failures.append(f"{label}: {n} TL vs {what} differ by {d:.3g}")
    # Unstacked: one edit of each kind on the plain batch, the form every user call takes.
    for kind, form, where in cells:
        if form in ("all", "mask") and not flat:
            edit = make_edit(kind, where, name, donor, mask)
            d = _close(tl(tokens, [edit]), hf(tokens, [edit]))
            if not d <= ATOL:
                failures.append(f"{kind} / {form}, unstacked: logits TL vs HF differ by {d:.3g}")
    assert not failures, f"{family} {name}: " + "; ".join(failures[:8]) + f" ({len(failures)} in all)"


def _spec(cell: tuple[str, str, dict]) -> tuple[str, dict]:
    kind, _, where = cell
    return kind, where


def test_matrix_size():
    """The matrix the closing note reports: hooks × kinds × index forms × families, counted from the tables."""
    cells = _cells()
    assert len({f for f, _ in cells}) == len(FAMILIES) == 8
    assert len(cells) >= 8 * 15


@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_edits_on_one_hook_apply_in_the_order_given(family):
    """scale then replace ≠ replace then scale: both backends follow the list's order, at one hook and across
    two hooks that share one HF module (hook_attn_out and hook_resid_mid)."""
    tl, hf, tokens, _, _ = setup(family)
    name = act_name("z", LAYER)
    first = [scale(name, 3.0, head=1), replace(name, 0.5, head=1, pos=[2, 5])]
    second = first[::-1]
    for forward in (tl, hf):
        a, b = forward(tokens, first), forward(tokens, second)
        assert (a - b).abs().max() > 1e-3  # the two orders really differ
        _, cache = forward.run(tokens, first, cache=[name])
        z = cache[name][:, :, 1]
        assert torch.allclose(z[:, [2, 5]], torch.full_like(z[:, [2, 5]], 0.5))  # replace ran last
    for order in (first, second):
        assert _close(tl(tokens, order), hf(tokens, order)) <= ATOL
    # Two hooks at different places: each runs where the network reaches it, so the list's order cannot matter.
    apart = [scale(act_name("z", LAYER), 3.0, head=0), replace(act_name("resid_post", LAYER), 0.5, pos=2)]
    for forward in (tl, hf):
        assert _close(forward(tokens, apart), forward(tokens, apart[::-1])) == 0.0
    if "hook_resid_mid" in _table_of(hf).sites:
        # Two names on one HF module: TL runs hook_attn_out before hook_resid_mid whatever the list's order.
        pair = [replace(act_name("resid_mid", LAYER), 0.2, pos=3), scale(act_name("attn_out", LAYER), 5.0)]
        for edits in (pair, pair[::-1]):
            assert _close(tl(tokens, edits), hf(tokens, edits)) <= ATOL


def test_list_by_list_is_every_combination():
    """pos=[1, 4], head=[0, 2] selects the 4 (position, head) pairs, not the 2 pairs (1, 0), (4, 2)."""
    tl, _, tokens, _, _ = setup("gpt2")
    name = act_name("z", LAYER)
    _, cache = tl.run(tokens, [zero(name, pos=[1, 4], head=[0, 2])], cache=[name])
    z = cache[name]
    for p, h in itertools.product([1, 4], [0, 2]):
        assert not z[:, p, h].any()
    assert z[:, 1, 1].abs().sum() > 0 and z[:, 4, 1].abs().sum() > 0 and z[:, 2, 0].abs().sum() > 0


def test_flat_qk_norm_hooks_refuse_positions_and_rows():
    """TL runs QK-norm on [(batch pos head), d_head]: a position or a sweep row there would index something else."""
    tl, _, tokens, _, _ = setup("qwen3")
    name = f"blocks.{LAYER}.attn.q_norm.hook_normalized"
    with pytest.raises(ValueError, match="no position axis"):
        tl.run(tokens, [scale(name, 2.0, pos=1)])
    with pytest.raises(ValueError, match="rows are not prompts"):
        tl.run(tokens, [scale(name, 2.0).on_rows(slice(0, 1))])


def test_docs_list_every_family_table():
    """docs/hook_points.md shows, per family, which hooks are written on the HF backend and how: the tables' text."""
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "hook_points.md").read_text()
    start, end = "<!-- generated: hf_maps.markdown() -->\n", "\n<!-- end generated -->"
    assert doc[doc.index(start) + len(start) : doc.index(end)] == hf_maps.markdown()
