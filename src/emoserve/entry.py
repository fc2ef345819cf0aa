"""The slim cache entry: its layout, reading it, and resolving `--model` to one. Torch-free.

A published model directory (`config.yaml`, `model.pt`, `tokens.txt`) is converted once (by `weights.py`,
which needs torch) into an entry: the weights alone as safetensors under our parameter names, the parsed
config, the labels, a manifest, and the ONNX graphs of the same network (`onnx_export.py`). Reading an
entry and finding one for `--model` need neither torch nor onnxruntime, so either backend starts from here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import hub
from .config import ModelConfig
from .errors import EmoserveError
from .hub import Hub
from .labels import Label, parse_tokens
from .workdir import work_dir

log = logging.getLogger(__name__)

ENTRY_FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
TOKENS_FILE = "tokens.txt"
FALLBACK_PRESET = "large"  # the architecture of the default model


class WeightsError(EmoserveError, RuntimeError):
    """A model that cannot be found, downloaded, converted or loaded; the message says what to do."""

    code = "model_unavailable"


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


@contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `dest` that replaces `dest` only if the block succeeds."""
    with work_dir(dest) as tmp:
        yield tmp
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)


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
    tmp = entry / f".{MANIFEST_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    os.replace(tmp, entry / MANIFEST_FILE)


# ---------------------------------------------------------------------------------------------
# Verifying an entry: cheaply at every load, fully (content hashes) on demand and after a server is ready


def record_files(entry: Path, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Size and sha256 of the entry's files `names` (default: all but the manifest), once they are final."""
    if names is None:
        names = [p.name for p in entry.iterdir() if p.is_file() and p.name != MANIFEST_FILE]
    files = sorted(entry / name for name in names if not name.startswith("."))
    return {p.name: {"size": p.stat().st_size, "sha256": hub.sha256_file(p)} for p in files}


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
        elif full and hub.sha256_file(path) != record["sha256"]:
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


def ensure_intact(entry: Path) -> Path:
    """The cheap check at load. A damaged entry is rebuilt from its source directory when that is still
    there (with a warning), else refused with what to do."""
    problems = check_entry(entry)
    if not problems:
        return entry
    what = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
    if rebuild(entry, what):
        return entry
    raise WeightsError(
        f"{entry}: the converted model is damaged ({what}) and its source is gone; delete this directory "
        "and convert or download the model again (`emoserve convert DIR` / `emoserve download NAME`)"
    )


def rebuild(entry: Path, what: str) -> bool:
    """Convert a damaged entry again from the directory it was converted from, when that is still there
    (with a warning naming `what` was wrong); False when there is no source to rebuild it from."""
    info = read_entry(entry)  # an unreadable manifest fails here, with what to do
    source = Path(info.source["path"]).parent if info.source.get("path") else None
    if source is None or not is_published_dir(source):
        return False
    log.warning("%s is damaged (%s): converting it again from %s", entry, what, source)
    from .weights import convert

    convert(source, entry, name=info.name)
    return True


# ---------------------------------------------------------------------------------------------
# Resolving --model


def home() -> Path:
    """The cache directory: $EMOSERVE_HOME, else the user's cache dir."""
    if env := os.environ.get("EMOSERVE_HOME"):
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("emoserve"))


def resolve(
    model: str | os.PathLike[str] | None = None,
    *,
    hub_name: Hub = "auto",
    cache: Path | None = None,
    progress: bool = True,
) -> Path:
    """The slim cache entry for `model`: a local directory or a known name (default: large).

    Only when no model is given and the default can be neither found nor downloaded does this
    fall back - loudly - to a generated random-weight model of the large architecture."""
    cache = cache or home()
    if model is None:
        try:
            return resolve_name(hub.DEFAULT_MODEL, hub_name=hub_name, cache=cache, progress=progress)
        except (WeightsError, hub.HubError) as err:
            return random_fallback(cache, reason=str(err))
    path = Path(model).expanduser()
    if path.is_dir():
        return resolve_dir(path, cache)
    if hub.canonical_name(str(model)) is not None:
        return resolve_name(str(model), hub_name=hub_name, cache=cache, progress=progress)
    raise WeightsError(
        f"model {str(model)!r} is neither a directory nor a known name "
        f"({', '.join(hub.KNOWN_MODELS)}, also as iic/... or emotion2vec/...)"
    )


def resolve_dir(path: Path, cache: Path) -> Path:
    if is_entry(path):
        return path
    if not is_published_dir(path):
        raise WeightsError(
            f"{path} is not a model directory: expected config.yaml, model.pt and tokens.txt "
            f"(the published layout) or a converted entry ({MANIFEST_FILE}, {WEIGHTS_FILE})"
        )
    # one entry per source directory, reused while model.pt is unchanged (checked by size and mtime,
    # not by re-hashing 1.9 GB on every start)
    entry = _converted_dir(path, cache)
    if is_entry(entry):
        stamp = read_entry(entry).source
        current = source_stamp(path / "model.pt")
        if all(stamp.get(k) == current[k] for k in ("size", "mtime_ns")):
            return entry
        log.info("%s changed since it was converted; converting again", path / "model.pt")
    from .weights import convert  # torch: only when there is something to convert

    return convert(path, entry)


def _converted_dir(path: Path, cache: Path) -> Path:
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return cache / "converted" / f"{path.resolve().name}-{digest}"


def resolve_name(name: str, *, hub_name: Hub, cache: Path, progress: bool) -> Path:
    canonical = hub.canonical_name(name)
    if canonical is None:
        raise WeightsError(f"unknown model name {name!r}; known: {', '.join(hub.KNOWN_MODELS)}")
    entry = cache / "models" / canonical
    if is_entry(entry):
        return entry  # no network at all when the cache has the model
    download_dir = cache / "downloads" / canonical
    hub.download(canonical, download_dir, hub=hub_name, progress=progress)
    from .weights import convert

    try:
        return convert(download_dir, entry, name=canonical)
    finally:
        shutil.rmtree(download_dir, ignore_errors=True)  # the entry holds all inference needs


def random_fallback(cache: Path, reason: str) -> Path:
    name = f"{hub.DEFAULT_MODEL}-random"
    log.warning(
        "\n%s\n!! %s is not cached and could not be downloaded:\n!!   %s\n"
        "!! Using a RANDOM-WEIGHT model of the same (large) architecture instead.\n"
        "!! Its predictions are MEANINGLESS; pass --model to use real weights.\n%s",
        "!" * 78,
        hub.DEFAULT_MODEL,
        reason,
        "!" * 78,
    )
    entry = cache / "models" / name
    if is_entry(entry):
        return entry
    from .weights import convert, make_test_model

    with work_dir(entry, suffix=".source") as tmp:  # the 1.9 GB random checkpoint, until converted
        make_test_model(tmp / "published", preset=FALLBACK_PRESET, seed=0)
        return convert(tmp / "published", entry, name=name)


def entry_of(model: str | os.PathLike[str] | None) -> Path:
    """The converted entry of `model` as it is now (a converted directory, the cache entry of a published
    directory or of a name); never downloads or converts."""
    path = Path(model).expanduser() if model is not None else None
    if path is not None and path.is_dir():
        if is_entry(path):
            return path
        if is_published_dir(path):
            entry = _converted_dir(path, home())
            if is_entry(entry):
                return entry
            raise WeightsError(f"{path} has not been converted yet: run `emoserve convert {path}`")
        raise WeightsError(f"{path} is not a model directory (config.yaml, model.pt, tokens.txt)")
    name, entry = _named_entry(model)
    if not is_entry(entry):
        raise WeightsError(f"{name} is not in the cache: run `emoserve download {name}`")
    return entry


def _named_entry(model: str | os.PathLike[str] | None) -> tuple[str, Path]:
    """The canonical name of `model` (default: the default model) and where its cache entry belongs."""
    name = hub.canonical_name(str(model or hub.DEFAULT_MODEL))
    if name is None:
        raise WeightsError(f"model {model!r} is neither a directory nor a known name")
    return name, home() / "models" / name


def describe(model: str | os.PathLike[str] | None) -> dict[str, Any]:
    """What `emoserve info` shows; never downloads or converts."""
    path = Path(model).expanduser() if model is not None else None
    if path is None or not path.is_dir():
        name, path = _named_entry(model)
        if not is_entry(path):
            return {"name": name, "cached": False, "hint": f"run `emoserve download {name}`"}
    if is_entry(path):
        info = read_entry(path)
        config, labels, params, random = info.config, info.labels, info.num_parameters, info.random_weights
        extra: dict[str, Any] = {"source": info.source, "onnx": info.onnx}
    elif is_published_dir(path):
        from .weights import read_published

        config, labels, state = read_published(path)
        params, random, extra = sum(v.numel() for v in state.values()), is_random_dir(path), {}
    else:
        raise WeightsError(f"{path} is not a model directory (config.yaml, model.pt, tokens.txt)")
    return {
        "path": str(path),
        "random_weights": random,
        "parameters": params,
        "weights_mb_fp32": round(params * 4 / 1e6, 1),
        "labels": [{"en": lb.en, "zh": lb.zh, "masked": lb.masked} for lb in labels],
        "config": config.to_dict(),
        "files": {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()},
        **extra,
    }
