"""Latency and real-time factor, one clip at a time, on the CPU.

For clips of 1, 5, 15 and 30 s (deterministic synthetic signals) through `Recognizer.predict((array,
16000))`: one untimed warm-up call per length, then the median of N timed calls. The real-time factor is
processing time / audio duration (below 1 = faster than real time). The baseline, measured in the same
run, is the 1 s clip: the other rows give their time per second of audio relative to it, which shows how
far the cost grows faster than the audio (attention is quadratic in frames, spec section 6).
"""

from __future__ import annotations

from functools import partial

from common import (
    bench_model,
    header,
    load_average,
    load_recognizer,
    median,
    parser,
    run_count,
    synthetic_clip,
    table,
    timed,
    torch_threads,
)

CLIP_SECONDS = (1.0, 5.0, 15.0, 30.0)


def main() -> None:
    args = parser(__doc__, default_runs=5).parse_args()
    runs = run_count(args)
    header("Latency and real-time factor", args, runs)
    model = bench_model(args.preset)
    recognizer = load_recognizer(model.entry)
    medians: dict[float, float] = {}
    spreads: dict[float, tuple[float, float]] = {}
    for seconds in CLIP_SECONDS:
        clip = (synthetic_clip(seconds, seed=int(seconds)), 16_000)
        recognizer.predict(clip)  # warm-up: this length's first call is not counted
        times = [timed(partial(recognizer.predict, clip)) for _ in range(runs)]
        medians[seconds], spreads[seconds] = median(times), (min(times), max(times))
    base_rtf = medians[CLIP_SECONDS[0]] / CLIP_SECONDS[0]
    headers = ["clip (s)", "median latency (s)", "min-max (s)", "real-time factor", "RTF / RTF at 1 s"]
    table(headers, [
        [f"{s:g}", f"{medians[s]:.3f}", f"{spreads[s][0]:.3f}-{spreads[s][1]:.3f}", f"{medians[s] / s:.3f}",
         f"{medians[s] / s / base_rtf:.2f}"]
        for s in CLIP_SECONDS
    ])
    print(f"Torch threads: {torch_threads()}. {load_average()} at the end.")
    print("No target is set for this benchmark; it documents the cost.")


if __name__ == "__main__":
    main()
