"""Fitting a calibration (inference/calibration.py): ECE against a direct computation; on a synthetic
over-confident set the chosen calibration lowers ECE (measured out of fold) and leaves accuracy unchanged;
the method is chosen by the measured log loss; isotonic's numpy map equals scikit-learn's."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

if importlib.util.find_spec("sklearn") is None:  # the train extra (./test.sh installs it)
    if os.environ.get("EMOSERVE_REQUIRE_TOOLS"):
        raise ImportError("scikit-learn is missing: scripts/setup-venv.sh test,ray,train")
    pytest.skip("the train extra (scikit-learn) is not installed", allow_module_level=True)

from sklearn.isotonic import IsotonicRegression

from emoserve.inference.calibration import ece, fit_calibration, fit_isotonic, reliability_png

LABELS = ("angry", "happy", "neutral", "sad")


def synthetic(n: int, sharpen: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """True class probabilities softmax(z); the model says softmax(sharpen * z): over-confident when
    sharpen > 1, under-confident when < 1. The labels are drawn from the true probabilities."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.2, size=(n, len(LABELS)))
    truth = np.array([rng.choice(len(LABELS), p=np.exp(row) / np.exp(row).sum()) for row in z])
    said = np.exp(sharpen * z)
    return said / said.sum(axis=1, keepdims=True), truth


def test_ece_equals_a_direct_computation() -> None:
    p, truth = synthetic(500, 2.0, seed=4)
    top, right = p.max(axis=1), p.argmax(axis=1) == truth
    expected = 0.0
    for b in range(15):  # equal-width bins (lo, hi], the first one [0, 1/15]
        lo, hi = b / 15, (b + 1) / 15
        inside = (top > lo) & (top <= hi) if b else (top <= hi)
        if inside.any():
            expected += inside.mean() * abs(right[inside].mean() - top[inside].mean())
    assert ece(p, truth) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("sharpen", "softens"), [(3.0, True), (0.4, False)])
def test_calibration_lowers_ece_and_keeps_accuracy(sharpen: float, softens: bool) -> None:
    p, truth = synthetic(800, sharpen)
    calibration, report, held_out = fit_calibration(p, truth, LABELS)
    assert report["method"] == "temperature" and not report["isotonic_tried"]  # 800 rows: too few
    assert (calibration.temperature > 1) is softens
    assert report["before"]["ece"] > 0.1, report["before"]
    assert report["after"]["ece"] < report["before"]["ece"] / 2, report
    assert report["after"]["ece"] == pytest.approx(ece(held_out, truth), abs=1e-6)  # out of fold
    assert report["after"]["accuracy"] == report["before"]["accuracy"]  # temperature keeps every argmax
    assert (calibration.apply(p).argmax(axis=1) == p.argmax(axis=1)).all()
    assert reliability_png(report, "t")[:4] == b"\x89PNG"


def test_with_enough_rows_isotonic_competes_and_the_lower_log_loss_wins() -> None:
    p, truth = synthetic(2000, 3.0, seed=2)
    _, report, _ = fit_calibration(p, truth, LABELS)
    assert report["isotonic_tried"] and set(report["candidates"]) == {"temperature", "isotonic"}
    losses = {m: c["log_loss"] for m, c in report["candidates"].items()}
    assert report["method"] == min(losses, key=lambda m: losses[m])
    assert report["after"]["ece"] < report["before"]["ece"]


def test_the_isotonic_map_in_numpy_equals_scikit_learns() -> None:
    p, truth = synthetic(600, 2.0, seed=3)
    calibration = fit_isotonic(p, truth, LABELS)
    fitted = np.stack(
        [
            IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip")
            .fit(p[:, k], truth == k)
            .predict(p[:, k])
            for k in range(len(LABELS))
        ],
        axis=1,
    )
    expected = fitted / fitted.sum(axis=1, keepdims=True)
    assert np.abs(calibration.apply(p) - expected).max() < 1e-9


def test_too_few_rows_are_refused() -> None:
    p, truth = synthetic(6, 2.0)
    with pytest.raises(ValueError, match="at least 10 to be measured"):
        fit_calibration(p, truth, LABELS)
