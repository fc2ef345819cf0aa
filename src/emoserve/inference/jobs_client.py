"""A client of a server's /v1/jobs (docs/guides/jobs.md): `emoserve jobs` is one user of it.

    client = JobsClient("http://HOST:7860", api_key=KEY)
    job = client.submit("call.wav", options={"channels": "separate"}, idempotency_key="call-42")
    done = client.wait(job["id"], on_progress=lambda job: print(job["progress"]["percent"]))
    timeline = client.result(job["id"])     # /v1/timeline's JSON

A refusal comes back as an `EmoserveError` with the server's code, status, message and Retry-After.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from emoserve.errors import EmoserveError

TERMINAL = ("succeeded", "failed", "cancelled")
POLL_S = 1.0


class JobsClient:
    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 300.0) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    def __enter__(self) -> JobsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def submit(
        self,
        path: str | Path,
        *,
        options: dict[str, Any] | None = None,
        callback_url: str | None = None,
        callback_secret: str | None = None,
        callback_progress: bool = False,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """The file uploaded as a job: the job (202)."""
        fields = {k: str(v) for k, v in (options or {}).items() if v is not None}
        if callback_url:
            fields["callback_url"] = callback_url
        if callback_secret:
            fields["callback_secret"] = callback_secret
        if callback_progress:
            fields["callback_progress"] = "true"
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        with open(path, "rb") as audio:
            files = {"file": (Path(path).name, audio, "application/octet-stream")}
            return self._json(self._http.post("/v1/jobs", files=files, data=fields, headers=headers))

    def page(self, status: str | None = None, limit: int = 50, after: str | None = None) -> dict[str, Any]:
        params = {
            k: v for k, v in {"status": status, "limit": limit, "after": after}.items() if v is not None
        }
        return self._json(self._http.get("/v1/jobs", params=params))

    def status(self, job_id: str) -> dict[str, Any]:
        return self._json(self._http.get(f"/v1/jobs/{job_id}"))

    def result(self, job_id: str, partial: bool = False) -> dict[str, Any]:
        params = {"partial": "true"} if partial else {}
        return self._json(self._http.get(f"/v1/jobs/{job_id}/result", params=params))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json(self._http.post(f"/v1/jobs/{job_id}/cancel"))

    def delete(self, job_id: str) -> None:
        self._json(self._http.delete(f"/v1/jobs/{job_id}"))

    def wait(
        self, job_id: str, on_progress: Callable[[dict[str, Any]], None] | None = None, poll_s: float = POLL_S
    ) -> dict[str, Any]:
        """The job once it has ended; `on_progress(job)` at each look before."""
        while (job := self.status(job_id))["status"] not in TERMINAL:
            if on_progress is not None:
                on_progress(job)
            time.sleep(poll_s)
        return job

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        if response.status_code < 400:
            return response.json() if response.content else None
        try:
            error = response.json()["error"]
            code, message = str(error["code"]), str(error["message"])
        except (ValueError, KeyError, TypeError):
            code, message = "internal_error", f"HTTP {response.status_code}: {response.text[:200]}"
        retry = response.headers.get("retry-after")
        raise EmoserveError(
            message,
            code=code,
            status=response.status_code,
            retry_after_s=float(retry) if retry and retry.isdigit() else None,
        )
