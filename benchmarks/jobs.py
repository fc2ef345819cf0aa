"""Jobs (/v1/jobs) against /v1/timeline on one `emoserve serve`, the same recording, the same options.

1. Throughput in audio seconds per second: a job from its POST to `succeeded` (upload, fsync, planning
   with the VAD, each segment scored and committed) against the timeline's one request, alternating,
   on the same server. Target: the job path costs <= 5% more (issue 26).
2. The cost of a resume: the server is killed (SIGKILL) at about half of a job and started again; the
   segments committed before the kill (kept), those the restarted server scored, and the seconds from
   the restart's ready to `succeeded` (the lease's 2 s and decoding up to the resume point included)
   against the seconds the first half took.
3. The store's size per hour of audio: jobs.sqlite3 (and its write-ahead log) after the jobs, per
   hour of recordings they scored (their audio is deleted when they end).
4. `/v1/recognize` p95 of a 5 s clip beside a draining backlog of jobs, against its idle p95 measured
   first on the same server. Target: <= 1.5x (issue 26).
"""

from __future__ import annotations

import json
import signal
import sqlite3
import tempfile
import time
from pathlib import Path

from common import (
    BENCH_HOME,
    Client,
    bench_model,
    clip_wav,
    free_port,
    header,
    median,
    parser,
    percentile,
    running_server,
    serve_argv,
    table,
    verdict,
)
from timeline import recording

JOBS_DIR = BENCH_HOME / "bench-jobs"
LEASE_S = 2.0
POLL_S = 0.25  # the client's look at a job: often enough for the figure, rare enough to cost nothing


def job_seconds(client: Client, body: bytes) -> tuple[float, str]:
    """(seconds from the POST to `succeeded`, the job's id)."""
    started = time.perf_counter()
    reply = client.request("POST", "/v1/jobs", body=body, headers={"Content-Type": "audio/wav"})
    assert reply.status == 202, reply.body
    job_id = reply.json()["id"]
    while (status := client.get(f"/v1/jobs/{job_id}").json())["status"] != "succeeded":
        assert status["status"] in ("queued", "running"), status
        time.sleep(POLL_S)
    return time.perf_counter() - started, job_id


def timeline_seconds(client: Client, body: bytes) -> float:
    reply = client.request("POST", "/v1/timeline", body=body, headers={"Content-Type": "audio/wav"})
    assert reply.status == 200, reply.body
    return reply.seconds


def server_argv(model: Path, port: int) -> list[str]:
    return serve_argv(
        model, port, "--no-ui", "--jobs-dir", str(JOBS_DIR), "--jobs-lease-s", str(LEASE_S),
        "--jobs-poll-s", "0.05", "--max-timeline-s", "7200", "--max-timeline-upload-mb", "1000",
    )  # fmt: skip


def throughput(model: Path, body: bytes, audio_s: float, runs: int) -> tuple[float, float, list[str]]:
    """(median timeline s, median job s, the jobs' ids)."""
    port = free_port()
    timelines, jobs, ids = [], [], []
    with running_server("jobs-throughput", server_argv(model, port), port) as server:
        server.wait_for("/readyz")
        client = Client(port, timeout_s=3600)
        timeline_seconds(client, body)  # warm: the first segments of each length
        for _ in range(runs):
            timelines.append(timeline_seconds(client, body))
            seconds, job_id = job_seconds(client, body)
            jobs.append(seconds)
            ids.append(job_id)
        client.close()
    return median(timelines), median(jobs), ids


def resume_cost(model: Path, body: bytes) -> tuple[int, int, int, float, float]:
    """(segments, committed before the kill, scored after the restart, s to finish after the restart's
    ready, s the first half took before the kill)."""
    port = free_port()
    with running_server("jobs-resume-1", server_argv(model, port), port) as server:
        server.wait_for("/readyz")
        client = Client(port, timeout_s=3600)
        reply = client.request("POST", "/v1/jobs", body=body, headers={"Content-Type": "audio/wav"})
        job_id = reply.json()["id"]
        started = None
        while (progress := client.get(f"/v1/jobs/{job_id}").json()["progress"])["percent"] < 50:
            if started is None and progress["segments_done"]:
                started = time.perf_counter()
            time.sleep(0.05)
        first_half_s = time.perf_counter() - (started or time.perf_counter())
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(30)
        client.close()
    db = JOBS_DIR / "jobs.sqlite3"
    with sqlite3.connect(db) as conn:
        committed = conn.execute("SELECT COUNT(*) FROM job_scored WHERE job_id = ?", (job_id,)).fetchone()[0]
    with running_server("jobs-resume-2", server_argv(model, port), port) as server:
        server.wait_for("/readyz")
        ready = time.perf_counter()
        client = Client(port, timeout_s=3600)
        while (status := client.get(f"/v1/jobs/{job_id}").json())["status"] != "succeeded":
            time.sleep(POLL_S)
        after_s = time.perf_counter() - ready
        client.close()
    total = status["progress"]["segments_total"]
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT attempt, COUNT(*) FROM job_scored WHERE job_id = ? GROUP BY attempt", (job_id,)
        )
        by_attempt = dict(rows.fetchall())
    assert by_attempt.get(1, 0) == committed and sum(by_attempt.values()) == total
    return total, committed, by_attempt.get(2, 0), after_s, first_half_s


def latency_beside_jobs(model: Path, body: bytes, calls: int) -> tuple[float, float, int]:
    """(idle p95 s, p95 s while jobs drain, jobs' segments committed meanwhile)."""
    port = free_port()
    clip = clip_wav(5.0)
    with running_server("jobs-latency", server_argv(model, port), port) as server:
        server.wait_for("/readyz")
        client = Client(port, timeout_s=600)
        for _ in range(2):
            client.recognize(clip)  # warm
        idle = [client.recognize(clip).seconds for _ in range(calls)]
        headers = {"Content-Type": "audio/wav"}
        ids = [client.request("POST", "/v1/jobs", body=body, headers=headers).json()["id"] for _ in range(3)]

        def committed() -> int:
            return sum(client.get(f"/v1/jobs/{i}").json()["progress"]["segments_done"] for i in ids)

        while committed() < 2:  # the backlog is draining: segments are being scored
            server.check_alive()
            time.sleep(POLL_S)
        before = committed()
        busy = []
        for _ in range(calls):
            reply = client.recognize(clip)
            assert reply.status == 200, reply.body
            busy.append(reply.seconds)
        during = committed() - before
        client.close()
    return percentile(idle, 95), percentile(busy, 95), during


def store_bytes() -> int:
    return sum(p.stat().st_size for p in JOBS_DIR.glob("jobs.sqlite3*"))


SECTIONS = ("throughput", "resume", "latency")


def main() -> None:
    p = parser(__doc__, default_runs=3)
    p.add_argument("--minutes", type=float, default=10.0, help="length of the recording (default 10)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"a subset of {','.join(SECTIONS)}")
    args = p.parse_args()
    sections = set(args.sections.split(","))
    runs = 1 if args.quick else args.runs
    minutes = 1.0 if args.quick else args.minutes
    header("Jobs against /v1/timeline", args, runs)
    work = Path(tempfile.gettempdir()) / "emoserve-bench-timeline"
    work.mkdir(exist_ok=True)
    model = bench_model(args.preset).entry
    body = recording(work / f"{minutes:g}min.wav", minutes).read_bytes()
    audio_s = minutes * 60
    for old in JOBS_DIR.glob("jobs.sqlite3*"):
        old.unlink()

    figures: dict[str, float] = {}
    if "throughput" in sections:
        timeline_s, job_s, _ = throughput(model, body, audio_s, runs)
        ratio = job_s / timeline_s
        table(
            ["path", f"seconds for {minutes:g} min (median of {runs})", "audio s per s"],
            [
                ["/v1/timeline", f"{timeline_s:.2f}", f"{audio_s / timeline_s:.1f}"],
                ["/v1/jobs (POST to succeeded)", f"{job_s:.2f}", f"{audio_s / job_s:.1f}"],
            ],
        )
        print(f"job / timeline: {ratio:.3f} ({verdict(ratio, 1.05)})\n")
        jobs_scored = runs
        size = store_bytes()
        print(f"store: {size / 1e6:.2f} MB after {jobs_scored} jobs of {minutes:g} min: "
              f"{size / 1e6 / (jobs_scored * minutes / 60):.2f} MB per hour of audio\n")  # fmt: skip

        figures["job_over_timeline"] = round(ratio, 4)

    if "resume" in sections:
        total, committed, after, after_s, first_half_s = resume_cost(model, body)
        table(
            ["segments", "committed before SIGKILL (kept)", "scored after the restart",
             "restart's ready -> done s", "the first half took s"],
            [[total, committed, after, f"{after_s:.2f}", f"{first_half_s:.2f}"]],
        )  # fmt: skip
        figures["resume_overhead_s"] = round(after_s - first_half_s, 2)

    if "latency" in sections:
        idle, busy, during = latency_beside_jobs(model, body, 5 if args.quick else 20)
        table(
            ["/v1/recognize 5 s clip", "p95 s"],
            [["idle", f"{idle:.3f}"], [f"3 jobs draining ({during} segments meanwhile)", f"{busy:.3f}"]],
        )
        print(f"beside jobs / idle: {busy / idle:.2f} ({verdict(busy / idle, 1.5)})\n")
        figures["recognize_p95_beside_jobs_over_idle"] = round(busy / idle, 3)

    print(json.dumps(figures))


if __name__ == "__main__":
    main()
