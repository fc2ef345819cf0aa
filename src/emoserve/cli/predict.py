"""`emoserve predict`: files, folders and globs scored (`inference/corpus.score_files`, or Ray Data with
--ray), or with --segments each file's emotion timeline (`inference/timeline.write_timelines`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from emoserve.cli.shared import (
    add_model_flags,
    add_ray_address,
    add_vad_flags,
    failures,
    load_checked_head,
    model_options,
    warn_if_random,
)
from emoserve.constants import CHANNEL_MODES, DEFAULT_MAX_SECONDS, GRANULARITIES, MAX_BATCH_SIZE

if TYPE_CHECKING:
    from emoserve.cli.shared import Commands
    from emoserve.inference.corpus import Outcome
    from emoserve.inference.formats import Format

AUDIO_BAR = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s of audio [{elapsed}<{remaining}]"


def add_commands(sub: Commands) -> None:
    p = sub.add_parser("predict", help="score audio files, folders (recursively) and globs")
    p.add_argument("paths", nargs="+", metavar="PATH")
    add_model_flags(p)
    p.add_argument("--granularity", choices=GRANULARITIES, default="utterance")
    p.add_argument("--embeddings", type=Path, metavar="DIR", help="write each embedding as DIR/<stem>.npy")
    p.add_argument(
        "--head",
        type=Path,
        metavar="DIR",
        help="also your own labels: a head from `emoserve train-head` (each row gets a `head` object)",
    )
    add_readout_flags(p)
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
    add_timeline_flags(p)
    p.add_argument("--ray", action="store_true", help="score on a Ray cluster with Ray Data (emoserve[ray])")
    add_ray_address(p)
    p.add_argument("--actors", type=int, help="with --ray: model actors (default: one per cluster CPU)")
    p.add_argument(
        "--gpus-per-actor",
        type=float,
        default=0.0,
        help="with --ray: GPUs per model actor, fractional to share one (0.5); default 0, the CPU",
    )
    p.set_defaults(run=cmd_predict)


def add_readout_flags(p: argparse.ArgumentParser) -> None:
    """How a result reads (inference/confidence.py): a label subset, a threshold, a calibration."""
    p.add_argument(
        "--labels",
        metavar="LABEL,...",
        help="the scores restricted to these labels and renormalised, e.g. angry,happy,neutral,sad, or a "
        "named set (iemocap4, emodb, ravdess)",
    )
    p.add_argument(
        "--min-confidence",
        type=float,
        metavar="X",
        help="0-1: a result whose top score is under X says `uncertain` (its scores unchanged)",
    )
    p.add_argument(
        "--calibration",
        type=Path,
        metavar="DIR",
        help="calibrated scores: a directory from `emoserve calibrate` (rows then say `calibrated`)",
    )


def add_timeline_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "long recordings",
        "--segments: an emotion timeline per file - its speech segments (silero-vad), each scored, then a "
        "summary; any length, in memory that does not grow with it",
    )
    g.add_argument("--segments", action="store_true", help="one result per speech segment, then a summary")
    add_vad_flags(g)
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


def cmd_predict(args: argparse.Namespace) -> int:
    from emoserve.inference.corpus import expand_inputs
    from emoserve.inference.recognizer import load_with

    files = expand_inputs(args.paths)
    if not files:
        raise ValueError(f"no audio files found in {' '.join(args.paths)}")
    if args.gpus_per_actor and not args.ray:
        raise ValueError("--gpus-per-actor sizes Ray Data's actors; add --ray")
    if args.gpus_per_actor < 0:
        raise ValueError(
            f"--gpus-per-actor is {args.gpus_per_actor:g}; it must be 0 or more (0.5 shares a GPU)"
        )
    recognizer = load_with(model_options(args))
    warn_if_random(recognizer)
    head = load_checked_head(args.head, recognizer) if args.head else None
    if head is not None and args.ray:
        raise ValueError("--head runs on this machine; leave out --ray")
    if (args.labels or args.min_confidence is not None or args.calibration) and args.ray:
        raise ValueError("--labels, --min-confidence and --calibration run on this machine; leave out --ray")
    if args.calibration:
        from emoserve.inference.confidence import load_calibration

        recognizer.use_calibration(load_calibration(args.calibration))
    recognizer = recognizer.scoring(head, recognizer.readout(args.labels, args.min_confidence))
    if (args.segments or args.segments_from) and args.ray:
        raise ValueError("--segments runs on this machine; leave out --ray (Ray Data scores whole clips)")
    fmt: Format = args.format or ("table" if args.output is None and sys.stdout.isatty() else "jsonl")
    if args.segments or args.segments_from:
        return predict_timelines(args, recognizer, files, fmt, head)
    return predict_clips(args, recognizer, files, fmt, head)


def predict_clips(args: argparse.Namespace, recognizer: Any, files: list[str], fmt: Format, head: Any) -> int:
    """A result per file as it is scored (here or on Ray), with a progress bar in files."""
    from tqdm import tqdm

    from emoserve.inference.corpus import score_files
    from emoserve.inference.formats import OutcomeWriter

    options: dict[str, Any] = {
        "granularity": args.granularity,
        "embeddings_dir": args.embeddings,
        "batch_size": args.batch_size,
    }
    failed = 0
    with (
        tqdm(total=len(files), unit="file", disable=None, file=sys.stderr) as bar,
        output(args.output) as out,
    ):
        writer = OutcomeWriter(out, fmt, score_labels(recognizer, args), args.granularity, head)
        outcomes = (
            ray_outcomes(args, files, options) if args.ray else score_files(recognizer, files, **options)
        )
        for outcome in outcomes:
            writer.write(outcome)
            if outcome.error:
                failed += 1
                bar.write(f"error: {outcome.error}", file=sys.stderr)
            bar.update()
    return failures(failed, len(files))


def predict_timelines(
    args: argparse.Namespace, recognizer: Any, files: list[str], fmt: Format, head: Any
) -> int:
    """`predict --segments`: each file's timeline, segment rows as they are scored, then its summary; a
    progress bar in audio seconds. A file that fails is one error row and the others go on."""
    from tqdm import tqdm

    from emoserve.audio.segments import read_spans_file
    from emoserve.audio.vad import VadSettings
    from emoserve.inference.formats import TimelineWriter
    from emoserve.inference.timeline import write_timelines

    vad = VadSettings(threshold=args.vad_threshold, max_segment_s=args.max_segment_s)
    spans = read_spans_file(args.segments_from) if args.segments_from else None
    with (
        tqdm(unit="s", unit_scale=False, disable=None, file=sys.stderr, bar_format=AUDIO_BAR) as bar,
        output(args.output) as out,
    ):
        writer = TimelineWriter(out, fmt, score_labels(recognizer, args), head)
        failed = write_timelines(
            recognizer, files, writer,
            batch_size=args.batch_size, progress=audio_progress(bar, len(files)),
            on_error=lambda file, error: bar.write(f"error: {error}", file=sys.stderr),
            channels=args.channels, vad=vad, spans=spans,
        )  # fmt: skip
    return failures(failed, len(files))


def score_labels(recognizer: Any, args: argparse.Namespace) -> list[str]:
    """The labels a row has scores of: the model's, or the --labels subset's."""
    subset = recognizer.readout(args.labels).labels
    return list(subset) if subset is not None else [label.en for label in recognizer.labels]


def audio_progress(bar: Any, files: int) -> Callable[[int, str], Callable[[float, float | None], None]]:
    """`file_timelines`' progress on one tqdm bar: the n-th file named, its audio seconds done of all."""

    def show(done: float, total: float | None) -> None:
        bar.total = round(total or done, 1)
        bar.n = round(done, 1)
        bar.refresh()

    def progress(n: int, file: str) -> Callable[[float, float | None], None]:
        bar.set_description(f"{n}/{files} {Path(file).name}")
        bar.reset()
        return show

    return progress


def output(path: Path | None) -> AbstractContextManager[IO[str]]:
    """--output, written whole or not at all (a temporary file renamed at the end), else stdout."""
    from emoserve.files import atomic_write

    return atomic_write(path) if path else nullcontext(sys.stdout)


def ray_outcomes(args: argparse.Namespace, files: list[str], options: dict[str, Any]) -> Iterator[Outcome]:
    from emoserve.ray_batch import connect, score_files

    connect(args.address)
    return score_files(
        files, model_options(args), actors=args.actors, gpus_per_actor=args.gpus_per_actor, **options
    )
