"""The family × capability table in docs/models.md is what the code does on the installed major
(`tl_patching.capabilities`), and its cells mean what they say on rows where the answer is known."""

from pathlib import Path

import pytest

from tl_patching import capabilities, lens

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"


@pytest.fixture(scope="module")
def table():
    return capabilities.table()


def test_the_docs_table_is_the_code(table):
    start, end = capabilities.doc_markers()
    written = DOC.read_text().split(start)[1].split(end)[0]
    assert written == capabilities.markdown(table), "rerun scripts/capability_table.py on this major"


def test_known_cells(table):
    gpt2, gemma2 = table["GPT2LMHeadModel"], table["Gemma2ForCausalLM"]
    assert set(gpt2.values()) <= {"✓", "closed form", "layer engine"}
    assert gemma2["edges"] == "refused"  # a norm after attention: a head's write is not its own
    assert all(r["invariants"] == "✓" for r in table.values() if r["load"] == "✓")
    opt = table["OPTForCausalLM"]
    if lens.MAJOR < 4:
        assert opt["load"] == "refused" and set(opt.values()) == {"refused", "—"}  # HookedTransformer has no OPT
    else:
        assert opt["load"] == "✓" and opt["HF mirror"] == "refused" and opt["fast paths"] == "refused"
    assert table["LlamaForCausalLM"]["AtP* QK fix"] == ("closed form" if lens.MAJOR < 4 else "layer engine")
