"""The HTTP API against its own OpenAPI schema (schemathesis): whatever the schema allows a client to
send, the answer is never a 5xx - bad requests get their 4xx JSON error. And the schema's result models
against the library's result types: one result schema, whichever surface renders it."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from emoserve.api.schemas import RESULT_MODELS, RecognitionOut, ResultModel, TimelineOut
from emoserve.inference import results
from emoserve.inference.results import Result, Timeline
from tests.support.server import LIVE, live_server

EXAMPLES = 25  # per operation, in ./test.sh


def test_no_request_the_schema_allows_gets_a_server_error(tmp_path: Path) -> None:
    with live_server(LIVE, tmp_path / "home") as api:
        base_url = str(api.client.base_url)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in operations} >= {"/v1/recognize", "/v1/model", "/healthz", "/readyz"}
        statuses: dict[str, set[int]] = {}
        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            def no_server_error(case: Any) -> None:
                response = case.call(base_url=base_url, timeout=30)
                where = f"{case.method} {case.formatted_path}"
                statuses.setdefault(where, set()).add(response.status_code)
                assert response.status_code < 500, f"{where}: {response.status_code} {response.text[:300]}"
                if response.status_code >= 400 and case.formatted_path.startswith("/v1/"):
                    assert set(response.json()) == {"error"}, f"{where}: {response.text[:300]}"

            no_server_error()
        # the generated requests did reach the routes, good and bad ones alike
        assert statuses["POST /v1/recognize"] & {400, 415}, statuses  # random bodies are refused, as 4xx
        assert statuses["GET /v1/model"] == {200}, statuses


def drift(result_type: type, model: type[ResultModel]) -> tuple[set[str], set[str]]:
    """(fields of the result type that its HTTP model lacks, fields of the model that the result type
    lacks and the model does not declare `http_only`)."""
    fields = {f.name for f in dataclasses.fields(result_type)}
    declared = set(model.model_fields)
    return fields - declared, declared - fields - model.http_only


@pytest.mark.parametrize("result_type", list(RESULT_MODELS), ids=lambda t: t.__name__)
def test_each_result_type_and_its_http_model_have_the_same_fields(result_type: type) -> None:
    model = RESULT_MODELS[result_type]
    missing, unexplained = drift(result_type, model)
    assert not missing, f"{result_type.__name__} has fields that {model.__name__} (/docs) lacks: {missing}"
    assert not unexplained, f"{model.__name__} has fields that {result_type.__name__} lacks: {unexplained}"
    assert model.http_only <= set(model.model_fields)


def test_every_result_type_has_an_http_model() -> None:
    types = {
        obj
        for obj in vars(results).values()
        if dataclasses.is_dataclass(obj) and isinstance(obj, type) and obj.__module__ == results.__name__
    }
    # ModelTag is what scored a result, not one: its fields are the results' own (checked above)
    assert types - {results.ModelTag} == set(RESULT_MODELS)


def test_the_check_sees_a_field_added_on_either_side() -> None:
    grown = dataclasses.make_dataclass("Grown", [("arousal", float, 0.0)], bases=(Result,), frozen=True)
    assert drift(grown, RecognitionOut) == ({"arousal"}, set())
    shrunk = dataclasses.make_dataclass(
        "Shrunk", [(f.name, f.type) for f in dataclasses.fields(Timeline) if f.name != "speech_s"]
    )
    assert drift(shrunk, TimelineOut) == (set(), {"speech_s"})
    assert drift(Result, RecognitionOut) == (set(), set())  # `timing` is declared http_only
