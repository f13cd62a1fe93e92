"""Regenerate the figures the README shows, under docs/figures/, from the main job on the shipped model.

    python scripts/make_docs_figures.py

The main job itself writes to figures/ (git ignores what is in it), so running it never changes the checkout; these
committed copies change only when this script is run on purpose. PNG export needs a Chromium (Debian: apt-get
install -y chromium); without one this script stops with an error rather than commit nothing.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS_FIGURES = ROOT / "docs" / "figures"
SHOWN = {"e4": ["e4_logit_diff_by_layer"]}  # experiment -> its figures that README.md shows

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "tl_patching.cli", "reproduce", "--experiments", ",".join(SHOWN), "--out", tmp]
        subprocess.run(cmd, check=True, cwd=ROOT)  # cwd: this checkout's tl_patching
        DOCS_FIGURES.mkdir(parents=True, exist_ok=True)
        for name in (n for names in SHOWN.values() for n in names):
            png = Path(tmp) / "shipped" / f"{name}.png"
            if not png.exists():
                sys.exit(f"error: no {png.name}: PNG export needs a Chromium (apt-get install -y chromium)")
            shutil.copyfile(png, DOCS_FIGURES / png.name)
            print(f"wrote {DOCS_FIGURES / png.name}")
