"""Figures read right and are reproducible: colour scales, ticks, E4's ratio, byte-identical HTML, stable JSON,
no stale PNGs. Built from made-up results (tests/synthetic_results.py), so no model runs here."""

import json
import re
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest
import synthetic_results as synth
import torch

from tl_patching import plotting
from tl_patching.experiments import load
from tl_patching.experiments.e4_ioi_patching import E4Result
from tl_patching.results import round_sig


def rgb(colour: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", colour)[:3])


def test_same_figure_saved_twice_gives_identical_html(tmp_path):
    fig = lambda: load("e5").figures(synth.e5())["e5_head_heatmap"]  # noqa: E731
    a = plotting.save(fig(), tmp_path / "a", "e5_head_heatmap", png=False)[0].read_bytes()
    b = plotting.save(fig(), tmp_path / "b", "e5_head_heatmap", png=False)[0].read_bytes()
    assert a == b and b'id="e5_head_heatmap"' in a
    # A rerun whose numbers differ in the 8th significant digit writes the same file.
    r = synth.e5()
    r.effect = r.effect * (1 + 1e-8)
    c = plotting.save(load("e5").figures(r)["e5_head_heatmap"], tmp_path / "c", "e5_head_heatmap", png=False)[
        0
    ].read_bytes()
    assert c == a


def test_result_json_round_trips_and_is_stable():
    r = synth.e4()
    text = r.to_json()
    back = E4Result.from_json(text)
    assert back.to_json() == text  # a second save of the loaded result changes nothing
    assert torch.allclose(back.heads_patched, r.heads_patched, rtol=1e-5, atol=0)
    assert back.heads_summary[2].ci_low == pytest.approx(r.heads_summary[2].ci_low, rel=1e-5)
    jittered = synth.e4()
    jittered.heads_patched = jittered.heads_patched.double() * (1 + 3e-9)
    assert (
        json.loads(jittered.to_json())["heads_patched"]["__tensor__"] == json.loads(text)["heads_patched"]["__tensor__"]
    )
    assert round_sig(9.410123825073242) == 9.41012 and round_sig(-1.23456789e-7) == -1.23457e-7


def test_e5_colour_scale_maps_negative_to_the_colour_the_subtitle_names():
    fig = load("e5").figures(synth.e5())["e5_head_heatmap"]
    heat = fig.data[0]
    assert heat.zmid == 0 and heat.zmin == -heat.zmax < 0
    low, high = rgb(heat.colorscale[0][1]), rgb(heat.colorscale[-1][1])  # colours at zmin (negative) and zmax
    assert low[2] > low[0] and high[0] > high[2]  # negative end blue, positive end red
    subtitle = fig.layout.title.text
    assert "blue = lowers" in subtitle and "red = raises" in subtitle
    assert fig.data[0].texttemplate  # values written in the cells


def test_heatmap_ticks_are_integers():
    figs = {**load("e1").figures(synth.e1()), **load("e5").figures(synth.e5())}
    for name in ("e1_mean_raw_score", "e1_fraction_negative", "e5_head_heatmap"):
        fig = figs[name]
        for axis, n in ((fig.layout.xaxis, synth.H), (fig.layout.yaxis, synth.L)):
            assert axis.tickmode == "array" and list(axis.tickvals) == list(range(n)), name
            assert all(float(t).is_integer() for t in axis.tickvals)
        assert fig.data[0].texttemplate, name
    many = load("e5").figures(synth.e5(n_layers=36, n_heads=20))["e5_head_heatmap"]
    assert (
        list(many.layout.yaxis.tickvals) == list(range(0, 36, 2)) and many.data[0].texttemplate is None
    )  # 720 cells: hover only


def test_e4_ratio_is_exp_of_mean_logit_diff_with_its_ci():
    r = synth.e4()
    for which in ("heads_patched", "resid_s2_patched", "resid_final_patched"):
        ratio, low, high = r.prob_ratio(which, with_ci=True)
        summaries = getattr(r, which.removesuffix("_patched") + "_summary")
        assert torch.allclose(
            ratio, getattr(r, which).double().mean(-1).exp()
        )  # geometric mean of the per-prompt ratios
        assert torch.allclose(low, torch.tensor([s.ci_low for s in summaries], dtype=torch.float64).exp())
        assert torch.allclose(high, torch.tensor([s.ci_high for s in summaries], dtype=torch.float64).exp())
    # Three confident prompts at layer 2 pull the arithmetic mean of exp() far above exp(mean): the figure uses the
    # latter.
    assert r.heads_patched[2].exp().mean() > 100 * r.prob_ratio("heads_patched")[2]
    fig = load("e4").figures(r)["e4_prob_ratio_by_layer"]
    heads = fig.data[0]
    ratio, low, high = (x.numpy() for x in r.prob_ratio("heads_patched", with_ci=True))
    assert np.allclose(heads.y, ratio, rtol=1e-5)
    assert np.allclose(np.asarray(heads.y) + np.asarray(heads.error_y.array), high, rtol=1e-5)
    assert np.allclose(np.asarray(heads.y) - np.asarray(heads.error_y.arrayminus), low, rtol=1e-5)
    assert any(s.y0 == s.y1 == 1 for s in fig.layout.shapes)  # the line at 1
    assert fig.layout.yaxis.type == "log"
    assert float(r.prob_ratio("clean")) == pytest.approx(np.exp(r.clean_summary.mean))


def test_stale_png_is_removed_when_png_export_is_unavailable(tmp_path, monkeypatch, capsys):
    def no_browser(*args, **kwargs):
        try:
            raise LookupError("No browser found at BROWSER_PATH='/nowhere'.")
        except LookupError as e:
            raise RuntimeError("\n\nKaleido requires Google Chrome to be installed.\n\n") from e

    monkeypatch.setattr(go.Figure, "write_image", no_browser)
    stale = tmp_path / "e5_head_heatmap.png"
    stale.write_bytes(b"old figure")
    run = plotting.PngExport()  # one per run
    written = plotting.save(load("e5").figures(synth.e5())["e5_head_heatmap"], tmp_path, "e5_head_heatmap", png=run)
    assert written == [tmp_path / "e5_head_heatmap.html"] and not stale.exists() and run.failed
    err = capsys.readouterr().err
    assert err.startswith("note: static PNG export skipped") and err.count("\n") == 1 and err.endswith("\n")  # one line
    assert (
        "Kaleido requires Google Chrome to be installed" in err
        and "No browser found" in err
        and "RuntimeError: )" not in err
    )
    plotting.save(load("e5").figures(synth.e5())["e5_layer_summary"], tmp_path, "e5_layer_summary", png=run)
    assert capsys.readouterr().err == ""  # the run's other figures skip PNG export quietly
    # --no-png: an old PNG is removed too, it would show an earlier run.
    stale.write_bytes(b"old figure")
    plotting.save(load("e5").figures(synth.e5())["e5_head_heatmap"], tmp_path, "e5_head_heatmap", png=False)
    assert not stale.exists()


def test_ridge_plot_rises_upward_without_overlap_and_has_a_density_scale():
    fig = load("e1").figures(synth.e1())["e1_kde_by_layer"]
    fills = [t for t in fig.data if t.fill == "tonexty"]
    assert len(fills) == synth.L
    baselines = list(fig.layout.yaxis.tickvals)
    assert list(fig.layout.yaxis.ticktext) == [str(l) for l in range(synth.L)] and baselines == sorted(
        baselines, reverse=True
    )
    for l, trace in enumerate(fills):
        y = np.asarray(trace.y)
        assert (y >= baselines[l] - 1e-9).all()  # rises upward from its own baseline
        if l > 0:
            assert y.max() < baselines[l - 1]  # stays below the next row's baseline
    assert any(a.text.startswith("density") for a in fig.layout.annotations)  # the scale bar's label
    assert any(s.xref == "paper" and s.y0 == 0 for s in fig.layout.shapes)


def test_e3_bands_match_their_lines_and_every_trace_is_in_the_legend():
    fig = load("e3").figures(synth.e3())["e3_cosine_similarity"]
    for trace in fig.data:
        assert trace.name and trace.showlegend is not False, trace.name
        if getattr(trace, "fill", None) == "toself":
            assert trace.mode == "lines"  # no stray markers on the band's outline
            line = next(t for t in fig.data if t.name == trace.name.split(":")[0] + ": mean")
            assert rgb(trace.fillcolor) == rgb(plotting.rgba(line.line.color, 1))
    assert (
        "M(M−1)/2" not in fig.layout.annotations[0].text
        and "all 6 pairs of the 4 tokens" in fig.layout.annotations[0].text
    )


def test_every_title_states_the_unit():
    figs = {}
    for key, result in (
        ("e1", synth.e1()),
        ("e2", synth.e2()),
        ("e3", synth.e3()),
        ("e4", synth.e4()),
        ("e5", synth.e5()),
        ("edges", synth.edges()),
    ):
        figs.update(load(key).figures(result))
    assert len(figs) == 13
    for name in ("e4_logit_diff_by_layer", "e5_head_heatmap", "e5_layer_summary", "edges_faithfulness"):
        assert "nats" in figs[name].layout.title.text, name
    for name, fig in figs.items():
        assert "<br><sup>" in fig.layout.title.text, name  # headline + subtitle


def test_browser_driver_chatter_is_kept_out_of_the_log(tmp_path, monkeypatch, caplog):
    """kaleido's driver logs errors it recovers from (a traceback on stderr in a plain run); the PNG is written."""
    import logging

    def chatty(fig, path, **kwargs):
        try:
            raise ValueError("Expecting property name enclosed in double quotes")
        except ValueError:
            logging.getLogger("choreographer.channels.pipe").exception("JSONError decoding message. Ignoring")
        Path(path).write_bytes(b"png")

    monkeypatch.setattr(go.Figure, "write_image", chatty)
    fig = load("e5").figures(synth.e5())["e5_head_heatmap"]
    written = plotting.save(fig, tmp_path, "e5_head_heatmap", png=True)
    assert written == [tmp_path / "e5_head_heatmap.html", tmp_path / "e5_head_heatmap.png"]
    assert [r.getMessage() for r in caplog.records] == []
    assert logging.getLogger("choreographer").level == logging.NOTSET  # restored
    chatty(fig, tmp_path / "control.png")  # the control: outside save, the record is there
    assert [r.getMessage() for r in caplog.records] == ["JSONError decoding message. Ignoring"]
