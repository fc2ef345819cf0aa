"""Utterance embeddings of many files for training and evaluating heads, batched through the library's
path (`files.score_outcomes`) and cached per file content and model, so that a second run only trains.

    $EMOSERVE_HOME/embeddings/<model key>/<sha256 of the file's bytes>.npy

The model key is a hash of the model's identity (config, weights' sha256, name) and the dtype: another
model, other weights or int8 never read this model's embeddings. A file whose bytes change has another
sha256, so its old embedding is simply never read again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emoserve.constants import MAX_BATCH_SIZE
from emoserve.files import atomic_write, sha256_file
from emoserve.inference.corpus import score_outcomes
from emoserve.inference.recognizer import Recognizer
from emoserve.model.head import model_identity


def model_key(recognizer: Recognizer) -> str:
    identity = {**model_identity(recognizer.info), "dtype": recognizer.dtype}
    identity.pop("random_weights")
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


class EmbeddingCache:
    """One model's embeddings by file content, in `root/<model key>/`."""

    def __init__(self, root: Path, recognizer: Recognizer) -> None:
        self.folder = root / model_key(recognizer)

    def _path(self, sha: str) -> Path:
        return self.folder / f"{sha}.npy"

    def get(self, sha: str) -> np.ndarray | None:
        path = self._path(sha)
        try:
            return np.load(path) if path.is_file() else None
        except (OSError, ValueError):  # a damaged cache file is computed again
            return None

    def put(self, sha: str, embedding: np.ndarray) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_write(self._path(sha), binary=True) as out:
            np.save(out, np.asarray(embedding, np.float32))


def default_cache_root() -> Path:
    from emoserve.model.cache import home

    return home() / "embeddings"


@dataclass(frozen=True)
class Embeddings:
    vectors: dict[int, np.ndarray]  # input index -> (dim,) float32
    errors: dict[int, str]  # input index -> why it has none
    computed: int  # files run through the model (the others came from the cache)


def utterance_embeddings(
    recognizer: Recognizer,
    files: Sequence[str],
    *,
    cache: EmbeddingCache | None = None,
    batch_size: int = MAX_BATCH_SIZE,
    progress: Callable[[int], None] | None = None,
) -> Embeddings:
    """Each file's utterance embedding (from the cache when there), the others batched by length through
    the model; a file that cannot be read or decoded gets its error instead and the rest go on."""
    vectors: dict[int, np.ndarray] = {}
    errors: dict[int, str] = {}
    todo: dict[str, list[int]] = {}  # one model run per distinct content
    shas: dict[str, str] = {}
    for i, file in enumerate(files):
        try:
            sha = sha256_file(Path(file))
        except OSError as error:
            errors[i] = f"{file}: {error.strerror or error}"
            continue
        cached = cache.get(sha) if cache else None
        if cached is not None:
            vectors[i] = cached
            if progress:
                progress(1)
        else:
            todo.setdefault(sha, []).append(i)
            shas.setdefault(sha, file)
    order = list(todo)
    for sha, outcome in zip(order, score_outcomes(recognizer, [shas[s] for s in order], embedding=True,
                                                  batch_size=batch_size), strict=True):  # fmt: skip
        indices = todo[sha]
        if outcome.result is None or outcome.result.embedding is None:
            errors.update({i: str(outcome.error) for i in indices})
        else:
            if cache:
                cache.put(sha, outcome.result.embedding)
            vectors.update({i: outcome.result.embedding for i in indices})
        if progress:
            progress(len(indices))
    return Embeddings(vectors, errors, computed=len(order))
