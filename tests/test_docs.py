"""The docs cannot go stale: every Python block of README.md and docs/*.md runs (a page's blocks in order, sharing
one namespace, in a temporary folder), docs/api.md is the code's own signatures, and every library name the docs
write in backticks exists.

A block that cannot run here (the model hub, a GPU, torchrun) is preceded by ``<!-- no-run: why -->``; the reason is
required.
"""

import importlib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?P<before>(?:<!--[^\n]*-->\s*\n)?)```python\n(?P<code>.*?)```", re.S)
NO_RUN = re.compile(r"<!--\s*no-run:(?P<why>[^>]*)-->")


def blocks(page: Path) -> list[tuple[str, str | None]]:
    """(code, reason not to run it or None) for each ```python block of ``page``."""
    out = []
    for m in BLOCK.finditer(page.read_text()):
        marker = NO_RUN.search(m["before"])
        out.append((m["code"], marker["why"].strip() if marker else None))
    return out


def api_reference():
    spec = importlib.util.spec_from_file_location("api_reference", ROOT / "scripts" / "api_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pages_have_python_blocks_and_every_skip_says_why():
    found = {p.name: blocks(p) for p in PAGES}
    assert sum(len(b) for b in found.values()) >= 5  # the finder finds them (README, caching, patching, scaling…)
    assert found["README.md"] and found["patching.md"] and found["caching.md"]
    for page, page_blocks in found.items():
        for code, why in page_blocks:
            assert why is None or len(why) >= 10, (page, code[:60])  # "no-run:" alone is not a reason
    # A marker that is not right before a block would silently skip nothing: every marker belongs to a block.
    for page in PAGES:
        markers = len(NO_RUN.findall(page.read_text()))
        assert markers == sum(why is not None for _, why in blocks(page)), page.name


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)], ids=lambda p: p.name)
def test_every_python_block_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {"__name__": "__docs__"}
    ran = 0
    for i, (code, why) in enumerate(blocks(page)):
        if why is not None:
            continue
        exec(compile(code, f"{page.name}, python block {i + 1}", "exec"), namespace)  # noqa: S102
        ran += 1
    assert ran >= 1


def test_api_reference_is_the_code():
    """docs/api.md is what scripts/api_reference.py writes now: rerun it after changing a public signature."""
    assert (ROOT / "docs" / "api.md").read_text() == api_reference().markdown()


def test_the_sweeps_signatures_are_in_the_docs():
    """The issue found no signature for attribution_patch, head_pos_sweep or path_patch's senders: each sweep's
    signature, in the one argument order, is on a topical page and in the reference."""
    text = {p.name: p.read_text() for p in PAGES}
    topical = "\n".join(t for name, t in text.items() if name != "api.md")
    for call in (
        "attribution_patch(forward, tokens, donor, metric)",
        "atp_star(forward, tokens, donor, metric, qk_fix=True, grad_drop=True)",
        "head_pos_sweep(forward, tokens, donor, metric",
        'path_patch(forward, tokens, donor, metric, senders=None, receivers="logits", mlps="recompute"',
        "final_position_head_sweep(forward, tokens, donor_cache, metric",
        "position_sweep(forward, tokens, donor_cache, metric, kind",
        "sweep(forward, tokens, variants, metric",
    ):
        assert call in topical, call
    for name in ("attribution_patch", "atp_star", "head_pos_sweep", "path_patch", "position_head_sweep"):
        assert re.search(rf"^{name}\(\n    forward: Forward,\n    tokens: Int\[Tensor, ", text["api.md"], re.M), name
    assert "senders" in text["circuits.md"] and "a head ``(layer, head)`` or a group" in text["api.md"]
    assert "any callable `[batch, d_vocab] -> [batch]`" in text["api.md"]


LIBRARY = re.compile(r"`(?:tl_patching\.)?((?:backends\.)?[a-z_]+)\.([A-Za-z_]\w*)")


def is_submodule(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent is a module, not a package
        return False


def test_every_library_name_the_docs_write_exists():
    """`patching.head_pos_sweep`, `tl_patching.prompts.ioi_dataset`, `cache_store.cached_run(…)`: the module is
    one of the library's and it has the name (a renamed function, like exact_head_pos_effects, fails here)."""
    missing = []
    for page in PAGES:
        for module_name, attr in LIBRARY.findall(page.read_text()):
            try:
                module = importlib.import_module(f"tl_patching.{module_name}")
            except ModuleNotFoundError:
                continue  # not a library module: `forward.run`, `model.cfg`, `torch.save`…
            if module_name == "forward" and attr in ("run", "model", "cfg", "hooks", "hf_model"):
                continue  # `forward.run`: the variable named forward (a Forward), not the module
            if attr in ("py", "md") or is_submodule(f"tl_patching.{module_name}.{attr}"):
                continue  # a file name (`fast.py`), or a submodule (`experiments.e1_attention_scores`)
            if not hasattr(module, attr):
                missing.append(f"{page.name}: {module_name}.{attr}")
    assert missing == []


def test_readme_counts_the_experiments_the_main_job_runs():
    from tl_patching.experiments import keys

    words = {5: "Five", 6: "Six", 7: "Seven"}
    readme = (ROOT / "README.md").read_text()
    assert f"**{words[len(keys())]} experiments**" in readme
    for key in keys():
        label = key.upper() if re.fullmatch(r"e\d", key) else key  # E1 … E5, circuit, edges
        assert f"| {label} |" in readme, key  # a row of the table each
