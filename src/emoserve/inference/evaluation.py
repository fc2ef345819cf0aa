"""The figures of a classifier on labelled data, computed with scikit-learn's metrics so that they are the
numbers papers report: accuracy (WA), balanced accuracy (UA), macro and weighted F1, per-class precision,
recall, F1 and support, the confusion matrix (rows: true labels), and the same per group. Also their
table for the terminal and `confusion.png`. For a regression head (numeric targets such as arousal and
valence): per target the concordance correlation coefficient (CCC, the field's metric), Pearson's r, MAE and
RMSE, the same per group, and `scatter.png` of predicted against true. Needs the `train` extra
(scikit-learn); never on the serving path.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from emoserve.constants import DEFAULT_TARGET_ACCURACY


def sklearn_metrics() -> Any:
    try:
        from sklearn import metrics
    except ImportError:
        raise ValueError(
            "evaluating and training heads needs scikit-learn: pip install 'emoserve[train]'"
        ) from None
    return metrics


def figures(y_true: Sequence[str], y_pred: Sequence[str]) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro and weighted F1 (scikit-learn's defaults: the labels of both
    the truth and the predictions; an F1 with no support counts as 0)."""
    m = sklearn_metrics()
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true": the nine-class head can
        warnings.simplefilter("ignore", UserWarning)  # predict labels the data does not have
        balanced = m.balanced_accuracy_score(y_true, y_pred)
    return {
        "accuracy": round(float(m.accuracy_score(y_true, y_pred)), 6),
        "balanced_accuracy": round(float(balanced), 6),
        "f1_macro": round(float(m.f1_score(y_true, y_pred, average="macro", zero_division=0)), 6),
        "f1_weighted": round(float(m.f1_score(y_true, y_pred, average="weighted", zero_division=0)), 6),
    }


def report_labels(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str] | None) -> list[str]:
    """The confusion matrix's labels: `labels` (or the true ones, sorted), then any other predicted."""
    first = list(labels) if labels is not None else sorted(set(y_true))
    return first + sorted(set(y_pred) - set(first))


def classification_report(
    y_true: Sequence[str],
    y_pred: Sequence[str],
    *,
    labels: Sequence[str] | None = None,
    groups: Sequence[str | None] | None = None,
    skipped: Sequence[dict[str, str]] = (),
) -> dict[str, Any]:
    """report.json: the figures, `per_class`, `confusion_matrix`, `n`, `skipped`, and `by_group` when
    `groups` are given."""
    m = sklearn_metrics()
    order = report_labels(y_true, y_pred, labels)
    precision, recall, f1, support = m.precision_recall_fscore_support(
        y_true, y_pred, labels=order, zero_division=0
    )
    report: dict[str, Any] = {
        **figures(y_true, y_pred),
        "n": len(y_true),
        "per_class": {
            label: {
                "precision": round(float(p), 6),
                "recall": round(float(r), 6),
                "f1": round(float(f), 6),
                "support": int(s),
            }
            for label, p, r, f, s in zip(order, precision, recall, f1, support, strict=True)
        },
        "confusion_matrix": {
            "labels": order,
            "matrix": m.confusion_matrix(y_true, y_pred, labels=order).tolist(),
        },
        "skipped": list(skipped),
    }
    if groups is not None:
        report["by_group"] = by_group(y_true, y_pred, groups)
    return report


def by_group(
    y_true: Sequence[str], y_pred: Sequence[str], groups: Sequence[str | None]
) -> dict[str, dict[str, Any]]:
    out = {}
    for group in sorted({g for g in groups if g is not None}):
        idx = [i for i, g in enumerate(groups) if g == group]
        out[group] = {**figures([y_true[i] for i in idx], [y_pred[i] for i in idx]), "n": len(idx)}
    return out


# --------------------------------------------------------------------------------------------- abstain


def coverage(correct: np.ndarray, confidence: np.ndarray, threshold: float) -> dict[str, Any]:
    """At `threshold` (a result under it answers `uncertain`): the share of rows answered, the accuracy
    on those (None when none is answered), and the counts."""
    answered = np.asarray(confidence) >= threshold
    right = np.asarray(correct, bool)
    n = int(answered.sum())
    return {
        "threshold": round(float(threshold), 6),
        "coverage": round(n / len(right), 6) if len(right) else 0.0,
        "accuracy": round(float(right[answered].mean()), 6) if n else None,
        "answered": n,
        "uncertain": len(right) - n,
    }


def suggest_threshold(correct: np.ndarray, confidence: np.ndarray, target_accuracy: float) -> dict[str, Any]:
    """The lowest threshold (the most rows answered) whose accuracy on the answered rows reaches
    `target_accuracy` on this data, with its coverage and accuracy; `threshold` None when no threshold
    does. Thresholds tried: each row's confidence (rows of equal confidence are answered together)."""
    conf = np.asarray(confidence, np.float64)
    order = np.argsort(-conf, kind="stable")
    right = np.asarray(correct, bool)[order]
    sorted_conf = conf[order]
    accuracy = np.cumsum(right) / np.arange(1, len(right) + 1)
    last_of_tie = np.append(sorted_conf[1:] != sorted_conf[:-1], True)  # where a threshold can cut
    reaching = np.flatnonzero(last_of_tie & (accuracy >= target_accuracy - 1e-12))
    if not len(reaching):
        return {"target_accuracy": target_accuracy, "threshold": None, "coverage": 0.0, "accuracy": None}
    k = int(reaching.max())
    found = coverage(right, sorted_conf, float(sorted_conf[k]))
    return {"target_accuracy": target_accuracy, **found}


def abstain_report(
    correct: Sequence[bool],
    confidence: Sequence[float],
    threshold: float | None,
    target_accuracy: float = DEFAULT_TARGET_ACCURACY,
) -> dict[str, Any]:
    """report.json's `abstain`: coverage and accuracy at `threshold` (when given) and the suggested
    threshold for `target_accuracy`."""
    right, conf = np.asarray(correct, bool), np.asarray(confidence, np.float64)
    out: dict[str, Any] = {"suggested": suggest_threshold(right, conf, target_accuracy)}
    if threshold is not None:
        out["at_threshold"] = coverage(right, conf, threshold)
    return out


# ------------------------------------------------------------------------------------------ regression


def dimension_figures(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, Any]:
    """One target's figures on (n,) arrays: CCC, Pearson's r, MAE, RMSE and n.

    CCC is Lin's concordance correlation coefficient, 2 cov(x, y) / (var x + var y + (mean x - mean y)^2)
    with population moments, as the AVEC, Odyssey 2024 and IS25 challenges score arousal, valence and
    dominance: a correlation that also pays for a bias or a wrong scale. Pearson's r is None where it is
    undefined (a constant prediction or truth)."""
    x = np.asarray(y_true, dtype=np.float64)
    y = np.asarray(y_pred, dtype=np.float64)
    mx, my = x.mean(), y.mean()
    vx, vy = x.var(), y.var()
    cov = ((x - mx) * (y - my)).mean()
    denominator = vx + vy + (mx - my) ** 2
    error = y - x
    return {
        "ccc": round(float(2 * cov / denominator), 6) if denominator > 0 else None,
        "pearson": round(float(cov / np.sqrt(vx * vy)), 6) if np.ptp(x) > 0 and np.ptp(y) > 0 else None,
        "mae": round(float(np.abs(error).mean()), 6),
        "rmse": round(float(np.sqrt((error**2).mean())), 6),
        "n": len(x),
    }


def regression_report(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    targets: Sequence[str],
    *,
    groups: Sequence[str | None] | None = None,
    skipped: Sequence[dict[str, str]] = (),
) -> dict[str, Any]:
    """report.json of a regression: `task`, `targets` ({name: figures}), `n`, `skipped`, and `by_group`
    ({group: {targets, n}}) when `groups` are given. y_true, y_pred: (n, targets)."""
    truth, pred = np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)
    report: dict[str, Any] = {
        "task": "regression",
        "targets": {t: dimension_figures(truth[:, j], pred[:, j]) for j, t in enumerate(targets)},
        "n": len(truth),
        "skipped": list(skipped),
    }
    if groups is not None:
        report["by_group"] = {}
        for group in sorted({g for g in groups if g is not None}):
            idx = [i for i, g in enumerate(groups) if g == group]
            report["by_group"][group] = {
                "targets": {t: dimension_figures(truth[idx, j], pred[idx, j]) for j, t in enumerate(targets)},
                "n": len(idx),
            }
    return report


def regression_table(report: dict[str, Any]) -> str:
    """A regression report for the terminal: a line per target (and per group and target)."""

    def figure(x: float | None) -> str:
        return f"{x:>8.4f}" if x is not None else f"{'-':>8}"

    lines = [f"n {report['n']}", f"{'target':<20} {'CCC':>8} {'pearson':>8} {'MAE':>8} {'RMSE':>8}"]
    for target, f in report["targets"].items():
        lines.append(
            f"{target:<20} {figure(f['ccc'])} {figure(f['pearson'])} {figure(f['mae'])} {figure(f['rmse'])}"
        )
    for group, g in report.get("by_group", {}).items():
        for target, f in g["targets"].items():
            lines.append(f"group {group:<14} n {g['n']:<5} {target}: CCC {figure(f['ccc']).strip()}")
    if report["skipped"]:
        lines.append(f"{len(report['skipped'])} skipped (report.json lists each with its reason)")
    return "\n".join(lines)


PANEL = 260  # pixels: one target's scatter plot


def scatter_png(y_true: np.ndarray, y_pred: np.ndarray, targets: Sequence[str], title: str) -> bytes:
    """Predicted (y) against true (x) per target, side by side, with the line y = x and the CCC."""
    from PIL import Image, ImageDraw, ImageFont

    truth, pred = np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)
    pad = 30
    image = Image.new("RGB", (len(targets) * (PANEL + pad) + pad, PANEL + 2 * pad + 30), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    _text(draw, (10, 6), title, font)
    for j, target in enumerate(targets):
        x0, y0 = pad + j * (PANEL + pad), pad + 14
        low = float(min(truth[:, j].min(), pred[:, j].min()))
        high = float(max(truth[:, j].max(), pred[:, j].max()))
        span = (high - low) or 1.0  # both axes span [low, high]: y = x is the diagonal
        xs = x0 + (truth[:, j] - low) / span * PANEL
        ys = y0 + PANEL - (pred[:, j] - low) / span * PANEL
        draw.rectangle((x0, y0, x0 + PANEL, y0 + PANEL), outline="grey")
        draw.line((x0, y0 + PANEL, x0 + PANEL, y0), fill=(200, 200, 200))
        for cx, cy in zip(xs.tolist(), ys.tolist(), strict=True):
            draw.ellipse((cx - 2, cy - 2, cx + 2, cy + 2), fill=(40, 80, 200))
        ccc = dimension_figures(truth[:, j], pred[:, j])["ccc"]
        label = f"{target}: CCC {ccc:.3f}" if ccc is not None else target
        _text(draw, (x0, y0 + PANEL + 6), f"{label}  (x true, y predicted)", font)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


# ------------------------------------------------------------------------------------------- rendering


def report_table(report: dict[str, Any]) -> str:
    """The report for the terminal: the summary figures, then a line per class (and per group)."""
    lines = [
        f"n {report['n']}  accuracy (WA) {report['accuracy']:.4f}  balanced accuracy (UA) "
        f"{report['balanced_accuracy']:.4f}  F1 macro {report['f1_macro']:.4f}  "
        f"F1 weighted {report['f1_weighted']:.4f}",
        f"{'label':<20} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}",
    ]
    for label, c in report["per_class"].items():
        lines.append(
            f"{label:<20} {c['precision']:>9.4f} {c['recall']:>9.4f} {c['f1']:>9.4f} {c['support']:>8}"
        )
    for group, g in report.get("by_group", {}).items():
        lines.append(
            f"group {group:<14} n {g['n']:<5} accuracy {g['accuracy']:.4f}  UA {g['balanced_accuracy']:.4f}  "
            f"F1 macro {g['f1_macro']:.4f}"
        )
    if abstain := report.get("abstain"):
        lines += abstain_lines(abstain)
    if report["skipped"]:
        lines.append(f"{len(report['skipped'])} skipped (report.json lists each with its reason)")
    return "\n".join(lines)


def abstain_lines(abstain: dict[str, Any]) -> list[str]:
    def said(c: dict[str, Any]) -> str:
        accuracy = f"{c['accuracy']:.4f}" if c["accuracy"] is not None else "-"
        return f"coverage {c['coverage']:.4f} ({c['uncertain']} uncertain), accuracy {accuracy}"

    lines = []
    if at := abstain.get("at_threshold"):
        lines.append(f"min_confidence {at['threshold']:g}: {said(at)}")
    s = abstain["suggested"]
    if s["threshold"] is None:
        lines.append(f"no threshold reaches accuracy {s['target_accuracy']:g} on this data")
    else:
        lines.append(
            f"suggested min_confidence {s['threshold']:.4f} for accuracy {s['target_accuracy']:g}: {said(s)}"
        )
    return lines


CELL, MARGIN = 56, 150  # pixels: a matrix cell, the room for the row labels and title


def confusion_png(report: dict[str, Any], title: str) -> bytes:
    """The confusion matrix as a PNG: counts in each cell, shaded by the row's share (recall)."""
    from PIL import Image, ImageDraw, ImageFont

    labels = report["confusion_matrix"]["labels"]
    matrix = report["confusion_matrix"]["matrix"]
    n = len(labels)
    width, height = MARGIN + n * CELL + 20, MARGIN + n * CELL + 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    _text(draw, (10, 8), title, font)
    _text(draw, (MARGIN, 30), "predicted (columns)", font)
    _text(draw, (10, MARGIN - 40), "true (rows)", font)
    for j, label in enumerate(labels):  # column labels, cut to fit above their cell
        _text(draw, (MARGIN + j * CELL + 4, MARGIN - 20), str(label)[:8], font)
    for i, row in enumerate(matrix):
        total = sum(row) or 1
        _text(draw, (10, MARGIN + i * CELL + CELL // 2 - 6), str(labels[i])[:20], font)
        for j, count in enumerate(row):
            share = count / total
            shade = int(255 - 200 * share)
            x, y = MARGIN + j * CELL, MARGIN + i * CELL
            draw.rectangle((x, y, x + CELL - 1, y + CELL - 1), fill=(shade, shade, 255), outline="grey")
            _text(draw, (x + 6, y + CELL // 2 - 6), str(count), font, "white" if share > 0.6 else "black")
    figures_line = (
        f"WA {report['accuracy']:.3f}  UA {report['balanced_accuracy']:.3f}  "
        f"F1 macro {report['f1_macro']:.3f}"
    )
    _text(draw, (10, height - 26), figures_line, font)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _text(draw: Any, xy: tuple[int, int], text: str, font: Any, fill: str = "black") -> None:
    """Pillow's built-in bitmap font (where FreeType is missing) draws latin-1 only: others become '?'."""
    try:
        draw.text(xy, text, fill=fill, font=font)
    except UnicodeEncodeError:
        draw.text(xy, text.encode("latin-1", "replace").decode("latin-1"), fill=fill, font=font)
