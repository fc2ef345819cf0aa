"""Your own labels: `emoserve evaluate` (the nine emotions or a head against labelled audio) and
`emoserve train-head` (a head of your labels on the utterance embeddings), `inference/training.py`'s."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emoserve.cli.shared import add_model_flags, load_checked_head, model_options, warn_if_random
from emoserve.constants import CLASSIFIERS, DEFAULT_MAX_SECONDS, MAX_BATCH_SIZE

if TYPE_CHECKING:
    from emoserve.cli.shared import Commands

SKIPPED_SHOWN = 20  # rows listed on the terminal; report.json lists them all


def add_commands(sub: Commands) -> None:
    add_evaluate(sub)
    add_train_head(sub)


def add_dataset_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "data",
        metavar="DATA",
        help="a manifest (.csv, .tsv or .jsonl: path, label[, group]; paths relative to it) or a folder with "
        "one subfolder per label",
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
        help="accuracy (WA), balanced accuracy (UA), F1 and the confusion matrix on labelled audio "
        "(emoserve[train])",
        description="The model's nine emotions (your labels mapped with --map) or a head (--head) against "
        "the labels of DATA, with scikit-learn's metrics. A row whose file is missing or undecodable is "
        "reported and left out.",
    )
    add_dataset_flags(p)
    p.add_argument("--head", type=Path, metavar="DIR", help="evaluate this head instead of the nine emotions")
    p.add_argument(
        "--map",
        metavar="LABEL=EMOTION,...",
        help="your labels as the model's, e.g. ang=angry,hap=happy,exc=happy,neu=neutral (unmapped labels "
        "are taken as they are; rows with other labels are skipped and listed)",
    )
    p.add_argument("--out", type=Path, metavar="DIR", help="write report.json and confusion.png here")
    p.add_argument(
        "--by", choices=("group",), help="also the figures per group (the manifest's group column)"
    )
    p.set_defaults(run=cmd_evaluate)


def add_train_head(sub: Commands) -> None:
    p = sub.add_parser(
        "train-head",
        help="train a head of your own labels on the utterance embeddings, cross-validated (emoserve[train])",
        description="Embeddings (batched, cached) -> standardisation + a classifier, cross-validated without "
        "leakage (leave-one-group-out with a group column, group k-fold with more than "
        "10 groups, else stratified k-fold) -> report.json and confusion.png -> fit on all the data -> "
        "a head directory (safetensors + head.json, no pickle) for predict/serve --head.",
    )
    add_dataset_flags(p)
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the head directory to write")
    p.add_argument(
        "--classifier",
        choices=CLASSIFIERS,
        default=CLASSIFIERS[0],
        help="logistic regression, class weights balanced (default), or a one-hidden-layer MLP",
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


def labelled_run(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """evaluate/train-head: the model, the dataset, the embeddings cache (None with --no-cache)."""
    from emoserve.inference.datasets import read_dataset
    from emoserve.inference.embeddings import EmbeddingCache, default_cache_root
    from emoserve.inference.evaluation import sklearn_metrics
    from emoserve.inference.recognizer import load_with

    sklearn_metrics()  # before any work: says how to install the extra when it is missing
    dataset = read_dataset(args.data)
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
    from emoserve.inference.evaluation import report_table
    from emoserve.inference.training import embed_dataset, evaluate_head, evaluate_nine, write_report

    label_map = parse_label_map(args.map)
    recognizer, dataset, cache = labelled_run(args)
    with file_bar(len(dataset.items)) as bar:
        if args.head:
            head = load_checked_head(args.head, recognizer)
            labelled = embed_dataset(recognizer, dataset, cache=cache, batch_size=args.batch_size,
                                     progress=bar.update)  # fmt: skip
            report = evaluate_head(labelled, head)
            title = f"head {head.name} on {Path(args.data).name}"
        else:
            report = evaluate_nine(recognizer, dataset, label_map, batch_size=args.batch_size,
                                   progress=bar.update)  # fmt: skip
            title = f"{recognizer.info.name} on {Path(args.data).name}"
    if args.by != "group":
        report.pop("by_group", None)
    report["random_weights"] = recognizer.random_weights
    if recognizer.random_weights:
        title += " - RANDOM-WEIGHT model"
    report_skipped(report["skipped"])
    print(report_table(report))
    if recognizer.random_weights:
        print("(RANDOM WEIGHTS: these figures are meaningless)")
    if args.out:
        write_report(args.out, report, title)
        print(f"wrote {args.out / 'report.json'} and {args.out / 'confusion.png'}", file=sys.stderr)
    return 0


def cmd_train_head(args: argparse.Namespace) -> int:
    import json

    from emoserve.inference.evaluation import report_table
    from emoserve.inference.training import TrainOptions, embed_dataset, train_head

    recognizer, dataset, cache = labelled_run(args)
    label_info = json.loads(args.label_info.read_text(encoding="utf-8")) if args.label_info else None
    with file_bar(len(dataset.items)) as bar:
        labelled = embed_dataset(recognizer, dataset, cache=cache, batch_size=args.batch_size,
                                 progress=bar.update)  # fmt: skip
    print(
        f"embeddings: {len(labelled.y)} files ({labelled.computed} computed, the rest cached)",
        file=sys.stderr,
    )
    options = TrainOptions(args.classifier, args.folds, args.c, args.hidden, args.seed, args.batch_size)
    trained = train_head(recognizer, labelled, args.out, options, label_info)
    report_skipped(trained.report["skipped"])
    for warning in trained.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"cross-validated ({trained.report['cv']['method']}):")
    print(report_table(trained.report))
    serve = f"emoserve serve --head {trained.path.name}={trained.path}"
    print(f"head written to {trained.path} (serve it: {serve})")
    return 0
