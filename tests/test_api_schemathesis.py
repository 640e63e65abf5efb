"""Property-based tests over the OpenAPI spec: no server error, responses match the schema."""

from __future__ import annotations

import pytest
import schemathesis
from api_fixtures import TOKENS, World
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from nilus_dagster.api.app import create_app


@pytest.fixture
def api_schema(sqlite_world: World, state_dsn: str):
    """The real app over a fresh state store (fuzzed runtime writes stay out of other tests)."""
    app = create_app(sqlite_world.settings(state_dsn=state_dsn))
    return schemathesis.openapi.from_asgi("/nilus-manager/openapi.json", app)


def _fuzz(schema, who: str, max_examples: int, mode: GenerationMode = GenerationMode.POSITIVE) -> int:
    """Hypothesis over every operation (driven here: schemathesis' pytest plugin predates pytest 9)."""
    headers = {"Authorization": f"Bearer {TOKENS[who][0]}"}
    checks = [not_a_server_error, status_code_conformance, response_schema_conformance]
    calls = 0
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 36
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=max_examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def run(case) -> None:
            nonlocal calls
            calls += 1
            case.validate_response(case.call(headers=headers), checks=checks)

        run()
    return calls


def test_openapi_contract_admin(api_schema) -> None:
    """Every tenant and scope allowed: the handlers themselves are fuzzed."""
    assert _fuzz(api_schema, "admin", max_examples=30) > 18 * 5


def test_invalid_inputs_never_cause_server_errors(api_schema) -> None:
    """Schema-violating requests (negative generation): 4xx JSON errors, never a 5xx."""
    assert _fuzz(api_schema, "admin", max_examples=20, mode=GenerationMode.NEGATIVE) > 16


def test_openapi_contract_tenant_token(api_schema) -> None:
    """A tenant's read token: mostly 403s, which must be documented JSON errors."""
    assert _fuzz(api_schema, "read_acme", max_examples=8) > 16
