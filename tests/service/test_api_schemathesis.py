"""Property-based run of schemathesis against /v1/openapi.json: no 5xx, and every response (422 bodies included)
conforms to the schema the API documents.

Bounded: a fixed number of examples per operation and generation mode, a fixed seed (derandomized), loopback
only, authenticated with a real key of a tenant whose queue limit is small (valid submits end at 429)."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.services

EXAMPLES_PER_OPERATION = 10  # per generation mode (valid and invalid data)


def test_openapi_fuzz_no_5xx_and_responses_match_the_schema(service, make_key):
    import httpx
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )
    from schemathesis.core.failures import FailureGroup

    doc = httpx.get(f"{service.url}/v1/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(doc)
    auth = {"Authorization": f"Bearer {make_key(max_queued=2)}"}
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=EXAMPLES_PER_OPERATION,
                derandomize=True,
                deadline=None,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case):
                try:
                    case.call_and_validate(base_url=service.url, headers=auth, checks=checks, timeout=30)
                except (
                    Exception,
                    FailureGroup,
                ) as exc:  # recorded, not raised: no shrinking, all operations run
                    failures.append(f"{case.operation.label}: {str(exc)[:800]}")

            t0 = time.monotonic()
            try:
                run()
            except Unsatisfiable:  # no invalid data exists for an operation without inputs (healthz)
                assert mode == GenerationMode.NEGATIVE, operation.label
            print(f"{operation.label} [{mode.value}]: {time.monotonic() - t0:.1f} s")
    assert operations >= 10, operations
    assert not failures, "\n\n".join(failures)
