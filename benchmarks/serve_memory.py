"""Service memory: RSS of one server process after the first 100 requests and after 1,000. CPU only.

One `emoserve serve` process (the default, with the web UI; measured from the moment /readyz and / answer
200). 4 client threads, each with its own keep-alive connection, send the same WAV clip as multipart
`file`, so the engine batches them as it does real traffic. The requests run in steps of 100; after each
step the clients stop, and once the server is idle (0.5 s later) its VmRSS is read from
/proc/<pid>/status. The baseline in the same run is the RSS after the first 100 requests: the target is
RSS after 1,000 within 5% of it.

Clip length: 5 s, except on `large`, where 1,000 x 5 s takes ~15 minutes on a 2-core CPU; there it is 1 s
(--clip-s overrides).
"""

from __future__ import annotations

import sys
import threading
import time

from common import (
    MB,
    Client,
    Server,
    bench_model,
    clip_wav,
    free_port,
    header,
    load_average,
    median,
    parser,
    run_count,
    running_server,
    serve_argv,
    table,
    verdict,
)

CLIENTS = 4
STEP = 100  # requests between two RSS readings
TOTAL = 1_000
QUICK_STEP, QUICK_TOTAL = 10, 50
SETTLE_S = 0.5  # idle time before reading RSS
TARGET = 1.05  # RSS after TOTAL / RSS after the first STEP


def main() -> None:
    p = parser(__doc__, default_runs=1)
    p.add_argument(
        "--clip-s", type=float, default=None, help="clip length in seconds (default 5, 1 on large)"
    )
    p.add_argument("--no-ui", action="store_true", help="start the server with --no-ui (a variant)")
    args = p.parse_args()
    runs = run_count(args)
    clip_s = args.clip_s or (1.0 if args.preset == "large" else 5.0)
    step, total = (QUICK_STEP, QUICK_TOTAL) if args.quick else (STEP, TOTAL)
    header("Service memory", args, runs)
    model = bench_model(args.preset)
    wav = clip_wav(clip_s)
    extra = ["--no-ui"] if args.no_ui else []
    command = " ".join(["emoserve serve --model <slim entry> --device cpu", *extra])
    print(f"- server: `{command}` (web UI {'off' if args.no_ui else 'on'}; other settings default)")
    print(f"- requests: {total} x {clip_s:g} s clips from {CLIENTS} clients, RSS read every {step}\n")
    trajectories = []
    for i in range(runs):
        port = free_port()
        with running_server(f"memory-{i + 1}", serve_argv(model.entry, port, *extra), port) as server:
            trajectories.append(trajectory(server, wav, step, total, ui=not args.no_ui))
        points = " ".join(f"{n}:{mb:.0f}" for n, mb in trajectories[-1])
        print(f"run {i + 1}/{runs}: requests:MB {points}", file=sys.stderr)
    report(trajectories, step, clip_s)


def trajectory(server: Server, wav: bytes, step: int, total: int, ui: bool) -> list[tuple[int, float]]:
    """[(requests done, VmRSS in MB)], from 0 (ready, UI mounted) to `total`."""
    server.wait_for("/readyz")
    if ui:
        server.wait_for("/", interval_s=0.1)
    clients = [Client(server.port) for _ in range(CLIENTS)]
    points = [(0, rss_mb(server))]
    started = time.perf_counter()
    try:
        for done in range(step, total + 1, step):
            send_many(clients, wav, step, server)
            points.append((done, rss_mb(server)))
    finally:
        for client in clients:
            client.close()
    elapsed = time.perf_counter() - started
    print(
        f"{total} requests in {elapsed:.0f} s ({total / elapsed:.1f}/s, settling pauses included), "
        "all answered 200."
    )
    return points


def send_many(clients: list[Client], wav: bytes, count: int, server: Server) -> None:
    """`count` requests spread over the clients, concurrently; every one must answer 200."""
    failures: list[str] = []
    share = [count // len(clients) + (i < count % len(clients)) for i in range(len(clients))]

    def run(client: Client, n: int) -> None:
        for _ in range(n):
            try:
                reply = client.recognize(wav)
            except OSError as error:
                failures.append(f"{type(error).__name__}: {error}")
                continue
            if reply.status != 200:
                failures.append(f"HTTP {reply.status}: {reply.body[:200]!r}")

    threads = [threading.Thread(target=run, args=(c, n)) for c, n in zip(clients, share, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, e.g. {failures[0]}\n{server.log_tail()}")


def rss_mb(server: Server) -> float:
    time.sleep(SETTLE_S)
    server.check_alive()
    return server.rss_bytes("VmRSS") / MB


def report(trajectories: list[list[tuple[int, float]]], step: int, clip_s: float) -> None:
    counts = [n for n, _ in trajectories[0]]
    by_count = {n: median([dict(t)[n] for t in trajectories]) for n in counts}
    first, last = by_count[step], by_count[counts[-1]]
    print(
        f"VmRSS of the server process in MB (decimal), median over runs; {clip_s:g} s clips; the baseline "
        f"is the RSS after the first {step} requests.\n"
    )
    table(
        ["requests done", "VmRSS (MB)", f"ratio to RSS after {step}"],
        [[n, f"{mb:.0f}", f"{mb / first:.3f}" if n >= step else "-"] for n, mb in by_count.items()],
    )
    ratio = last / first
    table(
        ["figure", "value", "target"],
        [
            [f"RSS after {counts[-1]} / RSS after {step} (ratio)", f"{ratio:.3f}", verdict(ratio, TARGET)],
            [f"growth from {step} to {counts[-1]} requests", f"{last - first:+.0f} MB", "-"],
        ],
    )
    print("RSS at 0 is at ready with the web UI mounted, before any request.")
    print(f"{load_average()} at the end. Server logs: .bench/serve/memory-*.log")


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as error:
        sys.exit(str(error))
