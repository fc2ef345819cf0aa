"""Memory given back after model calls (emoserve/memory.py) and ONNX Runtime's per-shape state.

Each side runs in a fresh process on the onnx backend (arena off, as served), sides interleaved:

1. Mixed batches: the same sequence of model calls (1-8 clips of 1-8 s, random, the same seed) with
   glibc as it comes, and with what a serving process does (`memory.return_freed_memory()` once, and
   `memory.trim()` after each call, as the engine does). Reported: the calls' total seconds, RSS at rest
   after the first call and after the last one, and the peak (VmHWM).
2. Distinct shapes: single clips of distinct lengths (1-2 s, to the sample) straight into the ONNX
   Runtime session, and through the backend, which pads a batch to one of 32 widths per octave
   (`model.interface.bucket_width`). Reported: RSS growth per 100 distinct lengths, at rest (with
   memory.py's settings on both sides, so that only the session's own state remains).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    MB,
    SAMPLE_RATE,
    bench_model,
    header,
    median,
    parser,
    proc_status_bytes,
    run_child,
    run_count,
    table,
)

MIXED_CALLS = 24
DISTINCT_LENGTHS = 300
SIDES = [
    ("mixed", "glibc as it comes"),
    ("mixed", "memory.py"),
    ("shapes", "raw session"),
    ("shapes", "bucketed widths"),
]


def main() -> None:
    p = parser(__doc__, default_runs=1)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(json.loads(args.child))
    runs = run_count(args)
    header("Allocator: memory given back, and per-shape state", args, runs)
    model = bench_model(args.preset)
    results: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(SIDES))}
    for run in range(runs):
        for i, (kind, side) in enumerate(SIDES):
            job = {"entry": str(model.entry), "kind": kind, "side": side, "quick": args.quick}
            results[i].append(run_child(__file__, job))
            print(f"run {run + 1}/{runs} {side}: {results[i][-1]}", file=sys.stderr)

    def med(i: int, key: str) -> float:
        return median([r[key] for r in results[i]])

    table(
        ["mixed batches", "calls (s)", "RSS at rest, after call 1 (MB)", "after the last (MB)", "peak (MB)"],
        [
            [
                SIDES[i][1],
                f"{med(i, 'seconds'):.1f}",
                f"{med(i, 'first_mb'):.0f}",
                f"{med(i, 'last_mb'):.0f}",
                f"{med(i, 'peak_mb'):.0f}",
            ]
            for i in (0, 1)
        ],
    )
    print(
        f"memory.py / glibc as it comes: calls {med(1, 'seconds') / med(0, 'seconds'):.2f}x, "
        f"RSS at rest after the last call {med(1, 'last_mb') / med(0, 'last_mb'):.2f}x\n"
    )
    table(
        ["distinct lengths", "widths run", "RSS growth per 100 lengths (MB)"],
        [
            [SIDES[i][1], f"{med(i, 'widths'):.0f}", f"{med(i, 'growth_mb') * 100 / med(i, 'lengths'):.2f}"]
            for i in (2, 3)
        ],
    )


def child(job: dict[str, Any]) -> None:
    import numpy as np

    from emoserve import system as memory
    from emoserve.inference.onnx_backend import OnnxBackend
    from emoserve.model.entry import read_entry
    from emoserve.model.interface import bucket_width

    served = job["side"] != "glibc as it comes"
    if served:
        memory.return_freed_memory()
    graph = read_entry(Path(job["entry"])).onnx_graph("float32")
    backend = OnnxBackend(graph, "float32", os.cpu_count() or 1)
    rng = random.Random(0)
    noise = np.random.default_rng(0).standard_normal(8 * SAMPLE_RATE).astype(np.float32) * 0.1

    def rest_mb() -> float:
        return proc_status_bytes("VmRSS") / MB

    if job["kind"] == "mixed":
        calls = 4 if job["quick"] else MIXED_CALLS
        started, first = time.perf_counter(), 0.0
        for call in range(calls):
            size, width = rng.randint(1, 8), rng.randint(1 * SAMPLE_RATE, 8 * SAMPLE_RATE)
            waves = np.stack([noise[:width]] * size)
            lengths = np.array([rng.randint(int(width * 0.95), width) for _ in range(size)], np.int64)
            lengths[0] = width
            backend.run(waves, lengths, frames=False)
            if served:
                memory.trim()
            if call == 0:
                first = rest_mb()
        print(
            json.dumps(
                {
                    "seconds": round(time.perf_counter() - started, 2),
                    "first_mb": round(first),
                    "last_mb": round(rest_mb()),
                    "peak_mb": round(proc_status_bytes("VmHWM") / MB),
                }
            )
        )
        return
    memory.return_freed_memory()  # both sides: only the session's own state is left to grow
    lengths = rng.sample(range(SAMPLE_RATE, 2 * SAMPLE_RATE), 20 if job["quick"] else DISTINCT_LENGTHS)
    widths = set()
    before = 0.0
    for i, n in enumerate(lengths):
        wave, length = noise[None, :n], np.array([n], np.int64)
        if job["side"] == "raw session":
            backend.session.run(["logits"], {"waves": wave, "lengths": length})
            widths.add(n)
        else:
            backend.run(wave, length, frames=False)
            widths.add(bucket_width(n))
        memory.trim()
        if i == 0:
            before = rest_mb()
    print(
        json.dumps(
            {"growth_mb": round(rest_mb() - before, 2), "lengths": len(lengths) - 1, "widths": len(widths)}
        )
    )


if __name__ == "__main__":
    main()
