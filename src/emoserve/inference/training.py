"""Your own labels: evaluate a model (its nine emotions through a label map, or a head) on labelled data,
and train a head on the utterance embeddings, cross-validated without leakage. Needs the `train` extra.

    train_head: dataset -> utterance embeddings (cached) -> checks (two labels at least, enough examples
    of each) -> cross-validation (leave-one-group-out with a `group` column and at most
    MAX_LOGO_GROUPS groups, group k-fold with more, else stratified k-fold) -> report.json and
    confusion.png of the held-out predictions -> the pipeline fit on all the data -> a head directory.

The pipeline is standardisation + logistic regression with balanced class weights (audEERING's and
EmoBox's recipe for frozen embeddings), or a one-hidden-layer MLP (`classifier="mlp"`). Both export to
the numpy head of `model/head.py`, whose probabilities are the pipeline's `predict_proba`.
"""

from __future__ import annotations

import logging
import platform
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from emoserve import __version__
from emoserve.constants import CLASSIFIERS, MAX_BATCH_SIZE, Classifier
from emoserve.inference.datasets import Dataset
from emoserve.inference.embeddings import EmbeddingCache, utterance_embeddings
from emoserve.inference.evaluation import classification_report, confusion_png, sklearn_metrics
from emoserve.inference.recognizer import Recognizer
from emoserve.model.head import Head, HeadLabel, model_identity, save_head

log = logging.getLogger(__name__)

# Up to this many groups each is held out once (IEMOCAP's 5 sessions, EmoDB's 10 speakers); with more,
# group k-fold: a fold per group would fit the pipeline hundreds of times for little change in the figures.
MAX_LOGO_GROUPS = 10
MIN_PER_LABEL = 2  # a label needs one example to train on and one to test on
FEW_PER_LABEL = 10  # below this the figures of a label are noise: said as a warning
REPORT_FILE, CONFUSION_FILE = "report.json", "confusion.png"


@dataclass(frozen=True)
class TrainOptions:
    classifier: Classifier = "logistic"
    folds: int = 5
    c: float = 1.0  # inverse regularisation strength (logistic regression)
    hidden: int = 256  # hidden units (mlp)
    seed: int = 0
    batch_size: int = MAX_BATCH_SIZE


@dataclass(frozen=True)
class Labelled:
    """A dataset's usable rows with their embeddings: X (n, dim) float64, labels, groups."""

    x: np.ndarray
    y: list[str]
    groups: list[str | None]
    files: list[str]
    skipped: list[dict[str, str]]
    computed: int  # embeddings computed now (the rest came from the cache)


def embed_dataset(
    recognizer: Recognizer,
    dataset: Dataset,
    *,
    cache: EmbeddingCache | None,
    batch_size: int = MAX_BATCH_SIZE,
    progress: Callable[[int], None] | None = None,
) -> Labelled:
    files = [item.path for item in dataset.items]
    found = utterance_embeddings(recognizer, files, cache=cache, batch_size=batch_size, progress=progress)
    skipped = list(dataset.skipped) + [{"path": files[i], "reason": why} for i, why in found.errors.items()]
    kept = [i for i in range(len(files)) if i in found.vectors]
    if not kept:
        raise ValueError(f"{dataset.source}: none of its {len(files)} files could be used")
    x = np.stack([found.vectors[i] for i in kept]).astype(np.float64)
    items = [dataset.items[i] for i in kept]
    return Labelled(
        x, [it.label for it in items], [it.group for it in items], [it.path for it in items], skipped,
        found.computed,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------- evaluate


def evaluate_nine(
    recognizer: Recognizer,
    dataset: Dataset,
    label_map: dict[str, str],
    *,
    batch_size: int = MAX_BATCH_SIZE,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """The model's nine-class predictions against the dataset's labels mapped by `label_map` (a label
    not in the map is taken as it is); rows whose label is not one of the model's are skipped."""
    from emoserve.inference.corpus import score_outcomes

    known = {label.en for label in recognizer.labels}
    skipped = list(dataset.skipped)
    rows = []
    for item in dataset.items:
        target = label_map.get(item.label, item.label)
        if target in known:
            rows.append((item, target))
        else:
            skipped.append({"path": item.path, "reason": f"label {item.label!r} is not one of the model's "
                            "labels: map it with --map LABEL=EMOTION"})  # fmt: skip
    y_true, y_pred, groups = [], [], []
    outcomes = score_outcomes(recognizer, [item.path for item, _ in rows], batch_size=batch_size)
    for (item, target), outcome in zip(rows, outcomes, strict=True):
        if progress:
            progress(1)
        if outcome.result is None:
            skipped.append({"path": item.path, "reason": str(outcome.error)})
            continue
        y_true.append(target)
        y_pred.append(outcome.result.emotion)
        groups.append(item.group)
    if not y_true:
        raise ValueError(f"{dataset.source}: no row could be evaluated ({len(skipped)} skipped)")
    labels = sorted(set(y_true))
    report = classification_report(
        y_true, y_pred, labels=labels, groups=groups if any(groups) else None, skipped=skipped
    )
    return {**report, "model": model_identity(recognizer.info), "head": None}


def evaluate_head(labelled: Labelled, head: Head) -> dict[str, Any]:
    """A head's predictions on the embeddings against the labels (those it does not know count as
    errors: they are in the matrix's rows)."""
    p = head.probabilities(labelled.x)
    y_pred = [head.labels[i].name for i in p.argmax(axis=1)]
    labels = head.label_names + sorted(set(labelled.y) - set(head.label_names))
    groups = labelled.groups if any(labelled.groups) else None
    report = classification_report(labelled.y, y_pred, labels=labels, groups=groups, skipped=labelled.skipped)
    return {**report, "head": head.name}


def write_report(out: Path, report: dict[str, Any], title: str) -> None:
    import json

    from emoserve.files import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / REPORT_FILE) as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
        f.write("\n")
    with atomic_write(out / CONFUSION_FILE, binary=True) as f:
        f.write(confusion_png(report, title))


# ---------------------------------------------------------------------------------------------- train


def check_trainable(labelled: Labelled, options: TrainOptions) -> list[str]:
    """ValueError for data that cannot train a head or be cross-validated; the warnings otherwise."""
    counts = Counter(labelled.y)
    if len(counts) < 2:
        raise ValueError(
            f"only one label ({next(iter(counts))!r}, {len(labelled.y)} files): a head needs at least two"
        )
    if rare := {label: n for label, n in counts.items() if n < MIN_PER_LABEL}:
        raise ValueError(
            "too few examples to cross-validate: "
            f"{', '.join(f'{k!r} has {v}' for k, v in sorted(rare.items()))}"
            f" (at least {MIN_PER_LABEL} each); add examples or leave those labels out"
        )
    warnings = []
    if few := sorted(label for label, n in counts.items() if n < FEW_PER_LABEL):
        warnings.append(f"few examples of {', '.join(map(repr, few))} (under {FEW_PER_LABEL}): noisy figures")
    if any(labelled.groups):
        missing = sum(1 for g in labelled.groups if g is None)
        if missing:
            raise ValueError(f"{missing} rows have no group while others have one: give every row a group")
        if len(set(labelled.groups)) < 2:
            raise ValueError(
                f"one group only ({labelled.groups[0]!r}): cross-validation by group needs at least two; "
                "leave the group column empty to cross-validate by stratified folds"
            )
    if options.classifier not in CLASSIFIERS:
        raise ValueError(f"classifier is {options.classifier!r}; choose from {', '.join(CLASSIFIERS)}")
    return warnings


def splits(labelled: Labelled, options: TrainOptions) -> tuple[str, list[tuple[np.ndarray, np.ndarray]]]:
    """The cross-validation's (train, test) index pairs and their method's name."""
    from sklearn.model_selection import LeaveOneGroupOut, StratifiedGroupKFold, StratifiedKFold

    y = np.array(labelled.y)
    index = np.zeros(len(y))
    if any(labelled.groups):
        groups = np.array(labelled.groups)
        n_groups = len(set(labelled.groups))
        if n_groups <= MAX_LOGO_GROUPS:
            return "leave-one-group-out", list(LeaveOneGroupOut().split(index, y, groups))
        folds = min(options.folds, n_groups)
        cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=options.seed)
        return f"stratified group {folds}-fold", list(cv.split(index, y, groups))
    folds = min(options.folds, min(Counter(labelled.y).values()))
    cv_plain = StratifiedKFold(n_splits=folds, shuffle=True, random_state=options.seed)
    return f"stratified {folds}-fold", list(cv_plain.split(index, y))


def make_pipeline(options: TrainOptions) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    classifier: Any
    if options.classifier == "mlp":
        classifier = MLPClassifier(
            hidden_layer_sizes=(options.hidden,), alpha=1e-3, max_iter=500, random_state=options.seed
        )
    else:
        classifier = LogisticRegression(C=options.c, class_weight="balanced", max_iter=5000)
    return Pipeline([("scale", StandardScaler()), ("classifier", classifier)])


def cross_validate(labelled: Labelled, options: TrainOptions) -> dict[str, Any]:
    """Held-out predictions of every row (each predicted by a pipeline that never saw it, nor its group),
    their report, and per fold its test groups and figures."""
    from sklearn.base import clone

    method, pairs = splits(labelled, options)
    y = np.array(labelled.y)
    y_pred = np.empty(len(y), dtype=object)
    folds = []
    for train, test in pairs:
        model = clone(make_pipeline(options)).fit(labelled.x[train], y[train])
        y_pred[test] = model.predict(labelled.x[test])
        metrics = sklearn_metrics()
        fold_groups = sorted({g for g in (labelled.groups[i] for i in test) if g is not None})
        folds.append({
            "n_train": len(train), "n_test": len(test), "test_groups": fold_groups,
            "train_labels": sorted(set(y[train])),
            "accuracy": round(float(metrics.accuracy_score(y[test], y_pred[test])), 6),
        })  # fmt: skip
    groups = labelled.groups if any(labelled.groups) else None
    report = classification_report(
        list(y), list(y_pred), labels=sorted(set(labelled.y)), groups=groups, skipped=labelled.skipped
    )
    return {**report, "cv": {"method": method, "folds": folds}}


def export_arrays(pipeline: Any) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """The fitted pipeline as the head's arrays: (mean, scale, [(weight (out, in), bias (out,)), ...])."""
    scaler, classifier = pipeline.named_steps["scale"], pipeline.named_steps["classifier"]
    mean = np.asarray(scaler.mean_, np.float64)
    scale = np.asarray(scaler.scale_, np.float64)
    if hasattr(classifier, "coefs_"):  # MLP: coefs_ are (in, out)
        layers = [(np.asarray(w).T, np.asarray(b)) for w, b in zip(classifier.coefs_, classifier.intercepts_,
                                                                      strict=True)]  # fmt: skip
    else:
        layers = [(np.asarray(classifier.coef_), np.asarray(classifier.intercept_))]
    weight, bias = layers[-1]
    if weight.shape[0] == 1:  # two labels: one logit z for the second; (0, z) gives the same softmax
        layers[-1] = (np.vstack([np.zeros_like(weight), weight]), np.concatenate([np.zeros(1), bias]))
    return mean, scale, layers


@dataclass(frozen=True)
class Trained:
    path: Path
    report: dict[str, Any]
    warnings: list[str]
    pipeline: Any  # the scikit-learn pipeline fit on all the data (for checks; never saved)


def train_head(
    recognizer: Recognizer,
    labelled: Labelled,
    out: Path,
    options: TrainOptions = TrainOptions(),
    label_info: dict[str, dict[str, str]] | None = None,
) -> Trained:
    """Cross-validate, fit on all the data and write the head directory `out` (see the module). An
    existing `out` is replaced only when it is a head directory (never a folder of other files)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "head.json").is_file())):
        raise ValueError(f"{out} exists and is not a head directory: choose another --out (it would be lost)")
    warnings = check_trainable(labelled, options)
    started = time.perf_counter()
    report = cross_validate(labelled, options)
    cv_s = time.perf_counter() - started
    for fold in report["cv"]["folds"]:
        if missing := sorted(set(labelled.y) - set(fold["train_labels"])):
            held_out = ", ".join(fold["test_groups"]) or "a fold"
            warnings.append(
                f"holding out {held_out} leaves no example of {', '.join(map(repr, missing))} to train on: "
                "those rows cannot be predicted right there (the figures count them as errors)"
            )
    pipeline = make_pipeline(options).fit(labelled.x, np.array(labelled.y))
    mean, scale, layers = export_arrays(pipeline)
    classes = [str(c) for c in pipeline.named_steps["classifier"].classes_]
    info = label_info or {}
    labels = [HeadLabel(c, info.get(c, {}).get("zh"), info.get(c, {}).get("emoji")) for c in classes]
    report["warnings"] = warnings
    report["model"] = model_identity(recognizer.info)
    meta = {
        "kind": options.classifier,
        "model": model_identity(recognizer.info),
        "training": {
            "classifier": describe(options),
            "n": len(labelled.y),
            "label_counts": dict(sorted(Counter(labelled.y).items())),
            "groups": len({g for g in labelled.groups if g is not None}),
            "cv_seconds": round(cv_s, 3),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        "report": {k: report[k] for k in ("accuracy", "balanced_accuracy", "f1_macro", "f1_weighted", "n")}
        | {"cv": report["cv"]["method"]},
        "versions": versions(),
    }
    title = f"{out.name}: cross-validated ({report['cv']['method']})"
    if recognizer.random_weights:
        title += " - RANDOM-WEIGHT model"
        warnings.append(f"{recognizer.info.name} has RANDOM weights: this head's figures are meaningless")
    import json

    files = {
        REPORT_FILE: (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode(),
        CONFUSION_FILE: confusion_png(report, title),
    }
    path = save_head(out, labels, mean, scale, layers, meta, extra_files=files)
    return Trained(path, report, warnings, pipeline)


def describe(options: TrainOptions) -> str:
    if options.classifier == "mlp":
        return f"StandardScaler + MLPClassifier(hidden={options.hidden}, relu, alpha=1e-3)"
    return f"StandardScaler + LogisticRegression(C={options.c:g}, class_weight=balanced)"


def versions() -> dict[str, str]:
    import sklearn

    return {
        "emoserve": __version__,
        "scikit-learn": sklearn.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
