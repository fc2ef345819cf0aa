"""Latency and real-time factor, one clip at a time, on the CPU, for each backend.

For clips of 1, 5, 15 and 30 s (deterministic synthetic signals) through `Recognizer.predict((array,
16000))` on three recognizers of the same entry: torch (float32), onnx (float32, ONNX Runtime) and onnx
int8 (dynamically quantized matmuls). Per clip length each backend gets one untimed warm-up call, then the
median of N timed calls; the order of the backends rotates from length to length. The real-time factor is
processing time / audio duration (below 1 = faster than real time). Baselines, measured in the same run:
the torch backend for the onnx ratios, and the 1 s clip for how far the cost grows faster than the audio
(attention is quadratic in frames, spec section 6). int8's score deltas are against onnx float32 on the
same clips.
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
    verdict,
)

CLIP_SECONDS = (1.0, 5.0, 15.0, 30.0)
BACKENDS = {"torch": ("torch", "float32"), "onnx": ("onnx", "float32"), "onnx int8": ("onnx", "int8")}
TARGETS = {5.0: 0.6, 15.0: 0.6}  # onnx / torch steady latency (issue: ONNX Runtime backend)


def main() -> None:
    args = parser(__doc__, default_runs=5).parse_args()
    runs = run_count(args)
    header("Latency and real-time factor", args, runs)
    model = bench_model(args.preset)
    recognizers = {name: load_recognizer(model.entry, *options) for name, options in BACKENDS.items()}
    medians: dict[str, dict[float, float]] = {name: {} for name in BACKENDS}
    spreads: dict[str, dict[float, tuple[float, float]]] = {name: {} for name in BACKENDS}
    deltas: list[float] = []
    names = list(BACKENDS)
    for i, seconds in enumerate(CLIP_SECONDS):
        clip = (synthetic_clip(seconds, seed=int(seconds)), 16_000)
        results = {}
        for name in names[i % len(names) :] + names[: i % len(names)]:
            recognizer = recognizers[name]
            results[name] = recognizer.predict(clip)  # warm-up: this length's first call is not counted
            times = [timed(partial(recognizer.predict, clip)) for _ in range(runs)]
            medians[name][seconds], spreads[name][seconds] = median(times), (min(times), max(times))
        deltas.append(max(abs(results["onnx int8"].scores[k] - v) for k, v in results["onnx"].scores.items()))
    for name in BACKENDS:
        base_rtf = medians[name][CLIP_SECONDS[0]] / CLIP_SECONDS[0]
        print(f"**{name}**\n")
        headers = ["clip (s)", "median latency (s)", "min-max (s)", "real-time factor", "RTF / RTF at 1 s"]
        table(
            headers,
            [
                [
                    f"{s:g}",
                    f"{medians[name][s]:.3f}",
                    f"{spreads[name][s][0]:.3f}-{spreads[name][s][1]:.3f}",
                    f"{medians[name][s] / s:.3f}",
                    f"{medians[name][s] / s / base_rtf:.2f}",
                ]
                for s in CLIP_SECONDS
            ],
        )
    rows = []
    for s in CLIP_SECONDS:
        onnx_ratio = medians["onnx"][s] / medians["torch"][s]
        rows.append(
            [
                f"{s:g}",
                f"{onnx_ratio:.3f}",
                verdict(onnx_ratio, TARGETS[s]) if s in TARGETS else "-",
                f"{medians['onnx int8'][s] / medians['torch'][s]:.3f}",
            ]
        )
    table(["clip (s)", "onnx / torch", "target", "int8 / torch"], rows)
    print(
        f"int8 vs onnx float32, largest score difference per clip: {', '.join(f'{d:.2e}' for d in deltas)} "
        "(random weights: real weights may differ; see `emoserve info`)."
    )
    print(
        f"Threads: torch {torch_threads()}, onnx {recognizers['onnx'].backend.threads}. "
        f"{load_average()} at the end."
    )


if __name__ == "__main__":
    main()
