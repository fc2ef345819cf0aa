"""What a request sends: its audio, as the multipart field `file` or as the raw body, read as it arrives
within a size limit, into memory (a clip: `read_upload`) or into a temporary file (a long recording:
`spool_upload`). One reader does both, so the two routes refuse alike: a declared Content-Length over the
limit before reading (413), a body that grows over it (413), a multipart request without `file` (422), a
client that hangs up (499, counted like any error). Also: running work until the client goes away
(`until_disconnected`) and the form fields' booleans (`form_bool`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.datastructures import FormData, UploadFile
from starlette.requests import ClientDisconnect, Request
from starlette.types import Message, Receive

from emoserve.constants import FALSE_WORDS, TRUE_WORDS
from emoserve.errors import ApiError

T = TypeVar("T")
RAW_BODY = "<request body>"  # the name of an upload sent as the raw body, in error messages
COPY_CHUNK = 1 << 20
MAX_FIELDS = 16
MAX_TEXT_BYTES = 1 << 20  # a form field, or a text file read as one (`text_files`)

Write = Callable[[bytes], Awaitable[None]]


@dataclass(frozen=True)
class UploadLimit:
    bytes: int
    setting: str  # what the 413 tells the client to change


@dataclass(frozen=True)
class Upload:
    """A clip's upload, held in memory."""

    data: bytes
    name: str  # the uploaded file's name, for error messages
    fields: dict[str, str]  # the other form fields, as text


@dataclass(frozen=True)
class SpooledUpload:
    """A recording's upload, in a temporary file that the caller removes (`remove`) when done with it."""

    path: str
    name: str
    fields: dict[str, str]

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


async def read_upload(request: Request, limit: UploadLimit) -> Upload:
    """The audio (at most `limit.bytes`) in memory; the other form fields as text."""
    data = bytearray()

    async def keep(chunk: bytes) -> None:
        data.extend(chunk)

    name, fields = await _receive(request, limit, keep, text_files=())
    return Upload(bytes(data), name, fields)


async def spool_upload(
    request: Request,
    limit: UploadLimit,
    *,
    text_files: Collection[str] = (),
    max_text_bytes: int = MAX_TEXT_BYTES,
    dir: str | os.PathLike[str] | None = None,
) -> SpooledUpload:
    """The audio (at most `limit.bytes`) written to a temporary file as it arrives, never held in memory;
    the other form fields as text, and so are the files named in `text_files` (at most `max_text_bytes`
    each), e.g. a segments file sent beside the recording. `dir`: where (default: the system's temporary
    directory)."""
    fd, path = tempfile.mkstemp(prefix="emoserve-upload-", suffix=".audio", dir=dir)
    try:
        with os.fdopen(fd, "wb") as out:

            async def write(chunk: bytes) -> None:
                await asyncio.to_thread(out.write, chunk)

            name, fields = await _receive(request, limit, write, text_files, max_text_bytes)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
    return SpooledUpload(path, name, fields)


async def _receive(
    request: Request,
    limit: UploadLimit,
    write: Write,
    text_files: Collection[str],
    max_text_bytes: int = MAX_TEXT_BYTES,
) -> tuple[str, dict[str, str]]:
    """The one reader: the audio goes to `write` chunk by chunk; returns its name and the form fields."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit.bytes:
        raise too_large(limit)  # refused before reading it
    body = Request(request.scope, _limited(request.receive, limit))
    try:
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            async for chunk in body.stream():
                await write(chunk)
            return RAW_BODY, {}
        max_files = 1 + len(text_files)
        async with body.form(
            max_files=max_files, max_fields=MAX_FIELDS, max_part_size=max_text_bytes
        ) as form:
            return await _copy_form(form, write, text_files, max_text_bytes)
    except ClientDisconnect:
        raise client_gone() from None


def _limited(receive: Receive, limit: UploadLimit) -> Receive:
    """`receive`, refusing a body that grows over the limit (413) as it arrives."""
    received = 0

    async def limited() -> Message:
        nonlocal received
        message = await receive()
        received += len(message.get("body", b""))
        if received > limit.bytes:
            raise too_large(limit)
        return message

    return limited


async def _copy_form(
    form: FormData, write: Write, text_files: Collection[str], max_text_bytes: int
) -> tuple[str, dict[str, str]]:
    file = form.get("file")
    if not isinstance(file, UploadFile):
        raise ApiError(
            "missing_file", "send the audio as the multipart field 'file' (or as the raw request body)"
        )
    while chunk := await file.read(COPY_CHUNK):
        await write(chunk)
    fields: dict[str, str] = {}
    for key, value in form.multi_items():
        if isinstance(value, str):
            fields[key] = value
        elif key in text_files:
            data = await value.read(max_text_bytes + 1)
            if len(data) > max_text_bytes:
                raise ApiError("upload_too_large", f"the {key} file is over {max_text_bytes:,} bytes")
            fields[key] = data.decode("utf-8", "replace")
    return file.filename or "<file>", fields


def too_large(limit: UploadLimit) -> ApiError:
    return ApiError("upload_too_large", f"the upload is over {limit.bytes / 1e6:g} MB (set {limit.setting})")


def client_gone() -> ApiError:
    """A client that hung up (mid-upload or before its result): nobody reads this, but it is counted."""
    return ApiError("client_disconnected", "the client closed the connection before the result")


async def until_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run `work`, but cancel it if the client goes away first: that frees its place in the queue."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request.receive))
    try:
        done, _ = await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        task.cancel()  # a no-op once it is done
    if task in done:
        return task.result()
    raise client_gone()


async def _disconnected(receive: Receive) -> None:
    """Returns when the client disconnects (the body has been read: nothing else is left to receive)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def form_bool(name: str, raw: str) -> bool:
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS or not word:
        return False
    raise ApiError("invalid_parameter", f"{name} is {raw!r}; use true or false")
