"""The baseline of serve_start.py (not a benchmark itself): a minimal FastAPI + uvicorn app in the
common web-app pattern, where the model is loaded when the first request needs it.

    python benchmarks/_lazy_app.py --model .bench/large-published --port 8000

The first POST /v1/recognize loads the published checkpoint the common way (the same loader as
cold_start.py's baseline): `Emotion2vec(config)` with random init, `torch.load` of the whole model.pt
(weights_only=True, no mmap), `from_published`, `load_state_dict`; then every request predicts through
`emoserve.inference.recognizer.Recognizer`. GET /healthz answers as soon as uvicorn serves. torch is
imported at the top, as such apps do.
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path
from typing import Any

import torch  # noqa: F401  (imported at the top, as the common pattern does)
import uvicorn
from fastapi import FastAPI, UploadFile

from _cold_start_child import load_baseline

app = FastAPI(title="lazy baseline")
MODEL_DIR = Path()  # set by main()
_recognizer: Any = None
_lock = threading.Lock()
_predict_lock = threading.Lock()


def recognizer() -> Any:
    """The model, loaded by the first request that needs it."""
    global _recognizer
    with _lock:
        if _recognizer is None:
            _recognizer = load_baseline(MODEL_DIR)
    return _recognizer


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/v1/recognize")
def recognize(file: UploadFile) -> dict[str, Any]:
    model = recognizer()
    data = file.file.read()
    with _predict_lock:  # a Recognizer is not thread-safe, and FastAPI runs this in a thread pool
        result = model.predict(data)
    return result.to_dict()


def main() -> None:
    global MODEL_DIR
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="a model directory in the published layout")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args()
    MODEL_DIR = args.model
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
