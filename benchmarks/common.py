"""Helpers shared by the benchmarks: options, the random test checkpoints, RSS, medians, tables.

Stdlib only at import time (numpy and emoserve are imported inside the functions that need them), so
that the cold-start child can import this module without distorting what it measures.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import select
import signal
import socket
import statistics
import subprocess
import sys
import time
import wave
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / ".bench"  # git-ignored
BENCH_HOME = BENCH_DIR / "home"  # EMOSERVE_HOME for the converted (slim safetensors) entries
CONVERSIONS_FILE = BENCH_HOME / "conversions.json"  # one-time conversion times, kept across runs
SAMPLE_RATE = 16_000  # Hz
MB = 1_000_000  # bytes; decimal, as the spec's "649 MB of fp32 weights"
PRESETS = ("tiny", "seed", "base", "large")  # emoserve.model.config.PRESETS (stdlib only here)


# ---------------------------------------------------------------------------------------------
# Options


def parser(description: str | None, default_runs: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--runs", type=int, default=default_runs, help=f"measurements per figure (default {default_runs})"
    )
    p.add_argument("--quick", action="store_true", help="one run and fewer calls: a smoke test, not figures")
    p.add_argument(
        "--preset",
        choices=PRESETS,
        default="large",
        help="architecture of the random-weight model (default large; tiny runs in seconds)",
    )
    return p


def run_count(args: argparse.Namespace) -> int:
    return 1 if args.quick else args.runs


# ---------------------------------------------------------------------------------------------
# The random-weight test checkpoint and its slim entry


@dataclass(frozen=True)
class BenchModel:
    published: Path  # the published layout: config.yaml, model.pt (with training state), tokens.txt
    entry: Path  # the converted slim entry under BENCH_HOME
    conversion_s: float  # one-time `emoserve convert` (whole command), measured when it last ran
    converted_at: str


def bench_model(preset: str) -> BenchModel:
    """The random `preset` checkpoint in the published layout and its converted entry, made once."""
    published = BENCH_DIR / f"{preset}-published"
    if not all((published / f).is_file() for f in ("config.yaml", "model.pt", "tokens.txt")):
        print(f"creating {published} (once) ...", file=sys.stderr)
        emoserve_cli("make-test-model", "--preset", preset, "--training-state", "--out", str(published))
    started_wall, started = time.time(), time.perf_counter()
    entry = Path(emoserve_cli("convert", str(published)).strip().splitlines()[-1])
    elapsed = time.perf_counter() - started
    conversions = json.loads(CONVERSIONS_FILE.read_text()) if CONVERSIONS_FILE.is_file() else {}
    if (entry / "manifest.json").stat().st_mtime >= started_wall or preset not in conversions:
        conversions[preset] = {"seconds": round(elapsed, 2), "at": time.strftime("%Y-%m-%d %H:%M")}
        CONVERSIONS_FILE.write_text(json.dumps(conversions, indent=2))
    return BenchModel(published, entry, conversions[preset]["seconds"], conversions[preset]["at"])


def emoserve_cli(*argv: str) -> str:
    """Run `emoserve ARGV` in its own process (so its memory never counts here); its stdout."""
    env = os.environ | {"EMOSERVE_HOME": str(BENCH_HOME)}
    done = subprocess.run(
        [sys.executable, "-m", "emoserve.cli", *argv], env=env, check=True, stdout=subprocess.PIPE, text=True
    )
    return done.stdout


def run_child(script: str, job: dict[str, Any]) -> dict[str, Any]:
    """Run `script --child JOB` (JSON) in a fresh interpreter with the benchmark cache; the JSON object
    it prints last. A failed child ends the benchmark with its stderr."""
    done = subprocess.run(
        [sys.executable, script, "--child", json.dumps(job)],
        capture_output=True,
        text=True,
        env=os.environ | {"EMOSERVE_HOME": str(BENCH_HOME)},
    )
    if done.returncode != 0:
        sys.exit(f"child failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def load_recognizer(
    entry: Path, backend: str = "torch", dtype: str = "float32", threads: int | None = None
) -> Any:
    """`emoserve.load_model` on the CPU, as a user would call it, on the given backend."""
    import emoserve

    os.environ["EMOSERVE_HOME"] = str(BENCH_HOME)
    return emoserve.load_model(str(entry), backend=backend, device="cpu", dtype=dtype, threads=threads)


def warm_page_cache(*paths: Path) -> None:
    """Read each file once: the page cache cannot be dropped without root, so both sides run warm."""
    for path in paths:
        with path.open("rb") as f:
            while f.read(16 << 20):
                pass


# ---------------------------------------------------------------------------------------------
# Inputs


def synthetic_clip(seconds: float, seed: int = 0) -> np.ndarray:
    """A deterministic speech-like float32 signal at 16 kHz: a gliding harmonic tone with a syllable-rate
    envelope, plus a little noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = 120 + 40 * np.sin(2 * np.pi * 0.5 * t + rng.uniform(0, np.pi))  # Hz
    phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)  # ~4 syllables/s
    wave = 0.2 * envelope * voice + 0.01 * rng.standard_normal(t.shape)
    return wave.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Measuring


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of `fn` takes."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def proc_status_bytes(field: str, pid: int | str = "self") -> int:
    """A memory field of /proc/<pid>/status (VmRSS, VmHWM, ...) in bytes; this process by default."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == field:
            return int(value.split()[0]) * 1024  # the kernel writes "kB", meaning KiB
    raise KeyError(f"/proc/{pid}/status has no {field}")


def peak_rss_mb() -> float:
    return proc_status_bytes("VmHWM") / MB


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between the nearest ranks; the value itself for one value."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


# ---------------------------------------------------------------------------------------------
# The HTTP service (serve_start.py, serve_load.py, serve_memory.py)

SERVE_LOG_DIR = BENCH_DIR / "serve"  # each server's stdout + stderr, for debugging
LOCALHOST = "127.0.0.1"


def wav_bytes(samples: np.ndarray) -> bytes:
    """A 16-bit PCM mono WAV file at 16 kHz, what a client uploads."""
    import numpy as np

    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(pcm.tobytes())
    return buffer.getvalue()


def clip_wav(seconds: float, seed: int = 2) -> bytes:
    """`synthetic_clip` as an uploadable WAV file."""
    return wav_bytes(synthetic_clip(seconds, seed))


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind((LOCALHOST, 0))
        port: int = probe.getsockname()[1]
        return port


def serve_argv(model: Path, port: int, *extra: str, device: str = "cpu") -> list[str]:
    """`emoserve serve` in this interpreter, on `device` (the CPU by default), on `port` of the loopback
    interface."""
    return [
        sys.executable,
        "-m",
        "emoserve.cli",
        "serve",
        "--model",
        str(model),
        "--host",
        LOCALHOST,
        "--port",
        str(port),
        "--device",
        device,
        *extra,
    ]


@dataclass(frozen=True)
class Reply:
    status: int  # HTTP status; 0 when the connection failed (see `error`)
    seconds: float  # request sent -> whole reply read
    finished: float  # time.perf_counter() when the reply was read
    retry_after: str | None  # the Retry-After header
    body: bytes
    error: str | None = None  # the exception, when there is no HTTP status

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """One keep-alive HTTP/1.1 connection (stdlib http.client), like one user of the service."""

    def __init__(self, port: int, timeout_s: float = 300.0) -> None:
        self.port = port
        self.timeout_s = timeout_s
        self._conn: http.client.HTTPConnection | None = None

    def get(self, path: str) -> Reply:
        return self.request("GET", path)

    def recognize(self, wav: bytes, path: str = "/v1/recognize") -> Reply:
        """POST the clip as the multipart field `file`, as `curl -F file=@clip.wav` does."""
        boundary = "emoserve-bench-boundary"
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="clip.wav"\r\n'
                f"Content-Type: audio/wav\r\n\r\n"
            ).encode()
            + wav
            + f"\r\n--{boundary}--\r\n".encode()
        )
        return self.request("POST", path, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> Reply:
        """One request; raises OSError (connection refused, reset, ...), after which the next call
        connects again."""
        if self._conn is not None and self._conn.sock is not None and dropped(self._conn.sock):
            self.close()  # the server closed the idle keep-alive connection (uvicorn: after 5 s)
        if self._conn is None:
            self._conn = http.client.HTTPConnection(LOCALHOST, self.port, timeout=self.timeout_s)
        started = time.perf_counter()
        try:
            self._conn.request(method, path, body=body, headers=headers or {})
            response = self._conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as error:
            self.close()
            if isinstance(error, OSError):
                raise
            raise ConnectionError(f"{type(error).__name__}: {error}") from error
        finished = time.perf_counter()
        if response.will_close:
            self.close()
        return Reply(response.status, finished - started, finished, response.getheader("Retry-After"), data)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def dropped(sock: socket.socket) -> bool:
    """An idle keep-alive connection that the server has closed is readable (EOF): reconnect before
    reusing it, as urllib3 and httpx do, rather than fail on a broken pipe."""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


class Server:
    """A server process started now; its stdout and stderr go to `log_path` under .bench/serve/.
    Use `running_server`, which always stops it."""

    def __init__(self, name: str, argv: Sequence[str], port: int) -> None:
        SERVE_LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.port = port
        self.log_path = SERVE_LOG_DIR / f"{name}.log"
        self._log = self.log_path.open("wb")
        env = os.environ | {"EMOSERVE_HOME": str(BENCH_HOME), "PYTHONUNBUFFERED": "1"}
        self.started = time.perf_counter()  # just before the spawn: interpreter start counts
        self.proc = subprocess.Popen(
            list(argv), stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def since_start(self, at: float | None = None) -> float:
        """Seconds from the spawn to `at` (a time.perf_counter() value; now by default)."""
        return (time.perf_counter() if at is None else at) - self.started

    def wait_for(self, path: str, timeout_s: float = 300.0, interval_s: float = 0.01) -> tuple[float, Reply]:
        """Poll GET `path` until it answers 200: (seconds from the spawn to that reply, the reply)."""
        client = Client(self.port, timeout_s=10.0)
        deadline = time.perf_counter() + timeout_s
        try:
            while True:
                self.check_alive()
                try:
                    reply = client.get(path)
                    if reply.status == 200:
                        return self.since_start(reply.finished), reply
                except OSError:
                    pass  # not listening yet
                if time.perf_counter() > deadline:
                    raise RuntimeError(
                        f"{self.name}: {path} not 200 within {timeout_s:g} s\n{self.log_tail()}"
                    )
                time.sleep(interval_s)
        finally:
            client.close()

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}\n{self.log_tail()}")

    def rss_bytes(self, field: str = "VmRSS") -> int:
        return proc_status_bytes(field, self.pid)

    def reset_peak_rss(self) -> None:
        """Start VmHWM again from the current RSS (Linux: writing 5 to /proc/PID/clear_refs)."""
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")

    def metric(self, name: str) -> float:
        """One unlabelled sample of GET /metrics (e.g. emoserve_batch_size_sum); NaN if absent."""
        client = Client(self.port, timeout_s=30.0)
        try:
            text = client.get("/metrics").body.decode()
        finally:
            client.close()
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return float(value)
        return float("nan")

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- last lines of {self.log_path} ---\n" + "\n".join(tail)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (the server drains and exits 0), SIGKILL after `timeout_s`; its exit status."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            return self.proc.returncode
        finally:
            self._log.close()


@contextmanager
def running_server(name: str, argv: Sequence[str], port: int) -> Iterator[Server]:
    """Start a server process; stop it (SIGTERM, then SIGKILL) however the block ends."""
    server = Server(name, argv, port)
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# Reporting


def header(title: str, args: argparse.Namespace, runs: int) -> None:
    print(f"# {title}\n")
    facts = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{os.cpu_count()} CPUs, {cpu_model()}, {platform.machine()}",
        "python / torch / onnxruntime / openvino": f"{platform.python_version()} / torch "
        f"{version('torch')} / onnxruntime {version('onnxruntime')} / openvino {_version('openvino')}",
        "model": f"RANDOM weights, preset {args.preset}",
        "runs": f"{runs}{' (--quick)' if args.quick else ''}",
        "load": load_average(),
        "command": " ".join([".venv/bin/python", *(os.path.relpath(sys.argv[0], REPO), *sys.argv[1:])]),
    }
    for key, value in facts.items():
        print(f"- {key}: {value}")
    print()


def _version(package: str) -> str:
    try:
        return version(package)
    except Exception:
        return "not installed"


def load_average() -> str:
    """The machine is shared: say how busy it was (1, 5 and 15 minute load averages)."""
    try:
        return "load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "load average unknown"


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a Markdown table (so it can be pasted into docs/benchmarks.md as is)."""
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print("\n".join(lines) + "\n")


def verdict(value: float, limit: float) -> str:
    return f"<= {limit:g}: {'met' if value <= limit else 'NOT met'}"
