"""Scoring many files: expanding paths, folders and globs, carrying on past bad files, and writing
jsonl/csv/table output and `.npy` embeddings without ever leaving a half-written file."""

from __future__ import annotations

import dataclasses
import glob
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emoserve.audio.decode import Audio, load_audio
from emoserve.constants import MAX_BATCH_SIZE, Granularity
from emoserve.errors import AudioError, ModelOutputError
from emoserve.files import atomic_write
from emoserve.inference.recognizer import Recognizer
from emoserve.inference.results import Result
from emoserve.model.head import Head

# what a folder walk picks up; a file named explicitly is always tried
_EXTENSIONS = "wav flac ogg oga mp3 m4a aac opus webm mp4 mkv mov wma aif aiff aifc au caf amr 3gp"
AUDIO_EXTENSIONS = frozenset(f".{ext}" for ext in _EXTENSIONS.split())


@dataclass(frozen=True)
class Outcome:
    file: str
    result: Result | None = None
    error: str | None = None
    embedding_path: str | None = None

    def to_dict(self) -> dict[str, object]:
        fields = self.result.to_dict() if self.result else {}
        return {"file": self.file, **fields, "embedding": self.embedding_path, "error": self.error}


def expand_inputs(inputs: Iterable[str]) -> list[str]:
    """Files as given, folders walked recursively (audio extensions only), globs expanded; a name
    that matches nothing is kept so that it is reported as an error rather than silently dropped."""
    files: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(
                str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS
            )
        elif not path.exists() and glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            files += [m for m in matches if Path(m).is_file()] or [item]
        else:
            files.append(item)
    return list(dict.fromkeys(files))  # once each, first position kept


def score_files(
    recognizer: Recognizer,
    files: Sequence[str],
    *,
    granularity: Granularity = "utterance",
    embeddings_dir: Path | None = None,
    batch_size: int = MAX_BATCH_SIZE,
    head: Head | None = None,
) -> Iterator[Outcome]:
    """Outcomes in input order; a file that fails yields its error and the rest go on. A `head`: each
    result carries its labels too."""
    names = EmbeddingNames(embeddings_dir) if embeddings_dir else None
    if head is not None:
        recognizer = recognizer.with_head(head)
    outcomes = score_outcomes(
        recognizer, files, granularity=granularity, embedding=names is not None, batch_size=batch_size
    )
    for outcome in outcomes:
        yield save_embedding(outcome, names)


def save_embedding(outcome: Outcome, names: EmbeddingNames | None) -> Outcome:
    """The outcome with its embedding written as `<stem>.npy` (in input order: names are given in turn)."""
    if names is None or outcome.result is None or outcome.result.embedding is None:
        return outcome
    return dataclasses.replace(outcome, embedding_path=names.save(outcome.file, outcome.result.embedding))


def score_outcomes(
    recognizer: Recognizer,
    files: Sequence[str],
    *,
    granularity: Granularity = "utterance",
    embedding: bool = False,
    batch_size: int = MAX_BATCH_SIZE,
) -> Iterator[Outcome]:
    """Outcomes in input order, embeddings in memory (`result.embedding`) and not yet written."""
    window = max(1, batch_size) * 4  # decode a few batches ahead so that length grouping has choice
    for start in range(0, len(files), window):
        chunk = files[start : start + window]
        decoded: dict[int, Audio] = {}
        errors: dict[int, str] = {}
        for i, file in enumerate(chunk):
            try:
                decoded[i] = load_audio(file, max_seconds=recognizer.max_seconds)
            except AudioError as err:
                errors[i] = str(err)
        results = _predict(recognizer, decoded, errors, granularity, embedding, batch_size)
        for i, file in enumerate(chunk):
            yield Outcome(file, error=errors[i]) if i in errors else Outcome(file, results[i])


def _predict(
    recognizer: Recognizer,
    decoded: dict[int, Audio],
    errors: dict[int, str],
    granularity: Granularity,
    embedding: bool,
    batch_size: int,
) -> dict[int, Result]:
    """Batched results by index; when the model gives a non-finite output, each clip alone, so that only
    the clips it happens for fail (into `errors`)."""
    order = list(decoded)
    clips = [decoded[i] for i in order]
    try:
        batched = recognizer.predict_many(clips, granularity, embedding=embedding, batch_size=batch_size)
        return dict(zip(order, batched, strict=True))
    except ModelOutputError:
        results = {}
        for i in order:
            try:
                results[i] = recognizer.predict_batch([decoded[i]], granularity, embedding)[0]
            except ModelOutputError as err:
                errors[i] = str(err)
        return results


class EmbeddingNames:
    """Writes `<stem>.npy` into one folder; a repeated stem gets `-2`, `-3`, ... rather than overwriting."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.used: set[str] = set()
        folder.mkdir(parents=True, exist_ok=True)

    def save(self, file: str, embedding: np.ndarray) -> str:
        stem = Path(file).stem
        name, n = stem, 1
        while name in self.used:
            n += 1
            name = f"{stem}-{n}"
        self.used.add(name)
        target = self.folder / f"{name}.npy"
        with atomic_write(target, binary=True) as out:
            np.save(out, embedding)
        return str(target)
