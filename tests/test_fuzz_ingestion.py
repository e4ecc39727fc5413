"""Property-based fuzzing of the ingestion API from its own OpenAPI schema: no 5xx on any input."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import not_a_server_error

from tests.stackutil import Stack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def api_schema(stack: Stack) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{stack.settings.ingestion_url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_error_with_key(case: schemathesis.Case, stack: Stack) -> None:
    case.call_and_validate(headers=stack.headers, checks=[not_a_server_error], timeout=30)


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_error_without_key(case: schemathesis.Case, stack: Stack) -> None:
    resp = case.call(headers={"Authorization": "Bearer not-the-key"}, timeout=30)
    assert resp.status_code < 500
    if case.path.startswith("/v1/"):
        assert resp.status_code in (401, 404, 405, 413, 422), resp.text


def test_raw_garbage_bodies(stack: Stack) -> None:
    url = f"{stack.settings.ingestion_url}/v1/jobs"
    bodies = [b"", b"null", b"[]", b"\xff\xfe\x00", b'{"input_tokens": 1e999}', b'{"input_tokens": NaN}',
              b'{"seed": 99999999999999999999999}', b'{"label": "\\ud800"}', b"{" * 5000]
    with httpx.Client(timeout=10) as c:
        for body in bodies:
            r = c.post(url, content=body, headers={**stack.headers, "Content-Type": "application/json"})
            assert 400 <= r.status_code < 500, (body[:40], r.status_code, r.text)
