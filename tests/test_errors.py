"""One error model: every domain error carries its code, HTTP status and message, and is mapped by them."""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

import pytest

from emoserve.api.errors import error_json
from emoserve.audio.decode import load_audio
from emoserve.errors import (
    AUDIO_ERRORS,
    CODES,
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
from emoserve.serving.jobs.store import LeaseLost
from tests.support.paths import SRC

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
    LeaseLost("job 1: attempt 1 no longer holds it"),
]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_every_domain_error_has_a_code_a_status_and_a_message(error: EmoserveError) -> None:
    assert isinstance(error, EmoserveError)
    assert error.code and error.code.islower() and " " not in error.code
    assert 400 <= error.status < 600 and str(error)
    response = error_json(error, None)
    assert response.status_code == error.status
    assert json.loads(bytes(response.body))["error"]["code"] == error.code
    assert ("retry-after" in response.headers) == (error.retry_after_s is not None)


def test_audio_reasons_map_to_their_codes() -> None:
    for reason, code in AUDIO_ERRORS.items():
        error = AudioError("x", source="x", reason=reason)
        assert (error.code, error.status) == (code, CODES[code].status)
    assert AudioError("x", source="x", reason="too_long").status == 413


def test_a_missing_file_has_its_own_code(tmp_path: Path) -> None:
    """It was coded empty_audio (a file with no samples), so a program could not tell them apart."""
    with pytest.raises(AudioError) as missing:
        load_audio(tmp_path / "nope.wav")
    assert missing.value.code == "audio_not_found" and "nope.wav" in str(missing.value)
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError) as empty:
        load_audio(tmp_path / "empty.wav")
    assert empty.value.code != "audio_not_found"


def _raised_codes() -> dict[str, list[str]]:
    """Every error code written in the source, by where: `code=` arguments, `code = ...` class attributes,
    the first argument of ApiError and ServiceUnavailable, metric counts and the two code maps."""
    found: dict[str, list[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            literals: list[ast.expr] = []
            is_code_attribute = isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "code" for t in node.targets
            )
            if (isinstance(node, ast.keyword) and node.arg == "code") or is_code_attribute:
                literals.append(node.value)
            elif isinstance(node, ast.Call) and node.args:
                name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
                if name in ("ApiError", "ServiceUnavailable", "count_error", "unavailable_error"):
                    literals.append(node.args[0])
            elif isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id in ("AUDIO_ERRORS", "HTTP_CODES") for t in node.targets
            ):
                assert isinstance(node.value, ast.Dict)
                literals.extend(v for v in node.value.values if v is not None)
            for literal in literals:
                if isinstance(literal, ast.Constant) and isinstance(literal.value, str):
                    where = f"{path.relative_to(SRC.parent)}:{literal.lineno}"
                    found.setdefault(literal.value, []).append(where)
    return found


def test_every_code_raised_anywhere_is_in_the_catalogue() -> None:
    found = _raised_codes()
    assert len(found) >= 25, "the scan finds the raise sites"  # it would find none if the walk broke
    unknown = {code: where for code, where in found.items() if code not in CODES}
    assert not unknown, f"codes missing from errors.CODES: {unknown}"
    # and the catalogue lists nothing that is never raised
    assert set(CODES) - set(found) <= {"internal_error"}, set(CODES) - set(found)


def test_the_openapi_schema_publishes_the_codes_as_an_enum() -> None:
    from emoserve.api.app import create_app
    from emoserve.serving.settings import Settings

    schema = create_app(Settings(ui=False)).openapi()
    schemas = schema["components"]["schemas"]
    assert sorted(schemas["ErrorCode"]["enum"]) == sorted(CODES)
    body = schemas["ErrorBody"]["properties"]["code"]
    assert body.get("$ref", "").endswith("/ErrorCode") or any(
        s.get("$ref", "").endswith("/ErrorCode") for s in body.get("allOf", [])
    )


def test_503s_say_when_to_retry() -> None:
    assert error_json(QueueFull(2.5), None).headers["retry-after"] == "3"
    assert EngineStopped("stopping").retry_after_s is not None


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_every_domain_error_pickles_with_its_fields(error: EmoserveError) -> None:
    """Errors cross processes (Ray Serve replicas): the same class, message and fields come back."""
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error)
    assert (back.code, back.status, back.retry_after_s) == (error.code, error.status, error.retry_after_s)
    assert vars(back) == vars(error)
