"""One error model: every failure emoserve reports derives from `EmoserveError`, which carries a stable
`code` (for programs, metric labels and logs), the HTTP `status` it maps to, a message for people and, for
503s, when to retry. The API, the web UI, the CLI and the metrics map errors by these fields, never by
class names. Torch-free and import-free, so every module can use it.
"""

from __future__ import annotations

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
