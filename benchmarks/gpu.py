"""The GPU run: what emoserve does on a CUDA device, in one script that finishes in minutes on an H100/H200.

Run it as `scripts/gpu-run.sh` (docs/benchmarks.md section 10): that installs the carried wheels
(`scripts/device-wheels.sh`) beside the GPU image's torch, numpy, onnxruntime, safetensors and pyyaml, and
tees the tables to $OUT/gpu.md; every figure also goes to $OUT/gpu.json (`--out`), written after each
section so that a failing section leaves the earlier ones. `--device cpu --quick` runs every section
anywhere (the test suite does, on a simulated device, so that it cannot rot). The model is the
random-weight `--preset` (default large) in the published layout, converted once without its ONNX graph.

The allocator: expandable segments are set here before anything imports torch (as `emoserve serve` does
before CUDA starts), and the setting in effect is printed. Between tables and after each memory row the
allocator's peak is reset (and its cache emptied before each table), so no figure carries an earlier one.

1. The seed's figures (a fresh `emoserve serve --device DEVICE --no-ui --backend torch`, before this
   process touches the GPU): spawn -> first recognition; the server's peak and reserved GPU memory and the
   device's used memory; 3 users' concurrent first requests; server memory every 100 of 500 mixed clips
   (1-15 s) sent by 3 users (flat is the goal); throughput of 32 clients against one.
2. Parity per dtype and clip length against CPU float32 (float16 and bfloat16 per length, so the ALiBi bias's
   half-precision drift on long clips shows): largest |score| difference, largest utterance-embedding
   difference relative to its largest value, same top emotion. Random weights: indicative only.
3. Latency and real-time factor by clip length and batch, per dtype: one `predict_batch` of `batch` copies
   (one model call of exactly that batch; the backend hands numpy back, so each call ends synchronised),
   with the peak and reserved device memory of that row; single 60 s and 120 s clips on a GPU.
5. `--dtype auto` on the device (issue 23): the precision it chose, why, and its agreement check with
   float32 (measured here the first time, on the device: the check's seconds and figures).
4. Memory in this process over 500 clips of mixed length (1-15 s) through `predict_many(batch_size=8)`, per
   dtype: the batch sizes the model actually ran (length grouping splits unequal clips), and after each 100
   clips the allocated, reserved and peak device memory beside the host RSS.
"""

from __future__ import annotations

import collections
import gc
import json
import math
import os
import sys
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
    proc_status_bytes,
    run_count,
    running_server,
    serve_argv,
    synthetic_clip,
    table,
)

DTYPES = ("float32", "bfloat16", "float16")
LENGTHS_S = (1, 5, 15, 30)
LONG_LENGTHS_S = (60, 120)  # single clips on a GPU: where the attention mask and the conv activations peak
BATCHES = (1, 8, 32)
MEMORY_CLIPS = 500
MEMORY_BATCH = 8
USERS = 3  # the seed's "3 users at once"
LOAD_SECONDS = 10.0  # each throughput level
EXAMPLES = REPO / "src" / "emoserve" / "examples"
ALLOCATOR_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")  # as inference/torch_backend.py
MB = 1e6

FIGURES: dict[str, Any] = {}  # every figure printed, by section: written to OUT/gpu.json


def main() -> None:
    allocator = use_expandable_segments()  # before torch is imported: nothing below may come first
    p = parser(__doc__, default_runs=3)
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (a smoke test)")
    p.add_argument(
        "--serve-dtype", default="float32", help="the server's --dtype in section 1 (default float32)"
    )
    p.add_argument("--out", type=Path, default=None, help="folder for gpu.json (default: $OUT when set)")
    args = p.parse_args()
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    runs = run_count(args)
    os.environ.setdefault("EMOSERVE_EXPORT_ONNX", "0")  # the GPU runs the torch backend
    header(f"GPU run on {args.device}", args, runs)
    print("- run by: scripts/gpu-run.sh (docs/benchmarks.md section 10); torch is the machine's own\n")
    FIGURES["run"] = {"device": args.device, "preset": args.preset, "quick": args.quick, "argv": sys.argv[1:]}
    on_cpu = args.device == "cpu"
    entry = bench_model(args.preset).entry
    dtypes = ("float32",) if on_cpu else DTYPES  # half precision is for GPUs only
    lengths = (1, 5) if args.quick else LENGTHS_S
    sections = [
        ("seed", lambda: seed(entry, args.device, args.serve_dtype, quick=args.quick)),
        ("device", lambda: device_facts(args.device, allocator)),
        (
            "parity",
            lambda: parity(entry, args.device, dtypes, lengths + (() if on_cpu or args.quick else (60,))),
        ),
        (
            "latency",
            lambda: latency(entry, args.device, dtypes, lengths, batches(args), runs, long=not on_cpu),
        ),
        (
            "memory",
            lambda: memory(entry, args.device, dtypes[:1] + dtypes[2:], 40 if args.quick else MEMORY_CLIPS),
        ),
        ("auto", lambda: auto(entry, args.device)),
    ]
    for name, section in sections:
        section()
        save(out)
        print(f"<!-- section {name} done -->\n", flush=True)


def batches(args: Any) -> tuple[int, ...]:
    return (1, 2) if args.quick and args.device == "cpu" else BATCHES


def use_expandable_segments() -> str:
    """Expandable segments unless either allocator variable is set; the value in effect."""
    assert "torch" not in sys.modules, "the allocator variable must be set before torch is imported"
    if not any(name in os.environ for name in ALLOCATOR_VARIABLES):
        for name in ALLOCATOR_VARIABLES:
            os.environ[name] = "expandable_segments:True"
    return ", ".join(f"{name}={os.environ.get(name, '')}" for name in ALLOCATOR_VARIABLES)


def save(out: Path | None) -> None:
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu.json").write_text(json.dumps(FIGURES, indent=1, default=str))


def report(section: str, title: str, headers: list[str], rows: list[list[Any]], note: str = "") -> None:
    """Print a table and keep its rows, as dicts by column, for gpu.json."""
    print(f"## {title}\n")
    if note:
        print(note + "\n")
    table(headers, [[cell(v) for v in row] for row in rows])
    FIGURES.setdefault(section, []).append(
        {"table": title, "rows": [dict(zip(headers, row, strict=True)) for row in rows]}
    )


def cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


# ------------------------------------------------------------------------------------------ device facts


def device_facts(device: str, allocator: str) -> None:
    import torch

    facts: dict[str, Any] = {"torch": torch.__version__, "allocator variables": allocator}
    if device == "cpu":
        facts |= {"device": "CPU", "threads": torch.get_num_threads()}
    else:
        props = torch.cuda.get_device_properties(device)
        torch.zeros(1, device=device)  # the allocator's first block: its settings are fixed from here
        settings = torch.cuda.memory._snapshot().get("allocator_settings", {})
        facts |= {
            "device": props.name,
            "memory (GiB)": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "CUDA": torch.version.cuda,
            "cuDNN": torch.backends.cudnn.version(),
            "expandable segments in effect": settings.get("expandable_segments", "not reported"),
            # what emoserve's load chose (inference/torch_backend.py set_float32_math): IEEE, TF32 off
            "float32 matmul": torch.backends.cuda.matmul.fp32_precision,
            "float32 convolution": torch.backends.cudnn.conv.fp32_precision,
        }
    FIGURES["device"] = facts
    print("## The device\n")
    for key, value in facts.items():
        print(f"- {key}: {value}")
    print()


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


def fresh_allocator(device: str) -> None:
    """Before a table: nothing cached or peaked from an earlier one."""
    gc.collect()
    if device != "cpu":
        import torch

        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def device_memory(device: str) -> dict[str, float]:
    """Allocated, reserved and peak device memory (MB) and host RSS (MB); the peak then starts again."""
    figures = {"host RSS (MB)": proc_status_bytes("VmRSS") / MB}
    if device != "cpu":
        import torch

        figures |= {
            "allocated (MB)": torch.cuda.memory_allocated(device) / MB,
            "reserved (MB)": torch.cuda.memory_reserved(device) / MB,
            "peak allocated (MB)": torch.cuda.max_memory_allocated(device) / MB,
        }
        torch.cuda.reset_peak_memory_stats(device)
    return figures


# ------------------------------------------------------------------------------------- 1. the seed's figures


def seed(entry: Path, device: str, dtype: str, *, quick: bool) -> None:
    """A fresh server, before this process has a CUDA context: the device's used memory is the server's."""
    port = free_port()
    argv = serve_argv(entry, port, "--backend", "torch", "--no-ui", "--dtype", dtype, device=device)
    first_wav = clip_wav(5.0)
    with running_server(f"gpu-{device.replace(':', '')}", argv, port) as server:
        readyz, reply = server.wait_for("/readyz", timeout_s=600)
        first = Client(port).recognize(first_wav)
        assert first.status == 200, first.body[:300]
        spawn_to_first = server.since_start(first.finished)
        timings = reply.json().get("timings", {})
        users = concurrent_first_requests(port)
        after_start = server_memory(server)
        flat = mixed_clips(server, 40 if quick else MEMORY_CLIPS)
        steady = median([Client(port).recognize(first_wav).seconds for _ in range(3 if quick else 10)])
        duration = 2.0 if quick else LOAD_SECONDS
        one, many = throughput(port, first_wav, 1, duration), throughput(port, first_wav, 32, duration)
    rows = [
        ["spawn -> /readyz 200 (s)", readyz],
        [
            "  of which model load, warm-up (server's own, s)",
            f"{timings.get('model_load_s', math.nan):.2f}, {timings.get('warmup_s', math.nan):.2f}",
        ],
        ["spawn -> first recognition of a 5 s clip (s)", spawn_to_first],
        ["first 5 s request after ready (s)", first.seconds],
        ["steady 5 s request, median (s)", steady],
        [f"{USERS} users' concurrent first requests: each (s)", ", ".join(f"{s:.3f}" for s in users)],
        [f"{USERS} users' concurrent first requests: slowest (s)", max(users)],
        *[[f"after start: {key}", value] for key, value in after_start.items()],
        ["throughput, 1 client (requests/s)", one],
        ["throughput, 32 clients (requests/s)", many],
        ["32 clients / 1 client", many / one],
    ]
    report(
        "seed",
        f"1. The seed's figures: `emoserve serve --device {device} --dtype {dtype} --no-ui`",
        ["figure", "value"],
        rows,
        "The first write-up's (RTX 4090, the large model): 8.2 s to the first recognition, 4.7 GB of GPU "
        "memory, 3 users at once.",
    )
    report(
        "seed",
        f"1b. Server memory over {flat[-1][0]} mixed clips (1-15 s), {USERS} users",
        ["clips", *flat[0][1]],
        [[done, *figures.values()] for done, figures in flat],
        "Flat is the goal: the GPU figures are the server's own gauges (`/metrics`), RSS its host memory.",
    )


def concurrent_first_requests(port: int) -> list[float]:
    """USERS clients, each with its own connection and clip length, sending their first request at once."""
    wavs = [clip_wav(seconds, seed=10 + i) for i, seconds in enumerate((3.0, 7.0, 12.0)[:USERS])]
    barrier, seconds = threading.Barrier(USERS), [math.nan] * USERS

    def user(i: int) -> None:
        client = Client(port)
        barrier.wait()
        reply = client.recognize(wavs[i])
        client.close()
        assert reply.status == 200, reply.body[:300]
        seconds[i] = reply.seconds

    threads = [threading.Thread(target=user, args=(i,)) for i in range(USERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return seconds


def server_memory(server: Any) -> dict[str, float]:
    figures = {"server RSS (MB)": server.rss_bytes() / MB}
    peak = server.metric("emoserve_gpu_max_memory_allocated_bytes")
    if not math.isnan(peak):
        total, free = (
            server.metric("emoserve_gpu_device_total_bytes"),
            server.metric("emoserve_gpu_device_free_bytes"),
        )
        figures |= {
            "GPU allocated (MB)": server.metric("emoserve_gpu_memory_allocated_bytes") / MB,
            "GPU peak allocated (MB)": peak / MB,
            "GPU reserved (MB)": server.metric("emoserve_gpu_memory_reserved_bytes") / MB,
            "GPU used on the device, all processes (MB)": (total - free) / MB,
        }
    return figures


def mixed_clips(server: Any, n_clips: int) -> list[tuple[int, dict[str, float]]]:
    """n_clips of 1-15 s through /v1/recognize from USERS clients; the server's memory every fifth."""
    import numpy as np

    rng = np.random.default_rng(0)
    seconds = rng.uniform(1, 15, n_clips)
    every = max(USERS, n_clips // 5)
    rows = [(0, server_memory(server))]
    for start in range(0, n_clips, every):
        chunk = list(range(start, min(n_clips, start + every)))
        wavs = {i: clip_wav(float(seconds[i]), seed=100 + i) for i in chunk}

        def user(mine: list[int], wavs: dict[int, bytes] = wavs) -> None:
            client = Client(server.port)
            for i in mine:
                reply = client.recognize(wavs[i])
                assert reply.status == 200, reply.body[:300]
            client.close()

        threads = [threading.Thread(target=user, args=(chunk[u::USERS],)) for u in range(USERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        rows.append((chunk[-1] + 1, server_memory(server)))
    return rows


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


# ---------------------------------------------------------------------------------------------- 2. parity


def parity(entry: Path, device: str, dtypes: tuple[str, ...], lengths: tuple[float, ...]) -> None:
    import numpy as np

    audio = clips(lengths)
    reference = load(entry, "cpu", "float32").predict_many(audio, embedding=True)
    rows = []
    for dtype in dtypes:
        fresh_allocator(device)
        got = load(entry, device, dtype).predict_many(audio, embedding=True)
        for a, b, clip in zip(got, reference, audio, strict=True):
            score = max(abs(a.scores[k] - b.scores[k]) for k in a.scores)
            scale = max(1.0, float(np.abs(b.embedding).max()))
            embedding = float(np.abs(a.embedding - b.embedding).max()) / scale
            seconds = len(clip.samples) / 16_000
            name = Path(clip.source).name
            rows.append([dtype, name, round(seconds, 1), score, embedding, a.emotion == b.emotion])
    report(
        "parity",
        "2. Parity against CPU float32, per clip",
        [
            f"dtype on {device}",
            "clip",
            "seconds",
            "max |score| diff",
            "embedding diff (relative)",
            "same top",
        ],
        rows,
        "Random weights: near-uniform scores, no trained model's activation outliers (indicative only).",
    )


# --------------------------------------------------------------------------------------------- 3. latency


def latency(
    entry: Path,
    device: str,
    dtypes: tuple[str, ...],
    lengths: tuple[float, ...],
    batch_sizes: tuple[int, ...],
    runs: int,
    *,
    long: bool,
) -> None:
    from emoserve import load_audio

    rows = []
    shapes = [(s, b) for s in lengths for b in batch_sizes] + (
        [(s, 1) for s in LONG_LENGTHS_S] if long else []
    )
    for dtype in dtypes:
        fresh_allocator(device)
        recognizer = load(entry, device, dtype)
        for seconds, batch in shapes:
            clip = load_audio((synthetic_clip(seconds), 16_000))
            recognizer.predict_batch([clip] * batch, "utterance", False)  # the shape's first call
            device_memory(device)  # the peak starts again for this row
            times = []
            for _ in range(runs):
                started = time.perf_counter()
                recognizer.predict_batch([clip] * batch, "utterance", False)
                times.append(time.perf_counter() - started)
            call, memory = median(times), device_memory(device)
            rows.append(
                [
                    dtype,
                    seconds,
                    batch,
                    call * 1000,
                    call / (seconds * batch),
                    memory.get("peak allocated (MB)", math.nan),
                    memory.get("reserved (MB)", math.nan),
                ]
            )
    report(
        "latency",
        "3. Latency by length and batch",
        [
            "dtype",
            "clip (s)",
            "batch (one model call)",
            "call (ms, median)",
            "real-time factor",
            "peak allocated (MB)",
            "reserved (MB)",
        ],
        rows,
    )


# ---------------------------------------------------------------------------------------------- 3. memory


class CountingBackend:
    """The recognizer's backend, counting the batch sizes it is actually given."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.sizes = inner, collections.Counter[int]()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def run(self, waves: Any, lengths: Any, frames: bool) -> Any:
        self.sizes[waves.shape[0]] += 1
        return self.inner.run(waves, lengths, frames)


def auto(entry: Path, device: str) -> None:
    """5. `--dtype auto` on the device: its choice, its reason and the agreement record it used."""
    import emoserve
    from emoserve.model.entry import read_manifest

    started = time.perf_counter()
    recognizer = emoserve.load_model(str(entry), backend="torch", device=device, dtype="auto", progress=False)
    seconds = time.perf_counter() - started
    records = read_manifest(entry).get("agreement", {})
    FIGURES["auto"] = {
        "dtype": recognizer.dtype,
        "reason": recognizer.reason,
        "load_s": seconds,
        "records": records,
    }
    print(f"5. `--dtype auto` on {device}: **{recognizer.dtype}** in {seconds:.1f} s (the check included)\n")
    print(f"- why: {recognizer.reason}")
    for key, record in records.items():
        print(
            f"- agreement {key}: {record.get('reason')} "
            f"({record.get('seconds')} s, {record.get('clips')} clips)"
        )
    print()


def memory(entry: Path, device: str, dtypes: tuple[str, ...], n_clips: int) -> None:
    import numpy as np

    from emoserve import load_audio

    for dtype in dtypes:
        fresh_allocator(device)
        recognizer = load(entry, device, dtype)
        recognizer.backend = counting = CountingBackend(recognizer.backend)
        rng = np.random.default_rng(0)
        report_every = max(MEMORY_BATCH, n_clips // 5 // MEMORY_BATCH * MEMORY_BATCH)
        rows, headers = [], ["clips"]
        for done in range(0, n_clips, MEMORY_BATCH):
            batch = [
                load_audio((synthetic_clip(float(rng.uniform(1, 15)), seed=done + i), 16_000))
                for i in range(MEMORY_BATCH)
            ]
            recognizer.predict_many(batch, batch_size=MEMORY_BATCH)
            if (done + MEMORY_BATCH) % report_every == 0:
                figures = device_memory(device)
                rows.append([done + MEMORY_BATCH, *figures.values()])
                headers = ["clips", *figures]
        sizes = ", ".join(f"{size}: {count}" for size, count in sorted(counting.sizes.items()))
        report(
            "memory",
            f"4. Memory over clips of mixed length (1-15 s), {dtype}",
            headers,
            rows,
            f"`predict_many(batch_size={MEMORY_BATCH})`; model calls by batch size (length grouping splits "
            f"unequal clips): {sizes}. Peak: since the row before.",
        )
        FIGURES["memory"][-1]["batch sizes"] = dict(counting.sizes)
        del recognizer, counting


if __name__ == "__main__":
    main()
