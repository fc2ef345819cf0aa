"""One error model: every domain error carries its code, HTTP status and message, and is mapped by them."""

from __future__ import annotations

import json
import pickle

import pytest

from emoserve.api.app import api_error, error_json
from emoserve.errors import (
    AUDIO_ERRORS,
    AudioError,
    ConfigError,
    EmoserveError,
    EngineStopped,
    ExportError,
    HubError,
    ModelOutputError,
    QueueFull,
    ServiceUnavailable,
    SettingsError,
    WarmupError,
    WeightsError,
)

ERRORS: list[EmoserveError] = [
    AudioError("a.wav: too long", source="a.wav", reason="too_long"),
    WeightsError("no such model"),
    HubError("offline"),
    ConfigError("bad config"),
    SettingsError("EMOSERVE_PORT: 'x' is not an integer"),
    QueueFull(2.5),
    EngineStopped("stopping"),
    WarmupError("scores sum to 2"),
    ServiceUnavailable("not_ready", "loading", 5.0),
    ModelOutputError(["a.wav"]),
    ExportError("exporter failed"),
]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_every_domain_error_has_a_code_a_status_and_a_message(error: EmoserveError) -> None:
    assert isinstance(error, EmoserveError)
    assert error.code and error.code.islower() and " " not in error.code
    assert 400 <= error.status < 600 and str(error)
    mapped = api_error(error)
    assert mapped is not None and (mapped.status, mapped.code) == (error.status, error.code)
    response = error_json(mapped)
    assert response.status_code == error.status
    assert json.loads(bytes(response.body))["error"]["code"] == error.code
    assert ("retry-after" in response.headers) == (error.retry_after_s is not None)


def test_audio_reasons_map_to_their_codes() -> None:
    for reason, (code, status) in AUDIO_ERRORS.items():
        error = AudioError("x", source="x", reason=reason)
        assert (error.code, error.status) == (code, status)
    assert AudioError("x", source="x", reason="too_long").status == 413


def test_503s_say_when_to_retry() -> None:
    assert error_json(QueueFull(2.5)).headers["retry-after"] == "3"
    assert EngineStopped("stopping").retry_after_s is not None


def test_anything_else_is_not_mapped() -> None:
    assert api_error(RuntimeError("a bug")) is None
    assert api_error(KeyError("x")) is None


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_every_domain_error_pickles_with_its_fields(error: EmoserveError) -> None:
    """Errors cross processes (Ray Serve replicas): the same class, message and fields come back."""
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error)
    assert (back.code, back.status, back.retry_after_s) == (error.code, error.status, error.retry_after_s)
    assert vars(back) == vars(error)
