"""Fitting a calibration (inference/confidence.py's `Calibration`) on labelled predictions, and its figures:
expected calibration error (ECE) and a reliability diagram before and after. Needs the `train` extra
(scikit-learn, scipy); never on the serving path, which applies a calibration in numpy.

    probabilities (n, labels) + true label indices -> candidates: temperature scaling (always) and isotonic
    regression per label (from ISOTONIC_MIN_ROWS rows: it overfits fewer) -> each scored by the log loss of
    its out-of-fold predictions (k-fold over the rows) -> the lower one, fitted on all rows -> the report:
    ECE, log loss and accuracy before and after (after: out of fold, never on the rows it was fitted on).

Temperature scaling (Guo et al. 2017, "On calibration of modern neural networks") divides the log scores by
one number T and keeps every argmax: accuracy cannot change. Isotonic regression can re-order labels.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from emoserve.inference.confidence import Calibration, Method

ECE_BINS = 15  # equal-width confidence bins, as Guo et al. 2017
ISOTONIC_MIN_ROWS = 1000  # scikit-learn's advice: isotonic calibration overfits with fewer samples
CALIBRATION_FOLDS = 5
TEMPERATURE_RANGE = (0.05, 20.0)
EPS = 1e-12  # a probability of 0 costs log(1e-12) in the log loss, not infinity


def ece(probabilities: np.ndarray, truth: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: over equal-width bins of the top score, the bin's share of rows times
    |its accuracy - its mean top score|."""
    rows = reliability(probabilities, truth, bins)
    n = sum(r["n"] for r in rows)
    return float(sum(r["n"] / n * abs(r["accuracy"] - r["confidence"]) for r in rows)) if n else 0.0


def reliability(probabilities: np.ndarray, truth: np.ndarray, bins: int = ECE_BINS) -> list[dict[str, Any]]:
    """The reliability diagram's bins that hold rows: their range, mean top score, accuracy and count."""
    p = np.asarray(probabilities, np.float64)
    top, correct = p.max(axis=1), p.argmax(axis=1) == np.asarray(truth)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(top, edges[1:-1], right=True), 0, bins - 1)
    out = []
    for b in range(bins):
        inside = which == b
        if inside.any():
            out.append({
                "low": round(float(edges[b]), 6), "high": round(float(edges[b + 1]), 6),
                "confidence": float(top[inside].mean()), "accuracy": float(correct[inside].mean()),
                "n": int(inside.sum()),
            })  # fmt: skip
    return out


def log_loss(probabilities: np.ndarray, truth: np.ndarray) -> float:
    p = np.asarray(probabilities, np.float64)
    return float(-np.log(np.clip(p[np.arange(len(p)), np.asarray(truth)], EPS, None)).mean())


def figures(probabilities: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    p = np.asarray(probabilities)
    return {
        "ece": round(ece(p, truth), 6),
        "log_loss": round(log_loss(p, truth), 6),
        "accuracy": round(float((p.argmax(axis=1) == truth).mean()), 6),
    }


# ------------------------------------------------------------------------------------------ fitting


def fit_temperature(probabilities: np.ndarray, truth: np.ndarray, labels: Sequence[str]) -> Calibration:
    """The temperature that minimises the log loss of softmax(log p / T)."""
    from scipy.optimize import minimize_scalar

    def loss(log_t: float) -> float:
        return log_loss(
            Calibration("temperature", tuple(labels), float(np.exp(log_t))).apply(probabilities), truth
        )

    low, high = np.log(TEMPERATURE_RANGE)
    found = minimize_scalar(loss, bounds=(low, high), method="bounded")
    return Calibration("temperature", tuple(labels), round(float(np.exp(found.x)), 6))


def fit_isotonic(probabilities: np.ndarray, truth: np.ndarray, labels: Sequence[str]) -> Calibration:
    """Per label, an increasing map from its score to the share of rows of that label (one-vs-rest),
    stored as its knots."""
    from sklearn.isotonic import IsotonicRegression

    knots = []
    for k in range(len(labels)):
        fitted = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(
            probabilities[:, k], (truth == k).astype(np.float64)
        )
        knots.append((tuple(map(float, fitted.X_thresholds_)), tuple(map(float, fitted.y_thresholds_))))
    return Calibration("isotonic", tuple(labels), knots=tuple(knots))


FITTERS = {"temperature": fit_temperature, "isotonic": fit_isotonic}


def out_of_fold(
    method: Method, probabilities: np.ndarray, truth: np.ndarray, labels: Sequence[str], seed: int
) -> np.ndarray:
    """Each row's calibrated probabilities from a calibration fitted on the other folds' rows."""
    from sklearn.model_selection import KFold

    out = np.empty_like(probabilities, dtype=np.float64)
    folds = KFold(min(CALIBRATION_FOLDS, len(truth)), shuffle=True, random_state=seed)
    for fit_rows, test_rows in folds.split(probabilities):
        calibration = FITTERS[method](probabilities[fit_rows], truth[fit_rows], labels)
        out[test_rows] = calibration.apply(probabilities[test_rows])
    return out


def fit_calibration(
    probabilities: np.ndarray, truth: np.ndarray, labels: Sequence[str], seed: int = 0
) -> tuple[Calibration, dict[str, Any], np.ndarray]:
    """The calibration chosen by measurement (see the module), its report, and the out-of-fold calibrated
    probabilities the report's `after` figures come from. `truth`: each row's label index in `labels`."""
    p, y = np.asarray(probabilities, np.float64), np.asarray(truth)
    if len(y) < 2 * CALIBRATION_FOLDS:
        raise ValueError(
            f"{len(y)} rows: a calibration needs at least {2 * CALIBRATION_FOLDS} to be measured"
        )
    methods: list[Method] = ["temperature", "isotonic"] if len(y) >= ISOTONIC_MIN_ROWS else ["temperature"]
    held_out = {m: out_of_fold(m, p, y, labels, seed) for m in methods}
    losses = {m: log_loss(q, y) for m, q in held_out.items()}
    chosen = min(losses, key=lambda m: losses[m])
    calibration = FITTERS[chosen](p, y, labels)
    after = figures(held_out[chosen], y)  # out of fold: never on the rows it was fitted on
    report: dict[str, Any] = {
        "method": chosen,
        "temperature": calibration.temperature,
        "n": len(y),
        "candidates": {m: {"log_loss": round(v, 6)} for m, v in losses.items()},
        "isotonic_tried": len(y) >= ISOTONIC_MIN_ROWS,
        "before": figures(p, y),
        "after": after,
        "reliability": {"before": reliability(p, y), "after": reliability(held_out[chosen], y)},
        "ece_bins": ECE_BINS,
        "ece": after["ece"],
    }
    return calibration, report, held_out[chosen]


# ------------------------------------------------------------------------------------------ rendering

PLOT = 240  # pixels: one reliability diagram


def reliability_png(report: dict[str, Any], title: str) -> bytes:
    """The reliability diagrams before and after side by side: per bin, a bar of its accuracy at its mean
    top score, against the diagonal of perfect calibration; the ECE under each."""
    from PIL import Image, ImageDraw, ImageFont

    pad = 30
    image = Image.new("RGB", (2 * (PLOT + pad) + pad, PLOT + 2 * pad + 30), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((10, 6), title.encode("latin-1", "replace").decode("latin-1"), fill="black", font=font)
    bins = report["ece_bins"]
    for j, when in enumerate(("before", "after")):
        x0, y0 = pad + j * (PLOT + pad), pad + 14
        draw.rectangle((x0, y0, x0 + PLOT, y0 + PLOT), outline="grey")
        draw.line((x0, y0 + PLOT, x0 + PLOT, y0), fill=(200, 200, 200))
        width = PLOT / bins
        for row in report["reliability"][when]:
            left = x0 + row["low"] * PLOT
            draw.rectangle(
                (left + 1, y0 + PLOT - row["accuracy"] * PLOT, left + width - 1, y0 + PLOT),
                fill=(40, 80, 200),
            )
        figures_line = f"{when}: ECE {report[when]['ece']:.3f}, accuracy {report[when]['accuracy']:.3f}"
        draw.text((x0, y0 + PLOT + 6), figures_line, fill="black", font=font)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
