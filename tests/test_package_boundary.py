"""The library's boundary: it never imports the shipped-model recipe, benchmarks, pandas or platform libraries."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "tl_patching"
FORBIDDEN = ("pandas", "ctypes", "tl_patching.recipe", "benchmarks", "harness")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_library_module_imports_the_recipe_benchmarks_or_pandas():
    offenders = {
        str(p.relative_to(PACKAGE)): sorted(n for n in imported_modules(p) if n.startswith(FORBIDDEN))
        for p in PACKAGE.rglob("*.py")
        if "recipe" not in p.parts
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_the_package_loads_nothing_heavy():
    probe = (
        "import sys, tl_patching; print(sorted(m for m in sys.modules if m.startswith(('torch', 'transformers', "
        "'transformer_lens', 'pandas', 'tl_patching.recipe'))))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
