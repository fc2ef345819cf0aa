"""Fetch a published emotion2vec+ model directory from Hugging Face or ModelScope.

`download` puts the four `MODEL_FILES` of a known model into a directory, atomically: the files are
downloaded into a temporary directory beside the destination, `model.pt` is checked against the sha256
the hub publishes, and only then is the directory renamed into place. The hub libraries are imported on
first use, so importing this module (and `emoserve --help`) stays cheap; modelscope is an optional extra.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emoserve.constants import Hub
from emoserve.errors import HubError
from emoserve.files import replace_dir, sha256_file, work_dir

log = logging.getLogger(__name__)

MODEL_FILES = ("config.yaml", "model.pt", "tokens.txt", "configuration.json")
# The only file stored with LFS: the hubs publish a sha256 for it, the small text files have none.
CHECKED_FILE = "model.pt"
MAX_REASON_CHARS = 300


@dataclass(frozen=True)
class HubIds:
    hf: str
    ms: str


KNOWN_MODELS: dict[str, HubIds] = {
    f"emotion2vec_plus_{size}": HubIds(
        hf=f"emotion2vec/emotion2vec_plus_{size}", ms=f"iic/emotion2vec_plus_{size}"
    )
    for size in ("large", "base", "seed")
}


def canonical_name(name: str) -> str | None:
    """The `KNOWN_MODELS` key for a short name or a Hugging Face / ModelScope repo id; None if unknown."""
    key = name.strip().lower()
    for canonical, ids in KNOWN_MODELS.items():
        if key in (canonical, ids.hf.lower(), ids.ms.lower()):
            return canonical
    return None


def download(name: str, dest: Path, *, hub: Hub = "auto", progress: bool = True) -> Path:
    """Fetch the `MODEL_FILES` of known model `name` into the directory `dest` and return `dest`.

    `dest` may be missing, empty, or an earlier copy holding only model files (it is replaced); anything
    else there is refused. On failure nothing is left at `dest` or beside it; a hard kill leaves a hidden
    `.<dest name>.*.partial` directory, which the next download or conversion beside it removes."""
    canonical = canonical_name(name)
    if canonical is None:
        raise HubError(f"unknown model {name!r}; known models: {', '.join(KNOWN_MODELS)}")
    sources = _sources(KNOWN_MODELS[canonical], hub)
    dest = Path(dest)
    _check_replaceable(dest)
    with work_dir(dest, suffix=".partial") as work:  # beside dest: the final rename is atomic
        model_dir = _fetch_first(canonical, sources, work, progress, hub)
        _move_into_place(model_dir, dest, work)
    log.info("%s is ready in %s", canonical, dest)
    return dest


# --- the pipeline behind download() ---------------------------------------------------------------


@dataclass(frozen=True)
class _Remote:
    """What a hub says about a repo before anything is downloaded."""

    revision: str | None  # the commit to download, so that the files match the hash read beside it
    sha256: str | None  # of CHECKED_FILE; None when the hub publishes none


@dataclass(frozen=True)
class _Source:
    key: str
    label: str
    repo_id: str
    lookup: Callable[[str], _Remote]
    fetch: Callable[[str, str | None, Path, bool], Path]  # (repo, revision, into, progress) -> dir of files


def _sources(ids: HubIds, hub: str) -> list[_Source]:
    # the hub functions are looked up here, at call time, so that tests can replace them
    hf = _Source("hf", "Hugging Face", ids.hf, _hf_lookup, _hf_fetch)
    ms = _Source("ms", "ModelScope", ids.ms, _ms_lookup, _ms_fetch)
    choices = {"hf": [hf], "ms": [ms], "auto": [hf, ms]}
    if hub not in choices:
        raise HubError(f"unknown hub {hub!r}; use hf, ms or auto")
    return choices[hub]


def _check_replaceable(dest: Path) -> None:
    if not dest.exists() and not dest.is_symlink():
        return
    # replacing an earlier copy is fine; anything else at dest may be the user's and is never deleted
    if dest.is_dir() and not dest.is_symlink() and {p.name for p in dest.iterdir()} <= set(MODEL_FILES):
        return
    raise HubError(
        f"{dest} exists and is not a model directory (only {', '.join(MODEL_FILES)} may be in it); "
        "remove it or choose another destination"
    )


def _fetch_first(canonical: str, sources: list[_Source], work: Path, progress: bool, hub: str) -> Path:
    reasons = []
    for source in sources:
        try:
            return _fetch_verified(source, work / source.key, progress)
        except HubError as err:
            reasons.append(f"{source.label} ({source.repo_id}): {err}")
            if source is not sources[-1]:
                log.warning("%s failed (%s); trying the next hub", source.label, err)
    raise HubError("\n  ".join([f"could not download {canonical}:", *reasons, _what_to_do(hub)]))


def _fetch_verified(source: _Source, scratch: Path, progress: bool) -> Path:
    """Download from one hub into `scratch`; return `scratch/model`, which holds exactly MODEL_FILES."""
    try:
        return _fetch_and_check(source, scratch, progress)
    except HubError:
        shutil.rmtree(scratch, ignore_errors=True)  # frees ~2 GB before the next hub is tried
        raise


def _fetch_and_check(source: _Source, scratch: Path, progress: bool) -> Path:
    log.info("downloading %s from %s", source.repo_id, source.label)
    try:
        remote = source.lookup(source.repo_id)
        fetched = source.fetch(source.repo_id, remote.revision, scratch / "download", progress)
    except HubError:
        raise
    except Exception as err:  # whatever the library raised (network, HTTP, auth): this hub failed
        log.debug("%s failed", source.label, exc_info=True)
        raise HubError(_reason(err)) from err
    model_dir = _collect(fetched, scratch / "model")
    _verify(model_dir / CHECKED_FILE, remote.sha256, source.label)
    return model_dir


def _collect(fetched: Path, model_dir: Path) -> Path:
    # the hub libraries leave metadata (.cache/, lock files) beside the files; only the files move on
    model_dir.mkdir(parents=True)
    for filename in MODEL_FILES:
        if not (fetched / filename).is_file():
            # a hub's pattern filter skips a missing file silently, so absence is only noticed here
            raise HubError(f"the hub's copy has no {filename}")
        (fetched / filename).rename(model_dir / filename)
    return model_dir


def _verify(path: Path, expected: str | None, label: str) -> None:
    if expected is None:
        log.warning("%s publishes no sha256 for %s; it was not verified", label, path.name)
        return
    actual = sha256_file(path)
    if actual != expected.lower():
        raise HubError(
            f"{path.name} is corrupt: its sha256 is {actual}, the hub says {expected} "
            "(the download was deleted; run it again)"
        )
    log.info("%s sha256 %s verified", path.name, actual)


def _move_into_place(model_dir: Path, dest: Path, work: Path) -> None:
    try:
        replace_dir(model_dir, dest, work)
    except OSError as err:
        raise HubError(f"could not move the downloaded model to {dest}: {err}") from err


def _reason(err: BaseException) -> str:
    # library messages run to many lines; the first names the failure, the traceback is logged at debug
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


def _what_to_do(hub: str) -> str:
    local = f"no network? pass --model DIR with a local copy of {', '.join(MODEL_FILES)}"
    other = {
        "hf": "set HF_ENDPOINT to a Hugging Face mirror, or try --hub ms",
        "ms": "try --hub hf",
        "auto": "set HF_ENDPOINT to a Hugging Face mirror",
    }[hub]
    return f"{local}; or {other}"


# --- Hugging Face (huggingface_hub; API checked against 2.4.0) ---------------------------------------


def _hf_lookup(repo_id: str) -> _Remote:
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo_id, files_metadata=True)
    sibling = next((s for s in info.siblings or [] if s.rfilename == CHECKED_FILE), None)
    lfs = sibling.lfs if sibling is not None else None
    return _Remote(revision=info.sha, sha256=lfs.sha256 if lfs is not None else None)


def _hf_fetch(repo_id: str, revision: str | None, into: Path, progress: bool) -> Path:
    from huggingface_hub import hf_hub_download

    with _hf_progress_bars(progress):
        for filename in MODEL_FILES:
            # local_dir: the real file lands at into/filename, not a symlink into the shared HF cache
            hf_hub_download(repo_id, filename, revision=revision, local_dir=into)
    return into


@contextlib.contextmanager
def _hf_progress_bars(enabled: bool) -> Iterator[None]:
    """Hide huggingface_hub's byte bars for this block only, unless the user forced them on or off."""
    from huggingface_hub import constants
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    group = "huggingface_hub"  # the parent of the groups its download bars use (http_get, xet_get)
    # HF_HUB_DISABLE_PROGRESS_BARS=0 is the user's explicit choice; overriding it only raises a warning
    forced_on = constants.HF_HUB_DISABLE_PROGRESS_BARS is False
    if enabled or forced_on or are_progress_bars_disabled(group):
        yield
        return
    # a process-wide switch in huggingface_hub: downloads are one-off, so a concurrent one is unlikely
    disable_progress_bars(group)
    try:
        yield
    finally:
        enable_progress_bars(group)


# --- ModelScope (modelscope >= 1.38; APIs checked against 1.40.2) ----------------


def _ms_lookup(repo_id: str) -> _Remote:
    _ms_snapshot_download()  # fails early, with the install hint, when modelscope is missing
    _ms_resolvable()
    # no revision: ModelScope downloads the default branch (master), the same one the file list reads
    return _Remote(revision=None, sha256=_ms_sha256(repo_id))


def _ms_fetch(repo_id: str, revision: str | None, into: Path, progress: bool) -> Path:
    snapshot_download = _ms_snapshot_download()
    revision_arg = {"revision": revision} if revision is not None else {}
    with _ms_progress(progress) as progress_arg:
        path = snapshot_download(
            repo_id,
            local_dir=str(into),
            allow_file_pattern=list(MODEL_FILES),
            **revision_arg,
            **progress_arg,
        )
    return Path(path)


def _ms_resolvable() -> None:
    """Offline, modelscope retries with back-off for ~7 s before it gives up; a failed name lookup
    says the same at once."""
    domain = os.environ.get("MODELSCOPE_DOMAIN", "modelscope.cn")
    host = domain.split("://")[-1].split("/")[0].split(":")[0]
    try:
        socket.getaddrinfo(host, 443)
    except OSError as err:
        raise HubError(f"cannot resolve {host} ({err}); no network?") from None


def _ms_snapshot_download() -> Callable[..., str]:
    try:
        from modelscope.hub.snapshot_download import snapshot_download
    except ImportError as err:
        raise HubError(
            f"ModelScope needs the modelscope package (>= 1.38): pip install 'modelscope>=1.38' ({err})"
        ) from err
    return snapshot_download


def _ms_sha256(repo_id: str) -> str | None:
    entries = _ms_file_list(repo_id)
    return next((e["sha256"] or None for e in entries if e["path"] == CHECKED_FILE), None)


def _ms_file_list(repo_id: str) -> list[dict[str, Any]]:
    from modelscope_hub import HubApi

    # modelscope >= 1.38 delegates to modelscope_hub, whose legacy get_model_files drops Sha256
    files = HubApi().list_repo_files(repo_id, "model")
    return [{"path": f.path, "sha256": f.sha256} for f in files]


@contextlib.contextmanager
def _ms_progress(enabled: bool) -> Iterator[dict[str, Any]]:
    """The snapshot_download arguments that show or hide ModelScope's byte bars, for this call only:
    modelscope hands downloads to modelscope_hub, which draws a bar only for the callbacks it is given."""
    from modelscope.hub.callback import TqdmCallback

    yield {"progress_callbacks": [TqdmCallback]} if enabled else {}
