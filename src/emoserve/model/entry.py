"""The slim cache entry: its layout, its manifest, reading and verifying it. Torch-free (resolving `--model`
to an entry is `cache.py`'s).

A published model directory (`config.yaml`, `model.pt`, `tokens.txt`) is converted once (by `convert.py`,
which needs torch) into an entry: the weights alone as safetensors under our parameter names, the parsed
config, the labels, a manifest, and the ONNX graphs of the same network (`export.py`). Reading an
entry needs neither torch nor onnxruntime, so either backend starts from here.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emoserve.errors import WeightsError
from emoserve.files import atomic_write, sha256_file
from emoserve.model.config import ModelConfig
from emoserve.model.labels import Label, parse_tokens

log = logging.getLogger(__name__)

ENTRY_FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
TOKENS_FILE = "tokens.txt"
FALLBACK_PRESET = "large"  # the architecture of the default model


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: Path  # the slim cache entry
    config: ModelConfig
    labels: tuple[Label, ...]
    random_weights: bool
    source: dict[str, Any]  # where the weights came from (path, size, sha256)
    onnx: dict[str, Any] = field(default_factory=dict)  # manifest "onnx": per dtype, its graph and checks

    def onnx_graph(self, dtype: str = "float32") -> Path | None:
        """The entry's ONNX graph for `dtype` ("float32" or "int8") when it was exported and checked."""
        record = self.onnx.get(dtype)
        if not isinstance(record, dict) or "file" not in record:
            return None
        path = self.path / record["file"]
        return path if path.is_file() else None

    @property
    def num_parameters(self) -> int:
        return int(sum(math.prod(shape) for shape in self.tensor_shapes().values()))

    def tensor_shapes(self) -> dict[str, list[int]]:
        return dict(json.loads((self.path / MANIFEST_FILE).read_text())["tensors"])


def read_labels(path: Path) -> tuple[Label, ...]:
    try:
        labels = parse_tokens(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise WeightsError(f"cannot read labels: {err}") from None
    if not labels:
        raise WeightsError(f"{path} lists no labels")
    return labels


def is_published_dir(path: Path) -> bool:
    return all((path / f).is_file() for f in ("config.yaml", "model.pt", "tokens.txt"))


def is_entry(path: Path) -> bool:
    return all((path / f).is_file() for f in (MANIFEST_FILE, WEIGHTS_FILE, CONFIG_FILE, TOKENS_FILE))


def is_random_dir(model_dir: Path) -> bool:
    """`make-test-model` marks its directories in configuration.json."""
    try:
        meta = json.loads((model_dir / "configuration.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(isinstance(meta, dict) and meta.get("emoserve", {}).get("random_weights"))


def source_stamp(model_pt: Path) -> dict[str, Any]:
    stat = model_pt.stat()
    return {"path": str(model_pt.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def read_entry(entry: Path) -> ModelInfo:
    try:
        manifest = read_manifest(entry)
        config = ModelConfig.from_dict(json.loads((entry / CONFIG_FILE).read_text()))
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise WeightsError(f"{entry}: broken cache entry ({err}); delete it to convert again") from None
    if manifest.get("format") != ENTRY_FORMAT:
        raise WeightsError(f"{entry}: cache entry format {manifest.get('format')}, expected {ENTRY_FORMAT}")
    labels = read_labels(entry / TOKENS_FILE)
    return ModelInfo(
        manifest["name"],
        entry,
        config,
        labels,
        bool(manifest["random_weights"]),
        manifest["source"],
        manifest.get("onnx") or {},
    )


def read_manifest(entry: Path) -> dict[str, Any]:
    return dict(json.loads((entry / MANIFEST_FILE).read_text()))


def write_manifest(entry: Path, manifest: dict[str, Any]) -> None:
    """Replace the manifest atomically (a reader sees the old one or the new one, never half)."""
    with atomic_write(entry / MANIFEST_FILE) as out:
        out.write(json.dumps(manifest, indent=2, ensure_ascii=False))


# ---------------------------------------------------------------------------------------------
# Verifying an entry: cheaply at every load, fully (content hashes) on demand and after a server is ready


def record_files(entry: Path, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Size and sha256 of the entry's files `names` (default: all but the manifest), once they are final."""
    if names is None:
        names = [p.name for p in entry.iterdir() if p.is_file() and p.name != MANIFEST_FILE]
    files = sorted(entry / name for name in names if not name.startswith("."))
    return {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in files}


def check_entry(entry: Path, *, full: bool = False) -> list[str]:
    """What is wrong with the entry's files, one sentence each; [] when nothing is.

    Cheap (every load): each recorded file is there with its recorded size, and the safetensors header
    parses and lists the manifest's tensors and shapes. `full` also compares content hashes."""
    try:
        manifest = read_manifest(entry)
    except (OSError, ValueError) as err:
        return [f"{MANIFEST_FILE} cannot be read ({err})"]
    problems = []
    files: dict[str, dict[str, Any]] = manifest.get("files") or {}
    for name, record in files.items():
        path = entry / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != record["size"]:
            problems.append(f"{name} is {path.stat().st_size:,} bytes, the manifest says {record['size']:,}")
        elif full and sha256_file(path) != record["sha256"]:
            problems.append(f"{name} has changed since it was converted (its sha256 differs)")
    if WEIGHTS_FILE not in files or (entry / WEIGHTS_FILE).is_file():
        problems += _check_safetensors_header(entry / WEIGHTS_FILE, manifest.get("tensors", {}))
    return problems


def _check_safetensors_header(path: Path, tensors: dict[str, list[int]]) -> list[str]:
    """The header of a safetensors file (8-byte length, JSON) against the manifest, without torch."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= min(100 << 20, path.stat().st_size - 8):
                return [f"{path.name} has no valid safetensors header"]
            header = json.loads(f.read(size))
    except (OSError, ValueError) as err:
        return [f"{path.name} cannot be read as safetensors ({err})"]
    header.pop("__metadata__", None)
    if {k: v.get("shape") for k, v in header.items()} != tensors:
        return [f"{path.name} does not hold the tensors the manifest lists"]
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + size + end != path.stat().st_size:
        return [f"{path.name} is {path.stat().st_size:,} bytes, its header says {8 + size + end:,}"]
    return []
