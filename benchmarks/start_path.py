"""The start path, this tree against another commit (default: 1b3552a, the flat layout before the packages):
what `emoserve --help`, the server's import and `emoserve serve` cost, run alternately from the same
interpreter and venv, so that a change of layout cannot add imports to the start path unseen.

For each tree, `--runs` times, alternating:
- `emoserve --help`: spawn -> exit (the CLI must stay light: no numpy, no torch);
- the server's import (`emoserve.api.app` here, `emoserve.server` in the flat layout): spawn -> imported,
  and how many modules that loaded;
- the library: spawn -> `emoserve.load_model(entry)` and a first 1 s result (the backend `auto` picks);
- `emoserve serve --no-ui` (onnx backend): spawn -> /healthz, -> /readyz.
The model is the random `--preset` (default tiny: the start path itself; large adds the model's load).

The other tree is a git worktree under .bench/ (made once); its `src` goes first on PYTHONPATH.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from common import (
    BENCH_DIR,
    REPO,
    bench_model,
    free_port,
    header,
    median,
    parser,
    run_count,
    running_server,
    serve_argv,
    table,
)

SERVER_MODULE = {"packages": "emoserve.api.app", "flat": "emoserve.server"}


def worktree(rev: str) -> Path:
    path = BENCH_DIR / f"tree-{rev}"
    if not (path / "src" / "emoserve").is_dir():
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), rev],
            check=True,
            capture_output=True,
        )
    return path


def layout(src: Path) -> str:
    return "packages" if (src / "emoserve" / "api").is_dir() else "flat"


def env_for(src: Path) -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(src), "PYTHONDONTWRITEBYTECODE": "1"}


def spawn_seconds(src: Path, code: str) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code], env=env_for(src), capture_output=True, text=True, check=True
    )
    return time.perf_counter() - started, done.stdout.strip()


def help_seconds(src: Path) -> float:
    code = (
        "import sys\nfrom emoserve.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\n"
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, 'the CLI loaded numpy/torch'"
    )
    return spawn_seconds(src, code)[0]


def server_import(src: Path) -> tuple[float, int]:
    code = f"import sys, {SERVER_MODULE[layout(src)]}\nprint(len(sys.modules))"
    seconds, out = spawn_seconds(src, code)
    return seconds, int(out)


def library_seconds(src: Path, entry: Path) -> float:
    code = (
        "import numpy as np, emoserve\n"
        f"rec = emoserve.load_model({str(entry)!r}, device='cpu', progress=False)\n"
        "rec.predict((np.zeros(16000, np.float32), 16000))"
    )
    return spawn_seconds(src, code)[0]


def serve_seconds(src: Path, entry: Path, n: int) -> tuple[float, float]:
    port = free_port()
    argv = serve_argv(entry, port, "--no-ui")
    os.environ["PYTHONPATH"] = str(src)  # the server process inherits it
    try:
        with running_server(f"start-path-{layout(src)}-{n}", argv, port) as server:
            healthz, _ = server.wait_for("/healthz")
            readyz, _ = server.wait_for("/readyz")
    finally:
        os.environ.pop("PYTHONPATH", None)
    return healthz, readyz


def main() -> None:
    p = parser(__doc__, default_runs=7)
    p.set_defaults(preset="tiny")
    p.add_argument("--against", default="1b3552a", help="the commit to compare with (default 1b3552a)")
    args = p.parse_args()
    runs = run_count(args)
    header(f"The start path: this tree against {args.against}", args, runs)
    trees = {"this tree": REPO / "src", args.against: worktree(args.against) / "src"}
    entry = bench_model(args.preset).entry
    figures: dict[str, dict[str, list[float]]] = {name: {} for name in trees}
    for n in range(runs):
        for name, src in trees.items() if n % 2 == 0 else reversed(trees.items()):
            got = figures[name]
            got.setdefault("help", []).append(help_seconds(src))
            seconds, modules = server_import(src)
            got.setdefault("import", []).append(seconds)
            got.setdefault("modules", []).append(modules)
            got.setdefault("library", []).append(library_seconds(src, entry))
            healthz, readyz = serve_seconds(src, entry, n)
            got.setdefault("healthz", []).append(healthz)
            got.setdefault("readyz", []).append(readyz)
    this, other = figures["this tree"], figures[args.against]
    rows = []
    for key, label in [
        ("help", "spawn -> `emoserve --help` done (s)"),
        ("import", "spawn -> the server's module imported (s)"),
        ("modules", "modules loaded by that import"),
        ("library", "spawn -> load_model + first 1 s result (s)"),
        ("healthz", "spawn -> /healthz 200, `serve --no-ui` (s)"),
        ("readyz", "spawn -> /readyz 200, `serve --no-ui` (s)"),
    ]:
        a, b = median(this[key]), median(other[key])
        rows.append([label, f"{a:.3f}", f"{b:.3f}", f"{a / b:.3f}"])
    table(["median of runs", "this tree", args.against, "ratio"], rows)


if __name__ == "__main__":
    main()
