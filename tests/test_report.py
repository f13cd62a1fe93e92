"""The main job's index page is a short report: model card, data, findings in words with labelled intervals,
the seeds' claims, readable figures, a conclusion; the same bytes on every identical run."""

import html
import json
import re
from pathlib import Path

import pytest
import synthetic_results as synth
import torch

from tl_patching import plotting, report
from tl_patching.experiments import keys, load
from tl_patching.report import cards
from tl_patching.report import page as report_page

ROOT = Path(__file__).resolve().parents[1]


def page_text(path: Path) -> str:
    text = re.sub(r"<style>.*?</style>", "", path.read_text(), flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text)))


def build(out_dir: Path, model_name: str = "shipped", results=None, png_for=()) -> Path:
    """Results JSON and figures (HTML only, plus a fake PNG for the names in ``png_for``) as the main job writes
    them."""
    results = results or {k: make() for k, make in synth.ALL.items()}
    for key, r in results.items():
        r.to_json(out_dir / f"{key}_result.json")
        for name, fig in load(key).figures(r).items():
            plotting.save(fig, out_dir, name, png=False)
            if name in png_for:
                (out_dir / f"{name}.png").write_bytes(b"png")
    return report.write_report(out_dir, model_name)


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> tuple[Path, str]:
    index = build(tmp_path_factory.mktemp("report"), png_for=("e5_head_heatmap",))
    return index, page_text(index)


def test_report_covers_every_experiment_with_findings_and_seed_claims(page):
    _, text = page
    for key in [k for k in keys() if k != "circuit"]:  # the circuit step's section: tests/test_shipped_model.py
        assert load(key).title in text
        seed = load(key).seed
        assert f"Against the seed ({seed}" in text
    assert text.count("Finding.") == 6 and text.count("Data.") == 6
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
    assert (
        "4 × 4 (d_head 32)" in text and "128 / 512" in text and "290 WordLevel tokens" in text and "48 tokens" in text
    )
    card = cards.card_markdown(cards.shipped_model_card())
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


# --- every number and verdict the report states, against a hand computation on results where the plausible wrong
# answers (a transposed head index, a signed instead of an absolute comparison, a threshold on the other side) differ

from tl_patching.circuit import CircuitResult  # noqa: E402
from tl_patching.experiments.e1_attention_scores import E1Result  # noqa: E402
from tl_patching.experiments.e2_activation_editing import E2Result, Intervention  # noqa: E402
from tl_patching.experiments.e3_cosine_similarity import E3Result  # noqa: E402
from tl_patching.experiments.e4_ioi_patching import E4Result  # noqa: E402
from tl_patching.experiments.e5_head_token_patching import E5Result  # noqa: E402
from tl_patching.metrics import summarize  # noqa: E402


def e1_result(mean_score, frac_negative, **fields) -> E1Result:
    L, H = mean_score.shape
    return E1Result(
        info=synth.info(n_layers=L, n_heads=H, text="Sam and Sally went to the park."),
        mean_score=mean_score,
        frac_negative=frac_negative,
        first_token_self_attention=torch.ones(L, H),
        kde_grid=torch.linspace(-3, 3, 5),
        kde_density=torch.ones(L, 5) / 6,
        max_diff_split_vs_hook=1e-7,
        **fields,
    )


# 3 layers × 5 heads. Layer means −1.0, 0.0, −0.1: the highest *layer* (1) is not the layer of the highest *head*
# (1.5 in layer 2). Lowest head: flat index 8 = layer 1 head 3 (transposed, 8 // 3, 8 % 3: layer 2 head 2); highest:
# flat 10 = layer 2 head 0 (transposed: layer 3 head 1). Mean of all 15: −5.5 / 15 = −0.37.
E1_MEANS = torch.tensor(
    [[-1.0, -1.0, -1.0, -1.0, -1.0], [0.5, 0.5, 0.5, -2.0, 0.5], [1.5, -0.5, -0.5, -0.5, -0.5]], dtype=torch.float64
)


def test_e1_finding_numbers_by_hand():
    # 70% of the scores below zero; 10 of 15 head means are negative (67%): the fraction is of scores, not of heads.
    text, claims = load("e1").finding(e1_result(E1_MEANS, torch.full((3, 5), 0.7, dtype=torch.float64)))
    assert "the mean raw score Q·Kᵀ/√d_head of all 15 heads is -0.37, and 70% of the scores are below zero." in text
    assert "Layer means run from -1.00 (layer 0) to 0.00 (layer 1);" in text
    assert "single heads from -2.00 (layer 1, head 3) to 1.50 (layer 2, head 0)." in text
    assert [(c.verdict, c.because) for c in claims] == [("agrees", "the scores are shifted below zero (70% negative).")]


@pytest.mark.parametrize(
    "mean, frac, verdict",
    [
        (-0.1, 0.6, "agrees"),  # exactly at the 60% bound: agrees (>=)
        (-0.1, 0.59, "partly"),  # just below it
        (-0.01, 0.75, "agrees"),
        (0.0, 0.75, "differs"),  # a mean of exactly 0 is not below zero
    ],
)
def test_e1_verdict_on_both_sides_of_each_bound(mean, frac, verdict):
    frac_negative = torch.full((3, 5), frac, dtype=torch.float64)
    assert float(frac_negative.mean()) == frac  # the bound is met exactly, not up to rounding
    _, [claim] = load("e1").finding(e1_result(torch.full((3, 5), mean, dtype=torch.float64), frac_negative))
    assert claim.verdict == verdict


def test_e1_score_formula_in_the_finding_and_the_figures():
    gemma = "3·tanh((Q·Kᵀ/√query_pre_attn_scalar)/3)"
    r = e1_result(E1_MEANS, torch.full((3, 5), 0.7, dtype=torch.float64), score_formula=gemma)
    assert f"the mean raw score {gemma} of all 15 heads" in load("e1").finding(r)[0]
    figures = load("e1").figures(r)
    assert (
        gemma in figures["e1_mean_raw_score"].layout.title.text
        and gemma in figures["e1_kde_by_layer"].layout.xaxis.title.text
    )
    assert "√d_head" not in figures["e1_kde_by_layer"].layout.xaxis.title.text
    # an E1 result written before score_formula existed (the shipped model's, from an earlier main job)
    saved = E1Result.from_json((ROOT / "tests" / "data" / "e1_result_before_score_formula.json").read_text())
    assert saved.score_formula == "Q·Kᵀ/√d_head"  # the shipped GPT-2's
    assert E1Result.from_json(r.to_json()).score_formula == gemma


def e2_result(resid_01: list[float], resid_10: list[float], layer: int = 2) -> E2Result:
    """Clean spread [2, 3, 6, 10] per layer; the ×0.1 and ×10 edits at ``layer`` with the given spreads."""

    def edited(label, std, top, kl):
        return Intervention(label, torch.tensor(std), [top, " Sam"], [0.7, 0.2], clean_top1_prob=0.5, kl_from_clean=kl)

    return E2Result(
        info=synth.info(text="Sam and Sally went to the park. Sam gave a gift to"),
        layer=layer,
        head=2,
        clean_resid_std=torch.tensor([2.0, 3.0, 6.0, 10.0]),
        clean_top_tokens=[" Sally", " Sam"],
        clean_top_probs=[0.9, 0.05],
        interventions=[
            edited(f"block {layer} output × 0.1", resid_01, " were", 0.125),
            edited(f"block {layer} output × 10", resid_10, " Sally", 2.5),
        ],
    )


def test_e2_finding_numbers_by_hand():
    text, claims = load("e2").finding(e2_result([2.0, 3.0, 0.6, 5.6], [2.0, 3.0, 60.0, 61.0]))
    # ×0.1: 6.00 → 0.60 at layer 2 (×0.10), 10.00 → 5.60 at layer 3 (×0.56); ×10: ×10.00 and ×6.10.
    assert (
        "Block 2 output × 0.1: the spread at layer 2 goes from 6.00 to 0.60 (×0.10), at the last layer (3) from 10.00 "
        "to 5.60 (×0.56); the next-token prediction changes from ' Sally' to ' were' (KL(clean‖edited) = 0.125 nats)."
    ) in text
    assert (
        "Block 2 output × 10: the spread at layer 2 goes from 6.00 to 60.00 (×10.00), at the last layer (3) from 10.00 "
        "to 61.00 (×6.10); the next-token prediction stays ' Sally' (KL(clean‖edited) = 2.500 nats)."
    ) in text
    assert "every edit is at layer 2 of 4." in text
    assert [c.verdict for c in claims] == ["agrees", "partly"]
    assert (
        claims[0].because
        == "it falls to ×0.10 of clean at layer 2 and is at ×0.56 by the last layer — much closer to clean."
    )
    assert claims[1].because.startswith(
        "it rises to ×10.0 of clean at layer 2 and is still ×6.1 at the last layer: it explodes, but is not compressed."
    )


# Recovery / compression: |log(end / clean)| < ½ |log(at / clean)|; at ×0.1 and ×10 the bound is
# ×√10^∓1 ≈ ×0.316 / ×3.16.
@pytest.mark.parametrize("end, verdict", [(3.2, "agrees"), (3.1, "differs"), (1 / 0.032, "agrees"), (100.0, "differs")])
def test_e2_recovery_verdict_on_both_sides_of_the_bound(end, verdict):
    # end is the last layer's spread (clean 10): ×0.32 recovers, ×0.31 does not; ×3.1 recovers (past clean), ×10 does
    # not (a signed comparison, log(end) > ½ log(at), would call ×10 a recovery).
    _, claims = load("e2").finding(e2_result([2.0, 3.0, 0.6, end], [2.0, 3.0, 60.0, 61.0]))
    assert claims[0].verdict == verdict


@pytest.mark.parametrize("end, verdict", [(31.0, "agrees"), (32.0, "partly"), (10.0, "agrees"), (1.0, "partly")])
def test_e2_compression_verdict_on_both_sides_of_the_bound(end, verdict):
    _, claims = load("e2").finding(e2_result([2.0, 3.0, 0.6, 5.6], [2.0, 3.0, 60.0, end]))
    assert claims[1].verdict == verdict


def test_e2_edit_at_the_last_layer_is_not_tested():
    _, claims = load("e2").finding(e2_result([2.0, 3.0, 6.0, 1.0], [2.0, 3.0, 6.0, 100.0], layer=3))
    assert [c.verdict for c in claims] == ["not tested"]


def e3_result(clean_means, diffs, significant, layer=1, head=2, alpha=0.05) -> E3Result:
    """10 pairs (M = 5 tokens) per layer, every pair at its layer's mean; silenced = clean + diff."""
    clean = torch.tensor(clean_means)[:, None].expand(-1, 10).clone()
    L = len(clean_means)
    return E3Result(
        info=synth.info(text="I think that pineapple on pizza is a crime.", alpha=alpha),
        layer=layer,
        head=head,
        n_pairs=10,
        clean_pairs=clean,
        silenced_pairs=clean + torch.tensor(diffs)[:, None],
        t_statistic=torch.zeros(L),
        p_value=torch.ones(L, dtype=torch.float64),
        threshold=alpha / L,
        significant=significant,
    )


def test_e3_finding_numbers_by_hand():
    # Largest |change| −0.05 at layer 1 (the largest signed change is +0.02 at layer 2).
    text, claims = load("e3").finding(
        e3_result([0.6, 0.3, 0.5, 0.9], [0.0, -0.05, 0.02, 0.01], [False, True, False, True])
    )
    assert "M(M−1)/2 = 10 pairs for M = 5 tokens." in text
    assert (
        "The clean mean cosine similarity is 0.60 at layer 0, lowest (0.30) at layer 1, and 0.90 at the last layer "
        "(3). Silencing head 2 of layer 1 changes the mean similarity by up to 0.050 (at layer 1, lower);"
    ) in text
    # A rise is named as one: the largest |change| +0.07 at layer 2.
    risen, _ = load("e3").finding(e3_result([0.6, 0.3, 0.5, 0.9], [0.0, -0.05, 0.07, 0.01], [False] * 4))
    assert "changes the mean similarity by up to 0.070 (at layer 2, higher);" in risen
    assert (
        "significant below the Bonferroni threshold 0.05/4 = 0.0125, finds a difference at layers 1 and 3 and none at "
        "layers 0 and 2."
    ) in text
    assert claims[0].verdict == "agrees" and claims[0].because.endswith("(0.60 → 0.30 → 0.90).")
    assert claims[1].verdict == "partly" and claims[1].because.startswith(
        "significant at layers 1 and 3; hook_resid_post of layer 1"
    )


def test_e3_finding_states_the_alpha_the_run_used():
    """The threshold was written "0.05/L" whatever alpha the run used (alpha 0.01: "0.05/4 = 0.0025")."""
    text, _ = load("e3").finding(
        e3_result([0.6, 0.3, 0.5, 0.9], [0.0, -0.05, 0.02, 0.01], [False, True, False, False], alpha=0.01)
    )
    assert (
        "the Bonferroni threshold 0.01/4 = 0.0025, finds a difference at layer 1 and none at layers 0, 2 and 3." in text
    )


@pytest.mark.parametrize(
    "clean, verdict",
    [
        ([0.6, 0.57, 0.6, 0.8], "agrees"),  # falls by 0.03 (> 0.02), rises by 0.23
        ([0.6, 0.59, 0.6, 0.8], "partly"),  # falls by 0.01 only
        ([0.6, 0.3, 0.5, 0.39], "partly"),  # rises by 0.09 only (≤ 0.1)
        ([0.6, 0.3, 0.5, 0.41], "agrees"),  # rises by 0.11
        ([0.6, 0.65, 0.7, 0.65], "differs"),
    ],
)
def test_e3_shape_verdict_on_both_sides_of_each_bound(clean, verdict):
    _, claims = load("e3").finding(e3_result(clean, [0.0] * 4, [False] * 4))
    assert claims[0].verdict == verdict


@pytest.mark.parametrize(
    "layer, significant, verdict",
    [
        (0, [False, True, False, True], "agrees"),  # not at the silenced layer, at the last: the ripple
        (1, [False, True, False, True], "partly"),  # at the silenced layer and at the last
        (1, [False, True, False, False], "differs"),  # at the silenced layer only
        (1, [False, False, False, False], "partly"),  # nowhere
    ],
)
def test_e3_ripple_verdict(layer, significant, verdict):
    _, claims = load("e3").finding(e3_result([0.6, 0.3, 0.5, 0.9], [0.0] * 4, significant, layer=layer))
    assert claims[1].verdict == verdict


def e4_result(
    heads_layer2: float = 2.0, final_layer1: list[float] | None = None, final_layer2: float = -2.0
) -> E4Result:
    """6 prompts, 4 layers. Clean [0, 3, 4, 5, 6, 9]: mean 4.5, 5 of 6 above 0 (83%; ">= 0" would give 100%);
    the donor its negative (mean −4.5). Per layer: constant rows unless given."""
    clean = torch.tensor([0.0, 3.0, 4.0, 5.0, 6.0, 9.0])
    row = lambda *values: torch.tensor(values)[:, None].expand(-1, 6).clone()  # noqa: E731
    heads = row(4.0, 4.5, heads_layer2, 4.5)
    s2 = row(3.0, 2.0, 1.0, 0.5)
    final = row(4.5, 1.0, final_layer2, 0.0)
    final[1] = torch.tensor(final_layer1 or [-1.0, -1.0, -1.0, -1.0, 5.0, 5.0])  # mean +1.0, yet 4 of 6 prompts flipped
    final[3] = -clean
    texts = ["Sam and Sally went to the park. Sam gave a gift to"]
    return E4Result.of(synth.info(n_prompts=6, texts=texts), clean, -clean, heads, s2, final)


def test_e4_finding_numbers_by_hand():
    r = e4_result()
    text, claims = load("e4").finding(r)
    c = summarize(r.clean)  # the interval itself: tests/test_metrics.py
    assert (
        f"the unpatched model prefers the correct name by 4.50 nats (95% bootstrap CI [{c.ci_low:.2f}, "
        f"{c.ci_high:.2f}]) in logit difference, a probability ratio P(correct)/P(wrong) of 90 (exp of the mean"
    ) in text  # e^4.5 = 90.0
    assert "the geometric mean over prompts); 83% of prompts are right." in text  # mean of the ratios: 1.5 × 10^3
    final = summarize(-r.clean)
    assert (
        "Patching hook_resid_post at the final position flips the mean at layers 2 and 3 (lowest at layer 3: -4.50 "
        f"nats, 95% bootstrap CI [{final.ci_low:.2f}, {final.ci_high:.2f}])."
    ) in text  # layer 1: mean +1.0, not flipped
    assert (
        "Patching hook_resid_post at the repeated name (S2) flips it at no layer (lowest at layer 3: 0.50 nats, "
        "95% bootstrap CI [0.50, 0.50])."
    ) in text
    assert (
        "Patching all heads of the layer (hook_z, every position) flips it at no layer (lowest at layer 2: 2.00 nats"
        in text
    )
    assert (claims[0].verdict, claims[0].because) == ("agrees", "hook_resid_post flips the mean at layers 2 and 3.")
    # Heads move the mean by 0.5, 0, 2.5, 0 nats; the gap clean − donor is 9: 2.5 / 9 = 28% ≥ 25%.
    assert claims[1].verdict == "differs"
    assert claims[1].because.startswith("the largest move is 2.50 nats at layer 2, 28% of the way from the recipient's")


@pytest.mark.parametrize("heads_layer2, verdict", [(2.25, "differs"), (2.26, "agrees")])
def test_e4_heads_verdict_on_both_sides_of_a_quarter(heads_layer2, verdict):
    # A move of 2.25 nats is exactly a quarter of the 9-nat gap: not "only a little".
    _, claims = load("e4").finding(e4_result(heads_layer2=heads_layer2))
    assert claims[1].verdict == verdict


def e5_result(heatmap: list[list[float]], clean=(9.0, 11.0)) -> E5Result:
    m = torch.tensor(heatmap)
    L, H = m.shape
    return E5Result(
        info=synth.info(n_layers=L, n_heads=H, n_prompts=2),
        clean=torch.tensor(clean),
        effect=torch.stack([m + 0.25, m - 0.25], -1),
        method="fast",
    )  # two prompts; their mean is the heatmap


# 4 layers × 3 heads. Fall −2.5 at flat index 7 = layer 2 head 1 (transposed, 7 // 4, 7 % 4: layer 1 head 3); rise 1.2
# at flat 11 = layer 3 head 2 (transposed: layer 2 head 3). Mean |effect| per layer 0.5/3, 0.2/3, 3.7/3, 2.3/3.
E5_MAP = [[0.3, -0.2, 0.0], [0.0, 0.1, -0.1], [0.8, -2.5, 0.4], [-0.6, 0.5, 1.2]]


def test_e5_finding_numbers_by_hand():
    text, claims = load("e5").finding(e5_result(E5_MAP))
    assert (
        "mean over 2 prompts (clean logit difference 10.00 nats): the largest fall is -2.50 nats at layer 2, head 1 "
        "(25% of the clean value), the largest rise +1.20 at layer 3, head 2. 6 of 12 heads raise the score and 4 "
        "lower it; 2 change it by less than 0.01 nats. The mean |effect| per head is 0.12 nats in the first half of "
        "the layers and 1.00 in the second."
    ) in text
    assert [c.verdict for c in claims] == ["differs", "agrees", "agrees"]
    assert claims[0].because.startswith("the largest is 2.50 nats against a clean 10.00. A block computes")
    assert "a 1/3 share of one term here" in claims[0].because and "this model has 12 heads in all" in claims[0].because
    assert claims[1].because == "mean |effect| 0.12 nats in the first half of the layers, 1.00 in the second."
    assert claims[2].because == "6 raise it and 4 lower it."


@pytest.mark.parametrize(
    "heatmap, verdict",
    [
        # Late layers larger on average though the single largest |effect| is early (a max would say "differs").
        ([[-3.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, -1.0], [1.0, -1.0, 1.0]], "agrees"),
        # Early larger in |effect| (0.567 vs 0.55) but negative: a signed mean would call the late layers larger.
        ([[-3.0, 0.2, 0.0], [0.1, -0.1, 0.0], [0.5, -0.6, 0.7], [0.9, -0.4, 0.2]], "differs"),
        ([[1.0, -1.0, 1.0]] * 4, "differs"),  # equal is not larger
    ],
)
def test_e5_late_layers_verdict(heatmap, verdict):
    _, claims = load("e5").finding(e5_result(heatmap))
    assert claims[1].verdict == verdict


@pytest.mark.parametrize(
    "fall, rise, verdict", [(-0.99, 0.5, "agrees"), (-1.0, 0.5, "differs"), (-0.5, 1.0, "differs")]
)
def test_e5_tiny_verdict_on_both_sides_of_a_tenth(fall, rise, verdict):
    # Clean 10: "tiny" is both the largest fall and the largest rise below 1.0 nats in size.
    _, claims = load("e5").finding(e5_result([[fall, 0.1, 0.0], [0.0, rise, 0.0]]))
    assert claims[0].verdict == verdict


def circuit_result(movers: list[list[int]]) -> CircuitResult:
    direct = torch.zeros(3, 4)
    direct[2, 1], direct[2, 3], direct[1, 0] = -1.5, 0.6, 0.2
    steer = {k: torch.zeros(3, 4) for k in "qkv"}
    steer["q"][1, 2], steer["k"][1, 2], steer["v"][1, 2] = 0.1, -0.4, 0.3  # strongest |effect|: k (signed: v)
    read = {k: torch.zeros(3, 4) for k in "qkv"}
    read["q"][0, 0], read["v"][0, 0] = 0.2, -0.1
    edges = [{"sender": [1, 2], "receiver": m, "input": "k", "effect": -0.2} for m in movers] + [
        {"sender": [0, 0], "receiver": [1, 2], "input": "q", "effect": 0.2}
    ]
    return CircuitResult(
        info=synth.info(n_layers=3, n_heads=4, n_prompts=2),
        clean=torch.tensor([2.0, 4.0]),
        donor=torch.tensor([-1.0, -2.0]),
        direct=direct,
        steer=steer,
        read=read,
        heads={"name mover": movers, "steering": [[1, 2]], "source": [[0, 0]]},
        edges=edges,
        settings={"threshold": 0.1, "cut_nats": 0.25, "edge_min": 0.05},
    )


def test_circuit_finding_numbers_by_hand():
    text, [claim] = load("circuit").finding(circuit_result([[2, 1], [2, 3]]))
    assert (
        "mean over 2 prompts; clean logit difference 3.00 nats, donor -1.50; a head counts when its path moves the "
        "logit difference by at least 0.25 nats. Heads writing the answer directly (to the logits): layer 2 head 1 "
        "(-1.50 nats) and layer 2 head 3 (+0.60 nats). Heads steering them: layer 1 head 2 (-0.40 nats through their k "
        "inputs). Heads those read from: layer 0 head 0 (+0.20 nats through their q inputs). 3 edges of at least 0.05 "
        "nats are drawn."
    ) in text
    # |−1.5| + |0.6| = 2.10 together (a signed sum: −0.90).
    assert claim.verdict == "agrees" and claim.because.startswith(
        "2 heads write the answer directly, 2.10 nats together against 1.50 for the largest alone;"
    )
    _, [claim] = load("circuit").finding(circuit_result([[2, 1]]))
    assert claim.verdict == "partly" and claim.because.startswith(
        "1 heads write the answer directly, 1.50 nats together"
    )


def test_edges_finding_numbers_by_hand():
    """synth.edges: exact effects −0.1 … −2.0 nats over 20 edges (recall@1, since 5% of 20 is 1), f by hand."""
    text, [claim] = load("edges").finding(synth.edges())
    assert (
        "Exact edge effects over all 20 edges (mean over 24 prompts; clean logit difference 9.00 nats, every edge "
        "ablated -1.00). Largest, in nats: m0->logits (-2.00), m0->m1 (-1.90), m0->a1.h0<v> (-1.80), "
        "m0->a1.h0<k> (-1.70), m0->a1.h0<q> (-1.60)."
    ) in text
    # Spearman with the top two swapped: 1 − 6·(1² + 1²) / (20·(20² − 1)) = 0.9985.
    assert (
        "EAP recall@1 0.00, Spearman -1.00; EAP-IG (inputs) recall@1 1.00, Spearman 1.00; EAP-IG (activations) "
        "recall@1 0.00, Spearman 1.00."
    ) in text
    # f = 0.5, 0.8, 1.0 at 10%, 50%, 100%: CPR = 0.4·1.3/2 + 0.5·1.8/2 = 0.71, CMD = 0.4·0.7/2 + 0.5·0.2/2 = 0.19;
    # EAP's 0, 0.2, 1: CPR 0.04 + 0.30 = 0.34, CMD 0.36 + 0.20 = 0.56.
    assert "exact CPR 0.71, CMD 0.19; EAP CPR 0.34, CMD 0.56; EAP-IG (inputs) CPR 0.71, CMD 0.19" in text
    r = synth.edges()
    assert r.curve("exact").cpr == pytest.approx(0.71) and r.curve("exact").cmd == pytest.approx(0.19)
    assert r.spearman("eap-ig-activations") == pytest.approx(1 - 12 / 7980)
    assert r.recall("eap-ig-activations", 2) == 1.0  # the swapped pair, both in the top 2
    # One edge moves 2 of the 10 nats between clean and ablated; 10 edges already give f = 0.8.
    assert claim.verdict == "agrees" and claim.because == (
        "the largest single edge moves the logit difference by 20% of the clean − ablated gap; the smallest "
        "exact-ranked circuit with f ≥ 0.8 has 10 of 20 edges."
    )
    _, [claim] = load("edges").finding(synth.edges(largest=-9.0))
    assert claim.verdict == "partly" and claim.because.startswith(
        "the largest single edge moves the logit difference by 90%"
    )


def test_data_description_token_count_and_start_token():
    e1 = synth.e1()  # token ids [0, 5, 6, 7, 8, 9]: 6 tokens, the first the prepended start token
    assert report_page.data_description(load("e1"), e1) == (
        "Text: “Sam and Sally went to the park.” (6 tokens, start token <|endoftext|> "
        "prepended (as its tokenizer does))."
    )
    e1.info.token_ids, e1.info.prepend_bos = [[5, 6, 7, 8, 9]], False
    assert report_page.data_description(load("e1"), e1).endswith(
        "(5 tokens, no start token (its tokenizer would add one; set by the caller))."
    )
    e1.info.start_token_convention = False
    assert report_page.data_description(load("e1"), e1).endswith("(5 tokens, no start token (as its tokenizer does)).")
    e1.info.prepend_bos, e1.info.start_token = True, "<bos>"
    assert report_page.data_description(load("e1"), e1).endswith(
        "(5 tokens, start token <bos> prepended (its tokenizer adds none; set by the caller))."
    )
    e1.info.start_token_convention = None  # a result saved before the convention was recorded
    assert report_page.data_description(load("e1"), e1).endswith("(5 tokens, start token prepended).")
    assert report_page.data_description(load("e2"), synth.e2()).endswith("Edits at layer 2 (head 2 for the key).")
    assert report_page.data_description(load("e3"), synth.e3()).endswith("Silenced: head 0 of layer 0.")
    e4 = synth.e4()
    assert report_page.data_description(load("e4"), e4).startswith("24 IOI prompts, each with a donor")
    assert report_page.data_description(load("e4"), e4).endswith(
        "Start token <|endoftext|> prepended (as its tokenizer does)."
    )
    one = synth.e4(n=1)
    one.info.settings["n_prompts"] = 1
    assert report_page.data_description(load("e4"), one) == (
        "The seed's single prompt pair: “Sam and Sally went to the park. Sam gave a gift to” "
        "(donor: the other name repeated)."
    )


def conclusion(results: dict) -> str:
    found = {k: load(k).finding(r) for k, r in results.items()}
    return page_text_of(report_page.conclusion("gpt2", {k: load(k) for k in results}, found, results))


def page_text_of(fragment: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", fragment)))


def test_conclusion_names_the_heads_and_layers_by_hand():
    text = conclusion({"e4": e4_result(), "e5": e5_result(E5_MAP)})
    # Claims: E4 two (agrees, differs), E5 three (differs, agrees, agrees).
    assert "Of 5 claims from the seed reports, 3 agree, 0 partly agree and 2 differ here." in text
    assert "from layer 2 on: patching it there gives the donor's answer (E4)." in text
    # The three lowest effects: −2.5 (layer 2 head 1), −0.6 (layer 3 head 0), −0.2 (layer 0 head 1).
    assert (
        "The heads that matter most at the final position are layer 2 head 1 (-2.50 nats), layer 3 head 0 (-0.60 nats) "
        "and layer 0 head 1 (-0.20 nats) (E5)."
    ) in text


def test_conclusion_says_from_layer_on_only_when_every_later_layer_flips():
    """Flipped at layers 1 and 3 but not 2: "from layer 1 on" was written before."""
    text = conclusion({"e4": e4_result(final_layer1=[-1.0] * 6, final_layer2=1.0)})
    assert "carries the donor's answer at layers 1 and 3" in text and "from layer" not in text


def gemma3_270m() -> dict:
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": 640,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "num_hidden_layers": 18,
        "intermediate_size": 2048,
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 256,
        "vocab_size": 262144,
        "max_position_embeddings": 32768,
    }


@pytest.mark.parametrize(
    "config, architecture, heads",
    [
        # Qwen3-0.6B: head_dim 128, not 1024 / 16 = 64.
        (
            {
                "architectures": ["Qwen3ForCausalLM"],
                "model_type": "qwen3",
                "hidden_size": 1024,
                "num_attention_heads": 16,
                "num_key_value_heads": 8,
                "head_dim": 128,
                "num_hidden_layers": 28,
                "intermediate_size": 3072,
                "hidden_act": "silu",
                "vocab_size": 151936,
                "max_position_embeddings": 40960,
            },
            "Qwen3ForCausalLM (qwen3, activation silu)",
            "28 × 16 (d_head 128)",
        ),
        # Gemma-3-270m: head_dim 256, not 640 / 4 = 160; its activation field is hidden_activation (the card said "?").
        (gemma3_270m(), "Gemma3ForCausalLM (gemma3_text, activation gelu_pytorch_tanh)", "18 × 4 (d_head 256)"),
        (
            {
                "architectures": ["GPT2LMHeadModel"],
                "model_type": "gpt2",
                "n_embd": 768,
                "n_head": 12,
                "n_layer": 12,
                "activation_function": "gelu_new",
                "vocab_size": 50257,
                "n_positions": 1024,
            },
            "GPT2LMHeadModel (gpt2, activation gelu_new)",
            "12 × 12 (d_head 64)",
        ),
        (
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": 576,
                "num_attention_heads": 9,
                "num_hidden_layers": 30,
                "intermediate_size": 1536,
                "hidden_act": "silu",
                "vocab_size": 49152,
                "max_position_embeddings": 8192,
            },
            "LlamaForCausalLM (llama, activation silu)",
            "30 × 9 (d_head 64)",
        ),
    ],
)
def test_model_card_reads_each_familys_config(tmp_path, config, architecture, heads):
    (tmp_path / "config.json").write_text(json.dumps(config))
    rows = dict(cards.model_card(str(tmp_path)))
    assert rows["architecture"] == architecture and rows["layers × heads"] == heads
    d_model = config.get("hidden_size", config.get("n_embd"))
    assert rows["d_model / d_mlp"] == f"{d_model} / {config.get('intermediate_size', 4 * d_model)}"


def test_model_card_of_a_loaded_model_with_head_dim_apart_from_d_model():
    from tl_patching.testing import random_pair

    hf, tl = random_pair("gemma3", n_layers=2, hidden_size=48)  # 4 heads of head_dim 8 on d_model 48 (48 / 4 = 12)
    rows = dict(cards.model_card("tiny-gemma3", model=tl))
    assert (
        rows["architecture"] == "Gemma3ForCausalLM (activation gelu_pytorch_tanh)"
        and rows["layers × heads"] == "2 × 4 (d_head 8)"
    )
    assert rows["d_model / d_mlp"] == "48 / 96"
    from_config = dict(cards.hf_config_rows(hf.config.to_dict(), None))  # "architectures": null in an unsaved config
    assert all(from_config[k] == rows[k] for k in ("layers × heads", "d_model / d_mlp"))
    assert from_config["architecture"] == "gemma3_text (gemma3_text, activation gelu_pytorch_tanh)"


def test_e4_reading_and_figures_with_one_prompt_state_no_interval():
    """One prompt has no spread: its "95% interval" was [10.55, 10.55]."""
    r = synth.e4(n=1)
    reading = r.reading()
    assert reading.startswith(f"clean logit diff {r.clean_summary.mean:.2f} nats (one prompt, no interval), donor ")
    assert "bootstrap" not in reading
    figs = load("e4").figures(r)
    for fig in figs.values():
        assert "one prompt: no interval" in fig.layout.title.text and "bootstrap" not in fig.layout.title.text
        assert all(
            t.error_y.visible is False for t in fig.data if t.error_y is not None and t.error_y.array is not None
        )
    many = synth.e4()
    c = many.clean_summary
    assert many.reading().startswith(f"clean logit diff {c.mean:.2f} nats (95% bootstrap CI [{c.ci_low:.2f}, ")
    assert all(t.error_y.visible for t in load("e4").figures(many)["e4_logit_diff_by_layer"].data if t.error_y.array)
