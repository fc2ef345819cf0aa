"""Your own labels: evaluate a model (its nine emotions through a label map, or a head) on labelled data,
and train a head on the utterance embeddings, cross-validated without leakage. Needs the `train` extra.

    train_head: dataset -> utterance embeddings (cached) -> checks (two labels at least, enough examples
    of each) -> cross-validation (leave-one-group-out with a `group` column and at most
    MAX_LOGO_GROUPS groups, group k-fold with more, else stratified k-fold) -> report.json and
    confusion.png of the held-out predictions -> the pipeline fit on all the data -> a head directory.

The pipeline is standardisation + logistic regression with balanced class weights (audEERING's and
EmoBox's recipe for frozen embeddings), or a one-hidden-layer MLP (`classifier="mlp"`). Both export to
the numpy head of `model/head.py`, whose probabilities are the pipeline's `predict_proba`.

A regression head (numeric targets: arousal, valence, dominance, in the data's own units) takes the same
path with group or plain k-fold splits, standardisation + ridge regression whose strength is chosen inside
each training fold (RidgeCV's efficient leave-one-out over RIDGE_ALPHAS), or an MLP; its report gives CCC,
Pearson's r, MAE and RMSE per target (`evaluation.dimension_figures`) and scatter.png; the numpy head's
values are the pipeline's `predict`.
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
from typing import TYPE_CHECKING, Any

import numpy as np

from emoserve import __version__
from emoserve.constants import (
    CLASSIFIERS,
    DEFAULT_TARGET_ACCURACY,
    MAX_BATCH_SIZE,
    REGRESSORS,
    Classifier,
    HeadTask,
    Regressor,
)
from emoserve.inference.datasets import Dataset
from emoserve.inference.embeddings import EmbeddingCache, utterance_embeddings
from emoserve.inference.evaluation import (
    abstain_report,
    classification_report,
    confusion_png,
    dimension_figures,
    regression_report,
    scatter_png,
    sklearn_metrics,
)
from emoserve.inference.heads import head_probabilities
from emoserve.inference.recognizer import Recognizer
from emoserve.model.head import Head, HeadLabel, model_identity, save_head

if TYPE_CHECKING:
    from emoserve.inference.confidence import Calibration

log = logging.getLogger(__name__)

# Up to this many groups each is held out once (IEMOCAP's 5 sessions, EmoDB's 10 speakers); with more,
# group k-fold: a fold per group would fit the pipeline hundreds of times for little change in the figures.
MAX_LOGO_GROUPS = 10
MIN_PER_LABEL = 2  # a label needs one example to train on and one to test on
FEW_PER_LABEL = 10  # below this the figures of a label are noise: said as a warning
REPORT_FILE, CONFUSION_FILE, SCATTER_FILE = "report.json", "confusion.png", "scatter.png"
RELIABILITY_FILE = "reliability.png"
MIN_REGRESSION_ROWS = (
    10  # fewer rows than this cannot cross-validate a regression into figures that mean much
)
# Ridge strengths tried inside each training fold (the features are standardised: with 768 or 1024
# dimensions and a few hundred clips the best is usually in the hundreds to thousands)
RIDGE_ALPHAS = tuple(10.0**k for k in range(-2, 7))


@dataclass(frozen=True)
class TrainOptions:
    classifier: Classifier = "logistic"
    folds: int = 5
    c: float = 1.0  # inverse regularisation strength (logistic regression)
    hidden: int = 256  # hidden units (mlp)
    seed: int = 0
    batch_size: int = MAX_BATCH_SIZE
    regressor: Regressor = "ridge"  # a regression head's learner
    calibrate: bool = False  # a classifier head: calibrate its scores on its out-of-fold predictions
    min_confidence: float | None = None  # the head's own abstain threshold (head.json)


@dataclass(frozen=True)
class Labelled:
    """A dataset's usable rows with their embeddings: X (n, dim) float64, labels, groups; for a
    regression also `values` (n, targets) float64 and the `targets`' names."""

    x: np.ndarray
    y: list[str]
    groups: list[str | None]
    files: list[str]
    skipped: list[dict[str, str]]
    computed: int  # embeddings computed now (the rest came from the cache)
    values: np.ndarray | None = None
    targets: tuple[str, ...] = ()

    @property
    def task(self) -> HeadTask:
        return "regression" if self.values is not None else "classification"


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
    values = np.array([it.values for it in items], np.float64) if dataset.targets else None
    return Labelled(
        x, [it.label for it in items], [it.group for it in items], [it.path for it in items], skipped,
        found.computed, values, dataset.targets,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------- evaluate


@dataclass(frozen=True)
class NineScored:
    """The model's results on a dataset's rows whose label (mapped) is one of its labels."""

    y_true: list[str]
    results: list[Any]  # Result, in the order of y_true
    groups: list[str | None]
    skipped: list[dict[str, str]]


def score_nine(
    recognizer: Recognizer,
    dataset: Dataset,
    label_map: dict[str, str],
    *,
    batch_size: int = MAX_BATCH_SIZE,
    progress: Callable[[int], None] | None = None,
    labels: str | None = None,
) -> NineScored:
    """The model's results on the rows whose label, mapped by `label_map` (a label not in the map is taken
    as it is), is one of the model's labels (of the subset `labels`, when given); the others skipped."""
    from emoserve.inference.corpus import score_outcomes

    subset = recognizer.readout(labels).labels
    known = set(subset) if subset is not None else {x.en for x in recognizer.labels}
    skipped = list(dataset.skipped)
    rows = []
    for item in dataset.items:
        target = label_map.get(item.label, item.label)
        if target in known:
            rows.append((item, target))
        else:
            skipped.append({"path": item.path, "reason": f"label {item.label!r} is not one of the model's "
                            "labels: map it with --map LABEL=EMOTION"})  # fmt: skip
    scored = NineScored([], [], [], skipped)
    scorer = recognizer.scoring(None, recognizer.readout(labels))
    outcomes = score_outcomes(scorer, [item.path for item, _ in rows], batch_size=batch_size)
    for (item, target), outcome in zip(rows, outcomes, strict=True):
        if progress:
            progress(1)
        if outcome.result is None:
            skipped.append({"path": item.path, "reason": str(outcome.error)})
            continue
        scored.y_true.append(target)
        scored.results.append(outcome.result)
        scored.groups.append(item.group)
    if not scored.y_true:
        raise ValueError(f"{dataset.source}: no row could be evaluated ({len(skipped)} skipped)")
    return scored


def evaluate_nine(
    recognizer: Recognizer,
    dataset: Dataset,
    label_map: dict[str, str],
    *,
    batch_size: int = MAX_BATCH_SIZE,
    progress: Callable[[int], None] | None = None,
    min_confidence: float | None = None,
    target_accuracy: float = DEFAULT_TARGET_ACCURACY,
    labels: str | None = None,
) -> dict[str, Any]:
    """The model's nine-class predictions (restricted to the subset `labels`, when given) against the
    dataset's labels mapped by `label_map`; rows whose label is not one of those are skipped. `abstain`:
    coverage and accuracy at `min_confidence` and the threshold suggested for `target_accuracy`."""
    s = score_nine(recognizer, dataset, label_map, batch_size=batch_size, progress=progress, labels=labels)
    y_pred = [r.emotion for r in s.results]
    groups = s.groups if any(s.groups) else None
    report = classification_report(
        s.y_true, y_pred, labels=sorted(set(s.y_true)), groups=groups, skipped=s.skipped
    )
    correct = [p == t for p, t in zip(y_pred, s.y_true, strict=True)]
    abstain = abstain_report(correct, [r.confidence for r in s.results], min_confidence, target_accuracy)
    return {**report, "abstain": abstain, "model": model_identity(recognizer.info), "head": None}


def evaluate_head(
    labelled: Labelled,
    head: Head,
    min_confidence: float | None = None,
    target_accuracy: float = DEFAULT_TARGET_ACCURACY,
) -> dict[str, Any]:
    """A head's predictions on the embeddings against the labels (those it does not know count as
    errors: they are in the matrix's rows), and its `abstain` figures as `evaluate_nine`'s."""
    p = head_probabilities(head, labelled.x)
    y_pred = [head.labels[i].name for i in p.argmax(axis=1)]
    labels = head.label_names + sorted(set(labelled.y) - set(head.label_names))
    groups = labelled.groups if any(labelled.groups) else None
    report = classification_report(labelled.y, y_pred, labels=labels, groups=groups, skipped=labelled.skipped)
    correct = [a == b for a, b in zip(y_pred, labelled.y, strict=True)]
    threshold = min_confidence if min_confidence is not None else head.min_confidence
    abstain = abstain_report(correct, p.max(axis=1), threshold, target_accuracy)
    return {**report, "abstain": abstain, "head": head.name}


def calibrate_nine(
    recognizer: Recognizer,
    dataset: Dataset,
    label_map: dict[str, str],
    out: Path,
    *,
    batch_size: int = MAX_BATCH_SIZE,
    progress: Callable[[int], None] | None = None,
    seed: int = 0,
) -> tuple[Calibration, dict[str, Any]]:
    """`emoserve calibrate`: the model's raw scores on the dataset's rows (labels mapped as `evaluate`'s)
    -> a calibration chosen by measurement (inference/calibration.py) -> the directory `out`
    (calibration.json, report.json with ECE before and after, reliability.png)."""
    import dataclasses
    import json

    from emoserve.inference.calibration import fit_calibration, reliability_png
    from emoserve.inference.confidence import save_calibration

    if out.exists() and (
        not out.is_dir() or (any(out.iterdir()) and not (out / "calibration.json").is_file())
    ):
        raise ValueError(f"{out} exists and is not a calibration directory: choose another --out")
    raw = recognizer.calibration
    recognizer.use_calibration(None)  # fitted on the model's own scores, whatever is in use
    try:
        s = score_nine(recognizer, dataset, label_map, batch_size=batch_size, progress=progress)
    finally:
        recognizer.use_calibration(raw)
    labels = [label.en for label in recognizer.labels]
    p = np.array([[r.scores[label] for label in labels] for r in s.results])
    truth = np.array([labels.index(t) for t in s.y_true])
    calibration, report, _ = fit_calibration(p, truth, labels, seed)
    report |= {
        "skipped": s.skipped,
        "labels_seen": sorted(set(s.y_true)),
        "random_weights": recognizer.random_weights,
    }
    meta = {
        "model": model_identity(recognizer.info),
        "report": {k: report[k] for k in ("method", "n", "before", "after", "ece")},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
    }
    calibration = dataclasses.replace(calibration, meta=meta)
    title = f"{recognizer.info.name} calibrated ({report['method']})"
    if recognizer.random_weights:
        title += " - RANDOM-WEIGHT model"
    files = {
        REPORT_FILE: (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode(),
        RELIABILITY_FILE: reliability_png(report, title),
    }
    save_calibration(out, calibration, files)
    return calibration, report


def evaluate_regression_head(labelled: Labelled, head: Head) -> tuple[dict[str, Any], bytes]:
    """A regression head's values on the embeddings against the dataset's targets (read by the head's
    target names): the report and its scatter plot."""
    if labelled.values is None or list(labelled.targets) != head.label_names:
        raise ValueError(f"head {head.name!r} predicts {', '.join(head.label_names)}: read those columns")
    predicted = np.atleast_2d(head.values(labelled.x))
    groups = labelled.groups if any(labelled.groups) else None
    report = regression_report(labelled.values, predicted, head.label_names, groups=groups,
                               skipped=labelled.skipped)  # fmt: skip
    return {**report, "head": head.name}, scatter_png(labelled.values, predicted, head.label_names, head.name)


def write_report(out: Path, report: dict[str, Any], figure: tuple[str, bytes]) -> None:
    """report.json and its figure (`(file name, png bytes)`: confusion.png or scatter.png) in `out`."""
    import json

    from emoserve.files import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / REPORT_FILE) as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
        f.write("\n")
    with atomic_write(out / figure[0], binary=True) as f:
        f.write(figure[1])


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

    if labelled.task == "regression":
        return regression_splits(labelled, options)
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


def cross_validate(labelled: Labelled, options: TrainOptions) -> tuple[dict[str, Any], np.ndarray]:
    """Held-out predictions of every row (each predicted by a pipeline that never saw it, nor its group),
    their report, and per fold its test groups and figures; and the held-out probabilities (n, labels),
    the labels sorted (a label missing from a fold's training rows gets 0 there)."""
    from sklearn.base import clone

    method, pairs = splits(labelled, options)
    y = np.array(labelled.y)
    y_pred = np.empty(len(y), dtype=object)
    classes = sorted(set(labelled.y))
    proba = np.zeros((len(y), len(classes)))
    folds = []
    for train, test in pairs:
        model = clone(make_pipeline(options)).fit(labelled.x[train], y[train])
        y_pred[test] = model.predict(labelled.x[test])
        columns = np.array([classes.index(c) for c in model.classes_])
        proba[np.ix_(test, columns)] = model.predict_proba(labelled.x[test])
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
    return {**report, "cv": {"method": method, "folds": folds}}, proba


def export_arrays(
    pipeline: Any, task: HeadTask = "classification"
) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """The fitted pipeline as the head's arrays: (mean, scale, [(weight (out, in), bias (out,)), ...])."""
    scaler, classifier = pipeline.named_steps["scale"], pipeline.steps[-1][1]
    mean = np.asarray(scaler.mean_, np.float64)
    scale = np.asarray(scaler.scale_, np.float64)
    if hasattr(classifier, "coefs_"):  # MLP: coefs_ are (in, out)
        layers = [(np.asarray(w).T, np.asarray(b)) for w, b in zip(classifier.coefs_, classifier.intercepts_,
                                                                      strict=True)]  # fmt: skip
    else:
        layers = [(np.asarray(classifier.coef_), np.asarray(classifier.intercept_))]
    weight, bias = layers[-1]
    if weight.ndim == 1:  # a regression fit on one target as a vector
        layers[-1] = (weight[None], np.atleast_1d(bias))
    elif (
        task == "classification" and weight.shape[0] == 1
    ):  # two labels: one logit z for the second; (0, z) gives the same softmax
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
    if labelled.task == "regression":
        return train_regression_head(recognizer, labelled, out, options)
    warnings = check_trainable(labelled, options)
    started = time.perf_counter()
    report, proba = cross_validate(labelled, options)
    cv_s = time.perf_counter() - started
    for fold in report["cv"]["folds"]:
        if missing := sorted(set(labelled.y) - set(fold["train_labels"])):
            held_out = ", ".join(fold["test_groups"]) or "a fold"
            warnings.append(
                f"holding out {held_out} leaves no example of {', '.join(map(repr, missing))} to train on: "
                "those rows cannot be predicted right there (the figures count them as errors)"
            )
    pipeline = make_pipeline(options).fit(labelled.x, np.array(labelled.y))
    mean, scale, layers = export_arrays(pipeline, "classification")
    classes = [str(c) for c in pipeline.named_steps["classifier"].classes_]
    info = label_info or {}
    labels = [HeadLabel(c, info.get(c, {}).get("zh"), info.get(c, {}).get("emoji")) for c in classes]
    report["warnings"] = warnings
    report["model"] = model_identity(recognizer.info)
    meta: dict[str, Any] = {
        "task": "classification",
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
    if options.min_confidence is not None:
        meta["min_confidence"] = options.min_confidence
    title = cv_title(recognizer, out, report, warnings)
    import json

    extra: dict[str, bytes] = {}
    if options.calibrate:
        meta["calibration"], extra = calibrate_head(labelled, classes, proba, options, title)
        report["calibration"] = json.loads(extra.pop(REPORT_FILE))
    files = {
        REPORT_FILE: (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode(),
        CONFUSION_FILE: confusion_png(report, title),
        **extra,
    }
    path = save_head(out, labels, mean, scale, layers, meta, extra_files=files)
    return Trained(path, report, warnings, pipeline)


def calibrate_head(
    labelled: Labelled, classes: list[str], proba: np.ndarray, options: TrainOptions, title: str
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A classifier head's calibration, fitted on its out-of-fold probabilities (never on predictions of
    rows the pipeline was trained on): head.json's `calibration`, and its report and reliability.png."""
    import json

    from emoserve.inference.calibration import fit_calibration, reliability_png

    truth = np.array([classes.index(label) for label in labelled.y])
    calibration, report, _ = fit_calibration(proba, truth, classes, options.seed)
    files = {
        REPORT_FILE: json.dumps(report).encode(),
        RELIABILITY_FILE: reliability_png(report, f"{title}, calibrated ({report['method']})"),
    }
    return calibration.to_dict() | {"report": {k: report[k] for k in ("method", "before", "after")}}, files


def cv_title(recognizer: Recognizer, out: Path, report: dict[str, Any], warnings: list[str]) -> str:
    """The figure's title; on a random-weight model it says so, and so does a warning."""
    title = f"{out.name}: cross-validated ({report['cv']['method']})"
    if recognizer.random_weights:
        title += " - RANDOM-WEIGHT model"
        warnings.append(f"{recognizer.info.name} has RANDOM weights: this head's figures are meaningless")
    return title


# ----------------------------------------------------------------------------------------- regression


def check_regressable(labelled: Labelled, options: TrainOptions) -> list[str]:
    """ValueError for targets that cannot train a regression head or be cross-validated; warnings else."""
    assert labelled.values is not None
    n = len(labelled.values)
    if n < MIN_REGRESSION_ROWS:
        raise ValueError(
            f"{n} rows with every target: a regression head needs at least {MIN_REGRESSION_ROWS} to be "
            "cross-validated; add examples"
        )
    if flat := [t for j, t in enumerate(labelled.targets) if np.ptp(labelled.values[:, j]) == 0]:
        raise ValueError(f"{', '.join(flat)} has the same value in every row: nothing to learn")
    if options.regressor not in REGRESSORS:
        raise ValueError(f"regressor is {options.regressor!r}; choose from {', '.join(REGRESSORS)}")
    warnings = []
    if any(labelled.groups):
        if missing := sum(1 for g in labelled.groups if g is None):
            raise ValueError(f"{missing} rows have no group while others have one: give every row a group")
        if len(set(labelled.groups)) < 2:
            raise ValueError(
                f"one group only ({labelled.groups[0]!r}): cross-validation by group needs at least two; "
                "leave the group column empty to cross-validate by k-fold"
            )
    if n < 10 * FEW_PER_LABEL:
        warnings.append(f"only {n} rows: the cross-validated figures are noisy")
    return warnings


def regression_splits(
    labelled: Labelled, options: TrainOptions
) -> tuple[str, list[tuple[np.ndarray, np.ndarray]]]:
    """A regression's (train, test) pairs: leave-one-group-out, group k-fold, or shuffled k-fold."""
    from sklearn.model_selection import GroupKFold, KFold, LeaveOneGroupOut

    index = np.zeros(len(labelled.x))
    if any(labelled.groups):
        groups = np.array(labelled.groups)
        n_groups = len(set(labelled.groups))
        if n_groups <= MAX_LOGO_GROUPS:
            return "leave-one-group-out", list(LeaveOneGroupOut().split(index, groups=groups))
        folds = min(options.folds, n_groups)
        cv = GroupKFold(n_splits=folds, shuffle=True, random_state=options.seed)
        return f"group {folds}-fold", list(cv.split(index, groups=groups))
    folds = min(options.folds, len(index))
    return f"{folds}-fold", list(KFold(folds, shuffle=True, random_state=options.seed).split(index))


def make_regressor(options: TrainOptions) -> Any:
    from sklearn.linear_model import RidgeCV
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    regressor: Any
    if options.regressor == "mlp":
        regressor = MLPRegressor(
            hidden_layer_sizes=(options.hidden,), alpha=1e-3, max_iter=1000, random_state=options.seed
        )
    else:
        regressor = RidgeCV(alphas=RIDGE_ALPHAS, alpha_per_target=True)
    return Pipeline([("scale", StandardScaler()), ("regressor", regressor)])


def fit_targets(values: np.ndarray) -> np.ndarray:
    """(n, targets) as scikit-learn takes them: one target as a vector (a column warns, and MLPRegressor
    would not say it is one)."""
    return values[:, 0] if values.shape[1] == 1 else values


def cross_validate_regression(labelled: Labelled, options: TrainOptions) -> tuple[dict[str, Any], np.ndarray]:
    """Held-out values of every row (each predicted by a pipeline that never saw it, nor its group), the
    report and per fold its test groups and CCC per target; and the held-out values (n, targets)."""
    from sklearn.base import clone

    assert labelled.values is not None
    method, pairs = regression_splits(labelled, options)
    y = labelled.values
    predicted = np.empty_like(y)
    folds = []
    for train, test in pairs:
        model = clone(make_regressor(options)).fit(labelled.x[train], fit_targets(y[train]))
        predicted[test] = np.reshape(model.predict(labelled.x[test]), (len(test), -1))
        fold_groups = sorted({g for g in (labelled.groups[i] for i in test) if g is not None})
        ccc = {
            t: dimension_figures(y[test, j], predicted[test, j])["ccc"]
            for j, t in enumerate(labelled.targets)
        }
        folds.append({"n_train": len(train), "n_test": len(test), "test_groups": fold_groups, "ccc": ccc})
    groups = labelled.groups if any(labelled.groups) else None
    report = regression_report(y, predicted, labelled.targets, groups=groups, skipped=labelled.skipped)
    return {**report, "cv": {"method": method, "folds": folds}}, predicted


def train_regression_head(
    recognizer: Recognizer, labelled: Labelled, out: Path, options: TrainOptions
) -> Trained:
    """`train_head` for numeric targets (see the module)."""
    import json

    assert labelled.values is not None
    warnings = check_regressable(labelled, options)
    started = time.perf_counter()
    report, predicted = cross_validate_regression(labelled, options)
    cv_s = time.perf_counter() - started
    pipeline = make_regressor(options).fit(labelled.x, fit_targets(labelled.values))
    mean, scale, layers = export_arrays(pipeline, "regression")
    report["warnings"] = warnings
    report["model"] = model_identity(recognizer.info)
    meta = {
        "task": "regression",
        "kind": options.regressor,
        "model": model_identity(recognizer.info),
        "training": {
            "regressor": describe_regressor(options, pipeline),
            "n": len(labelled.values),
            "targets": {
                t: {
                    "mean": round(float(col.mean()), 6),
                    "std": round(float(col.std()), 6),
                    "min": float(col.min()),
                    "max": float(col.max()),
                }
                for t, col in zip(labelled.targets, labelled.values.T, strict=True)
            },
            "groups": len({g for g in labelled.groups if g is not None}),
            "cv_seconds": round(cv_s, 3),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        "report": {"targets": report["targets"], "n": report["n"], "cv": report["cv"]["method"]},
        "versions": versions(),
    }
    title = cv_title(recognizer, out, report, warnings)
    files = {
        REPORT_FILE: (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode(),
        SCATTER_FILE: scatter_png(labelled.values, predicted, labelled.targets, title),
    }
    labels = [HeadLabel(t) for t in labelled.targets]
    path = save_head(out, labels, mean, scale, layers, meta, extra_files=files)
    return Trained(path, report, warnings, pipeline)


def target_range(values: np.ndarray) -> dict[str, float]:
    """What head.json records of a target's training values: the units its predictions come in."""
    return {
        "mean": round(float(values.mean()), 6),
        "std": round(float(values.std()), 6),
        "min": float(values.min()),
        "max": float(values.max()),
    }


def describe_regressor(options: TrainOptions, pipeline: Any) -> str:
    if options.regressor == "mlp":
        return f"StandardScaler + MLPRegressor(hidden={options.hidden}, relu, alpha=1e-3)"
    alphas = np.atleast_1d(pipeline.named_steps["regressor"].alpha_)
    return f"StandardScaler + RidgeCV(alpha per target {', '.join(f'{a:g}' for a in alphas)})"


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
