"""The main job's index page: each experiment's reading with links to its figures and results."""

from __future__ import annotations

import html
from pathlib import Path

from tl_patching.experiments import TITLES


def write_index(out_dir: Path, model_name: str, sections: list[tuple]) -> Path:
    """An index.html linking every figure with its reading; ``sections``: (key, result, files, seconds)."""
    rows = []
    for key, result, files, seconds in sections:
        links = " · ".join(f'<a href="{f.name}">{f.stem}</a>' for f in files if f.suffix == ".html")
        rows.append(f"<h2>{html.escape(TITLES[key])}</h2><p>{html.escape(result.reading())}</p><p>{links} · "
                    f'<a href="{key}_result.json">result JSON</a> · {seconds:.1f} s</p>')
    page = (f"<!doctype html><meta charset='utf-8'><title>tl_patching — {html.escape(model_name)}</title>"
            f"<h1>tl_patching results for {html.escape(model_name)}</h1>" + "\n".join(rows))
    index = out_dir / "index.html"
    index.write_text(page)
    return index
