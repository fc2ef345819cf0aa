"""`emoserve` command line: a module per command family, each command one library call.

    predict.py   predict (files, folders, globs; --segments: timelines; --ray: Ray Data)
    labels.py    evaluate, train-head (your own labels)
    models.py    download, convert, info, verify, make-test-model (the model's files)
    serve.py     serve (the HTTP API, web UI and metrics; --ray: Ray Serve)
    stream.py    stream (live emotion, here or to a server's /v1/stream)
    jobs.py      jobs submit|list|status|result|cancel|delete (long recordings as jobs on a server)
    shared.py    the flags several families take (the model's, declared once in inference/options.py)

Torch is imported only by the commands that need it, so `emoserve --help` answers at once."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from emoserve import __version__
from emoserve.cli import jobs, labels, models, predict, serve, stream
from emoserve.errors import EmoserveError


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
    except (EmoserveError, ValueError, FileNotFoundError) as err:  # a message that says what to do
        print(f"error: {err}", file=sys.stderr)
        return 2


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="emoserve", description="Speech emotion recognition with emotion2vec+."
    )
    top.add_argument("--version", action="version", version=f"emoserve {__version__}")
    top.add_argument("-v", "--verbose", action="store_true", help="log progress (loading, conversion)")
    top.set_defaults(run=lambda _: top.print_help())
    sub = top.add_subparsers(title="commands")
    for family in (predict, labels, models, serve, stream, jobs):
        family.add_commands(sub)
    return top
