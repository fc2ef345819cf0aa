"""The HTTP API against its own OpenAPI schema (schemathesis): whatever the schema allows a client to
send, the answer is never a 5xx - bad requests get their 4xx JSON error."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings

from .test_server import LIVE, live_server

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
