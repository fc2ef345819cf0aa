"""The figures of a regression head (`evaluation.dimension_figures`: CCC, Pearson's r, MAE, RMSE) against a
direct computation with numpy and scipy on the same arrays, per target and per group, and its scatter plot."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

if (
    importlib.util.find_spec("sklearn") is None
):  # the train extra (./test.sh installs it); scipy comes with it
    if os.environ.get("EMOSERVE_REQUIRE_TOOLS"):
        raise ImportError("scikit-learn is missing: scripts/setup-venv.sh test,ray,train")
    pytest.skip("the train extra (scikit-learn) is not installed", allow_module_level=True)

from scipy import stats

from emoserve.inference.evaluation import dimension_figures, regression_report, regression_table, scatter_png


def direct_ccc(x: np.ndarray, y: np.ndarray) -> float:
    """Lin (1989): 2 s_xy / (s_x^2 + s_y^2 + (mean x - mean y)^2), population moments (np.cov bias=True)."""
    cov = np.cov(x, y, bias=True)
    return float(2 * cov[0, 1] / (cov[0, 0] + cov[1, 1] + (x.mean() - y.mean()) ** 2))


@pytest.mark.parametrize("seed", range(5))
def test_the_figures_equal_a_direct_numpy_and_scipy_computation(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    truth = rng.uniform(1, 7, n)
    # a prediction that correlates, with a bias and a wrong scale that CCC must pay for and Pearson not
    pred = 0.5 * truth + rng.normal(0, 0.8, n) + rng.uniform(-1, 1)
    f = dimension_figures(truth, pred)
    assert f["n"] == n
    assert f["ccc"] == pytest.approx(direct_ccc(truth, pred), abs=1e-6)
    assert f["pearson"] == pytest.approx(stats.pearsonr(truth, pred).statistic, abs=1e-6)
    assert f["mae"] == pytest.approx(np.mean(np.abs(pred - truth)), abs=1e-6)
    assert f["rmse"] == pytest.approx(np.sqrt(np.mean((pred - truth) ** 2)), abs=1e-6)
    assert f["ccc"] < f["pearson"]  # the bias and scale error cost concordance, not correlation


def test_ccc_is_one_only_for_agreement_and_defined_where_pearson_is_not() -> None:
    x = np.linspace(-1, 1, 50)
    assert dimension_figures(x, x)["ccc"] == pytest.approx(1.0)
    shifted = dimension_figures(x, x + 1.0)
    assert shifted["pearson"] == pytest.approx(1.0) and shifted["ccc"] < 0.5
    flat = dimension_figures(x, np.full_like(x, 0.3))  # a head that always says the same
    assert (
        flat["pearson"] is None
        and flat["ccc"] == 0.0
        and flat["mae"] == pytest.approx(np.abs(x - 0.3).mean())
    )


def test_the_report_per_target_and_per_group() -> None:
    rng = np.random.default_rng(7)
    truth = rng.normal(size=(40, 2))
    pred = truth + rng.normal(0, 0.5, size=(40, 2))
    groups = ["a"] * 15 + ["b"] * 25
    report = regression_report(
        truth, pred, ["arousal", "valence"], groups=groups, skipped=[{"path": "x", "reason": "y"}]
    )
    assert report["task"] == "regression" and report["n"] == 40 and len(report["skipped"]) == 1
    for j, target in enumerate(("arousal", "valence")):
        assert report["targets"][target]["ccc"] == pytest.approx(
            direct_ccc(truth[:, j], pred[:, j]), abs=1e-6
        )
        b = report["by_group"]["b"]["targets"][target]
        assert b["n"] == 25 and b["ccc"] == pytest.approx(direct_ccc(truth[15:, j], pred[15:, j]), abs=1e-6)
    assert report["by_group"]["a"]["n"] == 15
    table = regression_table(report)
    assert "arousal" in table and "CCC" in table and "group b" in table
    png = scatter_png(truth, pred, ["arousal", "valence"], "title")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------- abstain


def test_coverage_and_the_suggested_threshold_against_brute_force() -> None:
    from emoserve.inference.evaluation import abstain_report, coverage, suggest_threshold

    rng = np.random.default_rng(11)
    confidence = np.round(rng.uniform(0.2, 1.0, 400), 2)  # ties, as real scores may have
    correct = rng.uniform(size=400) < confidence  # more confident, more often right
    at = coverage(correct, confidence, 0.6)
    answered = confidence >= 0.6
    assert at["coverage"] == pytest.approx(answered.mean()) and at["answered"] == answered.sum()
    assert at["accuracy"] == pytest.approx(correct[answered].mean()) and at["uncertain"] == (~answered).sum()
    found = suggest_threshold(correct, confidence, 0.85)
    reaching = [t for t in np.unique(confidence) if correct[confidence >= t].mean() >= 0.85]
    assert found["threshold"] == pytest.approx(min(reaching))  # the lowest: the most rows answered
    assert found["accuracy"] >= 0.85
    assert suggest_threshold(np.zeros(5, bool), np.ones(5), 0.5)["threshold"] is None  # unreachable
    report = abstain_report(list(correct), list(confidence), 0.6, 0.85)
    assert report["at_threshold"] == at and report["suggested"] == found
