"""The figures of a classifier on labelled data, computed with scikit-learn's metrics so that they are the
numbers papers report: accuracy (WA), balanced accuracy (UA), macro and weighted F1, per-class precision,
recall, F1 and support, the confusion matrix (rows: true labels), and the same per group. Also their
table for the terminal and `confusion.png`. Needs the `train` extra (scikit-learn); never on the serving path.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from typing import Any


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
    if report["skipped"]:
        lines.append(f"{len(report['skipped'])} skipped (report.json lists each with its reason)")
    return "\n".join(lines)


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
