"""`emoserve jobs`: long recordings as jobs on a server (docs/guides/jobs.md), through
`inference/jobs_client.py`: submit (files and folders, one job each; --wait with a progress bar, then the
results), list, status, result, cancel, delete. Each prints JSON, a line per job."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from emoserve.cli.shared import add_vad_flags, api_key, with_variable
from emoserve.inference.options import env_name

if TYPE_CHECKING:
    from emoserve.cli.shared import Commands
    from emoserve.inference.jobs_client import JobsClient

DEFAULT_URL = "http://127.0.0.1:7860"


def add_commands(sub: Commands) -> None:
    p = sub.add_parser(
        "jobs",
        help="long recordings as jobs on a server: submit, list, status, result, cancel, delete",
        description="A job is /v1/timeline's work accepted at once, kept on the server's disk, resumed "
        "after a crash; its result is /v1/timeline's JSON (docs/guides/jobs.md).",
    )
    p.set_defaults(run=lambda _: p.print_help())
    actions = p.add_subparsers(title="actions")

    submit = actions.add_parser(
        "submit", help="upload files as jobs (folders: their audio files, one job each)"
    )
    submit.add_argument("inputs", nargs="+", metavar="FILE|DIR", help="recordings, or folders of them")
    submit.add_argument("--wait", action="store_true", help="wait for each job, then print its result")
    submit.add_argument("--callback", metavar="URL", help="a webhook for the jobs' ends")
    submit.add_argument("--callback-secret", metavar="SECRET", help="signs the webhooks")
    submit.add_argument(
        "--callback-progress",
        action="store_true",
        help="also POST job.progress to the callback, one each tenth of a job at most",
    )
    submit.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="one job per key: a retry of this command makes no second one",
    )
    submit.add_argument("--channels", choices=("mix", "separate"), help="mix (default) or separate")
    add_vad_flags(submit)
    submit.set_defaults(run=cmd_submit)

    listed = actions.add_parser("list", help="the server's jobs, newest first")
    listed.add_argument("--status", choices=("queued", "running", "succeeded", "failed", "cancelled"))
    listed.add_argument("--limit", type=int, default=50, help="jobs (default 50)")
    listed.set_defaults(run=lambda args: _call(args, lambda c, a: c.page(a.status, a.limit)))

    for name, help, run in (
        ("status", "a job's state and progress", lambda c, a: c.status(a.id)),
        ("result", "a job's timeline (/v1/timeline's JSON)", lambda c, a: c.result(a.id, a.partial)),
        ("cancel", "cancel a job", lambda c, a: c.cancel(a.id)),
        ("delete", "delete a job, its result and its audio", lambda c, a: c.delete(a.id)),
    ):
        action = actions.add_parser(name, help=help)
        action.add_argument("id", help="the job's id")
        if name == "result":
            action.add_argument("--partial", action="store_true", help="the segments so far")
        action.set_defaults(run=lambda args, run=run: _call(args, run))

    for action in (submit, listed, *(actions.choices[n] for n in ("status", "result", "cancel", "delete"))):
        action.add_argument("--url", default=DEFAULT_URL, help=f"the server (default {DEFAULT_URL})")
        action.add_argument(
            "--api-key", help=with_variable("the server's API key, sent as X-API-Key", env_name("api_key"))
        )


def _client(args: argparse.Namespace) -> JobsClient:
    from emoserve.inference.jobs_client import JobsClient

    return JobsClient(args.url, api_key(args))


def _call(args: argparse.Namespace, action: Callable[[JobsClient, argparse.Namespace], Any]) -> int:
    with _client(args) as client:
        _print(action(client, args))
    return 0


def _print(value: Any) -> None:
    if value is not None:
        print(json.dumps(value, ensure_ascii=False), flush=True)


def cmd_submit(args: argparse.Namespace) -> int:
    from emoserve.inference.corpus import expand_inputs

    options = {
        "channels": args.channels,
        "max_segment_s": args.max_segment_s,
        "vad_threshold": args.vad_threshold,
    }
    files = expand_inputs(args.inputs)
    with _client(args) as client:
        jobs = []
        for n, file in enumerate(files):
            key = args.idempotency_key and (
                args.idempotency_key if len(files) == 1 else f"{args.idempotency_key}-{n}"
            )
            job = client.submit(
                file, options=options, callback_url=args.callback, callback_secret=args.callback_secret,
                callback_progress=args.callback_progress, idempotency_key=key,
            )  # fmt: skip
            jobs.append(job)
            _print(job)
        if not args.wait:
            return 0
        failed = 0
        for job in jobs:
            done = _wait_with_bar(client, job)
            if done["status"] == "succeeded":
                _print(client.result(done["id"]))
            else:
                failed += 1
                _print(done)
        return 1 if failed else 0


def _wait_with_bar(client: JobsClient, job: dict[str, Any]) -> dict[str, Any]:
    from tqdm import tqdm

    with tqdm(total=100.0, desc=job["file"], unit="%", disable=None, file=sys.stderr) as bar:

        def show(now: dict[str, Any]) -> None:
            bar.update(now["progress"]["percent"] - bar.n)

        done = client.wait(job["id"], on_progress=show)
        show(done)
    return done
