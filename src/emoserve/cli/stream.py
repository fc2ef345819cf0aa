"""`emoserve stream`: live emotion for a file or raw PCM on stdin, sent at real-time pace to a server
(--url: `inference/stream_client.py`) or to `Recognizer.stream` here, each message printed as it comes."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from emoserve.cli.shared import add_model_flags, add_vad_flags, api_key, with_variable
from emoserve.constants import (
    DEFAULT_MAX_SECONDS,
    SAMPLE_RATE,
    STREAM_ENCODINGS,
    STREAM_HOP_S,
    STREAM_HOP_S_RANGE,
    STREAM_SAMPLE_RATES,
    STREAM_WINDOW_S,
)
from emoserve.inference.options import env_name

if TYPE_CHECKING:
    import asyncio

    from emoserve.cli.shared import Commands
    from emoserve.inference.protocol import StreamMessage, StreamOptions

STREAM_FRAME_S = 0.1  # audio per message `emoserve stream` sends (the protocol takes any size up to 1 MiB)
Show = Callable[["StreamMessage"], None]
T = TypeVar("T")


def add_commands(sub: Commands) -> None:
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
        help=with_variable("with --url: the server's API key, sent as X-API-Key", env_name("api_key")),
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
        help=f"with -: stdin's sample rate (default {SAMPLE_RATE}; "
        f"{STREAM_SAMPLE_RATES[0]}-{STREAM_SAMPLE_RATES[1]})",
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
        help="an interim reading every this many seconds of speech (default "
        f"{STREAM_HOP_S:g}; {'-'.join(f'{s:g}' for s in STREAM_HOP_S_RANGE)})",
    )
    p.add_argument(
        "--window-s",
        type=float,
        default=STREAM_WINDOW_S,
        help=f"an interim reading covers the utterance's last this many seconds (default "
        f"{STREAM_WINDOW_S:g})",
    )
    p.add_argument(
        "--labels", metavar="LABEL,...", help="the scores restricted to these labels and renormalised"
    )
    p.add_argument(
        "--min-confidence", type=float, metavar="X", help="0-1: under it a reading says `uncertain`"
    )
    add_vad_flags(p.add_argument_group("speech detection", "as `predict --segments` (silero-vad)"))
    add_model_flags(p)
    p.set_defaults(run=cmd_stream, max_seconds=DEFAULT_MAX_SECONDS)


def cmd_stream(args: argparse.Namespace) -> int:
    """The source's PCM frames -> a server's /v1/stream (--url) or Recognizer.stream here -> each message
    printed as it comes; Ctrl-C ends the source (the last segment and the summary still come). 0: the
    stream ended normally; 1: a fatal `error`."""
    options = stream_options(args)  # the protocol's checks, here first: a bad flag fails before any work
    frames = stream_frames(args)
    if args.source != "-" and not args.fast:
        frames = paced(frames, bytes_per_s=4 * SAMPLE_RATE)
    printer = Printer(args.format or ("text" if sys.stdout.isatty() else "jsonl"))
    if args.url:
        closed = stream_remote(args.url, options, api_key(args), frames, printer.show)
        return 0 if closed == 1000 and not printer.fatal else 1
    stream_here(args, options, frames, printer.show)
    return 1 if printer.fatal else 0


def stream_options(args: argparse.Namespace) -> StreamOptions:
    """The stream's options from the flags (ValueError naming one out of range); a file is sent as 16 kHz
    f32 mono (its decoded samples as they are: whatever the file's bit depth, the segments of `predict
    --segments`)."""
    from emoserve.audio.vad import VadSettings
    from emoserve.inference.protocol import StreamOptions

    raw = args.source == "-"
    return StreamOptions(
        sample_rate=args.sample_rate if raw else SAMPLE_RATE,
        encoding=args.encoding if raw else "pcm_f32le",
        channels=args.channels if raw else 1,
        hop_s=args.hop_s,
        window_s=args.window_s,
        vad=VadSettings(threshold=args.vad_threshold, max_segment_s=args.max_segment_s),
        labels=args.labels,
        min_confidence=args.min_confidence,
    )


class Printer:
    """Each message as it comes: a JSON line (errors also said on stderr) or a line for a person."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.fatal = self.random = False

    def show(self, message: StreamMessage) -> None:
        import json

        from emoserve.inference.formats import RANDOM_MARK, RANDOM_WARNING, stream_line
        from emoserve.inference.protocol import is_fatal

        self.fatal = self.fatal or is_fatal(message)
        error = message["type"] == "error"
        if self.fmt == "jsonl":
            print(json.dumps(message, ensure_ascii=False), flush=True)
            if message["type"] == "error":
                print(f"error: {message['code']}: {message['message']}", file=sys.stderr)
        else:
            line = stream_line(message)
            if self.random and message["type"] in ("interim", "segment"):
                line += RANDOM_MARK
            print(line, file=sys.stderr if error else sys.stdout, flush=True)
        if message["type"] == "ready" and message["random_weights"]:
            self.random = True
            print(RANDOM_WARNING, file=sys.stderr)


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
    args: argparse.Namespace, options: StreamOptions, frames: Iterator[bytes], show: Show
) -> None:
    """Without --url: Recognizer.stream, scored in this process (the model loaded as `predict` does)."""
    from emoserve.cli.shared import model_options
    from emoserve.inference.recognizer import load_with

    recognizer = load_with(model_options(args))
    session = recognizer.stream(
        sample_rate=options.sample_rate, encoding=options.encoding, channels=options.channels,
        hop_s=options.hop_s, window_s=options.window_s, vad=options.vad, labels=options.labels,
        min_confidence=options.min_confidence,
    )  # fmt: skip
    show(session.first)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends the source: the rest still comes
        for frame in frames:
            for message in session.feed(frame):
                show(message)
    for message in session.end():
        show(message)


def stream_remote(
    url: str, options: StreamOptions, api_key: str | None, frames: Iterator[bytes], show: Show
) -> int | None:
    """--url: the frames to the server from this thread, so that Ctrl-C ends the source here as it does
    in-process, while the client's event loop, on a thread of its own, shows each message as it comes;
    `end` after the last frame. The server's close code (1000: a normal end)."""
    import asyncio

    from emoserve.inference.stream_client import StreamClient, StreamClosed, StreamRefused

    with event_loop() as loop:

        def run(step: Coroutine[Any, Any, T]) -> T:
            return asyncio.run_coroutine_threadsafe(step, loop).result()

        try:
            client = run(StreamClient.connect(url, options, api_key=api_key))
        except StreamRefused as err:
            raise ValueError(f"{url} refused the stream: {err}") from None
        except OSError as err:
            raise ValueError(f"cannot connect to {url}: {err}") from None
        shown = asyncio.run_coroutine_threadsafe(show_all(client, show), loop)
        try:
            try:
                with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends the source: the rest still comes
                    for frame in frames:
                        run(client.send(frame))
                run(client.end())
            except StreamClosed:
                pass  # the server ended the stream (a fatal error): its messages say why
        except BaseException:
            run(client.close())  # the source failed: the stream ends at once
            raise
        finally:
            shown.result()  # the messages until the server closes the stream
    return client.close_code


async def show_all(messages: Any, show: Show) -> None:
    async for message in messages:
        show(message)


@contextlib.contextmanager
def event_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An asyncio event loop running on a thread of its own while the block runs."""
    import asyncio
    import threading

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="emoserve-stream", daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
