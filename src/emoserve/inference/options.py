"""Which model to load and how, as one value: what `load_model` takes (`recognizer.load_with`), and what
`emoserve serve` (its settings), `emoserve predict` and Ray's actors each read once and pass on.

Each option a person sets is declared here once, on its field: default, choices, help, and through its name
the flag (--backend) and the variable (EMOSERVE_BACKEND). The server's settings (`serving/settings.py`) and
the commands' model flags (`cli/shared.py`) are built from these declarations, as vLLM builds its command
line from the fields of its config dataclasses. Import-light: the server's settings and `emoserve --help`
read it before anything heavy loads."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from emoserve.constants import BACKENDS, DEFAULT_MAX_SECONDS, DEFAULT_MODEL, DTYPES, HUBS, Backend, Dtype, Hub

ENV_PREFIX = "EMOSERVE_"


@dataclass(frozen=True)
class Option:
    """How a person sets one model option: the flag --NAME and the variable EMOSERVE_NAME."""

    help: str
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    short: str | None = None  # the model commands' one-letter alias (-m); `serve` has none
    # False: a setting of `emoserve serve` only, not a flag of the commands that load a model themselves
    on_commands: bool = True


def _option(default: Any, help: str, **declared: Any) -> Any:
    """A field with its declaration (ruff's RUF009 cannot see that this returns a field, hence its noqa)."""
    return field(default=default, metadata={"option": Option(help, **declared)})


@dataclass(frozen=True)
class ModelOptions:
    # the fields in the order they had before they were declared here (callers may pass them by position)
    model: str | None = _option(
        None,
        f"model directory or name (default: {DEFAULT_MODEL} from the cache, downloaded when possible, else "
        "- loudly - random weights); a model named explicitly never falls back",
        metavar="DIR|NAME",
        short="-m",
    )
    backend: Backend = _option(  # noqa: RUF009
        "auto",
        "openvino or onnx (CPU, no torch), torch, or auto: on a CPU the fastest runtime installed for the "
        "dtype (measured) that can run the model, torch on a GPU",
        choices=BACKENDS,
    )
    device: str = _option("auto", "auto (CUDA when present), cpu, cuda, cuda:N")
    dtype: Dtype = _option(  # noqa: RUF009
        "auto",
        "auto: the fastest precision this machine has natively whose agreement with float32 was measured "
        "and passed (bfloat16 on a CPU with AMX or AVX512-BF16 where a runtime runs it faster than float32, "
        "half precision on a GPU, else float32; never int8); float32: the reference's numbers; bfloat16 on "
        "such a CPU (openvino, torch) or a GPU; float16 on a GPU; int8 on a CPU (onnx, opt-in)",
        choices=DTYPES,
    )
    hub: Hub = _option("auto", "where to download a missing model from", choices=HUBS)  # noqa: RUF009
    # Not a declared option: each command says its own limit (--max-seconds), the server its max_audio_s
    max_seconds: float | None = DEFAULT_MAX_SECONDS
    threads: int | None = _option(None, "CPU threads (default: physical cores)", on_commands=False)


def option_fields() -> Iterator[tuple[dataclasses.Field[Any], Option]]:
    """The declared options of `ModelOptions`, in their order, with their declarations."""
    for f in dataclasses.fields(ModelOptions):
        if "option" in f.metadata:
            yield f, f.metadata["option"]


def env_name(name: str) -> str:
    """The variable of a setting or option: backend -> EMOSERVE_BACKEND."""
    return ENV_PREFIX + name.upper()
