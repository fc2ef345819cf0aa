"""Service under load: 1, 3, 8 and 32 concurrent clients sending 5 s clips to one server. CPU only.

One `emoserve serve` process (the default, with the web UI; measured once /readyz and / answer 200),
started with `--max-queue 16`: the engine runs up to 8 clips per model call (max_batch_size, default)
and lets 16 more wait, so 24 requests at most are in the server at once. 8 clients can never fill that;
32 clients must hit it, and the requests beyond it get 503 with Retry-After (push-back).

Each client is a thread with its own keep-alive connection (stdlib http.client) that sends the same 5 s
WAV as multipart `file`, waits for the reply and sends the next, for a fixed duration per level. A 503 is
answered as a well-behaved client does: it waits Retry-After seconds (at most until the level ends) and
sends again. Throughput counts the 200 replies over the wall time from the start of the level to its last
reply; latency percentiles are over the 200 replies. The baseline, measured in the same run on the same
server, is 1 client, run first and again last (machine drift shows as their difference): ratios are
against the median of those. Batch sizes come from the server's own /metrics.

Checks: no status other than 200 at 3 and 8 clients; at 32, nothing but 200 and 503, every 503 with a
Retry-After header, and at least one 503 (the queue was hit).
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from common import (
    Client,
    Reply,
    Server,
    bench_model,
    clip_wav,
    free_port,
    header,
    load_average,
    median,
    parser,
    percentile,
    run_count,
    running_server,
    serve_argv,
    table,
)

CLIENTS = (1, 3, 8, 32)
DURATION_S = {1: 20.0, 3: 30.0, 8: 45.0, 32: 60.0}  # per level; --quick: QUICK_DURATION_S each
QUICK_DURATION_S = 1.0
PAUSE_S = 1.0
CLIP_S = 5.0
MAX_QUEUE = 16  # 8 running + 16 waiting = 24 < 32 clients: the 32-client level must meet push-back
NO_ERRORS_AT = (3, 8)
PUSH_BACK_AT = 32


@dataclass
class Level:
    clients: int
    wall_s: float = 0.0
    replies: list[Reply] = field(default_factory=list)
    batches: float = float("nan")  # model calls during the level (from /metrics)
    clips: float = float("nan")  # clips in those calls

    def ok(self) -> list[Reply]:
        return [r for r in self.replies if r.status == 200]

    def statuses(self) -> Counter[str]:
        return Counter(str(r.status) if r.status else f"error: {r.error}" for r in self.replies)

    def throughput(self) -> float:
        return len(self.ok()) / self.wall_s

    def latency(self, q: float) -> float:
        return percentile([r.seconds for r in self.ok()], q)


def main() -> None:
    p = parser(__doc__, default_runs=1)
    p.add_argument(
        "--max-queue", type=int, default=MAX_QUEUE, help=f"the server's --max-queue (default {MAX_QUEUE})"
    )
    p.add_argument("--no-ui", action="store_true", help="start the server with --no-ui (a variant)")
    args = p.parse_args()
    runs = run_count(args)
    header("Service under load", args, runs)
    model = bench_model(args.preset)
    wav = clip_wav(CLIP_S)
    port = free_port()
    extra = ["--max-queue", str(args.max_queue), *(["--no-ui"] if args.no_ui else [])]
    argv = serve_argv(model.entry, port, *extra)
    print(
        f"- server: `emoserve serve --model <slim entry> --device cpu {' '.join(extra)}` "
        f"(web UI {'off' if args.no_ui else 'on'}; other settings default)\n"
    )
    levels: dict[int, list[Level]] = {n: [] for n in CLIENTS}
    with running_server("load", argv, port) as server:
        server.wait_for("/readyz")
        if not args.no_ui:
            server.wait_for("/", interval_s=0.1)  # the UI is mounted: start-up is over
        Client(server.port).recognize(wav)  # one untimed request through the whole HTTP path
        for i in range(runs):
            for n in (*CLIENTS, 1):  # 1 client again at the end: the baseline brackets the run (drift)
                duration = QUICK_DURATION_S if args.quick else DURATION_S[n]
                levels[n].append(run_level(server, n, wav, duration))
                print(
                    f"run {i + 1}/{runs} {n:2d} clients: {levels[n][-1].statuses()} in "
                    f"{levels[n][-1].wall_s:.1f} s",
                    file=sys.stderr,
                )
                time.sleep(PAUSE_S)  # let the server settle between levels
    report(levels, args.max_queue)


def run_level(server: Server, clients: int, wav: bytes, duration_s: float) -> Level:
    level = Level(clients)
    lock = threading.Lock()
    start: list[float] = []  # set once every client is ready to send
    barrier = threading.Barrier(clients + 1, action=lambda: start.append(time.perf_counter()))
    calls_before = server.metric("emoserve_batch_size_count")
    clips_before = server.metric("emoserve_batch_size_sum")

    def client_loop() -> None:
        client = Client(server.port)
        mine: list[Reply] = []
        barrier.wait()
        deadline = start[0] + duration_s
        try:
            while time.perf_counter() < deadline:
                reply = send(client, wav)
                mine.append(reply)
                if reply.status == 503:
                    wait = float(reply.retry_after) if reply.retry_after else 1.0
                    time.sleep(max(0.0, min(wait, deadline - time.perf_counter())))
        finally:
            client.close()
            with lock:
                level.replies += mine

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    for thread in threads:
        thread.join()
    server.check_alive()
    level.wall_s = max((r.finished for r in level.replies), default=start[0]) - start[0]
    level.batches = server.metric("emoserve_batch_size_count") - calls_before
    level.clips = server.metric("emoserve_batch_size_sum") - clips_before
    return level


def send(client: Client, wav: bytes) -> Reply:
    started = time.perf_counter()
    try:
        return client.recognize(wav)
    except OSError as error:  # a failure without an HTTP status: counted, never hidden
        now = time.perf_counter()
        return Reply(0, now - started, now, None, b"", f"{type(error).__name__}: {error}")


def report(levels: dict[int, list[Level]], max_queue: int) -> None:
    def med(n: int, figure: str) -> float:
        per_run = {
            "throughput": lambda lv: lv.throughput(),
            "p50": lambda lv: lv.latency(50),
            "p95": lambda lv: lv.latency(95),
            "batch": lambda lv: lv.clips / lv.batches if lv.batches else float("nan"),
            "push_back": lambda lv: percentile([r.seconds for r in lv.replies if r.status == 503], 50),
        }[figure]
        return median([per_run(lv) for lv in levels[n]])

    base_throughput, base_p50 = med(1, "throughput"), med(1, "p50")
    rows = []
    for n in CLIENTS:
        statuses = sum((lv.statuses() for lv in levels[n]), Counter())
        rows.append(
            [
                n,
                sum(len(lv.replies) for lv in levels[n]),
                ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())),
                f"{med(n, 'throughput'):.2f}",
                f"{med(n, 'throughput') * CLIP_S:.1f}",
                f"{med(n, 'p50'):.2f}",
                f"{med(n, 'p95'):.2f}",
                f"{med(n, 'batch'):.1f}",
                f"{med(n, 'throughput') / base_throughput:.2f}",
                f"{med(n, 'p50') / base_p50:.2f}",
            ]
        )
    print(
        f"Medians over runs; {CLIP_S:g} s clips; latency of the 200 replies, in seconds. Ratios are "
        "against 1 client (the baseline, same server, same run).\n"
    )
    table(
        [
            "clients",
            "requests",
            "statuses",
            "requests/s",
            "audio s/s",
            "p50 (s)",
            "p95 (s)",
            "clips per model call",
            "throughput ratio",
            "p50 ratio",
        ],
        rows,
    )
    print(
        f"Duration per level: {', '.join(f'{n} clients {levels[n][0].wall_s:.0f} s' for n in CLIENTS)} "
        "(to the last reply)."
    )
    first, last = levels[1][0], levels[1][-1]
    print(
        f"1 client at the start of the run: {first.throughput():.2f} requests/s, p50 "
        f"{first.latency(50):.2f} s; at the end: {last.throughput():.2f} requests/s, p50 "
        f"{last.latency(50):.2f} s (the 1-client row is the median of all of them: drift shows here)."
    )
    push_back = med(PUSH_BACK_AT, "push_back")
    if push_back == push_back:  # not NaN: there were 503s
        print(f"A 503 at {PUSH_BACK_AT} clients came back in {push_back * 1000:.0f} ms (median).")
    print()
    table(["check", "result"], checks(levels, max_queue))
    print(f"{load_average()} at the end. Server log: .bench/serve/load.log")


def checks(levels: dict[int, list[Level]], max_queue: int) -> list[list[str]]:
    rows = []
    for n in NO_ERRORS_AT:
        bad = {k: v for lv in levels[n] for k, v in lv.statuses().items() if k != "200"}
        rows.append([f"{n} clients: only 200", "met" if not bad else f"NOT met: {bad}"])
    replies = [r for lv in levels[PUSH_BACK_AT] for r in lv.replies]
    other = Counter(
        str(r.status) if r.status else f"error: {r.error}" for r in replies if r.status not in (200, 503)
    )
    no_header = sum(1 for r in replies if r.status == 503 and not r.retry_after)
    pushed = sum(1 for r in replies if r.status == 503)
    rows += [
        [
            f"{PUSH_BACK_AT} clients: nothing but 200 and 503",
            "met" if not other else f"NOT met: {dict(other)}",
        ],
        [
            f"{PUSH_BACK_AT} clients: every 503 has Retry-After",
            "met" if not no_header else f"NOT met: {no_header} without",
        ],
        [
            f"{PUSH_BACK_AT} clients: the queue (max_queue {max_queue}) was hit",
            f"met: {pushed} x 503" if pushed else "NOT met: no 503 (the server kept up, or max_queue is big)",
        ],
    ]
    return rows


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as error:
        sys.exit(str(error))
