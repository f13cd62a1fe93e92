"""The shipped model: loads through the local-directory path in TL and HF, does IOI, and drives the main job."""

import json

import pytest
import torch

from tl_patching.checkpoints import SHIPPED_MODEL_DIR
from tl_patching.cli import main
from tl_patching.experiments import run_experiment
from tl_patching.forward import Forward
from tl_patching.metrics import logit_diff, summarize
from tl_patching.models import load_pair
from tl_patching.prompts import ioi_batches
from tl_patching.recipe.training import eval_prompts

pytestmark = pytest.mark.skipif(
    not (SHIPPED_MODEL_DIR / "config.json").exists(), reason="shipped model not trained yet"
)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    return load_pair("shipped")


def test_shipped_model_is_small_and_loads_offline(shipped, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    size = sum(f.stat().st_size for f in SHIPPED_MODEL_DIR.iterdir())
    assert size < 10 * 2**20
    hf, tl = shipped
    tokens = tl.to_tokens("Sam and Sally went to the park. Sam gave a gift to")
    assert (Forward(tl)(tokens) - Forward(tl, hf)(tokens)).abs().max() < 1e-4


def test_shipped_model_does_ioi_on_held_out_pairs_and_template(shipped):
    _, tl = shipped
    held = [tuple(p) for p in json.loads((SHIPPED_MODEL_DIR / "training.json").read_text())["held_out_pairs"]]
    prompts = eval_prompts(held, n=200)
    diffs = torch.cat([logit_diff(Forward(tl)(b.tokens), b.correct, b.wrong) for b in ioi_batches(tl, prompts)])
    s = summarize(diffs)
    assert s.n == 200 and s.accuracy >= 0.98 and s.mean >= 4.0


def test_shipped_model_is_a_language_model():
    report = json.loads((SHIPPED_MODEL_DIR / "training.json").read_text())
    assert report["held_out_filler_loss"] < 0.5 * report["unigram_baseline_loss"]


@pytest.mark.slow
def test_ioi_structure_offline(shipped):
    """Issue targets: resid_post patching at a middle layer flips the mean logit difference; one head moves it > 10%."""
    _, tl = shipped
    e4 = run_experiment("e4", Forward(tl), n_prompts=100, progress=False)
    middle = (tl.cfg.n_layers // 2 - 1, tl.cfg.n_layers // 2)
    assert e4.clean_summary.mean > 0
    patched = [s.mean for l in middle for s in (e4.resid_s2_summary[l], e4.resid_final_summary[l])]
    assert min(patched) < 0
    e5 = run_experiment("e5", Forward(tl), n_prompts=100, progress=False)
    assert e5.heatmap.abs().max() > 0.1 * e5.clean.mean()


@pytest.mark.slow
def test_main_job_end_to_end(tmp_path):
    main(["reproduce", "--out", str(tmp_path), "--n-prompts", "20", "--no-png"])
    out = tmp_path / "shipped"
    index = (out / "index.html").read_text()
    for key in ("e1", "e2", "e3", "e4", "e5", "circuit", "edges"):
        assert (out / f"{key}_result.json").exists()
        assert f"{key}_result.json" in index
    figures = sorted(p.name for p in out.glob("*.html") if p.name != "index.html")
    assert len(figures) == 3 + 4 + 1 + 2 + 2 + 1 + 1
    assert "Heads writing the answer directly" in index and "Exact edge effects over all 479 edges" in index
    assert all(f in index for f in figures)
    assert (out / "plotly.min.js").exists()  # HTML opens offline
