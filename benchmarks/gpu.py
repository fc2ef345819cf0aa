"""The GPU run: what emoserve does on a CUDA device, in one script that finishes in minutes on an H200.

It needs torch, numpy, safetensors and pyyaml (on the GPU machine already) and the small wheels that
`scripts/device-wheels.sh` downloads (the decoders and the server's libraries); `--device cpu --quick` runs
it anywhere (the test suite does, so that it cannot rot). The model is the random-weight `--preset`
(default large) in the published layout, converted once without its ONNX graph (the GPU runs torch).

1. Parity: each dtype on the device (float32, bfloat16, float16) against CPU float32, on the bundled
   example clips and generated clips of 1-30 s: the largest |score| difference, and the largest
   utterance-embedding difference relative to the embedding's largest value.
2. Latency and real-time factor by clip length (1, 5, 15, 30 s) and batch (1, 8, 32), per dtype: one
   `predict_batch` of `batch` copies (the backend hands numpy back, so each call ends synchronised).
3. Memory over 500 clips of mixed length (1-15 s, to the sample) in batches of 8: the allocator's
   allocated and reserved bytes, and the peak, after each 100 clips (RSS on a CPU). Flat is the goal.
4. `emoserve serve --device DEVICE --no-ui`: spawn -> /healthz and /readyz (with the server's own model
   load and warm-up times), the first 5 s request against the steady median, and throughput of 32
   concurrent clients against one.
"""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path
from typing import Any

from common import (
    BENCH_HOME,
    REPO,
    Client,
    bench_model,
    clip_wav,
    free_port,
    header,
    median,
    parser,
    run_count,
    running_server,
    serve_argv,
    synthetic_clip,
    table,
)

DTYPES = ("float32", "bfloat16", "float16")
LENGTHS_S = (1, 5, 15, 30)
BATCHES = (1, 8, 32)
MEMORY_CLIPS = 500
MEMORY_BATCH = 8
LOAD_SECONDS = 10.0  # each throughput level
EXAMPLES = REPO / "src" / "emoserve" / "examples"


def main() -> None:
    p = parser(__doc__, default_runs=3)
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (a smoke test)")
    args = p.parse_args()
    runs = run_count(args)
    os.environ.setdefault("EMOSERVE_EXPORT_ONNX", "0")  # the GPU runs the torch backend
    header(f"GPU run on {args.device}", args, runs)
    print(device_facts(args.device) + "\n")
    entry = bench_model(args.preset).entry
    on_cpu = args.device == "cpu"
    dtypes = ("float32",) if on_cpu else DTYPES  # half precision is for GPUs only
    lengths = (1, 5) if args.quick else LENGTHS_S
    batches = (1, 2) if args.quick and on_cpu else BATCHES
    parity(entry, args.device, dtypes, lengths)
    latency(entry, args.device, dtypes, lengths, batches, runs)
    memory(entry, args.device, 40 if args.quick else MEMORY_CLIPS)
    serve(entry, args.device, quick=args.quick)


def device_facts(device: str) -> str:
    import torch

    if device == "cpu":
        return f"- device: CPU, torch {torch.__version__}, {torch.get_num_threads()} threads"
    props = torch.cuda.get_device_properties(device)
    return (
        f"- device: {props.name}, {props.total_memory / 2**30:.0f} GiB, "
        f"capability {props.major}.{props.minor}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    )


def load(entry: Path, device: str, dtype: str) -> Any:
    import emoserve

    os.environ["EMOSERVE_HOME"] = str(BENCH_HOME)
    return emoserve.load_model(str(entry), backend="torch", device=device, dtype=dtype, progress=False)


def clips(lengths: tuple[float, ...]) -> list[Any]:
    from emoserve import load_audio

    found = [load_audio(path) for path in sorted(EXAMPLES.iterdir()) if not path.name.startswith(".")]
    generated = [
        load_audio((synthetic_clip(s, seed=i), 16_000), name=f"{s:g}s") for i, s in enumerate(lengths)
    ]
    return found + generated


# ---------------------------------------------------------------------------------------------- 1. parity


def parity(entry: Path, device: str, dtypes: tuple[str, ...], lengths: tuple[float, ...]) -> None:
    import numpy as np

    audio = clips(lengths)
    reference = load(entry, "cpu", "float32").predict_many(audio, embedding=True)
    rows = []
    for dtype in dtypes:
        got = load(entry, device, dtype).predict_many(audio, embedding=True)
        score = max(
            abs(a.scores[k] - b.scores[k]) for a, b in zip(got, reference, strict=True) for k in a.scores
        )
        embedding = max(
            float(np.abs(a.embedding - b.embedding).max() / max(1.0, float(np.abs(b.embedding).max())))
            for a, b in zip(got, reference, strict=True)
        )
        same = sum(a.emotion == b.emotion for a, b in zip(got, reference, strict=True))
        rows.append([dtype, f"{score:.2e}", f"{embedding:.2e}", f"{same}/{len(audio)}"])
    print("## 1. Parity against CPU float32\n")
    print(
        f"{len(audio)} clips: the bundled examples and generated {', '.join(f'{s:g}' for s in lengths)} s.\n"
    )
    table(
        [f"dtype on {device}", "max |score| diff", "max embedding diff (relative)", "same top emotion"], rows
    )


# --------------------------------------------------------------------------------------------- 2. latency


def latency(
    entry: Path,
    device: str,
    dtypes: tuple[str, ...],
    lengths: tuple[float, ...],
    batches: tuple[int, ...],
    runs: int,
) -> None:
    from emoserve import load_audio

    rows = []
    for dtype in dtypes:
        recognizer = load(entry, device, dtype)
        for seconds in lengths:
            clip = load_audio((synthetic_clip(seconds), 16_000))
            for batch in batches:
                recognizer.predict_batch([clip] * batch, "utterance", False)  # the shape's first call
                times = []
                for _ in range(runs):
                    started = time.perf_counter()
                    recognizer.predict_batch([clip] * batch, "utterance", False)
                    times.append(time.perf_counter() - started)
                call = median(times)
                rows.append(
                    [dtype, f"{seconds:g}", batch, f"{call * 1000:.1f}", f"{call / (seconds * batch):.4f}"]
                )
    print("## 2. Latency by length and batch\n")
    table(["dtype", "clip (s)", "batch", "call (ms, median)", "real-time factor"], rows)


# ---------------------------------------------------------------------------------------------- 3. memory


def memory(entry: Path, device: str, n_clips: int) -> None:
    import numpy as np

    from emoserve import load_audio

    recognizer = load(entry, device, "float32")
    rng = np.random.default_rng(0)
    report_every = max(MEMORY_BATCH, n_clips // 5 // MEMORY_BATCH * MEMORY_BATCH)
    rows = []
    for done in range(0, n_clips, MEMORY_BATCH):
        batch = [
            load_audio((synthetic_clip(float(rng.uniform(1, 15)), seed=done + i), 16_000))
            for i in range(MEMORY_BATCH)
        ]
        recognizer.predict_many(batch, batch_size=MEMORY_BATCH)
        if (done + MEMORY_BATCH) % report_every == 0:
            rows.append([done + MEMORY_BATCH, *memory_now(device)])
    print("## 3. Memory over clips of mixed length (1-15 s), batches of 8\n")
    table(["clips", "allocated (MB)", "reserved (MB)", "peak allocated (MB)"], rows)


def memory_now(device: str) -> list[str]:
    if device == "cpu":
        from common import proc_status_bytes

        rss = proc_status_bytes("VmRSS") / 1e6
        return [f"{rss:.0f} (RSS)", "-", f"{proc_status_bytes('VmHWM') / 1e6:.0f} (VmHWM)"]
    import torch

    return [
        f"{torch.cuda.memory_allocated(device) / 1e6:.0f}",
        f"{torch.cuda.memory_reserved(device) / 1e6:.0f}",
        f"{torch.cuda.max_memory_allocated(device) / 1e6:.0f}",
    ]


# ----------------------------------------------------------------------------------------------- 4. serve


def serve(entry: Path, device: str, *, quick: bool) -> None:
    port = free_port()
    argv = serve_argv(entry, port, "--backend", "torch", "--no-ui", device=device)
    wav = clip_wav(5.0)
    with running_server(f"gpu-{device.replace(':', '')}", argv, port) as server:
        healthz, _ = server.wait_for("/healthz")
        readyz, reply = server.wait_for("/readyz")
        timings = reply.json().get("timings", {})
        client = Client(port)
        first = client.recognize(wav)
        assert first.status == 200, first.body[:300]
        steady = median([client.recognize(wav).seconds for _ in range(3 if quick else 10)])
        duration = 2.0 if quick else LOAD_SECONDS
        one = throughput(port, wav, 1, duration)
        many = throughput(port, wav, 32, duration)
    print("## 4. `emoserve serve --no-ui` on the device\n")
    table(
        ["figure", "value"],
        [
            ["spawn -> /healthz 200 (s)", f"{healthz:.2f}"],
            ["spawn -> /readyz 200 (s)", f"{readyz:.2f}"],
            [
                "  of which model load, warm-up (server's own, s)",
                f"{timings.get('model_load_s', math.nan):.2f}, {timings.get('warmup_s', math.nan):.2f}",
            ],
            ["first 5 s request after ready (s)", f"{first.seconds:.3f}"],
            ["steady 5 s request, median (s)", f"{steady:.3f}"],
            ["first / steady", f"{first.seconds / steady:.2f}"],
            ["throughput, 1 client (requests/s)", f"{one:.1f}"],
            ["throughput, 32 clients (requests/s)", f"{many:.1f}"],
            ["32 clients / 1 client", f"{many / one:.2f}"],
        ],
    )


def throughput(port: int, wav: bytes, clients: int, duration_s: float) -> float:
    """200 replies per second of `clients` threads, each sending the clip again as soon as it is answered."""
    done: list[int] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + duration_s

    def loop() -> None:
        client, ok = Client(port), 0
        while time.perf_counter() < deadline:
            ok += client.recognize(wav).status == 200
        client.close()
        with lock:
            done.append(ok)

    started = time.perf_counter()
    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.perf_counter() - started)


if __name__ == "__main__":
    main()
