"""Long recordings: the timeline's costs on the CPU.

Speech-and-pause recordings are built from the bundled example clips (espeak speech, 3-7 s) separated by
pauses of 0.5-3 s with low noise, written block by block. Four measurements:

1. VAD: decode + silero-vad + segmentation (`Recording.segments()`) over a 10-minute recording, as
   seconds per hour of audio.
2. Real-time factor of the whole pipeline (`Recognizer.timeline`: decode, VAD, segments scored in groups
   through predict_many) on 10 and 60 minutes, against the baseline measured in the same run: the sum of
   one-at-a-time `predict()` calls on the very same segments. Target: the pipeline is no slower.
3. Peak RSS of `emoserve predict FILE --segments` (a fresh process each) on 3, 30 and 180 minutes.
   Target: growth <= 20 MB from 3 to 180 minutes (issue 16). It runs on the tiny preset: the model's
   memory does not depend on the file, and the large model would need hours on 180 minutes of 2 cores.
4. Latency of a 5 s `/v1/recognize` on an `emoserve serve` while a 30-minute timeline streams on the
   same server, against its idle latency measured first on that server. Target: <= 3x.
5. Throughput (issue 23): the whole `Recognizer.timeline` of the 10-minute recording, in audio seconds
   per second, on the default (`--dtype auto --backend auto`) against onnx float32 (the default before),
   the two alternating, medians of --runs.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import (
    BENCH_HOME,
    LOCALHOST,
    Client,
    bench_model,
    clip_wav,
    free_port,
    header,
    load_average,
    load_recognizer,
    median,
    parser,
    running_server,
    serve_argv,
    synthetic_clip,
    table,
    timed,
    verdict,
)

SAMPLE_RATE = 16_000
TARGETS = {"pipeline_ratio": 1.0, "rss_growth_mb": 20.0, "latency_ratio": 3.0}  # rss: issue 16
LATENCY_CALLS = 7


def recording(path: Path, minutes: float, seed: int = 0) -> Path:
    """Speech (the bundled examples, in a shuffled order) and pauses of 0.5-3 s, with low noise."""
    import numpy as np
    import soundfile as sf

    from emoserve.audio.decode import load_audio
    from emoserve.constants import EXAMPLES_DIR

    if path.is_file() and path.stat().st_size > 0:
        return path
    clips = [
        load_audio(p).samples for p in sorted(EXAMPLES_DIR.iterdir()) if p.suffix in (".wav", ".flac", ".mp3")
    ]
    rng = np.random.default_rng(seed)
    total = int(minutes * 60 * SAMPLE_RATE)
    tmp = path.with_suffix(".part.wav")
    with sf.SoundFile(tmp, "w", SAMPLE_RATE, 1, subtype="PCM_16") as out:
        written = 0
        while written < total:
            pause = np.zeros(int(rng.uniform(0.5, 3.0) * SAMPLE_RATE), np.float32)
            piece = np.concatenate([pause, clips[rng.integers(len(clips))]])[: total - written]
            out.write(piece + rng.normal(0, 1e-3, len(piece)).astype(np.float32))
            written += len(piece)
    tmp.rename(path)
    return path


def vad_cost(path: Path, minutes: float) -> tuple[float, int]:
    from emoserve.audio.segments import Recording

    started = time.perf_counter()
    n = sum(1 for _ in Recording(path).segments())
    seconds = time.perf_counter() - started
    return seconds * 60 / minutes, n


def pipeline_vs_one_at_a_time(recognizer: Any, path: Path) -> tuple[float, float, float, int, float]:
    """(pipeline s, one-at-a-time s, of which decode + VAD s, segments, audio s).

    The scoring is timed group by group, as `score_segments` groups them (8 segments, `predict_many`),
    and each group is also scored one `predict()` at a time right beside it, alternating which goes
    first: load that comes and goes on a shared machine then falls on both sides alike. Both sides
    include the decode + VAD time of the file, measured once."""
    from emoserve.audio.segments import Recording
    from emoserve.inference.timeline import TIMELINE_BATCH_SIZE

    started = time.perf_counter()
    job = Recording(path)
    segments = list(job.segments())
    vad_s = time.perf_counter() - started
    batched_s = alone_s = 0.0
    for n, at in enumerate(range(0, len(segments), TIMELINE_BATCH_SIZE)):
        clips = [job.clip(s) for s in segments[at : at + TIMELINE_BATCH_SIZE]]

        def batched(clips: list[Any] = clips) -> None:
            recognizer.predict_many(clips, batch_size=len(clips))

        def alone(clips: list[Any] = clips) -> None:
            for clip in clips:
                recognizer.predict(clip)

        first, second = (batched, alone) if n % 2 == 0 else (alone, batched)
        t_first, t_second = timed(first), timed(second)
        batched_s += t_first if first is batched else t_second
        alone_s += t_second if first is batched else t_first
    return vad_s + batched_s, vad_s + alone_s, vad_s, len(segments), job.duration_s


def throughput(entry: Path, path: Path, runs: int) -> None:
    """The whole timeline of `path` on the default and on onnx float32, alternating: audio s per s."""
    recognizers = {
        "default (auto)": load_recognizer(entry, backend="auto", dtype="auto"),
        "onnx float32": load_recognizer(entry, backend="onnx", dtype="float32"),
    }
    seconds: dict[str, list[float]] = {name: [] for name in recognizers}
    audio_s = 0.0
    for run in range(runs):
        order = list(recognizers) if run % 2 == 0 else list(reversed(recognizers))
        for name in order:
            started = time.perf_counter()
            timeline = recognizers[name].timeline(path)
            seconds[name].append(time.perf_counter() - started)
            audio_s = timeline.duration_s
    rows = []
    for name, rec in recognizers.items():
        took = median(seconds[name])
        rows.append([name, f"{rec.backend.name} {rec.dtype}", f"{took:.1f}", f"{audio_s / took:.1f}"])
    table(["", "runtime", "seconds (median)", "audio s per s"], rows)
    ratio = median(seconds["default (auto)"]) / median(seconds["onnx float32"])
    print(f"Timeline of {audio_s / 60:.0f} min: default / onnx float32 = {ratio:.3f} (time).\n")


def peak_rss_mb(model: Path, path: Path) -> tuple[float, float]:
    """(peak RSS MB, seconds) of `emoserve predict PATH --segments` in its own process: VmHWM of its own
    memory (ru_maxrss would carry the parent's high-water mark across fork and exec)."""
    code = (
        "import sys; from emoserve.cli import main; code = main(sys.argv[1:]); "
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
        "print(int(hwm) * 1024 / 1e6, file=sys.stderr); sys.exit(code)"
    )
    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "predict",
            str(path),
            "--segments",
            "--model",
            str(model),
            "-o",
            "/dev/null",
            "--format",
            "jsonl",
        ],
        env={"EMOSERVE_HOME": str(BENCH_HOME), "PATH": "/usr/bin:/bin"},
        stderr=subprocess.PIPE,
        text=True,
        check=True,
    )
    return float(done.stderr.strip().splitlines()[-1]), time.perf_counter() - started


def latency_beside_a_timeline(model: Path, path: Path, calls: int) -> tuple[float, float, int]:
    """(idle median s, median s while the timeline streams, timeline segments received meanwhile)."""
    port = free_port()
    clip = clip_wav(5.0)
    with running_server("timeline-latency", serve_argv(model, port, "--no-ui"), port) as server:
        server.wait_for("/readyz")
        client = Client(port)
        for _ in range(2):
            client.recognize(clip)  # warm: the first calls of a shape are not what we measure
        idle = [client.recognize(clip).seconds for _ in range(calls)]
        received = []
        conn = http.client.HTTPConnection(LOCALHOST, port, timeout=600)

        def stream() -> None:
            try:
                with path.open("rb") as body:
                    conn.request(
                        "POST",
                        "/v1/timeline",
                        body=body,
                        headers={"Accept": "application/x-ndjson", "Content-Type": "audio/wav"},
                    )
                    for line in conn.getresponse():
                        received.append(json.loads(line))
            except (OSError, AttributeError, http.client.HTTPException):
                pass  # we hung up (http.client reads from a closed socket as AttributeError)

        thread = threading.Thread(target=stream, daemon=True)
        thread.start()
        while len(received) < 2:  # the timeline is running: segments are being scored
            server.check_alive()
            time.sleep(0.05)
        busy = []
        for _ in range(calls):
            reply = client.recognize(clip)
            assert reply.status == 200, reply.body
            busy.append(reply.seconds)
        during = len(received)
        conn.close()  # hang up: the rest of the timeline is cancelled
        client.close()
    return median(idle), median(busy), during


SECTIONS = ("vad", "pipeline", "rss", "latency", "throughput")


def main() -> None:
    p = parser(__doc__, default_runs=1)
    p.add_argument("--skip-60", action="store_true", help="leave out the 60-minute pipeline run")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"a subset of {','.join(SECTIONS)}")
    args = p.parse_args()
    sections = set(args.sections.split(","))
    header("Long recordings: the timeline", args, 1)
    quick = args.quick
    work = Path(tempfile.gettempdir()) / "emoserve-bench-timeline"
    work.mkdir(exist_ok=True)
    model = bench_model(args.preset)

    if "throughput" in sections:
        throughput(
            model.entry,
            recording(work / f"{1.0 if quick else 10.0:g}min.wav", 1.0 if quick else 10.0),
            args.runs,
        )

    if "vad" in sections:
        minutes = 1.0 if quick else 10.0
        per_hour, segments = vad_cost(recording(work / f"{minutes:g}min.wav", minutes), minutes)
        print(
            f"**VAD**: decode + silero-vad + segmentation of {minutes:g} min ({segments} segments): "
            f"{per_hour:.1f} s per hour of audio ({3600 / per_hour:.0f}x real time).\n"
        )

    if "pipeline" in sections:
        recognizer = load_recognizer(model.entry, backend="auto")
        recognizer.predict((synthetic_clip(5.0), SAMPLE_RATE))  # warm: the first call is not measured
        rows = []
        for m in [1.0] if quick else [10.0] + ([] if args.skip_60 else [60.0]):
            pipeline_s, alone_s, vad_s, n, audio_s = pipeline_vs_one_at_a_time(
                recognizer, recording(work / f"{m:g}min.wav", m)
            )
            ratio = pipeline_s / alone_s
            rows.append(
                [
                    f"{m:g}",
                    n,
                    f"{vad_s:.1f}",
                    f"{pipeline_s:.1f}",
                    f"{pipeline_s / audio_s:.3f}",
                    f"{alone_s:.1f}",
                    f"{ratio:.3f}",
                    verdict(ratio, TARGETS["pipeline_ratio"]),
                ]
            )
        print(
            f"**Pipeline** ({args.preset}, {recognizer.backend.name} backend; both sides include the "
            "decode + VAD seconds):\n"
        )
        table(
            [
                "minutes",
                "segments",
                "decode + VAD (s)",
                "pipeline (s)",
                "RTF",
                "one-at-a-time (s)",
                "pipeline / one-at-a-time",
                "target",
            ],
            rows,
        )

    if "rss" in sections:
        tiny = bench_model("tiny")
        rss = []
        for m in [0.5, 3.0] if quick else [3.0, 30.0, 180.0]:
            peak, seconds = peak_rss_mb(tiny.entry, recording(work / f"{m:g}min.wav", m))
            rss.append((m, peak, seconds))
        growth = rss[-1][1] - rss[0][1]
        print("**Peak RSS** of `emoserve predict FILE --segments` (tiny preset, a fresh process each):\n")
        table(
            ["minutes", "peak RSS (MB)", "wall (s)"], [[f"{m:g}", f"{p:.0f}", f"{s:.1f}"] for m, p, s in rss]
        )
        print(
            f"Growth from {rss[0][0]:g} to {rss[-1][0]:g} min: {growth:+.0f} MB "
            f"(target {verdict(growth, TARGETS['rss_growth_mb'])}, MB).\n"
        )

    if "latency" in sections:
        minutes = 3.0 if quick else 30.0
        long = recording(work / f"{minutes:g}min.wav", minutes)
        idle, busy, during = latency_beside_a_timeline(model.entry, long, 2 if quick else LATENCY_CALLS)
        ratio = busy / idle
        print(
            f"**5 s /v1/recognize beside a {minutes:g}-minute timeline** ({args.preset}): "
            f"idle median {idle:.3f} s, during the timeline {busy:.3f} s ({during} segments streamed "
            f"meanwhile): {ratio:.2f}x (target {verdict(ratio, TARGETS['latency_ratio'])}).\n"
        )
    print(f"{load_average()} at the end.")


if __name__ == "__main__":
    main()
