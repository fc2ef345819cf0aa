"""Webhooks: a job's end (`job.succeeded`, `job.failed`, `job.cancelled`) POSTed to its callback URL,
at least once, from the outbox the store writes in the transaction that ends the job; with
`callback_progress`, also `job.progress` (with the job's `progress`) from the transaction of the segment
that takes the job past another tenth: at most nine a job, never more than one a tenth.

    POST <callback_url>   {"event_id", "event", "job_id", "status", "created_at", "error"[, "progress"]}
    Emoserve-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" with the job's secret>
    Emoserve-Event-Id: <event_id>   (the same on every retry: receivers de-duplicate on it)

A 2xx is delivered; a 5xx, 408, 425, 429, a timeout or a refused connection is retried with exponential
backoff and jitter for jobs_webhook_max_age_s; any other 4xx stops the retries. Callbacks to loopback,
private and link-local addresses are refused unless allow_private_callbacks (a callback URL would
otherwise reach into the server's own network), checked when the job is submitted and again before each
delivery (the name may resolve elsewhere by then). URLs and secrets are never logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import random
import socket
import time
from urllib.parse import urlsplit

import httpx

from emoserve.errors import ApiError
from emoserve.serving.jobs.store import JobStore, Webhook
from emoserve.serving.metrics import Metrics
from emoserve.serving.settings import Settings

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Emoserve-Signature"
EVENT_ID_HEADER = "Emoserve-Event-Id"
ATTEMPT_HEADER = "Emoserve-Webhook-Attempt"
TIMEOUT_S = 10.0  # a receiver that has not answered by then is retried (AssemblyAI's 10 s)
HOLD_S = 30.0  # an event being sent is not picked up by another replica meanwhile
MAX_BACKOFF_S = 3600.0
RETRIED_STATUSES = frozenset({408, 425, 429})


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The `Emoserve-Signature` header's value (docs/jobs.md shows how a receiver checks it)."""
    message = str(timestamp).encode() + b"." + body
    digest = hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def check_callback(url: str, allow_private: bool) -> None:
    """An http(s) URL whose host resolves to public addresses only (unless `allow_private`)."""
    bad = ApiError("invalid_parameter", "callback_url must be an http:// or https:// URL with a host")
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:  # a malformed address or port
        raise bad from None
    if parts.scheme not in ("http", "https") or not host:
        raise bad
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(host, port or 443, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        raise ApiError("invalid_parameter", "callback_url's host does not resolve") from None
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if not address.is_global:
            raise ApiError(
                "invalid_parameter",
                "callback_url resolves to a loopback, private or link-local address; this server refuses "
                "those unless allow_private_callbacks (--allow-private-callbacks / "
                "EMOSERVE_ALLOW_PRIVATE_CALLBACKS)",
            )


def backoff_s(attempt: int) -> float:
    """Exponential, with jitter so that many receivers coming back are not hit at once."""
    return float(min(MAX_BACKOFF_S, 2.0**attempt) * random.uniform(0.5, 1.5))


async def deliver_due(store: JobStore, settings: Settings, metrics: Metrics) -> int:
    """One pass over the events due; the number tried."""
    due = await asyncio.to_thread(store.due_webhooks, HOLD_S)
    if not due:
        return 0
    async with httpx.AsyncClient(timeout=TIMEOUT_S, trust_env=False, follow_redirects=False) as client:
        for hook in due:
            outcome, retry = await _send(client, hook, settings)
            retry_at, result = None, outcome.split("_")[0]  # delivered, rejected, refused
            if retry:
                result = "retry"
                if time.time() - hook.created_at > settings.jobs_webhook_max_age_s:
                    outcome = result = "gave_up"
                else:
                    retry_at = time.time() + backoff_s(hook.attempts)
            metrics.webhook_deliveries_total.labels(result).inc()
            log.info("webhook %s of job %s: %s (try %d)", hook.event_id, hook.job_id, outcome, hook.attempts)
            await asyncio.to_thread(store.webhook_tried, hook.event_id, outcome, retry_at)
    return len(due)


async def _send(client: httpx.AsyncClient, hook: Webhook, settings: Settings) -> tuple[str, bool]:
    """(outcome, whether to retry)."""
    try:
        await asyncio.to_thread(check_callback, hook.url, settings.allow_private_callbacks)
    except ApiError:
        return "refused", False
    body = hook.body.encode()
    headers = {
        "Content-Type": "application/json",
        EVENT_ID_HEADER: hook.event_id,
        ATTEMPT_HEADER: str(hook.attempts),
    }
    if hook.secret:
        headers[SIGNATURE_HEADER] = sign(hook.secret, body, int(time.time()))
    try:
        response = await client.post(hook.url, content=body, headers=headers)
    except httpx.TimeoutException:
        return "timeout", True
    except httpx.HTTPError:
        return "unreachable", True
    status = response.status_code
    if 200 <= status < 300:
        return "delivered", False
    if status >= 500 or status in RETRIED_STATUSES:
        return f"http_{status}", True
    return f"rejected_{status}", False
