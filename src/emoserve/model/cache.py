"""The model cache: resolving `--model` (a directory or a name) to a converted entry, downloading and
converting on the way, repairing a damaged entry from its source, the random-weight fallback, and
`emoserve info`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from emoserve.constants import DEFAULT_MODEL, Hub
from emoserve.errors import WeightsError
from emoserve.files import work_dir
from emoserve.model import hub
from emoserve.model.entry import (
    FALLBACK_PRESET,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    check_entry,
    is_entry,
    is_published_dir,
    is_random_dir,
    read_entry,
    read_manifest,
    source_stamp,
)

log = logging.getLogger(__name__)


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
    from emoserve.model.convert import convert

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
            return resolve_name(DEFAULT_MODEL, hub_name=hub_name, cache=cache, progress=progress)
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
    from emoserve.model.convert import convert

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
    from emoserve.model.convert import convert

    try:
        return convert(download_dir, entry, name=canonical)
    finally:
        shutil.rmtree(download_dir, ignore_errors=True)  # the entry holds all inference needs


def random_fallback(cache: Path, reason: str) -> Path:
    name = f"{DEFAULT_MODEL}-random"
    log.warning(
        "\n%s\n!! %s is not cached and could not be downloaded:\n!!   %s\n"
        "!! Using a RANDOM-WEIGHT model of the same (large) architecture instead.\n"
        "!! Its predictions are MEANINGLESS; pass --model to use real weights.\n%s",
        "!" * 78,
        DEFAULT_MODEL,
        reason,
        "!" * 78,
    )
    entry = cache / "models" / name
    if is_entry(entry):
        return entry
    from emoserve.model.convert import convert
    from emoserve.model.testing import make_test_model

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
    name = hub.canonical_name(str(model or DEFAULT_MODEL))
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
        # agreement: each lower precision's measured agreement with float32 (inference/precision.py)
        agreement = read_manifest(path).get("agreement", {})
        extra: dict[str, Any] = {"source": info.source, "onnx": info.onnx, "agreement": agreement}
    elif is_published_dir(path):
        from emoserve.model.checkpoint import read_published

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
