"""Batching: one `predict_many` call against the same clips one at a time, on the CPU.

On the onnx backend by default (`--backend torch` for the other). Eight clips of mixed length (uniform
in 1-15 s, fixed seed, deterministic synthetic signals) are scored as one
`Recognizer.predict_many(clips, batch_size=8)` call and, as the baseline in the same run, by 8
`Recognizer.predict` calls in a row. After one untimed warm-up of each, the two alternate (which goes
first swaps every run) and each figure is the median of N runs. Target: the batch is no slower than
one at a time on this CPU (ratio <= 1.0).

A padded batch computes on padding too: the waste is reported as padded / real samples (the conv
encoder and linear layers, linear in length) and padded / real attention cells (quadratic in frames),
from the forward passes `predict_many` really made. A control without padding (4 clips of exactly 5 s)
shows what batching itself gains on this machine, with no target.

The other way to use both cores for two clips at once: `--side-by-side` also scores the control clips
with two one-thread recognizers (one per core, the weights shared through the page cache), each on its
own thread taking half of the clips, against the same baseline (one at a time, one recognizer with a
thread per core). It is what "an engine worker per core" would give, with no target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common import (
    SAMPLE_RATE,
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

BATCH_SIZE = 8
MIXED_CLIPS, MIXED_SECONDS, SEED = 8, (1.0, 15.0), 0
CONTROL_CLIPS, CONTROL_SECONDS = 4, 5.0
TARGET = 1.0  # batch time / one-at-a-time time, mixed clips


@dataclass(frozen=True)
class Comparison:
    lengths: list[int]  # samples per clip
    batch_s: list[float]  # one predict_many call, per run
    single_s: list[float]  # the predict calls in a row, per run
    passes: list[list[int]]  # real lengths in each forward pass predict_many made
    difference: float  # largest |batched - one at a time| score


def main() -> None:
    p = parser(__doc__, default_runs=5)
    p.add_argument(
        "--backend",
        choices=("onnx", "openvino", "torch"),
        default="onnx",
        help="the backend measured (default onnx)",
    )
    p.add_argument(
        "--dtype", default="float32", help="its precision (default float32; bfloat16 on openvino or torch)"
    )
    p.add_argument(
        "--side-by-side",
        action="store_true",
        help="also: the control clips on two one-thread recognizers at once (see above)",
    )
    args = p.parse_args()
    runs = run_count(args)
    header(f"Batching: predict_many vs one at a time ({args.backend} backend, {args.dtype})", args, runs)
    entry = bench_model(args.preset).entry
    recognizer = load_recognizer(entry, backend=args.backend, dtype=args.dtype)
    mixed = compare(recognizer, mixed_clips(), runs)
    control = compare(recognizer, control_clips(), runs)
    config = recognizer.info.config
    report(mixed, f"{MIXED_CLIPS} mixed clips", config)
    report(control, f"control: {CONTROL_CLIPS} x {CONTROL_SECONDS:g} s, no padding", config)
    rows = [
        ["batch / one at a time, mixed clips", f"{ratio(mixed):.3f}", verdict(ratio(mixed), TARGET)],
        ["batch / one at a time, control", f"{ratio(control):.3f}", "none (control)"],
    ]
    if args.side_by_side:
        workers = [
            load_recognizer(entry, backend=args.backend, dtype=args.dtype, threads=1) for _ in range(2)
        ]
        side, single = side_by_side(recognizer, workers, control_clips(), runs)
        print("## control clips on two one-thread recognizers side by side\n")
        audio_s = CONTROL_CLIPS * CONTROL_SECONDS
        table(
            ["", "median (s)", "min-max (s)", "audio s / s"],
            [
                ["2 threads x 1-thread recognizer", *figures(side, audio_s)],
                ["one at a time (baseline)", *figures(single, audio_s)],
            ],
        )
        rows.append(
            [
                "side by side / one at a time, control",
                f"{median(side) / median(single):.3f}",
                "none (control)",
            ]
        )
    table(["figure", "value", "target"], rows)
    threads = recognizer.backend.threads if args.backend != "torch" else torch_threads()
    print(f"Backend: {recognizer.backend.name}, {threads} threads. {load_average()} at the end.")


def ratio(c: Comparison) -> float:
    return median(c.batch_s) / median(c.single_s)


def mixed_clips() -> list[tuple[Any, int]]:
    import numpy as np

    seconds = np.random.default_rng(SEED).uniform(*MIXED_SECONDS, size=MIXED_CLIPS)
    return [(synthetic_clip(float(s), seed=i), SAMPLE_RATE) for i, s in enumerate(seconds)]


def control_clips() -> list[tuple[Any, int]]:
    return [(synthetic_clip(CONTROL_SECONDS, seed=i), SAMPLE_RATE) for i in range(CONTROL_CLIPS)]


def side_by_side(
    recognizer: Any, workers: list[Any], clips: list[tuple[Any, int]], runs: int
) -> tuple[list[float], list[float]]:
    """Seconds for `clips` split between `workers` (each on its own thread) and, alternating, one at a
    time on `recognizer`; after one untimed round of each."""
    from concurrent.futures import ThreadPoolExecutor

    halves = [clips[i :: len(workers)] for i in range(len(workers))]

    def both() -> None:
        with ThreadPoolExecutor(len(workers)) as pool:
            list(pool.map(one_at_a_time, workers, halves))

    both()
    one_at_a_time(recognizer, clips)
    return alternate(both, lambda: one_at_a_time(recognizer, clips), runs)


def one_at_a_time(recognizer: Any, clips: list[tuple[Any, int]]) -> list[Any]:
    return [recognizer.predict(clip) for clip in clips]


def alternate(
    first: Callable[[], Any], second: Callable[[], Any], runs: int
) -> tuple[list[float], list[float]]:
    """Seconds of each call over `runs` rounds, which goes first swapping every round."""
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(runs):
        order = [(times[0], first), (times[1], second)]
        for seconds, fn in order if i % 2 == 0 else order[::-1]:
            seconds.append(timed(fn))
    return times


def compare(recognizer: Any, clips: list[tuple[Any, int]], runs: int) -> Comparison:
    def batched() -> list[Any]:
        return list(recognizer.predict_many(clips, batch_size=BATCH_SIZE))

    passes, batch_results = spy_forward_passes(recognizer, batched)  # also the warm-up of both
    difference = max(
        abs(a.scores[k] - b.scores[k])
        for a, b in zip(batch_results, one_at_a_time(recognizer, clips), strict=True)
        for k in a.scores
    )
    batch_s, single_s = alternate(batched, lambda: one_at_a_time(recognizer, clips), runs)
    return Comparison([len(c[0]) for c in clips], batch_s, single_s, passes, difference)


def spy_forward_passes(recognizer: Any, call: Callable[[], list[Any]]) -> tuple[list[list[int]], list[Any]]:
    """The real lengths (samples) of each forward pass `call` makes, seen by spying on
    `Recognizer.predict_batch`, so the padding figures follow whatever grouping the product does."""
    passes: list[list[int]] = []
    original = recognizer.predict_batch

    def spy(batch: list[Any], *args: Any, **kwargs: Any) -> Any:
        passes.append([len(clip.samples) for clip in batch])
        return original(batch, *args, **kwargs)

    recognizer.predict_batch = spy
    try:
        results = call()
    finally:
        del recognizer.predict_batch
    return passes, results


def report(c: Comparison, title: str, config: Any) -> None:
    audio_s = sum(c.lengths) / SAMPLE_RATE
    print(f"## {title}\n")
    print(f"Clips (s): {', '.join(f'{n / SAMPLE_RATE:.2f}' for n in c.lengths)}; {audio_s:.1f} s of audio.\n")
    table(
        ["", "median (s)", "min-max (s)", "audio s / s"],
        [
            [f"predict_many(batch_size={BATCH_SIZE}), 1 call", *figures(c.batch_s, audio_s)],
            [f"predict x {len(c.lengths)} (baseline)", *figures(c.single_s, audio_s)],
        ],
    )
    sizes = ", ".join(str(len(p)) for p in c.passes)
    print(f"predict_many made {len(c.passes)} forward pass(es), of {sizes} clips (length-sorted groups).")
    print(
        f"Padding waste: padded / real samples = {padding(c.passes, lambda n: n):.2f}; padded / real "
        f"attention cells (tokens^2) = {padding(c.passes, lambda n: tokens(config, n) ** 2):.2f}."
    )
    print(f"Largest |batched - one at a time| score difference: {c.difference:.2e}.\n")


def figures(times: list[float], audio_s: float) -> list[str]:
    return [f"{median(times):.3f}", f"{min(times):.3f}-{max(times):.3f}", f"{audio_s / median(times):.1f}"]


def padding(passes: list[list[int]], cost: Callable[[int], int]) -> float:
    """Work on the padded batches / work on the real clips, for a per-item cost of its length."""
    return sum(len(p) * cost(max(p)) for p in passes) / sum(cost(n) for p in passes for n in p)


def tokens(config: Any, samples: int) -> int:
    return int(config.num_frames(samples) + config.num_extra_tokens)


if __name__ == "__main__":
    main()
