"""One error model: every failure emoserve reports derives from `EmoserveError`, which carries a stable
`code` (for programs, metric labels and logs), the HTTP `status` it maps to, a message for people and, for
503s, when to retry. The API, the web UI, the CLI and the metrics map errors by these fields, never by
class names. Torch-free and import-free, so every module can use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Retry-After hints of the 503s
LOADING_RETRY_AFTER_S = 5.0  # loading or warming: a model loads in seconds
DRAINING_RETRY_AFTER_S = 10.0  # another instance should take over; come back after the restart
FAILED_RETRY_AFTER_S = 60.0  # an operator has to act


class EmoserveError(Exception):
    """A failure with a stable `code`, its HTTP `status` and a message that says what to do."""

    code = "internal_error"
    status = 500

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.retry_after_s = retry_after_s

    @property
    def message(self) -> str:
        return str(self)

    def __reduce__(self) -> tuple[object, ...]:
        """Pickled by its fields, so that it crosses to another process (a Ray Serve replica's caller):
        Exception's own pickling calls the class with the message alone, which subclasses do not take."""
        return (_restore, (type(self), str(self)), self.__dict__)


def _restore(cls: type[EmoserveError], message: str) -> EmoserveError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    return error  # its fields (code, status, retry_after_s, ...) follow as the pickled state


# AudioError.reason -> (code, HTTP status). Not audio at all is 415; audio that is unusable is 400.
AUDIO_ERRORS = {
    "empty": ("empty_audio", 400),
    "not_found": ("empty_audio", 400),
    "undecodable": ("unsupported_audio", 415),
    "non_finite": ("invalid_audio", 400),
    "truncated": ("truncated_audio", 400),
    "malformed": ("malformed_audio", 400),
    "too_short": ("audio_too_short", 400),
    "too_long": ("audio_too_long", 413),
    "bad_argument": ("invalid_parameter", 422),
}


class AudioError(EmoserveError, ValueError):
    """Bad audio input; the message names the input and says what to do.

    ``reason`` is one of the keys of AUDIO_ERRORS, which gives its code and HTTP status.
    """

    def __init__(self, message: str, *, source: str, reason: str) -> None:
        code, status = AUDIO_ERRORS.get(reason, ("invalid_audio", 400))
        super().__init__(message, code=code, status=status)
        self.source = source
        self.reason = reason


class ConfigError(EmoserveError, ValueError):
    """A `config.yaml` that does not describe a model this code can run."""


class ExportError(EmoserveError, RuntimeError):
    code = "export_failed"


class HubError(EmoserveError, RuntimeError):
    """A model could not be fetched; the message says what failed and what to do."""

    code = "download_failed"


class WeightsError(EmoserveError, RuntimeError):
    """A model that cannot be found, downloaded, converted or loaded; the message says what to do."""

    code = "model_unavailable"


class ApiError(EmoserveError):
    """An error of the HTTP layer itself (bad parameters, a body too large, no key): status first."""

    def __init__(self, status: int, code: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message, code=code, status=status, retry_after_s=retry_after_s)


class SettingsError(EmoserveError, ValueError):
    """A setting with a bad value; the message starts with the flag or variable it came from."""

    code = "invalid_setting"
    status = 400


class QueueFull(EmoserveError):
    """`max_queue` requests are already waiting; `retry_after_s` (>= 1) is when to try again."""

    code = "queue_full"
    status = 503

    def __init__(self, retry_after_s: float, message: str | None = None) -> None:
        message = message or f"the request queue is full; retry in {math.ceil(retry_after_s)} s"
        super().__init__(message, retry_after_s=retry_after_s)


class EngineStopped(EmoserveError):
    """The engine is not started, or is stopping: it accepts no new requests."""

    code = "draining"
    status = 503

    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after_s=DRAINING_RETRY_AFTER_S)


class WarmupError(EmoserveError):
    """The model produced output that cannot be right; the message names the check and where."""

    code = "warmup_failed"


class ServiceUnavailable(EmoserveError):
    """Not ready (yet), draining or failed: HTTP 503 with Retry-After. `code` is not_ready, draining or
    start_up_failed."""

    status = 503

    def __init__(self, code: str, message: str, retry_after_s: float) -> None:
        super().__init__(message, code=code, retry_after_s=retry_after_s)


class ModelOutputError(EmoserveError, RuntimeError):
    """The model gave non-finite numbers (NaN or inf): never passed on as a result."""

    code = "invalid_model_output"

    def __init__(self, sources: Sequence[str]) -> None:
        super().__init__(
            f"the model gave non-finite outputs (NaN/inf) for {', '.join(sources)}: its weights are damaged "
            "or the dtype overflowed; check the model with `emoserve verify`"
        )
        self.sources = list(sources)
