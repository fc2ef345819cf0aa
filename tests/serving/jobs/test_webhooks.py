"""Webhooks' pieces: the signature a receiver checks, callbacks into private networks refused, the
backoff. (Deliveries to a real receiver: tests/api/test_jobs.py and test_worker.py.)"""

from __future__ import annotations

import hashlib
import hmac

import pytest

from emoserve.errors import ApiError
from emoserve.serving.jobs.webhooks import MAX_BACKOFF_S, backoff_s, check_callback, sign


def test_the_signature_is_hmac_sha256_of_the_timestamp_and_the_body() -> None:
    body = b'{"event": "job.succeeded"}'
    header = sign("s3cret", body, 1_700_000_000)
    t, v1 = header.split(",")
    assert t == "t=1700000000"
    want = hmac.new(b"s3cret", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert v1 == f"v1={want}"
    assert (
        sign("s3cret", body + b" ", 1_700_000_000) != header and sign("other", body, 1_700_000_000) != header
    )


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/hook",
        "http://localhost/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.7/hook",
        "http://169.254.169.254/latest/meta-data",  # the cloud metadata service
        "http://[::1]/hook",
        "http://[fe80::1]/hook",
    ],
)
def test_callbacks_into_private_networks_are_refused_unless_allowed(url: str) -> None:
    with pytest.raises(ApiError) as refused:
        check_callback(url, allow_private=False)
    assert refused.value.code == "invalid_parameter" and "allow_private_callbacks" in str(refused.value)
    check_callback(url, allow_private=True)


@pytest.mark.parametrize("url", ["ftp://example.com/x", "http:///nohost", "http://[::1/x", "http://h:99999/"])
def test_a_callback_that_is_no_http_url_is_refused(url: str) -> None:
    for allow in (False, True):
        with pytest.raises(ApiError) as refused:
            check_callback(url, allow_private=allow)
        assert refused.value.code == "invalid_parameter"


def test_a_public_address_is_accepted() -> None:
    check_callback("https://93.184.215.14/hook", allow_private=False)


def test_backoff_grows_with_jitter_and_is_bounded() -> None:
    first = [backoff_s(1) for _ in range(50)]
    assert all(1.0 <= b <= 3.0 for b in first) and len(set(first)) > 1
    assert all(8.0 <= backoff_s(4) <= 24.0 for _ in range(20))
    assert backoff_s(40) <= 1.5 * MAX_BACKOFF_S
