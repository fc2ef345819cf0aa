"""`emoserve` command line. Thin: each command is one library call; torch is imported only by the
commands that need it, so `emoserve --help` answers at once."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emoserve import __version__
from emoserve.constants import (
    BACKENDS,
    CHANNEL_MODES,
    DEFAULT_MAX_SECONDS,
    DEFAULT_MODEL,
    DTYPES,
    GRANULARITIES,
    HUBS,
    MAX_BATCH_SIZE,
    MAX_SEGMENT_S,
    SAMPLE_RATE,
    STREAM_ENCODINGS,
    STREAM_HOP_S,
    STREAM_WINDOW_S,
    VAD_THRESHOLD,
)
from emoserve.model.config import PRESETS

if TYPE_CHECKING:
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]
    from emoserve.inference.files import Outcome
    from emoserve.inference.options import ModelOptions


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # expected failures carry a message that says what to do
        if not _is_user_error(err):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


def _is_user_error(err: Exception) -> bool:
    from emoserve.errors import EmoserveError

    return isinstance(err, EmoserveError | ValueError | FileNotFoundError)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="emoserve", description="Speech emotion recognition with emotion2vec+."
    )
    top.add_argument("--version", action="version", version=f"emoserve {__version__}")
    top.add_argument("-v", "--verbose", action="store_true", help="log progress (loading, conversion)")
    top.set_defaults(run=lambda _: top.print_help())
    sub = top.add_subparsers(title="commands")
    for add in (
        add_predict, add_evaluate, add_train_head, add_download, add_convert, add_info, add_verify,
        add_make_test_model, add_serve, add_stream,
    ):  # fmt: skip
        add(sub)
    return top


def add_predict(sub: Commands) -> None:
    p = sub.add_parser("predict", help="score audio files, folders (recursively) and globs")
    p.add_argument("paths", nargs="+", metavar="PATH")
    add_model_options(p)
    p.add_argument("--granularity", choices=GRANULARITIES, default="utterance")
    p.add_argument("--embeddings", type=Path, metavar="DIR", help="write each embedding as DIR/<stem>.npy")
    p.add_argument(
        "--head",
        type=Path,
        metavar="DIR",
        help="also your own labels: a head from `emoserve train-head` (each row gets a `head` object)",
    )
    p.add_argument("--output", "-o", type=Path, metavar="FILE", help="write results here (default: stdout)")
    p.add_argument(
        "--format",
        choices=("jsonl", "csv", "table"),
        help="output format (default: table on a terminal, else jsonl)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=MAX_BATCH_SIZE,
        help=f"clips per forward pass (default {MAX_BATCH_SIZE})",
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=DEFAULT_MAX_SECONDS,
        help=f"longest clip accepted (default {DEFAULT_MAX_SECONDS:g}); with --segments it does not limit "
        "a file",
    )
    add_timeline_options(p)
    p.add_argument("--ray", action="store_true", help="score on a Ray cluster with Ray Data (emoserve[ray])")
    add_ray_options(p)
    p.add_argument("--actors", type=int, help="with --ray: model actors (default: one per cluster CPU)")
    p.set_defaults(run=cmd_predict)


def add_timeline_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "long recordings",
        "--segments: an emotion timeline per file - its speech segments (silero-vad), each scored, then a "
        "summary; any length, in memory that does not grow with it",
    )
    g.add_argument("--segments", action="store_true", help="one result per speech segment, then a summary")
    g.add_argument(
        "--max-segment-s",
        type=float,
        default=MAX_SEGMENT_S,
        help=f"longer speech is cut (default {MAX_SEGMENT_S:g})",
    )
    g.add_argument(
        "--vad-threshold",
        type=float,
        default=VAD_THRESHOLD,
        help=f"speech probability (default {VAD_THRESHOLD:g})",
    )
    g.add_argument(
        "--channels",
        choices=CHANNEL_MODES,
        default="mix",
        help="separate: a timeline per channel, speakers ch0, ch1 (call-centre stereo)",
    )
    g.add_argument(
        "--segments-from",
        type=Path,
        metavar="FILE",
        help="your own segments instead of the VAD: JSON [{start_s, end_s, speaker}] or RTTM",
    )


def add_dataset_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "data",
        metavar="DATA",
        help="a manifest (.csv, .tsv or .jsonl: path, label[, group]; paths relative to it) or a folder with "
        "one subfolder per label",
    )
    add_model_options(p)
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
    add_dataset_options(p)
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
    add_dataset_options(p)
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the head directory to write")
    p.add_argument(
        "--classifier",
        choices=("logistic", "mlp"),
        default="logistic",
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


def add_download(sub: Commands) -> None:
    p = sub.add_parser("download", help="download a published model and convert it into the cache")
    p.add_argument("name", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--hub", choices=HUBS, default="auto")
    p.set_defaults(run=cmd_download)


def add_convert(sub: Commands) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a published model directory into a slim cache entry with its ONNX graph "
        "(an entry without the graph gets it added)",
    )
    p.add_argument("model_dir", type=Path, help="a published model directory or a converted entry")
    p.add_argument("--out", type=Path, help="where to write the entry (default: in the cache)")
    p.add_argument("--int8", action="store_true", help="also the int8 (dynamically quantized) ONNX graph")
    p.add_argument("--no-onnx", action="store_true", help="no ONNX graph (the torch backend only)")
    p.set_defaults(run=cmd_convert)


def add_info(sub: Commands) -> None:
    p = sub.add_parser("info", help="config, parameter count, labels, files and sizes of a model")
    p.add_argument("model", nargs="?", help=f"directory or name (default {DEFAULT_MODEL})")
    p.add_argument("--verify", action="store_true", help="also check every file's content hash")
    p.set_defaults(run=cmd_info)


def add_verify(sub: Commands) -> None:
    p = sub.add_parser(
        "verify", help="check a converted model's files against the content hashes recorded at conversion"
    )
    p.add_argument("model", nargs="?", help=f"directory or name (default {DEFAULT_MODEL})")
    p.set_defaults(run=cmd_verify)


def add_make_test_model(sub: Commands) -> None:
    p = sub.add_parser("make-test-model", help="write a RANDOM-weight model in the published layout")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--training-state",
        action="store_true",
        help="pad model.pt with dummy optimizer state to the published size (for load benchmarks)",
    )
    p.set_defaults(run=cmd_make_test_model)


def add_serve(sub: Commands) -> None:
    p = sub.add_parser(
        "serve",
        help="run the HTTP API, web UI and metrics (one model shared through a batching engine)",
        description="Every flag can also be set as an EMOSERVE_* environment variable "
        "(e.g. EMOSERVE_MAX_BATCH_SIZE=16); flags win.",
    )
    add_setting_flags(p)
    p.add_argument("--ray", action="store_true", help="serve on Ray Serve replicas (emoserve[ray])")
    p.add_argument("--replicas", type=int, default=1, help="with --ray: model replicas (default 1)")
    add_ray_options(p)
    p.set_defaults(run=cmd_serve)


def add_setting_flags(p: argparse.ArgumentParser) -> None:
    """One flag per Settings field. Values stay strings here: settings.load_settings parses them, so a bad
    value fails with the flag's name just as a bad variable fails with the variable's."""
    from emoserve.serving.settings import setting_infos

    for s in setting_infos():
        # None: the help text says what happens when it is not set
        default = "" if s.default is None else f"; default {s.default}"
        help_text = f"{s.help} [{s.env}{default}]"
        if s.is_bool:
            p.add_argument(
                s.flag, dest=s.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif s.repeatable:
            p.add_argument(s.flag, dest=s.name, action="append", metavar=s.metavar, help=help_text)
        else:
            p.add_argument(s.flag, dest=s.name, default=None, metavar=s.metavar, help=help_text)


def add_ray_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        help="with --ray: the cluster (auto: the one `ray start` made here; default: a new local one)",
    )


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", help=f"model directory or name (default: {DEFAULT_MODEL}, cached)")
    p.add_argument("--hub", choices=HUBS, default="auto", help="where to download a missing model from")
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default=os.environ.get("EMOSERVE_BACKEND", "auto"),
        help="onnx (ONNX Runtime, CPU, no torch), torch, or auto: onnx on a CPU when the model has its "
        "graph, else torch [EMOSERVE_BACKEND; default auto]",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="float16/bfloat16 on a GPU only (torch); int8 on a CPU only (onnx)",
    )


def cmd_predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from emoserve.files import atomic_write
    from emoserve.inference.files import expand_inputs, score_files
    from emoserve.inference.formats import RANDOM_WARNING, Format, OutcomeWriter
    from emoserve.inference.recognizer import load_with


    files = expand_inputs(args.paths)
    if not files:
        raise ValueError(f"no audio files found in {' '.join(args.paths)}")
    recognizer = load_with(model_options(args))
    if recognizer.random_weights:
        print(RANDOM_WARNING, file=sys.stderr)
    head = load_checked_head(args.head, recognizer) if args.head else None
    fmt: Format = args.format or ("table" if args.output is None and sys.stdout.isatty() else "jsonl")
    labels = [label.en for label in recognizer.labels]
    if head is not None and args.ray:
        raise ValueError("--head runs on this machine; leave out --ray")
    if args.segments or args.segments_from:
        if args.ray:
            raise ValueError("--segments runs on this machine; leave out --ray (Ray Data scores whole clips)")
        return predict_timelines(args, recognizer, files, fmt, labels, head)
    failed = 0
    with (
        tqdm(total=len(files), unit="file", disable=None, file=sys.stderr) as bar,
        atomic_write(args.output) if args.output else nullcontext(sys.stdout) as out,
    ):
        writer = OutcomeWriter(out, fmt, labels, args.granularity, head.label_names if head else None)
        options: dict[str, Any] = {
            "granularity": args.granularity,
            "embeddings_dir": args.embeddings,
            "batch_size": args.batch_size,
        }
        if head is not None:
            options["head"] = head
        for outcome in (
            ray_outcomes(args, files, options) if args.ray else score_files(recognizer, files, **options)
        ):
            writer.write(outcome)
            if outcome.error:
                failed += 1
                bar.write(f"error: {outcome.error}", file=sys.stderr)
            bar.update()
    if failed:
        print(f"{failed} of {len(files)} files failed", file=sys.stderr)
    return 1 if failed else 0


def predict_timelines(
    args: argparse.Namespace, recognizer: Any, files: list[str], fmt: str, labels: list[str], head: Any = None
) -> int:
    """`predict --segments`: each file's timeline, segment rows as they are scored, then its summary; a
    progress bar in audio seconds. A file that fails is one error row and the others go on."""
    from tqdm import tqdm

    from emoserve.audio.segments import read_spans_file
    from emoserve.audio.vad import VadSettings
    from emoserve.errors import EmoserveError
    from emoserve.files import atomic_write
    from emoserve.inference.formats import TimelineWriter
    from emoserve.inference.results import Timeline
    from emoserve.inference.timeline import file_timelines

    vad = VadSettings(threshold=args.vad_threshold, max_segment_s=args.max_segment_s)
    spans = read_spans_file(args.segments_from) if args.segments_from else None
    failed = 0
    with (
        tqdm(unit="s", unit_scale=False, disable=None, file=sys.stderr, bar_format=AUDIO_BAR) as bar,
        atomic_write(args.output) if args.output else nullcontext(sys.stdout) as out,
    ):
        writer = TimelineWriter(out, fmt, labels, head.label_names if head else None)

        def show(done: float, total: float | None) -> None:
            bar.total = round(total or done, 1)
            bar.n = round(done, 1)
            bar.refresh()

        def progress(n: int, file: str) -> Callable[[float, float | None], None]:
            bar.set_description(f"{n}/{len(files)} {Path(file).name}")
            bar.reset()
            return show

        scorer = recognizer.with_head(head) if head is not None else recognizer
        timelines = file_timelines(
            scorer, files, batch_size=args.batch_size, progress=progress,
            channels=args.channels, vad=vad, spans=spans,
        )  # fmt: skip
        for file, item in timelines:
            if isinstance(item, EmoserveError):
                failed += 1
                writer.error(file, item)
                bar.write(f"error: {item}", file=sys.stderr)
            elif isinstance(item, Timeline):
                writer.summary(item)
            else:
                writer.segment(file, item, recognizer.random_weights)
    if failed:
        print(f"{failed} of {len(files)} files failed", file=sys.stderr)
    return 1 if failed else 0


AUDIO_BAR = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s of audio [{elapsed}<{remaining}]"


def ray_outcomes(args: argparse.Namespace, files: list[str], options: dict[str, Any]) -> Iterator[Outcome]:
    from emoserve.ray_batch import connect, score_files

    connect(args.address)
    return score_files(files, model_options(args), actors=args.actors, **options)


def model_options(args: argparse.Namespace) -> ModelOptions:
    """The model flags (`add_model_options`) and --max-seconds as one value."""
    from emoserve.inference.options import ModelOptions

    return ModelOptions(args.model, args.backend, args.device, args.dtype, args.hub, args.max_seconds)


def load_checked_head(path: Path, recognizer: Any) -> Any:
    from emoserve.model.head import load_head

    head = load_head(path)
    head.check_model(recognizer.info)
    return head


def labelled_run(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """evaluate/train-head: the model, the dataset, the embeddings cache (None with --no-cache)."""
    from emoserve.inference.datasets import read_dataset
    from emoserve.inference.embeddings import EmbeddingCache, default_cache_root
    from emoserve.inference.evaluation import sklearn_metrics
    from emoserve.inference.formats import RANDOM_WARNING
    from emoserve.inference.recognizer import load_with

    sklearn_metrics()  # before any work: says how to install the extra when it is missing
    dataset = read_dataset(args.data)
    recognizer = load_with(model_options(args))
    if recognizer.random_weights:
        print(RANDOM_WARNING, file=sys.stderr)
    cache = None if args.no_cache else EmbeddingCache(args.cache_dir or default_cache_root(), recognizer)
    return recognizer, dataset, cache


def file_bar(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="file", disable=None, file=sys.stderr)


def report_skipped(skipped: list[dict[str, str]]) -> None:
    for row in skipped[:20]:
        print(f"skipped: {row['path']}: {row['reason']}", file=sys.stderr)
    if len(skipped) > 20:
        print(f"skipped: {len(skipped) - 20} more (report.json lists them all)", file=sys.stderr)


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


def cmd_download(args: argparse.Namespace) -> None:
    from emoserve.model.cache import home, resolve_name

    print(resolve_name(args.name, hub_name=args.hub, cache=home(), progress=True))


def cmd_convert(args: argparse.Namespace) -> None:
    """Convert once into the cache (or --out); an entry without its ONNX graphs gets them added."""
    from emoserve.model.cache import home, resolve_dir
    from emoserve.model.convert import add_onnx, convert
    from emoserve.model.entry import read_entry

    onnx = not args.no_onnx
    if args.out:
        entry = convert(args.model_dir, args.out, onnx=onnx, int8=args.int8)
    else:
        entry = resolve_dir(args.model_dir, home())
    dtypes = ("float32", "int8") if args.int8 else ("float32",)
    info = read_entry(entry)
    for dtype in dtypes if onnx else ():
        if info.onnx_graph(dtype) is None:
            info = add_onnx(entry, dtype)
        if info.onnx_graph(dtype) is None:
            raise ValueError(f"ONNX export ({dtype}) failed: {info.onnx[dtype].get('error')}")
    print(entry)


def cmd_info(args: argparse.Namespace) -> int:
    import json

    from emoserve.model.cache import describe

    info = describe(args.model)
    if args.verify:
        info["verify"] = verify_problems(args.model)
    print(json.dumps(info, indent=2, ensure_ascii=False))
    return 1 if info.get("verify") else 0


def cmd_verify(args: argparse.Namespace) -> int:
    problems = verify_problems(args.model)
    for problem in problems:
        print(f"DAMAGED: {problem}", file=sys.stderr)
    if not problems:
        print("ok: every file matches the hashes recorded at conversion")
    return 1 if problems else 0


def verify_problems(model: str | None) -> list[str]:
    """The full check of the converted entry of `model` (nothing is downloaded or converted)."""
    from emoserve.model.cache import entry_of
    from emoserve.model.entry import check_entry, read_manifest

    entry = entry_of(model)
    if not read_manifest(entry).get("files"):
        return [f"{entry}: no content hashes recorded (converted by an older emoserve): convert it again"]
    return [f"{entry}: {problem}" for problem in check_entry(entry, full=True)]


def cmd_make_test_model(args: argparse.Namespace) -> None:
    from emoserve.model.testing import make_test_model

    out = make_test_model(args.out, preset=args.preset, seed=args.seed, training_state=args.training_state)
    print(f"{out}  (RANDOM weights, preset {args.preset}, seed {args.seed})")


def cmd_serve(args: argparse.Namespace) -> int:
    from emoserve.api.app import serve
    from emoserve.serving.settings import load_settings

    settings = load_settings(vars(args))
    level = logging.DEBUG if args.verbose else getattr(logging, settings.log_level.upper())
    logging.getLogger("emoserve").setLevel(level)
    if args.ray:
        from emoserve.ray_serve import RayOptions, run

        return run(settings, RayOptions.parse({"replicas": args.replicas}), args.address)
    return serve(settings)


STREAM_FRAME_S = 0.1  # audio per message `emoserve stream` sends (the protocol takes any size up to 1 MiB)


def add_stream(sub: Commands) -> None:
    p = sub.add_parser(
        "stream",
        help="live emotion: stream a file or raw PCM from stdin to a server (--url) or to the model here",
        description="Readings while the person is still speaking (docs/streaming.md): speech_start, an "
        "interim reading every --hop-s of speech, each utterance's segment (what `predict --segments` "
        "gives for the same audio), then the summary. One line per message on a terminal, the protocol's "
        "messages as JSON lines when piped (or --format jsonl). "
        "E.g. ffmpeg -i talk.m4a -f s16le -ar 16000 -ac 1 - | emoserve stream -",
    )
    p.add_argument(
        "source",
        metavar="SOURCE",
        help="an audio file (decoded to 16 kHz mono, sent as pcm_f32le at real-time pace), or - for raw "
        "PCM on stdin (described by --sample-rate, --encoding, --channels)",
    )
    p.add_argument(
        "--url",
        help="a server, ws://HOST:PORT (its /v1/stream); without it the model runs in this process",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("EMOSERVE_API_KEY"),
        help="with --url: the server's API key, sent as X-API-Key [EMOSERVE_API_KEY]",
    )
    p.add_argument(
        "--fast", action="store_true", help="send a file as fast as it is taken, not at real-time pace"
    )
    p.add_argument(
        "--format",
        choices=("jsonl", "text"),
        help="output (default: text on a terminal, else jsonl: one protocol message per line)",
    )
    p.add_argument(
        "--sample-rate",
        type=int,
        default=SAMPLE_RATE,
        help=f"with -: stdin's sample rate (default {SAMPLE_RATE}; 8000-192000)",
    )
    p.add_argument(
        "--encoding",
        choices=STREAM_ENCODINGS,
        default=STREAM_ENCODINGS[0],
        help=f"with -: stdin's samples (default {STREAM_ENCODINGS[0]})",
    )
    p.add_argument(
        "--channels", type=int, default=1, help="with -: stdin's interleaved channels, mixed (default 1)"
    )
    p.add_argument(
        "--hop-s",
        type=float,
        default=STREAM_HOP_S,
        help=f"an interim reading every this many seconds of speech (default {STREAM_HOP_S:g}; 0.25-10)",
    )
    p.add_argument(
        "--window-s",
        type=float,
        default=STREAM_WINDOW_S,
        help=f"an interim reading covers the utterance's last this many seconds (default "
        f"{STREAM_WINDOW_S:g})",
    )
    g = p.add_argument_group("speech detection", "as `predict --segments` (silero-vad)")
    g.add_argument(
        "--vad-threshold",
        type=float,
        default=VAD_THRESHOLD,
        help=f"speech probability (default {VAD_THRESHOLD:g})",
    )
    g.add_argument(
        "--max-segment-s",
        type=float,
        default=MAX_SEGMENT_S,
        help=f"longer speech is cut (default {MAX_SEGMENT_S:g})",
    )
    add_model_options(p)
    p.set_defaults(run=cmd_stream, max_seconds=DEFAULT_MAX_SECONDS)


def cmd_stream(args: argparse.Namespace) -> int:
    """`emoserve stream`: the source's PCM frames -> a server's /v1/stream (--url) or Recognizer.stream
    here -> each message printed as it comes; Ctrl-C ends the source (the last segment and the summary
    still come). 0: the stream ended normally; 1: a fatal `error`."""
    import json

    from emoserve.api.stream import stream_options

    query = stream_query(args)
    stream_options(query)  # the server's checks, here first: a bad flag fails before any work
    frames = stream_frames(args)
    if args.source != "-" and not args.fast:
        frames = paced(frames, bytes_per_s=4 * SAMPLE_RATE)
    fmt = args.format or ("text" if sys.stdout.isatty() else "jsonl")
    fatal = random = False

    def show(message: dict[str, Any]) -> None:
        nonlocal fatal, random
        if message["type"] == "error" and message["fatal"]:
            fatal = True
        if fmt == "jsonl":
            print(json.dumps(message, ensure_ascii=False), flush=True)
            if message["type"] == "error":
                print(f"error: {message['code']}: {message['message']}", file=sys.stderr)
        elif (line := stream_line(message)) is not None:
            if random and message["type"] in ("interim", "segment"):
                line += "  (RANDOM WEIGHTS)"
            print(line, file=sys.stderr if message["type"] == "error" else sys.stdout, flush=True)
        if message["type"] == "ready" and message["random_weights"]:
            from emoserve.inference.formats import RANDOM_WARNING

            random = True
            print(RANDOM_WARNING, file=sys.stderr)

    if args.url:
        closed = stream_remote(args.url, query, args.api_key, frames, show)
        return 0 if closed == 1000 and not fatal else 1
    stream_here(args, query, frames, show)
    return 1 if fatal else 0


def stream_query(args: argparse.Namespace) -> dict[str, str]:
    """The stream's query parameters (GET /v1/stream) from the flags; a file is sent as 16 kHz f32 mono
    (its decoded samples as they are: whatever the file's bit depth, the segments of `predict --segments`)."""
    raw = args.source == "-"
    return {
        "sample_rate": str(args.sample_rate if raw else SAMPLE_RATE),
        "encoding": args.encoding if raw else "pcm_f32le",
        "channels": str(args.channels if raw else 1),
        "hop_s": f"{args.hop_s:g}",
        "window_s": f"{args.window_s:g}",
        "vad_threshold": f"{args.vad_threshold:g}",
        "max_segment_s": f"{args.max_segment_s:g}",
    }


def stream_frames(args: argparse.Namespace) -> Iterator[bytes]:
    """SOURCE as messages of about STREAM_FRAME_S of audio: a file decoded by the timeline's streaming
    decoder (16 kHz mono float32 -> f32le), or stdin's bytes as they come, cut at whole frames."""
    if args.source == "-":
        width = (4 if args.encoding == "pcm_f32le" else 2) * args.channels
        return stdin_frames(sys.stdin.buffer, max(width, int(args.sample_rate * STREAM_FRAME_S) * width))
    path = Path(args.source)
    if not path.is_file():
        raise FileNotFoundError(f"{args.source}: no such file (give an audio file, or - for PCM on stdin)")
    return file_frames(path)


def file_frames(path: Path, frame_s: float = STREAM_FRAME_S) -> Iterator[bytes]:
    import numpy as np

    from emoserve.audio.stream import AudioStream

    size = int(SAMPLE_RATE * frame_s)
    with AudioStream(path, channels="mix", max_seconds=None) as audio:
        pending = np.zeros(0, "<f4")
        for block in audio.blocks():
            pending = np.concatenate([pending, block[:, 0].astype("<f4")])
            while len(pending) >= size:
                yield pending[:size].tobytes()
                pending = pending[size:]
        if len(pending):
            yield pending.tobytes()


def stdin_frames(stream: Any, size: int) -> Iterator[bytes]:
    """Messages of `size` bytes as they arrive (a pipe from ffmpeg or a microphone paces itself)."""
    while chunk := stream.read(size):
        yield chunk


def paced(
    frames: Iterator[bytes],
    bytes_per_s: float,
    clock: Callable[[], float] | None = None,
    sleep: Callable[[float], None] | None = None,
) -> Iterator[bytes]:
    """Each frame no sooner than its audio's time since the first: a file sent as a live source would."""
    import time

    clock, sleep = clock or time.monotonic, sleep or time.sleep
    start, sent = clock(), 0
    for frame in frames:
        if (wait := start + sent / bytes_per_s - clock()) > 0:
            sleep(wait)
        yield frame
        sent += len(frame)


def stream_here(
    args: argparse.Namespace,
    query: dict[str, str],
    frames: Iterator[bytes],
    show: Callable[[dict[str, Any]], None],
) -> None:
    """Without --url: Recognizer.stream, scored in this process (the model loaded as `predict` does)."""
    from emoserve.api.stream import stream_options
    from emoserve.inference.recognizer import load_with

    options = stream_options(query)
    recognizer = load_with(model_options(args))
    session = recognizer.stream(
        sample_rate=options.sample_rate, encoding=options.encoding, channels=options.channels,
        hop_s=options.hop_s, window_s=options.window_s, vad=options.vad,
    )  # fmt: skip
    show(session.first)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends the source: the rest still comes
        for frame in frames:
            for message in session.feed(frame):
                show(message)
    for message in session.end():
        show(message)


def stream_remote(
    url: str,
    query: dict[str, str],
    api_key: str | None,
    frames: Iterator[bytes],
    show: Callable[[dict[str, Any]], None],
) -> int | None:
    """--url: the frames to the server's /v1/stream while a thread shows what comes back; `end` after the
    last; the server's close code (1000: a normal end)."""
    import json
    import threading
    from urllib.parse import urlencode, urlsplit, urlunsplit

    from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI
    from websockets.sync.client import connect

    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.netloc:
        raise ValueError(f"--url is {url!r}; give ws://HOST:PORT (or wss://)")
    path = parts.path.rstrip("/")
    path = path if path.endswith("/v1/stream") else f"{path}/v1/stream"
    target = urlunsplit((scheme, parts.netloc, path, urlencode(query), ""))
    headers = {"X-API-Key": api_key} if api_key else None
    try:
        ws = connect(target, additional_headers=headers, max_size=None, open_timeout=30)
    except InvalidStatus as err:
        body = err.response.body.decode("utf-8", "replace").strip() if err.response.body else ""
        raise ValueError(f"{url} refused the stream: HTTP {err.response.status_code} {body}") from None
    except (OSError, InvalidURI, TimeoutError) as err:
        raise ValueError(f"cannot connect to {url}: {err}") from None
    with ws:

        def read() -> None:
            with contextlib.suppress(ConnectionClosed):
                for raw in ws:
                    show(json.loads(raw))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends the source: the rest still comes
                for frame in frames:
                    ws.send(frame)
            ws.send(json.dumps({"type": "end"}))
        except ConnectionClosed:
            pass  # the server ended the stream (a fatal error): the reader shows why
        reader.join()
    return ws.close_code


def stream_line(message: dict[str, Any]) -> str | None:
    """A protocol message as one line for a person (None: nothing worth a line)."""
    kind = message["type"]
    if kind == "ready":
        p = message["parameters"]
        random = "  (RANDOM WEIGHTS)" if message["random_weights"] else ""
        return (
            f"streaming to {message['model']}{random}: {p['sample_rate']} Hz {p['encoding']}, "
            f"{p['channels']} channel(s), a reading every {p['hop_s']:g} s of speech"
        )
    if kind == "speech_start":
        return f"{message['start_s']:8.2f} s           speech starts"
    if kind in ("interim", "segment"):
        reading = (
            f"{message['emoji']} {message['emotion']} ({message['label_zh']}) {message['confidence']:.3f}"
        )
        when = f"{message['start_s']:8.2f}-{message['end_s']:8.2f} s"
        if kind == "interim":
            return f"{when}  ... {reading}"
        split = "  (split)" if message.get("split") else ""
        return f"{when}  =>  {reading}  [segment]{split}"
    if kind == "summary":
        s = message["summary"]
        dominant = s["dominant"] or "none (no speech)"
        return (
            f"summary: {message['speech_s']:.1f} s of speech in {s['segments']} segments of "
            f"{message['duration_s']:.1f} s; dominant {dominant}"
        )
    if kind == "error":
        goes_on = "" if message["fatal"] else " (the stream goes on)"
        return f"error: {message['code']}: {message['message']}{goes_on}"
    return None

