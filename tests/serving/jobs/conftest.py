"""The PostgreSQL server the jobs' tests share (started once, a database per test)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.jobs import postgres_server


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[str]:
    with postgres_server() as url:
        yield url
