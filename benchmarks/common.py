"""Helpers shared by the benchmarks: options, the random test checkpoints, RSS, medians, tables.

Stdlib only at import time (numpy and emoserve are imported inside the functions that need them), so
that the cold-start child can import this module without distorting what it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
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
PRESETS = ("tiny", "seed", "base", "large")  # mirrors emoserve.cli.PRESETS


# ---------------------------------------------------------------------------------------------
# Options


def parser(description: str | None, default_runs: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=default_runs,
                   help=f"measurements per figure (default {default_runs})")
    p.add_argument("--quick", action="store_true", help="one run and fewer calls: a smoke test, not figures")
    p.add_argument("--preset", choices=PRESETS, default="large",
                   help="architecture of the random-weight model (default large; tiny runs in seconds)")
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
    done = subprocess.run([sys.executable, "-m", "emoserve.cli", *argv], env=env, check=True,
                          stdout=subprocess.PIPE, text=True)
    return done.stdout


def load_recognizer(entry: Path) -> Any:
    """`emoserve.load_model` on the CPU, as a user would call it."""
    import emoserve

    os.environ["EMOSERVE_HOME"] = str(BENCH_HOME)
    return emoserve.load_model(str(entry), device="cpu")


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


def proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == field:
            return int(value.split()[0]) * 1024  # the kernel writes "kB", meaning KiB
    raise KeyError(f"/proc/self/status has no {field}")


def peak_rss_mb() -> float:
    return proc_status_bytes("VmHWM") / MB


# ---------------------------------------------------------------------------------------------
# Reporting


def header(title: str, args: argparse.Namespace, runs: int) -> None:
    print(f"# {title}\n")
    facts = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{os.cpu_count()} CPUs, {cpu_model()}, {platform.machine()}",
        "python / torch": f"{platform.python_version()} / torch {version('torch')}",
        "model": f"RANDOM weights, preset {args.preset}",
        "runs": f"{runs}{' (--quick)' if args.quick else ''}",
        "load": load_average(),
        "command": " ".join([".venv/bin/python", *(os.path.relpath(sys.argv[0], REPO), *sys.argv[1:])]),
    }
    for key, value in facts.items():
        print(f"- {key}: {value}")
    print()


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
