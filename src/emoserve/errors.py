"""Every failure emoserve reports, in one place: the error classes and the catalogue of their codes.

Each failure derives from `EmoserveError`, which carries a stable `code` (for programs, metric labels and
logs), the HTTP `status` it maps to, a message for people and, for 503s, when to retry. `CODES` is the
one list of codes with their status and meaning: the API publishes it as an enum in its OpenAPI schema,
a test checks every raise site against it, and a code is never renamed without a note in
docs/changelog.md. The API, the web UI, the CLI and the metrics map errors by these fields, never by
class names. Imports nothing of emoserve, so every module can use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple


class Code(NamedTuple):
    status: int  # the HTTP status
    meaning: str  # for the error-code reference page and the OpenAPI description


CODES: dict[str, Code] = {
    # the audio (AudioError.reason -> code: AUDIO_ERRORS). Not audio at all is 415; unusable audio 400.
    "empty_audio": Code(400, "the input has no samples"),
    "audio_not_found": Code(400, "no file at the path given"),
    "unsupported_audio": Code(415, "not audio, or a format no decoder here reads"),
    "invalid_audio": Code(400, "samples that are not finite numbers (NaN/inf)"),
    "truncated_audio": Code(400, "a file that ends before its header says"),
    "malformed_audio": Code(400, "a damaged file, or one whose format changes part-way"),
    "audio_too_short": Code(400, "shorter than the model's shortest input"),
    "audio_too_long": Code(413, "longer than this server's limit (the message names the setting)"),
    "invalid_frame": Code(400, "a live stream's binary message that is not whole samples of its encoding"),
    # the request
    "invalid_parameter": Code(422, "a parameter with a bad value; the message names it"),
    "missing_file": Code(422, "a multipart request without its `file` part"),
    "upload_too_large": Code(413, "a body over the upload limit"),
    "headers_too_large": Code(431, "request headers over 16 KB"),
    "unauthorized": Code(401, "no API key, or a wrong one"),
    "bad_request": Code(400, "a request HTTP itself refuses"),
    "not_found": Code(404, "no such route"),
    "method_not_allowed": Code(405, "the route takes another method"),
    "client_disconnected": Code(499, "the client closed the connection before the result"),
    # the service
    "not_ready": Code(503, "the model is loading or warming up; retry after Retry-After"),
    "draining": Code(503, "the server is shutting down; another instance should answer"),
    "start_up_failed": Code(503, "the model could not be loaded; an operator has to act"),
    "queue_full": Code(503, "too many requests waiting; retry after Retry-After"),
    "too_many_streams": Code(503, "max_streams live streams are open; retry after Retry-After"),
    "stream_too_long": Code(413, "a live stream longer than max_stream_s"),
    "stream_idle": Code(408, "a live stream that sent nothing for stream_idle_s"),
    "frame_too_large": Code(413, "a live stream's message over 1 MiB"),
    "invalid_message": Code(400, "a live stream's text message that is not JSON, or of an unknown type"),
    "replica_lost": Code(503, "the model replica that held the request died (Ray Serve)"),
    "preempted": Code(503, "a live stream's interim reading stopped part-way for more urgent work (skipped)"),
    # jobs (/v1/jobs)
    "job_not_found": Code(404, "no job with this id (never made, deleted, or expired)"),
    "job_not_done": Code(409, "the job has no result: not done yet, failed or cancelled (the message says)"),
    "job_finished": Code(409, "the job has already ended; there is nothing to cancel"),
    "idempotency_key_reused": Code(422, "an Idempotency-Key already used for another file or other options"),
    "too_many_jobs": Code(429, "jobs_max_queued jobs are waiting; retry after Retry-After"),
    "jobs_disk_full": Code(507, "the jobs' audio would pass jobs_max_disk_mb; retry after Retry-After"),
    "jobs_store_unavailable": Code(503, "the jobs' database cannot be reached now; retry after Retry-After"),
    "job_lease_lost": Code(409, "a worker's write to a job it no longer holds (another worker took it)"),
    "worker_lost": Code(500, "a job whose worker died jobs_max_attempts times: it is not tried again"),
    # the model
    "model_unavailable": Code(500, "a model that cannot be found, downloaded, converted or loaded"),
    "invalid_model_config": Code(500, "a config.yaml that describes no model this code can run"),
    "download_failed": Code(502, "a model hub that could not be reached or gave a damaged file"),
    "export_failed": Code(500, "the ONNX export of a model failed"),
    "warmup_failed": Code(500, "the warm-up's outputs cannot be right"),
    "invalid_model_output": Code(500, "the model gave NaN/inf: damaged files, or the dtype overflowed"),
    "invalid_head": Code(500, "a head directory that is damaged, or made for another model"),
    # settings and the rest
    "invalid_setting": Code(400, "a setting with a bad value; the message names the flag or variable"),
    "internal_error": Code(500, "a bug: the log has the traceback"),
}
# the codes of the statuses Starlette itself answers with; any other is bad_request (4xx) or internal_error
HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}


# Retry-After hints of the 503s
LOADING_RETRY_AFTER_S = 5.0  # loading or warming: a model loads in seconds
DRAINING_RETRY_AFTER_S = 10.0  # another instance should take over; come back after the restart
FAILED_RETRY_AFTER_S = 60.0  # an operator has to act


class EmoserveError(Exception):
    """A failure with a stable `code`, its HTTP `status` and a message that says what to do."""

    code = "internal_error"

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
        self._status = status  # None: the code's own (CODES)
        self.retry_after_s = retry_after_s

    @property
    def status(self) -> int:
        if self._status is not None:
            return self._status
        return CODES[self.code].status if self.code in CODES else 500

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


AUDIO_ERRORS = {  # AudioError.reason -> its code
    "empty": "empty_audio",
    "not_found": "audio_not_found",
    "undecodable": "unsupported_audio",
    "non_finite": "invalid_audio",
    "truncated": "truncated_audio",
    "malformed": "malformed_audio",
    "too_short": "audio_too_short",
    "too_long": "audio_too_long",
    "bad_argument": "invalid_parameter",
    "bad_frame": "invalid_frame",
}


class AudioError(EmoserveError, ValueError):
    """Bad audio input; the message names the input and says what to do.

    ``reason`` is one of the keys of AUDIO_ERRORS, which gives its code.
    """

    def __init__(self, message: str, *, source: str, reason: str) -> None:
        super().__init__(message, code=AUDIO_ERRORS.get(reason, "invalid_audio"))
        self.source = source
        self.reason = reason


class ConfigError(EmoserveError, ValueError):
    """A `config.yaml` that does not describe a model this code can run."""

    code = "invalid_model_config"


class ExportError(EmoserveError, RuntimeError):
    code = "export_failed"


class HubError(EmoserveError, RuntimeError):
    """A model could not be fetched; the message says what failed and what to do."""

    code = "download_failed"


class WeightsError(EmoserveError, RuntimeError):
    """A model that cannot be found, downloaded, converted or loaded; the message says what to do."""

    code = "model_unavailable"


class HeadError(EmoserveError, ValueError):
    """A head directory (`emoserve train-head`) that cannot be loaded or does not fit the model; the message
    names the directory and what to do."""

    code = "invalid_head"


class OptionError(EmoserveError, ValueError):
    """A request option with a bad value (a label subset naming an unknown label, a min_confidence out of
    range), in the library as in every surface; the message names the option and the valid values."""

    code = "invalid_parameter"


class ApiError(EmoserveError):
    """An error of the HTTP layer itself (bad parameters, a body too large, no key): its status is its
    code's."""

    def __init__(self, code: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message, code=code, retry_after_s=retry_after_s)


class SettingsError(EmoserveError, ValueError):
    """A setting with a bad value; the message starts with the flag or variable it came from."""

    code = "invalid_setting"


class QueueFull(EmoserveError):
    """`max_queue` requests are already waiting; `retry_after_s` (>= 1) is when to try again."""

    code = "queue_full"

    def __init__(self, retry_after_s: float, message: str | None = None) -> None:
        message = message or f"the request queue is full; retry in {math.ceil(retry_after_s)} s"
        super().__init__(message, retry_after_s=retry_after_s)


class EngineStopped(EmoserveError):
    """The engine is not started, or is stopping: it accepts no new requests."""

    code = "draining"

    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after_s=DRAINING_RETRY_AFTER_S)


class Preempted(EmoserveError):
    """A model call of best-effort work (live streams' interim readings) stopped part-way because more
    urgent work arrived (the engine's `Priority`); the reading is skipped, never retried."""

    code = "preempted"

    def __init__(self) -> None:
        super().__init__("stopped for more urgent work", retry_after_s=0.0)


class WarmupError(EmoserveError):
    """The model produced output that cannot be right; the message names the check and where."""

    code = "warmup_failed"


class ServiceUnavailable(EmoserveError):
    """Not ready (yet), draining or failed: HTTP 503 with Retry-After. `code` is not_ready, draining or
    start_up_failed."""

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
