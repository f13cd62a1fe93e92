"""Write the family × capability table of the installed TransformerLens major into docs/models.md
(`tl_patching.capabilities`; run once per major: .venv and .venv-tl3).

    .venv/bin/python scripts/capability_table.py && .venv-tl3/bin/python scripts/capability_table.py
"""

from pathlib import Path

from tl_patching import capabilities, lens

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"


def main() -> None:
    start, end = capabilities.doc_markers()
    text = DOC.read_text()
    before, rest = text.split(start)
    _, after = rest.split(end)
    DOC.write_text(before + start + capabilities.markdown(capabilities.table()) + end + after)
    print(f"wrote the TransformerLens {lens.MAJOR} table into {DOC}")


if __name__ == "__main__":
    main()
