"""The main job's index page is a short report: model card, data, findings in words with labelled intervals,
the seeds' claims, readable figures, a conclusion; the same bytes on every identical run."""

import html
import re
from pathlib import Path

import pytest
import synthetic_results as synth

from tl_patching import plotting, report

ROOT = Path(__file__).resolve().parents[1]


def page_text(path: Path) -> str:
    text = re.sub(r"<style>.*?</style>", "", path.read_text(), flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text)))


def build(out_dir: Path, model_name: str = "shipped", results=None, png_for=()) -> Path:
    """Results JSON and figures (HTML only, plus a fake PNG for the names in ``png_for``) as the main job writes them."""
    results = results or {k: make() for k, make in synth.ALL.items()}
    sections = []
    for key, r in results.items():
        r.to_json(out_dir / f"{key}_result.json")
        files = [f for name, fig in getattr(plotting, f"{key}_figures")(r).items() for f in plotting.save(fig, out_dir, name, png=False)]
        for name in png_for:
            if (out_dir / f"{name}.html") in files:
                (out_dir / f"{name}.png").write_bytes(b"png")
                files.append(out_dir / f"{name}.png")
        sections.append((key, r.reading(), files, 1.23))
    return report.write_report(out_dir, model_name, sections)


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> tuple[Path, str]:
    index = build(tmp_path_factory.mktemp("report"), png_for=("e5_head_heatmap",))
    return index, page_text(index)


def test_report_covers_every_experiment_with_findings_and_seed_claims(page):
    _, text = page
    from tl_patching.experiments import EXPERIMENTS  # the circuit step's section: tests/test_shipped_model.py

    for key in EXPERIMENTS:
        assert report.HEADINGS[key] in text
        seed, _ = report.SEEDS[key]
        assert f"Against the seed ({seed}" in text
    assert text.count("Finding.") == 5 and text.count("Data.") == 5
    for verdict in ("agrees", "differs"):
        assert verdict in text
    assert "Conclusion" in text and "claims from the seed reports" in text


def test_intervals_are_labelled_and_no_raw_lists(page):
    _, text = page
    assert "95% bootstrap CI [" in text
    for match in re.finditer(r"(?<!\w)\[[^\]]*\]", text):  # every bracketed list on the page is a labelled interval
        assert text[: match.start()].endswith("95% bootstrap CI "), match.group()
    assert "[]" not in text and "layers [" not in text
    assert "at no layer" in text  # E4 synthetic: hook_resid_post at S2 never flips the answer


def test_e1_self_attention_is_a_check_not_a_finding(page):
    _, text = page
    assert "true by construction" in text and "not a finding" in text


def test_model_card_for_the_shipped_model_matches_its_files_and_the_doc(page):
    _, text = page
    assert "4 × 4 (d_head 32)" in text and "128 / 512" in text and "290 WordLevel tokens" in text and "48 tokens" in text
    card = report.card_markdown(report.shipped_model_card())
    assert card in (ROOT / "docs" / "model_card.md").read_text()


def test_figures_are_full_width_images_or_embedded_pages(page):
    index, _ = page
    source = index.read_text()
    assert 'width="320"' not in source and "max-width:1000px" in source
    assert '<img src="e5_head_heatmap.png"' in source  # a PNG where there is one
    assert '<iframe src="e1_kde_by_layer.html"' in source  # the interactive page where there is none


def test_report_is_the_same_on_every_identical_run(tmp_path):
    a, b = build(tmp_path / "a"), build(tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()
    assert "1.23" not in a.read_text()  # no run times on the page


def test_report_reads_right_for_another_model(tmp_path):
    results = {"e5": synth.e5("gpt2-large", n_layers=36, n_heads=20)}
    text = page_text(build(tmp_path, "gpt2-large", results))
    assert "36 × 20" in text and "290 WordLevel" not in text and "shipped" not in text.lower()
    assert "E5 — IOI: one head at the final position" in text and "E1 —" not in text


def test_readings_are_words(page):
    for make in synth.ALL.values():
        reading = make().reading()
        assert "[]" not in reading and not re.search(r"layers \[", reading)
    assert "at no layer" in synth.e4().reading()
