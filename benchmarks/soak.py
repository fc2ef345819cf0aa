"""Soak: 32 clients for 10 minutes against one `emoserve serve` (large model, CPU, default backend).

Each client is a thread with its own keep-alive connection that loops: pick a request (deterministic per
client) - a clip of a random length between 1 and 8 s, to the sample (multipart `file`; real traffic
has arbitrary lengths, and per-shape state in the model runtime grows with the number of distinct
ones), or, one time in ten, a bad input (bytes that are not audio, an empty body, or a WAV cut in its
samples) - and, one time in twenty, send a request and hang up before the answer (a client that
disconnects mid-request). A 503 is answered as a well-behaved client does: wait Retry-After, then go
on. Per minute: the statuses, the latency of the accepted (200) requests, the server's RSS sampled
every second (VmRSS from /proc/PID/status by a sampling thread): its min, median and max, and its true
peak over the minute (VmHWM, reset through /proc/PID/clear_refs at each minute's start).

Checks: statuses are only 200, 4xx for the bad inputs and 503 with Retry-After (no 500, no connection
error on requests that were not hung up); growth of the per-minute FLOOR of RSS (the lowest sample)
from minute 1 to the last minute <= 2%; p99 of the accepted requests in the last minute <= 1.5x the
first minute's. The floor is what the server holds between model calls under the same load: memory
kept for good (a leak, or freed memory the allocator does not give back) raises it minute after minute.
The peak is printed, not checked: it is the largest batch that ran in that minute (up to 8 clips of
similar length, ~1 GB of activations for 8 x 8 s of the large model), so it moves with the batches the
traffic happened to form. Minute 1's floor leaves out the first RAMP_S seconds, before the clients'
first requests are in (an idle server holds less than a loaded one). For information (no check): the
RSS at idle before the load, and over a short idle pause after it.
"""

from __future__ import annotations

import random
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from common import (
    LOCALHOST,
    MB,
    SAMPLE_RATE,
    Client,
    bench_model,
    clip_wav,
    free_port,
    header,
    load_average,
    median,
    parser,
    percentile,
    running_server,
    serve_argv,
    synthetic_clip,
    table,
    verdict,
    wav_bytes,
)

CLIENTS = 32
DURATION_S = 600.0
QUICK_DURATION_S = 8.0
CLIP_SECONDS = (1.0, 8.0)  # each request draws its length from this range, to the sample
RAMP_S = 10.0  # minute 1's floor starts after this (--quick: a tenth of its "minute")
BAD_SHARE = 0.10
HANG_UP_SHARE = 0.05
TARGETS = {"rss_growth": 0.02, "p99_ratio": 1.5}
SAMPLE_S = 1.0  # RSS sampling period (--quick: a tenth of its short "minute")
IDLE_S = 15.0  # idle pause before and after the load, sampled the same way (--quick: one "minute")


@dataclass
class Minute:
    statuses: Counter[str] = field(default_factory=Counter)
    accepted_s: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)  # samples taken during this minute
    floor_mb: list[float] = field(default_factory=list)  # the same, after the ramp-up
    peak_mb: float = float("nan")  # VmHWM over this minute


def main() -> None:
    p = parser(__doc__, default_runs=1)
    p.add_argument("--minutes", type=float, default=DURATION_S / 60, help="duration (default 10)")
    p.add_argument("--clients", type=int, default=CLIENTS, help=f"concurrent clients (default {CLIENTS})")
    args = p.parse_args()
    header("Soak", args, 1)
    duration = QUICK_DURATION_S if args.quick else args.minutes * 60
    minute_s = duration / 4 if args.quick else 60.0
    sample_s = minute_s / 10 if args.quick else SAMPLE_S
    idle_s = minute_s if args.quick else IDLE_S
    model = bench_model(args.preset)
    longest = synthetic_clip(CLIP_SECONDS[1], seed=1)
    shortest = round(CLIP_SECONDS[0] * SAMPLE_RATE)

    def random_clip(rng: random.Random) -> bytes:
        return wav_bytes(longest[: rng.randint(shortest, len(longest))])

    cut = clip_wav(3.0)
    bad = [b"this is not audio" * 50, b"", cut[: len(cut) // 2]]
    ramp_s = minute_s / 10 if args.quick else RAMP_S
    port = free_port()
    minutes: dict[int, Minute] = {}
    lock = threading.Lock()
    with running_server("soak", serve_argv(model.entry, port), port) as server:
        server.wait_for("/readyz")
        server.wait_for("/", interval_s=0.1)  # the UI is mounted: start-up is over

        def rss_samples(seconds: float) -> list[float]:
            """The server's RSS (MB) every `sample_s` for `seconds` (no load)."""
            samples = []
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                samples.append(server.rss_bytes("VmRSS") / MB)
                time.sleep(sample_s)
            return samples

        idle_before = rss_samples(idle_s)
        started = time.perf_counter()

        last_minute = max(0, round(duration / minute_s) - 1)

        def minute_of(t: float) -> Minute:  # answers that come after the end count in the last minute
            return minutes.setdefault(min(int((t - started) // minute_s), last_minute), Minute())

        def client_loop(seed: int) -> None:
            rng = random.Random(seed)
            client = Client(server.port, timeout_s=120)
            try:
                while time.perf_counter() - started < duration:
                    draw = rng.random()
                    if draw < HANG_UP_SHARE:
                        hang_up(server.port, random_clip(rng))
                        with lock:
                            minute_of(time.perf_counter()).statuses["hung up"] += 1
                        continue
                    body = rng.choice(bad) if draw < HANG_UP_SHARE + BAD_SHARE else random_clip(rng)
                    try:
                        reply = client.recognize(body)
                        status = str(reply.status)
                    except OSError as error:
                        reply, status = None, f"error: {type(error).__name__}"
                    with lock:
                        m = minute_of(time.perf_counter())
                        m.statuses[status] += 1
                        if reply is not None and reply.status == 200:
                            m.accepted_s.append(reply.seconds)
                        if reply is not None and reply.status == 503 and not reply.retry_after:
                            m.statuses["503 without Retry-After"] += 1
                    if reply is not None and reply.status == 503:
                        time.sleep(float(reply.retry_after or 1))
            finally:
                client.close()

        def sample_rss() -> None:  # cheap: one read of /proc/PID/status per sample
            current = None
            while (now := time.perf_counter()) - started < duration:
                rss_mb = server.rss_bytes("VmRSS") / MB
                with lock:
                    minute = minute_of(now)
                    if minute is not current:  # a new minute: the last one's peak, then a fresh one
                        if current is not None:
                            current.peak_mb = server.rss_bytes("VmHWM") / MB
                        server.reset_peak_rss()
                        current = minute
                    minute.rss_mb.append(rss_mb)
                    if now - started >= ramp_s:
                        minute.floor_mb.append(rss_mb)
                time.sleep(sample_s)
            if current is not None:
                current.peak_mb = server.rss_bytes("VmHWM") / MB

        threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(args.clients)]
        threads.append(threading.Thread(target=sample_rss, daemon=True))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        server.check_alive()
        idle_after = rss_samples(idle_s)  # the clients are done: nothing is queued or running
        server.check_alive()
    report(minutes, sample_s, ramp_s, idle_before, idle_after)


def hang_up(port: int, wav: bytes) -> None:
    """Send a whole request, then close the connection without reading the answer."""
    boundary = "soak"
    body = (
        (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="clip.wav"\r\n\r\n').encode()
        + wav
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /v1/recognize HTTP/1.1\r\nHost: {LOCALHOST}\r\nContent-Length: {len(body)}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
    ).encode()
    with socket.create_connection((LOCALHOST, port), timeout=10) as sock:
        sock.sendall(head + body)
        time.sleep(0.05)


def report(
    minutes: dict[int, Minute],
    sample_s: float,
    ramp_s: float,
    idle_before: list[float],
    idle_after: list[float],
) -> None:
    ordered = [minutes[k] for k in sorted(minutes)]
    rows = []
    for i, m in enumerate(ordered):
        p50 = percentile(m.accepted_s, 50)
        p99 = percentile(m.accepted_s, 99)
        rss = [f"{f(m.rss_mb):.0f}" if m.rss_mb else "-" for f in (median, max)]
        rows.append(
            [
                i + 1,
                ", ".join(f"{k}: {v}" for k, v in sorted(m.statuses.items())),
                f"{p50:.2f}",
                f"{p99:.2f}",
                f"{min(m.floor_mb):.0f}" if m.floor_mb else "-",
                *rss,
                f"{m.peak_mb:.0f}",
            ]
        )
    table(
        [
            "minute",
            "statuses",
            "p50 accepted (s)",
            "p99 accepted (s)",
            "RSS floor (MB)",
            "RSS median (MB)",
            "RSS max (MB)",
            "RSS peak (MB)",
        ],
        rows,
    )
    samples = sum(len(m.rss_mb) for m in ordered)
    print(
        f"RSS sampled every {sample_s:g} s ({samples} samples; minute 1's floor from {ramp_s:g} s on). "
        f"At idle: "
        f"{min(idle_before):.0f}-{max(idle_before):.0f} MB before the load, "
        f"{min(idle_after):.0f}-{max(idle_after):.0f} MB after it ({len(idle_after)} samples each side).\n"
    )
    total = sum((m.statuses for m in ordered), Counter())
    unexpected = {
        k: v
        for k, v in total.items()
        if not (k in ("200", "503", "hung up") or (k.isdigit() and 400 <= int(k) < 500))
    }
    with_rss = [m for m in ordered if m.floor_mb]
    growth = min(with_rss[-1].floor_mb) / min(with_rss[0].floor_mb) - 1 if len(with_rss) > 1 else float("nan")
    full = [m for m in ordered if m.accepted_s]
    p99_ratio = (
        percentile(full[-1].accepted_s, 99) / percentile(full[0].accepted_s, 99)
        if len(full) > 1
        else float("nan")
    )
    table(
        ["check", "value", "target"],
        [
            [
                "statuses: only 200, 4xx and 503 with Retry-After",
                str(unexpected or "none other"),
                "met" if not unexpected else "NOT met",
            ],
            [
                "RSS growth, first to last minute (per-minute floor)",
                f"{growth:+.3%}",
                verdict(growth, TARGETS["rss_growth"]),
            ],
            [
                "p99 accepted, last minute / first minute",
                f"{p99_ratio:.2f}",
                verdict(p99_ratio, TARGETS["p99_ratio"]),
            ],
        ],
    )
    print(f"{load_average()} at the end. Server log: .bench/serve/soak.log")


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as error:
        sys.exit(str(error))
