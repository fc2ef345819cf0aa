"""Your own labels: `emoserve evaluate` (the nine emotions or a head against labelled audio) and
`emoserve train-head` (a head of your labels on the utterance embeddings), `inference/training.py`'s."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emoserve.cli.shared import add_model_flags, model_options, warn_if_random
from emoserve.constants import (
    CLASSIFIERS,
    DEFAULT_MAX_SECONDS,
    DEFAULT_TARGET_ACCURACY,
    MAX_BATCH_SIZE,
    REGRESSORS,
)

if TYPE_CHECKING:
    from emoserve.cli.shared import Commands

SKIPPED_SHOWN = 20  # rows listed on the terminal; report.json lists them all


def add_commands(sub: Commands) -> None:
    add_evaluate(sub)
    add_train_head(sub)
    add_calibrate(sub)


def add_dataset_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "data",
        metavar="DATA",
        help="a manifest (.csv, .tsv or .jsonl: path, label[, group]; paths relative to it; for a regression "
        "a numeric column per target instead of label) or a folder with one subfolder per label",
    )
    add_model_flags(p)
    p.add_argument(
        "--batch-size", type=int, default=MAX_BATCH_SIZE, help=f"clips per forward pass ({MAX_BATCH_SIZE})"
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=DEFAULT_MAX_SECONDS,
        help=f"longest clip accepted (default {DEFAULT_MAX_SECONDS:g}); longer files are skipped",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="embeddings cache, per file content and model (default: $EMOSERVE_HOME/embeddings)",
    )
    p.add_argument("--no-cache", action="store_true", help="compute every embedding, cache nothing")


def add_evaluate(sub: Commands) -> None:
    p = sub.add_parser(
        "evaluate",
        help="accuracy (WA), balanced accuracy (UA), F1 and the confusion matrix on labelled audio; CCC, "
        "Pearson, MAE and RMSE for a regression head (emoserve[train])",
        description="The model's nine emotions (your labels mapped with --map) or a head (--head) against "
        "the labels of DATA, with scikit-learn's metrics; a regression head against DATA's columns of its "
        "targets, per target CCC, Pearson's r, MAE, RMSE and a scatter plot. A row whose file is missing "
        "or undecodable is reported and left out.",
    )
    add_dataset_flags(p)
    p.add_argument("--head", type=Path, metavar="DIR", help="evaluate this head instead of the nine emotions")
    p.add_argument(
        "--map",
        metavar="LABEL=EMOTION,...",
        help="your labels as the model's, e.g. ang=angry,hap=happy,exc=happy,neu=neutral (unmapped labels "
        "are taken as they are; rows with other labels are skipped and listed)",
    )
    p.add_argument(
        "--out", type=Path, metavar="DIR", help="write report.json and confusion.png (scatter.png) here"
    )
    p.add_argument(
        "--by", choices=("group",), help="also the figures per group (the manifest's group column)"
    )
    p.add_argument(
        "--labels",
        metavar="LABEL,...",
        help="the nine emotions restricted to these labels and renormalised (or a named set: iemocap4, "
        "emodb, ravdess); rows of other labels are skipped",
    )
    p.add_argument(
        "--min-confidence",
        type=float,
        metavar="X",
        help="also the coverage (share answered) and accuracy when results under X say `uncertain`",
    )
    p.add_argument(
        "--target-accuracy",
        type=float,
        default=DEFAULT_TARGET_ACCURACY,
        metavar="A",
        help="suggest the min_confidence that reaches this accuracy on DATA (default "
        f"{DEFAULT_TARGET_ACCURACY:g})",
    )
    p.set_defaults(run=cmd_evaluate)


def add_train_head(sub: Commands) -> None:
    p = sub.add_parser(
        "train-head",
        help="train a head of your own labels, or of numeric targets (arousal, valence, ...), on the "
        "utterance embeddings, cross-validated (emoserve[train])",
        description="Embeddings (batched, cached) -> standardisation + a classifier (or, with --targets, a "
        "regressor), cross-validated without leakage (leave-one-group-out with a group column, group "
        "k-fold with more than 10 groups, else stratified k-fold) -> report.json and confusion.png "
        "(scatter.png) -> fit on all the data -> a head directory (safetensors + head.json, no pickle) for "
        "predict/serve --head.",
    )
    add_dataset_flags(p)
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the head directory to write")
    p.add_argument(
        "--classifier",
        choices=CLASSIFIERS,
        default=CLASSIFIERS[0],
        help="logistic regression, class weights balanced (default), or a one-hidden-layer MLP",
    )
    p.add_argument(
        "--task",
        choices=("classification", "regression"),
        help="regression: numeric targets (--targets, or every numeric column of the manifest); "
        "default classification, or regression when --targets is given",
    )
    p.add_argument(
        "--targets",
        metavar="NAME,...",
        help="a regression head of these numeric columns, e.g. arousal,valence,dominance (any scale; "
        "predictions come in the same units)",
    )
    p.add_argument(
        "--regressor",
        choices=REGRESSORS,
        default=REGRESSORS[0],
        help="regression: ridge, its strength chosen in each training fold (default), or an MLP",
    )
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="a classifier head: calibrate its scores on its cross-validated predictions (temperature or "
        "isotonic, chosen by measurement); report.json gains ECE before/after and reliability.png",
    )
    p.add_argument(
        "--min-confidence",
        type=float,
        metavar="X",
        help="the head's own abstain threshold: under it its label is `uncertain` (a request may set "
        "another)",
    )
    p.add_argument("--folds", type=int, default=5, help="folds without groups, or with many groups (5)")
    p.add_argument("--c", type=float, default=1.0, help="logistic: inverse regularisation strength (1.0)")
    p.add_argument("--hidden", type=int, default=256, help="mlp: hidden units (256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--label-info",
        type=Path,
        metavar="FILE",
        help='JSON {"label": {"zh": "...", "emoji": "..."}} shown beside your labels',
    )
    p.set_defaults(run=cmd_train_head)


def add_calibrate(sub: Commands) -> None:
    p = sub.add_parser(
        "calibrate",
        help="calibrate the nine emotions' scores on your labelled audio (emoserve[train])",
        description="The model's scores on the rows of DATA whose labels (mapped with --map) are its labels "
        "-> temperature scaling, or isotonic regression per label with 1000 rows or more, chosen by the "
        "log loss of cross-validated predictions -> DIR: calibration.json (numbers only), report.json (ECE, "
        "log loss and accuracy before and after, after measured out of fold) and reliability.png. Serve it "
        "with `serve --calibration DIR` or `predict --calibration DIR`.",
    )
    add_dataset_flags(p)
    p.add_argument(
        "--map",
        metavar="LABEL=EMOTION,...",
        help="your labels as the model's, e.g. ang=angry,hap=happy,exc=happy,neu=neutral",
    )
    p.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="the calibration directory to write"
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_calibrate)


def labelled_run(args: argparse.Namespace, targets: list[str] | None = None) -> tuple[Any, Any, Any]:
    """evaluate/train-head: the model, the dataset (with `targets`, their numeric columns), the
    embeddings cache (None with --no-cache)."""
    from emoserve.inference.datasets import read_dataset
    from emoserve.inference.embeddings import EmbeddingCache, default_cache_root
    from emoserve.inference.evaluation import sklearn_metrics
    from emoserve.inference.recognizer import load_with

    sklearn_metrics()  # before any work: says how to install the extra when it is missing
    dataset = read_dataset(args.data, targets or ())
    recognizer = load_with(model_options(args))
    warn_if_random(recognizer)
    cache = None if args.no_cache else EmbeddingCache(args.cache_dir or default_cache_root(), recognizer)
    return recognizer, dataset, cache


def file_bar(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="file", disable=None, file=sys.stderr)


def report_skipped(skipped: list[dict[str, str]]) -> None:
    for row in skipped[:SKIPPED_SHOWN]:
        print(f"skipped: {row['path']}: {row['reason']}", file=sys.stderr)
    if len(skipped) > SKIPPED_SHOWN:
        print(f"skipped: {len(skipped) - SKIPPED_SHOWN} more (report.json lists them all)", file=sys.stderr)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from emoserve.inference.datasets import parse_label_map
    from emoserve.inference.evaluation import confusion_png, regression_table, report_table
    from emoserve.inference.training import (
        CONFUSION_FILE,
        SCATTER_FILE,
        embed_dataset,
        evaluate_head,
        evaluate_nine,
        evaluate_regression_head,
        write_report,
    )
    from emoserve.model.head import load_head

    label_map = parse_label_map(args.map)
    head = load_head(args.head) if args.head else None
    if args.min_confidence is not None and not 0 <= args.min_confidence <= 1:
        raise ValueError(f"--min-confidence is {args.min_confidence:g}; give a number from 0 to 1")
    targets = head.label_names if head is not None and head.task == "regression" else None
    recognizer, dataset, cache = labelled_run(args, targets)
    scatter = b""
    with file_bar(len(dataset.items)) as bar:
        if head is not None:
            head.check_model(recognizer.info)
            labelled = embed_dataset(recognizer, dataset, cache=cache, batch_size=args.batch_size,
                                     progress=bar.update)  # fmt: skip
            if targets:
                report, scatter = evaluate_regression_head(labelled, head)
            else:
                report = evaluate_head(labelled, head, args.min_confidence, args.target_accuracy)
            title = f"head {head.name} on {Path(args.data).name}"
        else:
            report = evaluate_nine(
                recognizer, dataset, label_map, batch_size=args.batch_size, progress=bar.update,
                min_confidence=args.min_confidence, target_accuracy=args.target_accuracy, labels=args.labels,
            )  # fmt: skip
            title = f"{recognizer.info.name} on {Path(args.data).name}"
    if args.by != "group":
        report.pop("by_group", None)
    report["random_weights"] = recognizer.random_weights
    if recognizer.random_weights:
        title += " - RANDOM-WEIGHT model"
    report_skipped(report["skipped"])
    print(regression_table(report) if targets else report_table(report))
    if recognizer.random_weights:
        print("(RANDOM WEIGHTS: these figures are meaningless)")
    if args.out:
        figure = (SCATTER_FILE, scatter) if targets else (CONFUSION_FILE, confusion_png(report, title))
        write_report(args.out, report, figure)
        print(f"wrote {args.out / 'report.json'} and {args.out / figure[0]}", file=sys.stderr)
    return 0


def regression_targets(args: argparse.Namespace) -> list[str] | None:
    """train-head's targets: --targets, or with --task regression every numeric column; None: labels."""
    from emoserve.inference.datasets import numeric_columns

    if args.targets:
        if args.task == "classification":
            raise ValueError("--targets makes a regression head: leave out --task classification")
        names = [t.strip() for t in args.targets.split(",") if t.strip()]
        if not names:
            raise ValueError(f"--targets is {args.targets!r}: name numeric columns, e.g. arousal,valence")
        return names
    return numeric_columns(args.data) if args.task == "regression" else None


def cmd_train_head(args: argparse.Namespace) -> int:
    import json

    from emoserve.inference.evaluation import regression_table, report_table
    from emoserve.inference.training import TrainOptions, embed_dataset, train_head

    recognizer, dataset, cache = labelled_run(args, regression_targets(args))
    label_info = json.loads(args.label_info.read_text(encoding="utf-8")) if args.label_info else None
    with file_bar(len(dataset.items)) as bar:
        labelled = embed_dataset(recognizer, dataset, cache=cache, batch_size=args.batch_size,
                                 progress=bar.update)  # fmt: skip
    print(
        f"embeddings: {len(labelled.y)} files ({labelled.computed} computed, the rest cached)",
        file=sys.stderr,
    )
    options = TrainOptions(
        args.classifier, args.folds, args.c, args.hidden, args.seed, args.batch_size, args.regressor,
        args.calibrate, args.min_confidence,
    )  # fmt: skip
    trained = train_head(recognizer, labelled, args.out, options, label_info)
    report_skipped(trained.report["skipped"])
    for warning in trained.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"cross-validated ({trained.report['cv']['method']}):")
    table = regression_table if labelled.task == "regression" else report_table
    print(table(trained.report))
    if calibration := trained.report.get("calibration"):
        before, after = calibration["before"], calibration["after"]
        print(
            f"calibrated ({calibration['method']}): ECE {before['ece']:.4f} -> {after['ece']:.4f}, "
            f"accuracy {before['accuracy']:.4f} -> {after['accuracy']:.4f} (cross-validated)"
        )
    serve = f"emoserve serve --head {trained.path.name}={trained.path}"
    print(f"head written to {trained.path} (serve it: {serve})")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from emoserve.inference.datasets import parse_label_map
    from emoserve.inference.training import calibrate_nine

    label_map = parse_label_map(args.map)
    recognizer, dataset, _ = labelled_run(args)
    with file_bar(len(dataset.items)) as bar:
        _, report = calibrate_nine(
            recognizer, dataset, label_map, args.out, batch_size=args.batch_size, progress=bar.update,
            seed=args.seed,
        )  # fmt: skip
    report_skipped(report["skipped"])
    before, after = report["before"], report["after"]
    losses = ", ".join(f"{method} {c['log_loss']:.4f}" for method, c in report["candidates"].items())
    print(
        f"{report['n']} rows of {', '.join(report['labels_seen'])}; method {report['method']} (log loss of "
        f"cross-validated predictions: {losses})"
    )
    print(
        f"ECE {before['ece']:.4f} -> {after['ece']:.4f}, log loss {before['log_loss']:.4f} -> "
        f"{after['log_loss']:.4f}, accuracy {before['accuracy']:.4f} -> {after['accuracy']:.4f}"
    )
    if recognizer.random_weights:
        print("(RANDOM WEIGHTS: these figures are meaningless)")
    print(f"calibration written to {args.out} (serve it: emoserve serve --calibration {args.out})")
    return 0
