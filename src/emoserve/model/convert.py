"""Converting a published checkpoint directory into a slim cache entry, and loading an entry into torch.

A published model directory (`config.yaml`, `model.pt`, `tokens.txt`) is converted once into an entry
(`entry.py`): the weights alone as safetensors under our parameter names, the parsed config, the labels, a
manifest and the ONNX graphs (`export.py`). Loading an entry memory-maps the safetensors file into a model
built on the meta device, so no parameter is ever allocated or randomly initialised before it is overwritten.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from emoserve.errors import WeightsError
from emoserve.files import atomic_dir, sha256_file
from emoserve.model.checkpoint import check_state, meta_model, read_published, state_shapes
from emoserve.model.entry import (
    CONFIG_FILE,
    ENTRY_FORMAT,
    MANIFEST_FILE,
    TOKENS_FILE,
    WEIGHTS_FILE,
    ModelInfo,
    is_published_dir,
    is_random_dir,
    read_entry,
    read_manifest,
    record_files,
    source_stamp,
    write_manifest,
)
from emoserve.model.export import onnx_record
from emoserve.model.network import Emotion2vec

log = logging.getLogger(__name__)


def convert(
    model_dir: Path, entry: Path, *, name: str | None = None, onnx: bool | None = None, int8: bool = False
) -> Path:
    """Convert a published directory into a slim cache entry at `entry` (atomically).

    `onnx` (default: unless EMOSERVE_EXPORT_ONNX=0) also exports the float32 ONNX graph for the onnx
    backend, `int8` the dynamically quantized one too."""
    from emoserve.model.export import export_enabled, onnx_record

    model_dir = Path(model_dir)
    if not is_published_dir(model_dir):
        raise WeightsError(f"{model_dir} is not a model directory (config.yaml, model.pt, tokens.txt)")
    started = time.perf_counter()
    config, labels, state = read_published(model_dir)
    source = source_stamp(model_dir / "model.pt") | {"sha256": sha256_file(model_dir / "model.pt")}
    manifest = {
        "format": ENTRY_FORMAT,
        "name": name or model_dir.resolve().name,
        "random_weights": is_random_dir(model_dir),
        "source": source,
        "tensors": {k: list(v.shape) for k, v in state.items()},
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with atomic_dir(Path(entry)) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
        (tmp / TOKENS_FILE).write_text("\n".join(label.token for label in labels), encoding="utf-8")
        if export_enabled() if onnx is None else onnx:
            model = meta_model(config)
            model.load_state_dict(state, strict=True, assign=True)
            model.eval().requires_grad_(False)
            dtypes = ("float32", "int8") if int8 else ("float32",)
            manifest["onnx"] = {dtype: onnx_record(model, tmp, dtype) for dtype in dtypes}
        manifest["files"] = record_files(tmp)  # content hashes: `emoserve verify`, the server's check
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    log.info("converted %s -> %s in %.1f s", model_dir, entry, time.perf_counter() - started)
    return Path(entry)


def load_entry(
    entry: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Emotion2vec, ModelInfo]:
    """Memory-map the entry's weights into a model whose parameters were never allocated."""
    info = read_entry(entry)
    state = load_file(str(entry / WEIGHTS_FILE), device="cpu")  # zero-copy mmap on the CPU
    model = meta_model(info.config)
    check_state(state, state_shapes(model))
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model, info


def add_onnx(entry: Path, dtype: str = "float32") -> ModelInfo:
    """Export the `dtype` graph into an existing entry (an older one, or int8 on demand) and record it."""
    model, _ = load_entry(entry)
    record = onnx_record(model, entry, dtype)
    manifest = read_manifest(entry)
    manifest.setdefault("onnx", {})[dtype] = record
    if "file" in record and "files" in manifest:
        manifest["files"] |= record_files(entry, [record["file"], record["data"]])
    write_manifest(entry, manifest)
    return read_entry(entry)
