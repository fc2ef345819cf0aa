"""Which model to load and how, as one value: what `load_model` takes (`recognizer.load_with`), and what
`emoserve serve` (its settings), `emoserve predict` and Ray's actors each read once and pass on. Import-light:
the server's settings use it before anything heavy loads."""

from __future__ import annotations

from dataclasses import dataclass

from emoserve.constants import DEFAULT_MAX_SECONDS, Hub


@dataclass(frozen=True)
class ModelOptions:
    model: str | None = None  # a directory or a name; None: emotion2vec_plus_large
    backend: str = "auto"  # one of constants.BACKENDS
    device: str = "auto"  # auto (CUDA when present), cpu, cuda, cuda:N
    dtype: str = "float32"  # one of constants.DTYPES
    hub: Hub = "auto"
    max_seconds: float | None = DEFAULT_MAX_SECONDS
    threads: int | None = None  # None: the physical cores
