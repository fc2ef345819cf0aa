"""ONNX Runtime session options for the onnx backend: prepacking and the CPU memory arena, measured.

Each configuration runs in fresh processes (interleaved, order rotating): create the session on the
entry's pre-optimised graph, run a 1 s clip (the first result), then a 5 s clip `--steady` times and a
15 s clip once. Reported: session creation, steady 5 s latency, peak RSS, and at the end the process's
memory split from /proc/self/smaps_rollup into file-backed pages (the memory-mapped weights, shared with
every other process that maps the same file) and anonymous pages (private to this process).
The default (`model/interface.session_options`) is prepacking off, arena off (docs/benchmarks.md section 6).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import product
from pathlib import Path
from typing import Any

from common import (
    MB,
    bench_model,
    header,
    load_average,
    median,
    parser,
    run_child,
    run_count,
    table,
)

CONFIGS = [{"prepack": p, "arena": a} for p, a in product((False, True), (True, False))]


def main() -> None:
    p = parser(__doc__, default_runs=3)
    p.add_argument("--steady", type=int, default=5, help="timed 5 s calls per process (default 5)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(json.loads(args.child))
    runs = run_count(args)
    header("ONNX Runtime session options", args, runs)
    model = bench_model(args.preset)
    results: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(CONFIGS))}
    for run in range(runs):
        order = list(range(len(CONFIGS)))
        for i in order[run % len(order) :] + order[: run % len(order)]:
            job = CONFIGS[i] | {"entry": str(model.entry), "steady": 1 if args.quick else args.steady}
            results[i].append(run_child(__file__, job))
            print(f"run {run + 1}/{runs} {CONFIGS[i]} {results[i][-1]}", file=sys.stderr)
    rows = []
    for i, config in enumerate(CONFIGS):

        def med(key: str, i: int = i) -> float:
            return median([r[key] for r in results[i]])

        rows.append(
            [
                f"prepack {'on' if config['prepack'] else 'off'}, arena {'on' if config['arena'] else 'off'}",
                f"{med('session_s'):.3f}",
                f"{med('steady_5s'):.3f}",
                f"{med('call_15s'):.3f}",
                f"{med('peak_rss_mb'):.0f}",
                f"{med('file_mb'):.0f}",
                f"{med('anon_mb'):.0f}",
            ]
        )
    table(
        [
            "options",
            "session (s)",
            "5 s call, median (s)",
            "15 s call (s)",
            "peak RSS (MB)",
            "file-backed now (MB)",
            "anonymous now (MB)",
        ],
        rows,
    )
    print(
        "File-backed pages are the memory-mapped weights: shared by every process that maps the entry. "
        f"Anonymous pages are private. {load_average()} at the end."
    )


def child(job: dict[str, Any]) -> None:
    import numpy as np

    from common import peak_rss_mb, synthetic_clip
    from emoserve.inference.onnx_backend import OnnxBackend
    from emoserve.inference.recognizer import Recognizer
    from emoserve.model.entry import read_entry
    from emoserve.system import physical_cores

    info = read_entry(Path(job["entry"]))
    graph = info.onnx_graph("float32")
    assert graph is not None, "the entry has no ONNX graph"
    started = time.perf_counter()
    backend = OnnxBackend(graph, "float32", physical_cores(), prepack=job["prepack"], arena=job["arena"])
    session_s = time.perf_counter() - started
    recognizer = Recognizer(backend, info)
    recognizer.predict((synthetic_clip(1.0, seed=1), 16_000))
    clip = (synthetic_clip(5.0, seed=2), 16_000)
    recognizer.predict(clip)
    steady = []
    for _ in range(job["steady"]):
        t = time.perf_counter()
        recognizer.predict(clip)
        steady.append(time.perf_counter() - t)
    t = time.perf_counter()
    recognizer.predict((synthetic_clip(15.0, seed=3), 16_000))
    call_15s = time.perf_counter() - t
    rollup = smaps_rollup()
    print(
        json.dumps(
            {
                "session_s": session_s,
                "steady_5s": float(np.median(steady)),
                "call_15s": call_15s,
                "peak_rss_mb": peak_rss_mb(),
                "file_mb": rollup["Rss"] - rollup["Anonymous"],
                "anon_mb": rollup["Anonymous"],
            }
        )
    )


def smaps_rollup() -> dict[str, float]:
    """Fields of /proc/self/smaps_rollup in MB."""
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        out[key.strip()] = int(value.split()[0]) * 1024 / MB
    return out


if __name__ == "__main__":
    main()
