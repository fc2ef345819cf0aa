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
