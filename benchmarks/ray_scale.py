"""Scaling out on Ray, CPU only, on this machine (a one-node Ray cluster): what Ray costs and gives.

1. Start: `ray start --head` (its own process, as an operator runs it), then the Serve application
   deployed from this driver (serve.run of emoserve.ray_serve:build_app) until the first 200.
2. Load: 8 and 32 clients sending 5 s clips (serve_load.py's clients: a 503 waits Retry-After) to
   - the baseline, measured in the same run, first and again last (the machine is shared: the two show
     the drift): one `emoserve serve --no-ui` process, torch threads = cores
   - Ray Serve, 1 replica with num_cpus = cores (threads = cores)
   - Ray Serve, 2 replicas with num_cpus = cores / 2 each
   Throughput and latency ratios are against the baseline at the same client count.
3. Memory of each of the 2 replicas: RSS and PSS (/proc/<pid>/smaps_rollup; PSS splits the pages the
   replicas share, such as the memory-mapped weights, between them).
4. A replica SIGKILLed under 8 clients: seconds until Serve runs 2 again, and every reply's status (the
   emoserve proxy middleware sends a lost request again).
5. Bulk scoring of CLIPS clips of CLIP_BULK_S s: `emoserve predict DIR` vs `emoserve predict DIR --ray
   --address auto` (2 actors of 1 CPU), whole commands, outputs compared.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from common import (
    BENCH_DIR,
    BENCH_HOME,
    LOCALHOST,
    Client,
    bench_model,
    clip_wav,
    free_port,
    header,
    load_average,
    parser,
    running_server,
    serve_argv,
    synthetic_clip,
    table,
    wav_bytes,
)
from serve_load import CLIP_S, Level, run_level

CLIENTS = (8, 32)
LEVEL_S = 30.0  # the large model takes ~1 s per 5 s clip on 2 cores: ~30 replies at 8 clients
QUICK_LEVEL_S = 2.0
CLIPS = 200
CLIP_BULK_S = 2.0
CORES = os.cpu_count() or 2
RAY_BIN = Path(sys.executable).parent / "ray"


class RayEndpoint:
    """What serve_load.run_level needs of a server, for the Serve proxy: /metrics answers come from one
    replica at a time, so batch figures are not summed (NaN)."""

    def __init__(self, port: int) -> None:
        self.port = port

    def metric(self, name: str) -> float:
        return float("nan")

    def check_alive(self) -> None:
        pass


def main() -> None:
    p = parser(__doc__, default_runs=1)
    args = p.parse_args()
    header("Scaling out on Ray", args, 1)
    level_s = QUICK_LEVEL_S if args.quick else LEVEL_S
    model = bench_model(args.preset)
    wav = clip_wav(CLIP_S)
    home = Path(tempfile.mkdtemp(prefix="ray-home-"))  # Ray's auth token goes under ~/.ray
    os.environ.update(
        {
            "HOME": str(home),
            "EMOSERVE_HOME": str(BENCH_HOME),
            "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "emoserve.ray_serve:proxy_middlewares",
        }
    )
    levels: dict[str, dict[int, Level]] = {"one process": one_process(model.entry, wav, level_s)}
    started = time.perf_counter()
    subprocess.run(
        [
            str(RAY_BIN),
            "start",
            "--head",
            f"--num-cpus={CORES}",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        check=True,
        capture_output=True,
    )
    ray_start_s = time.perf_counter() - started
    try:
        import ray
        from ray import serve

        from emoserve.ray_serve import API_APP

        ray.init(address="auto", log_to_driver=False, logging_level="WARNING")
        serve_port = free_port()
        serve.start(http_options={"host": LOCALHOST, "port": serve_port})
        starts = {}
        for replicas in (1, 2):
            name = f"Ray Serve, {replicas} replica{'s' if replicas > 1 else ''}"
            serve.delete(API_APP)  # a rolling update would wait for CPUs the old replica holds
            starts[name] = deploy(model.entry, replicas, serve_port, wav)
            levels[name] = {n: run_level(RayEndpoint(serve_port), n, wav, level_s) for n in CLIENTS}  # type: ignore[arg-type]
        memory = replica_memory()
        kill = kill_replica(serve_port, wav, level_s)
        serve.delete(API_APP)  # the replicas hold every CPU: Ray Data's actors would wait for them
        bulk = bulk_scoring(model.entry, args.quick)
        serve.shutdown()
        ray.shutdown()
    finally:
        subprocess.run([str(RAY_BIN), "stop", "--force"], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)
    # the baseline again, last: the machine is shared, and drift shows as the difference of the two
    levels["one process, again at the end"] = one_process(model.entry, wav, level_s)
    report(ray_start_s, starts, levels, memory, kill, bulk)


def one_process(entry: Path, wav: bytes, level_s: float) -> dict[int, Level]:
    """The baseline: `emoserve serve --no-ui` (torch threads = cores), one level per client count."""
    port = free_port()
    with running_server("ray-baseline", serve_argv(entry, port, "--no-ui"), port) as server:
        server.wait_for("/readyz")
        Client(port).recognize(wav)
        return {n: run_level(server, n, wav, level_s) for n in CLIENTS}


def deploy(entry: Path, replicas: int, port: int, wav: bytes) -> float:
    """serve.run of the API application -> the first 200 of /v1/recognize, in seconds."""
    from ray import serve

    from emoserve.ray_serve import API_APP, build_app

    started = time.perf_counter()
    args = {
        "model": str(entry),
        "device": "cpu",
        "replicas": str(replicas),
        "num_cpus": str(CORES / replicas),
        "ui": "false",
    }
    serve.run(build_app(args), name=API_APP, route_prefix="/")
    reply = Client(port).recognize(wav)
    assert reply.status == 200, reply.body[:300]
    return time.perf_counter() - started


def replica_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if b"ServeReplica:emoserve:Recognition" in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return sorted(pids)


def replica_memory() -> list[tuple[int, float, float]]:
    """(pid, RSS MiB, PSS MiB) of each replica."""
    rows = []
    for pid in replica_pids():
        fields = {}
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            key, _, value = line.partition(":")
            fields[key] = int(value.split()[0]) / 1024  # kB -> MiB
        rows.append((pid, fields["Rss"], fields["Pss"]))
    return rows


def running_replicas() -> int:
    from ray import serve

    from emoserve.ray_serve import API_APP, RECOGNITION

    return serve.status().applications[API_APP].deployments[RECOGNITION.name].replica_states.get("RUNNING", 0)


def kill_replica(port: int, wav: bytes, level_s: float) -> tuple[float, Counter[str]]:
    """SIGKILL one replica under 8 clients; (seconds until 2 run again, statuses of all replies)."""
    import threading

    result: list[Level] = []
    endpoint = RayEndpoint(port)
    thread = threading.Thread(target=lambda: result.append(run_level(endpoint, 8, wav, level_s + 30)))  # type: ignore[arg-type]
    thread.start()
    time.sleep(3.0)
    os.kill(replica_pids()[0], signal.SIGKILL)
    killed = time.perf_counter()
    while running_replicas() == 2 and time.perf_counter() - killed < 30:
        time.sleep(0.1)
    while running_replicas() < 2 and time.perf_counter() - killed < 180:
        time.sleep(0.1)
    replaced_s = time.perf_counter() - killed
    thread.join()
    return replaced_s, result[0].statuses()


def bulk_scoring(entry: Path, quick: bool) -> dict[str, float | str]:
    folder = BENCH_DIR / "ray-bulk"
    folder.mkdir(exist_ok=True)
    count = 10 if quick else CLIPS
    for i in range(count):
        path = folder / f"clip{i:03d}.wav"
        if not path.exists():
            path.write_bytes(wav_bytes(synthetic_clip(CLIP_BULK_S, seed=100 + i)))
    outputs, seconds = {}, {}
    for name, extra in (("local", []), ("ray", ["--ray", "--address", "auto", "--actors", "2"])):
        out = folder.parent / f"ray-bulk-{name}.jsonl"
        started = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "emoserve.cli",
                "predict",
                str(folder),
                "--model",
                str(entry),
                "--device",
                "cpu",
                "-o",
                str(out),
                *extra,
            ],
            check=True,
            capture_output=True,
            timeout=900,
        )
        seconds[name] = time.perf_counter() - started
        outputs[name] = [json.loads(line) for line in out.read_text().splitlines()]
    pairs = list(zip(outputs["local"], outputs["ray"], strict=True))
    same = all((a["file"], a["emotion"]) == (b["file"], b["emotion"]) for a, b in pairs)
    scores = max(abs(a["scores"][k] - b["scores"][k]) for a, b in pairs for k in a["scores"])
    return {
        "clips": count,
        "local_s": seconds["local"],
        "ray_s": seconds["ray"],
        "same": "yes" if same else "NO",
        "max_score_diff": scores,
    }


def report(
    ray_start_s: float,
    starts: dict[str, float],
    levels: dict[str, dict[int, Level]],
    memory: list[tuple[int, float, float]],
    kill: tuple[float, Counter[str]],
    bulk: dict[str, float | str],
) -> None:
    print("## Start\n")
    table(
        ["step", "seconds"],
        [
            ["`ray start --head` (returns once the node is up)", f"{ray_start_s:.1f}"],
            *[[f"deploy {k} -> first 200", f"{v:.1f}"] for k, v in starts.items()],
        ],
    )
    print(f"## Load ({CLIP_S:g} s clips; ratios against one process at the same client count)\n")
    rows = []
    for name, by_clients in levels.items():
        for n, level in by_clients.items():
            base = levels["one process"][n]  # the first run of it; the last shows the drift
            rows.append(
                [
                    name,
                    n,
                    ", ".join(f"{k}: {v}" for k, v in sorted(level.statuses().items())),
                    f"{level.throughput():.2f}",
                    f"{level.latency(50):.2f}",
                    f"{level.latency(95):.2f}",
                    f"{level.throughput() / base.throughput():.2f}",
                    f"{level.latency(95) / base.latency(95):.2f}",
                ]
            )
    table(
        [
            "server",
            "clients",
            "statuses",
            "requests/s",
            "p50 (s)",
            "p95 (s)",
            "throughput ratio",
            "p95 ratio",
        ],
        rows,
    )
    print("## Memory of the 2 replicas\n")
    table(["replica pid", "RSS (MiB)", "PSS (MiB)"], [[p, f"{r:.0f}", f"{s:.0f}"] for p, r, s in memory])
    print("## A replica SIGKILLed under 8 clients\n")
    replaced_s, statuses = kill
    table(
        ["replaced after (s)", "statuses of all replies"],
        [[f"{replaced_s:.1f}", ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items()))]],
    )
    print(f"## Bulk scoring: {bulk['clips']} clips of {CLIP_BULK_S:g} s\n")
    table(
        ["command", "seconds", "clips/s"],
        [
            ["emoserve predict DIR", f"{bulk['local_s']:.1f}", f"{bulk['clips'] / bulk['local_s']:.2f}"],  # type: ignore[operator]
            [
                "emoserve predict DIR --ray --address auto --actors 2",
                f"{bulk['ray_s']:.1f}",
                f"{bulk['clips'] / bulk['ray_s']:.2f}",
            ],  # type: ignore[operator]
        ],
    )
    print(
        f"Same files, order and emotions: {bulk['same']}; largest score difference "
        f"{bulk['max_score_diff']:.1e}.\n"
    )
    print(f"{load_average()} at the end.")


if __name__ == "__main__":
    main()
