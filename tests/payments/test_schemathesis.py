"""Schemathesis against the payments API's own OpenAPI document, on a real ``oncepay serve``:
generated requests, valid and not, never get a 5xx, and every answer conforms to the schema
(documented status, content type and body)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.payments.test_processes import cli
from tests.processes import free_port, oncepay_args, running

pytestmark = pytest.mark.slow

# Examples per operation: enough to hit every field's edge (types, bounds, formats) at least
# once across the run, few enough to keep the test to a few seconds per operation.
EXAMPLES = 30


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    folder: Path = tmp_path_factory.mktemp("schemathesis")
    db = f"sqlite:///{folder / 'p.db'}"
    env = {"ONCEPAY_DATABASE_URL": db,
           "ONCEPAY_ACQUIRER_DATABASE_URL": f"sqlite:///{folder / 'a.db'}"}  # fmt: skip
    merchant = json.loads(cli("merchants", "create", "Fuzz", env=env).stdout)
    port = free_port()
    # --no-worker: generated webhook endpoints name arbitrary hosts, and nothing may be sent to
    # any address but this machine's own.
    args = oncepay_args("serve", "--port", str(port), "--no-worker")
    with running(args, port, {**os.environ, **env}):
        base = f"http://127.0.0.1:{port}"
        yield {"schema": schemathesis.openapi.from_url(f"{base}/openapi.json"),
               "key": merchant["api_key"]}  # fmt: skip


def _operations() -> list[Any]:
    """(method, path) of every documented operation, read from the app without serving it."""
    from oncepay.payments.api.app import create_app

    document = create_app().openapi()
    return [
        pytest.param(method.upper(), path, mode, id=f"{mode}-{method.upper()} {path}")
        for path, item in document["paths"].items()
        for method in item
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        # An operation that takes nothing (GET /health) has no invalid input to generate.
        if mode is GenerationMode.POSITIVE or _takes_input(item[method])
    ]


def _takes_input(operation: dict[str, Any]) -> bool:
    return bool(operation.get("parameters") or operation.get("requestBody"))


@pytest.mark.parametrize(("method", "path", "mode"), _operations())
def test_api_conforms_and_never_fails(
    served: dict[str, Any], method: str, path: str, mode: GenerationMode
) -> None:
    operation = served["schema"][path][method]
    headers = {"Authorization": f"Bearer {served['key']}"}

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    def run(case: Any) -> None:
        case.call_and_validate(
            headers=headers,
            checks=[
                not_a_server_error,
                status_code_conformance,
                content_type_conformance,
                response_schema_conformance,
                negative_data_rejection,
            ],
        )

    run()
