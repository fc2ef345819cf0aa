"""Service start: fresh server processes -> /healthz, /readyz and the first recognition, against a
baseline app that loads the model on its first request. CPU only.

Every measurement is a new server process, timed from just before this script spawns it (interpreter
start counts). Four kinds, interleaved run by run with the order rotating:

- ours (UI):     `emoserve serve --model <slim entry> --device cpu`, the default (backend auto: onnx on a
                 CPU), with the Gradio web UI (which the server mounts at / during start-up). Poll GET
                 /healthz until 200, then GET /readyz until 200, then POST /v1/recognize with a 5 s clip
                 (the first request after ready), then wait until / answers 200 (the UI is up: steady
                 state), then the same request `--steady` more times; then each other route a user hits
                 first (frame granularity, /v1/timeline, the UI's recognise through Gradio's API) once
                 and `--steady` times, in an order that rotates run by run: first / steady per route.
                 The UI's mount time is the server's own log line.
- ours (no UI):  the same with `--no-ui`.
- cold (no UI):  the same as "ours (no UI)" with the entry's compiled-model cache (OpenVINO's, kept in the
                 entry) removed just before the spawn: the first start after an install or an upgrade.
- onnx float32 (no UI): `--no-ui --backend onnx --dtype float32`, the default before issue 23, for the
                 ratio `--dtype auto` must hold (spawn -> ready and first result <= 1.1x).
- torch (no UI): the same with `--no-ui --backend torch --dtype float32`: the PyTorch backend, for the ratio.
- baseline:      benchmarks/_lazy_app.py, a minimal FastAPI + uvicorn app that loads the published
                 model.pt the common way on its first request (random init, torch.load of the whole file,
                 from_published, load_state_dict). Poll /healthz, then POST the same clip at once, then
                 the steady requests.

Polling: every 10 ms until /healthz answers, then every 10 ms on /readyz. Each request is a 5 s WAV sent
as multipart `file` over one keep-alive connection. Peak RSS is VmHWM of the server process at the end.
The model pages are read once before measuring, so every side starts with a warm page cache.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    LOCALHOST,
    SERVE_LOG_DIR,
    Client,
    Server,
    bench_model,
    clip_wav,
    free_port,
    header,
    load_average,
    median,
    parser,
    run_count,
    running_server,
    serve_argv,
    table,
    verdict,
    warm_page_cache,
)

LAZY_APP = Path(__file__).resolve().parent / "_lazy_app.py"
KINDS = ("ours", "ours_no_ui", "cold_no_ui", "onnx_no_ui", "torch_no_ui", "baseline")
NAMES = {
    "ours": "ours (UI)",
    "ours_no_ui": "ours (--no-ui)",
    "cold_no_ui": "ours, cache cold (--no-ui)",
    "onnx_no_ui": "onnx float32 (--no-ui)",
    "torch_no_ui": "torch float32 (--no-ui)",
    "baseline": "baseline (lazy app)",
}
FLOAT32 = ("--dtype", "float32")
EXTRA_FLAGS = {
    "ours": (),
    "ours_no_ui": ("--no-ui",),
    "cold_no_ui": ("--no-ui",),
    "onnx_no_ui": ("--no-ui", "--backend", "onnx", *FLOAT32),
    "torch_no_ui": ("--no-ui", "--backend", "torch", *FLOAT32),
}
CACHE_DIR = "openvino-cache"  # the compiled models kept in the entry (inference/openvino_backend.py)
CLIP_S = 5.0
UI_MOUNTED = re.compile(r"web UI mounted at / in ([0-9.]+) s")  # the server's log line
TARGETS = {
    "healthz_s": 2.0,
    "first_vs_steady": 1.1,
    "first_result_vs_baseline": 0.4,
    "ready_with_ui_s": 3.0,
    "vs_onnx_float32": 1.1,  # issue 23: the default's spawn -> ready and first result / onnx float32's
}
# the routes measured after the process's first request (each: its first request, then its steady ones)
OTHER_ROUTES = {
    "frame": "POST /v1/recognize?granularity=frame",
    "timeline": "POST /v1/timeline",
    "ui": "the web UI's recognise (Gradio API)",
}


def main() -> None:
    p = parser(__doc__, default_runs=3)
    p.add_argument("--steady", type=int, default=10, help="steady-state requests per process (default 10)")
    p.add_argument(
        "--kinds",
        default=",".join(KINDS),
        help=f"a subset of {','.join(KINDS)} (baseline is always measured)",
    )
    args = p.parse_args()
    kinds = tuple(k for k in KINDS if k in args.kinds.split(",") or k == "baseline")
    runs = run_count(args)
    steady = 2 if args.quick else args.steady
    header("Service start", args, runs)
    model = bench_model(args.preset)
    warm_page_cache(model.published / "model.pt", *model.entry.glob("model.*"))
    wav = clip_wav(CLIP_S)
    results: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    for i in range(runs):
        # rotate the order so drift hits every kind alike
        for kind in kinds[i % len(kinds) :] + kinds[: i % len(kinds)]:
            path = model.published if kind == "baseline" else model.entry
            results[kind].append(one_process(kind, path, wav, steady, f"start-{kind}-{i + 1}", i))
            print(f"run {i + 1}/{runs} {kind:10s} {summary(results[kind][-1])}", file=sys.stderr)
    report(results, steady)


def one_process(kind: str, model: Path, wav: bytes, steady: int, name: str, run: int) -> dict[str, Any]:
    port = free_port()
    if kind == "cold_no_ui":
        shutil.rmtree(model / CACHE_DIR, ignore_errors=True)
    if kind == "baseline":
        argv = [sys.executable, str(LAZY_APP), "--model", str(model), "--port", str(port)]
    else:
        argv = serve_argv(model, port, *EXTRA_FLAGS[kind])
    with running_server(name, argv, port) as server:
        out: dict[str, Any] = {}
        out["t_healthz"], _ = server.wait_for("/healthz")
        if kind != "baseline":
            out["t_ready"], ready = server.wait_for("/readyz")
            out |= {f"server_{k}": v for k, v in ready.json()["timings"].items()}
        client = Client(server.port)
        try:
            first = checked(client.recognize(wav), server)
            out["first_s"] = first.seconds
            out["t_first_result"] = server.since_start(first.finished)
            out["scores"] = first.json()["scores"]
            if kind == "ours":
                out["t_ui"], _ = server.wait_for("/", interval_s=0.1)
            out["steady_s"] = median([checked(client.recognize(wav), server).seconds for _ in range(steady)])
            if kind != "baseline":
                about = client.get("/v1/model").json()
                out["backend"] = f"{about['backend']} {about['dtype']}"
                out |= other_routes(kind, client, wav, steady, server, run)
        finally:
            client.close()
        out["peak_rss_mb"] = server.rss_bytes("VmHWM") / 1e6
        if mounted := UI_MOUNTED.search(server.log_path.read_text(errors="replace")):
            out["server_ui_mount_s"] = float(mounted.group(1))
        return out


def other_routes(
    kind: str, client: Client, wav: bytes, steady: int, server: Server, run: int
) -> dict[str, float]:
    """After the process's first request (POST /v1/recognize): each other route's first request, then its
    steady latency (median of `steady`), the routes in an order that rotates run by run. The UI's
    recognise goes through Gradio's API (gradio_client: the handler a browser's click runs)."""
    calls: dict[str, Any] = {
        "frame": lambda: checked(client.recognize(wav, "/v1/recognize?granularity=frame"), server).seconds,
        "timeline": lambda: checked(client.recognize(wav, "/v1/timeline"), server).seconds,
    }
    ui = None
    if kind == "ours":
        from gradio_client import Client as GradioClient
        from gradio_client import handle_file

        clip = SERVE_LOG_DIR / "start-clip.wav"
        clip.write_bytes(wav)
        ui = GradioClient(
            f"http://{LOCALHOST}:{server.port}/", verbose=False, analytics_enabled=False, download_files=False
        )

        def ui_recognise() -> float:
            started = time.perf_counter()
            ui.predict(
                audio=handle_file(str(clip)), granularity="utterance", embedding=False, api_name="/recognize"
            )
            return time.perf_counter() - started

        calls["ui"] = ui_recognise
    names = list(calls)
    names = names[run % len(names) :] + names[: run % len(names)]
    out = {}
    try:
        for route in names:
            out[f"first_{route}_s"] = calls[route]()
            out[f"steady_{route}_s"] = median([calls[route]() for _ in range(steady)])
    finally:
        if ui is not None:
            ui.close()
    return out


def checked(reply: Any, server: Server) -> Any:
    if reply.status != 200:
        raise RuntimeError(f"{server.name}: HTTP {reply.status}: {reply.body[:500]!r}\n{server.log_tail()}")
    return reply


def summary(result: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in result.items() if isinstance(v, float))


def report(results: dict[str, list[dict[str, Any]]], steady: int) -> None:
    def values(kind: str, key: str) -> list[float]:
        return [r[key] for r in results[kind] if key in r]

    def med(kind: str, key: str) -> float:
        return median(values(kind, key))

    def route_ratio(kind: str, route: str) -> float | None:
        firsts, steadies = values(kind, f"first_{route}_s"), values(kind, f"steady_{route}_s")
        return median(firsts) / median(steadies) if firsts else None

    def spread(kind: str, key: str, fmt: str = ".2f") -> str:
        v = values(kind, key)
        return f"{median(v):{fmt}} ({min(v):{fmt}}-{max(v):{fmt}})" if v else "-"

    for runs in results.values():
        for r in runs:
            r["first_vs_steady"] = r["first_s"] / r["steady_s"]
            for route in OTHER_ROUTES:
                if f"first_{route}_s" in r:
                    r[f"first_vs_steady_{route}"] = r[f"first_{route}_s"] / r[f"steady_{route}_s"]
    print(
        "Medians over fresh processes (min-max in brackets); seconds from the spawn of the server process.\n"
    )
    rows = [
        ("start -> /healthz 200", "t_healthz", ".2f"),
        ("start -> /readyz 200", "t_ready", ".2f"),
        ("  of which model load (server's own timing)", "server_model_load_s", ".2f"),
        ("  of which warm-up (server's own timing)", "server_warmup_s", ".2f"),
        ("web UI mount (server's log)", "server_ui_mount_s", ".2f"),
        (f"first {CLIP_S:g} s request (s)", "first_s", ".3f"),
        ("start -> first result", "t_first_result", ".2f"),
        ("start -> / answers 200 (polled after the first result)", "t_ui", ".2f"),
        (f"steady latency, median of {steady} (s)", "steady_s", ".3f"),
        ("first request / steady", "first_vs_steady", ".2f"),
        *(
            (f"  {OTHER_ROUTES[route]}: first / steady", f"first_vs_steady_{route}", ".2f")
            for route in OTHER_ROUTES
        ),
        ("peak RSS of the server (MB)", "peak_rss_mb", ".0f"),
    ]
    kinds = list(results)
    table(
        ["", *(NAMES[k] for k in kinds)],
        [[label, *(spread(k, key, fmt) for k in kinds)] for label, key, fmt in rows],
    )
    print("For the baseline the first request includes loading the model; ours' comes after /readyz.\n")
    figures = []
    for kind in kinds[:-1]:
        name = NAMES[kind]
        healthz = med(kind, "t_healthz")
        first_ratio = med(kind, "first_s") / med(kind, "steady_s")
        start_ratio = med(kind, "t_first_result") / med("baseline", "t_first_result")
        figures += [
            [f"{name}: start -> /healthz (s)", f"{healthz:.2f}", verdict(healthz, TARGETS["healthz_s"])],
            [
                f"{name}: first request after ready / steady (ratio)",
                f"{first_ratio:.3f}",
                verdict(first_ratio, TARGETS["first_vs_steady"]),
            ],
            *(
                [
                    f"{name}: {OTHER_ROUTES[route]}, first / steady",
                    f"{ratio:.3f}",
                    verdict(ratio, TARGETS["first_vs_steady"]),
                ]
                for route in OTHER_ROUTES
                if (ratio := route_ratio(kind, route)) is not None
            ),
            [
                f"{name}: start -> first result, ratio to baseline",
                f"{start_ratio:.3f}",
                verdict(start_ratio, TARGETS["first_result_vs_baseline"]),
            ],
        ]
    if "ours" in results and results["ours"] and "t_ui" in results["ours"][0]:
        ready_ui = med("ours", "t_ready")
        figures.append(
            [
                f"{NAMES['ours']}: start -> /readyz (s)",
                f"{ready_ui:.2f}",
                verdict(ready_ui, TARGETS["ready_with_ui_s"]),
            ]
        )
    if "onnx_no_ui" in results:
        for kind in ("ours_no_ui", "cold_no_ui"):
            for key, what in (("t_ready", "spawn -> ready"), ("t_first_result", "spawn -> first result")):
                if kind in results:
                    ratio = med(kind, key) / med("onnx_no_ui", key)
                    figures.append(
                        [
                            f"{NAMES[kind]}: {what} / onnx float32's",
                            f"{ratio:.3f}",
                            verdict(ratio, TARGETS["vs_onnx_float32"]),
                        ]
                    )
        for kind in ("ours_no_ui", "torch_no_ui"):
            if kind in results:
                ratio = med(kind, "peak_rss_mb") / med("onnx_no_ui", "peak_rss_mb")
                figures.append([f"{NAMES[kind]}: peak RSS / onnx float32's", f"{ratio:.3f}", "(no target)"])
    table(["figure (ratios of medians)", "value", "target"], figures)
    print("Backends: " + ", ".join(f"{NAMES[k]}: {results[k][0].get('backend')}" for k in kinds[:-1]) + ".")
    baseline_ratio = med("baseline", "first_s") / med("baseline", "steady_s")
    print(f"Baseline first request / steady: {baseline_ratio:.1f}x (it loads the model).")
    print(f"Same answer from every process: {same_scores(results)}.")
    print(f"{load_average()} at the end. Server logs: .bench/serve/start-*.log")


def same_scores(results: dict[str, list[dict[str, Any]]]) -> str:
    """Ours and the baseline must agree: the largest score difference over all processes, within 1e-4 at
    float32 and within the agreement check's bound (5e-3) at a lower precision."""
    reference = next(iter(results["baseline"]))["scores"]
    said = []
    for low in (False, True):
        runs = [
            r for rs in results.values() for r in rs if ("float32" not in r.get("backend", "float32")) == low
        ]
        if runs:
            diff = max(abs(r["scores"][k] - v) for r in runs for k, v in reference.items())
            bound = 5e-3 if low else 1e-4
            what = "lower precision" if low else "float32"
            said.append(
                f"{what}: largest score difference {diff:.1e} ({'ok' if diff <= bound else 'DIFFERENT'})"
            )
    return "; ".join(said)


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as error:
        sys.exit(str(error))
    except json.JSONDecodeError as error:
        sys.exit(f"a server answered something that is not JSON: {error}")
