"""Latency and real-time factor, one clip at a time, on the CPU, for each backend and precision.

For clips of 1, 5, 15 and 30 s (deterministic synthetic signals) through `Recognizer.predict((array,
16000))` on recognizers of the same entry: torch, onnx (ONNX Runtime) and openvino (OpenVINO) at float32,
onnx int8 (dynamically quantized matmuls), and, where the CPU has native bf16 (amx_bf16 or avx512_bf16),
openvino and torch at bfloat16. Per clip length each one gets one untimed warm-up call, then the median of
N timed calls; the order rotates from length to length. The real-time factor is processing time / audio
duration (below 1 = faster than real time). Baselines, measured in the same run: the torch backend for
the onnx ratios, onnx float32 (the default before `--dtype auto`) for the openvino and bf16 ratios, and
the 1 s clip for how far the cost grows faster than the audio (attention is quadratic in frames, spec
section 6). The score deltas of int8 and bf16 are against onnx float32 on the same clips.
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
from emoserve.inference.precision import native_bf16

CLIP_SECONDS = (1.0, 5.0, 15.0, 30.0)
BACKENDS = {
    "torch": ("torch", "float32"),
    "onnx": ("onnx", "float32"),
    "onnx int8": ("onnx", "int8"),
    "openvino": ("openvino", "float32"),
}
BF16_BACKENDS = {"openvino bf16": ("openvino", "bfloat16"), "torch bf16": ("torch", "bfloat16")}
TARGETS = {5.0: 0.6, 15.0: 0.6}  # onnx / torch steady latency (issue: ONNX Runtime backend)
DEFAULT_TARGET = 0.5  # the new default / onnx float32 on a 5 s clip (issue 23)


def main() -> None:
    args = parser(__doc__, default_runs=5).parse_args()
    runs = run_count(args)
    header("Latency and real-time factor", args, runs)
    model = bench_model(args.preset)
    flag = native_bf16()
    backends = BACKENDS | (BF16_BACKENDS if flag else {})
    recognizers = {name: load_recognizer(model.entry, *options) for name, options in backends.items()}
    medians: dict[str, dict[float, float]] = {name: {} for name in backends}
    spreads: dict[str, dict[float, tuple[float, float]]] = {name: {} for name in backends}
    lower = [name for name in backends if name not in ("torch", "onnx", "openvino")]
    deltas: dict[str, list[float]] = {name: [] for name in lower}
    names = list(backends)
    for i, seconds in enumerate(CLIP_SECONDS):
        clip = (synthetic_clip(seconds, seed=int(seconds)), 16_000)
        results = {}
        for name in names[i % len(names) :] + names[: i % len(names)]:
            recognizer = recognizers[name]
            results[name] = recognizer.predict(clip)  # warm-up: this length's first call is not counted
            times = [timed(partial(recognizer.predict, clip)) for _ in range(runs)]
            medians[name][seconds], spreads[name][seconds] = median(times), (min(times), max(times))
        for name in lower:
            deltas[name].append(
                max(abs(results[name].scores[k] - v) for k, v in results["onnx"].scores.items())
            )
    for name in backends:
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
    others = [name for name in backends if name not in ("torch", "onnx")]
    rows = [
        [f"{s:g}", *(f"{medians[name][s] / medians['onnx'][s]:.3f}" for name in others)] for s in CLIP_SECONDS
    ]
    print("Against onnx float32 (the default before `--dtype auto`), same run:\n")
    table(["clip (s)", *(f"{name} / onnx" for name in others)], rows)
    default = load_recognizer(model.entry, "auto", "auto")
    chosen = next(
        (name for name, options in backends.items() if options == (default.backend.name, default.dtype)), "?"
    )
    ratio = medians[chosen][5.0] / medians["onnx"][5.0] if chosen != "?" else float("nan")
    print(
        f"The new default here (`--dtype auto --backend auto`): {chosen} ({default.reason}). "
        f"5 s clip: {ratio:.3f} x onnx float32, {verdict(ratio, DEFAULT_TARGET)}.\n"
    )
    for name in lower:
        print(
            f"{name} vs onnx float32, largest score difference per clip: "
            f"{', '.join(f'{d:.2e}' for d in deltas[name])}"
        )
    print("(random weights: real weights may differ; see `emoserve info`).")
    print(f"Native bf16: {flag or 'none (no bf16 columns)'}.")
    print(
        f"Threads: torch {torch_threads()}, onnx {recognizers['onnx'].backend.threads}, "
        f"openvino {recognizers['openvino'].backend.threads}. "
        f"{load_average()} at the end."
    )


if __name__ == "__main__":
    main()
