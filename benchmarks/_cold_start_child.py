"""One fresh process of `cold_start.py` (not a benchmark itself): start -> ready one way, then report.

    python benchmarks/_cold_start_child.py '{"mode": "torch" | "ours" | "onnx" | "auto" | "baseline",
        "started": <time.time() of the parent just before it spawned us>, "path": ..., "warmup_s": 1.0,
        "clip_s": 5.0, "steady": 10}'

Prints one JSON line with offsets in seconds from `started` (so interpreter start counts) and the peak
RSS at ready. Only `json`, `sys` and `time` are imported before `import torch`, so the torch floor is pure.
"onnx" and "auto" (`--dtype auto --backend auto`, the default) never import torch (and report whether
anything did).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

TORCH_FREE = ("onnx", "auto")


def main() -> None:
    job = json.loads(sys.argv[1])
    started: float = job["started"]
    anchor = time.perf_counter() - (time.time() - started)  # perf_counter value at `started`

    def now() -> float:
        return time.perf_counter() - anchor

    out: dict[str, Any] = {}
    if job["mode"] not in TORCH_FREE:
        import torch

        out["t_import_torch"] = now()
    if job["mode"] != "torch":
        from common import peak_rss_mb, synthetic_clip

        path = Path(job["path"])
        recognizer = load_baseline(path) if job["mode"] == "baseline" else load_ours(path, job["mode"])
        out["t_loaded"] = now()
        recognizer.predict((synthetic_clip(job["warmup_s"], seed=1), 16_000))
        out["t_ready"] = now()
        out["peak_rss_mb"] = peak_rss_mb()
        out["threads"] = recognizer.backend.threads if job["mode"] in TORCH_FREE else torch.get_num_threads()
        out["torch_imported"] = "torch" in sys.modules
        out["runtime"] = f"{recognizer.backend.name} {recognizer.backend.dtype}"
        if job["steady"] > 0:
            out |= first_and_steady(recognizer, synthetic_clip(job["clip_s"], seed=2), job["steady"])
    print(json.dumps(out))


def load_ours(entry: Path, mode: str) -> Any:
    import emoserve

    if mode == "auto":
        return emoserve.load_model(entry, backend="auto", dtype="auto", device="cpu")
    return emoserve.load_model(
        entry, backend="onnx" if mode == "onnx" else "torch", device="cpu", dtype="float32"
    )


def load_baseline(published: Path) -> Any:
    """The common path: random init on the CPU, torch.load of the whole model.pt (no mmap), rename,
    load_state_dict. Wrapped in the same Recognizer so that the warm-up inference is identical."""
    import torch

    from emoserve.inference.recognizer import Recognizer
    from emoserve.inference.torch_backend import TorchBackend
    from emoserve.model.checkpoint import from_published, read_config
    from emoserve.model.entry import ModelInfo, read_labels
    from emoserve.model.network import Emotion2vec
    from emoserve.system import physical_cores

    torch.set_num_threads(physical_cores())  # as load_model does, so both sides compute alike
    labels = read_labels(published / "tokens.txt")
    config = read_config(published, len(labels))
    model = Emotion2vec(config)
    checkpoint = torch.load(published / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(from_published(checkpoint["model"], config))
    del checkpoint
    info = ModelInfo(published.name, published, config, labels, True, {})
    return Recognizer(TorchBackend(model.eval().requires_grad_(False)), info)


def first_and_steady(recognizer: Any, clip: Any, steady: int) -> dict[str, float]:
    """The first call on a real-length clip after ready, then the median of `steady` more."""
    from common import median, timed

    first = timed(lambda: recognizer.predict((clip, 16_000)))
    rest = [timed(lambda: recognizer.predict((clip, 16_000))) for _ in range(steady)]
    return {"first_call_s": first, "steady_call_s": median(rest)}


if __name__ == "__main__":
    main()
