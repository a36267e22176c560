"""The OpenAPI document is usable, not only valid (issue 14): ``openapi-python-client``
generates a client from a running ``oncepay serve``'s ``/openapi.json``, the client imports,
and it makes a payment with it: create (manual capture), capture, refund, read, list."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.payments.test_processes import cli
from tests.processes import free_port, oncepay_args, running

pytestmark = pytest.mark.slow

PACKAGE = "oncepay_generated_client"
# Generating imports the generator and renders every model: a few seconds of CPU, far longer
# on a loaded machine; five minutes only stops a generator that hangs.
GENERATE_TIMEOUT = 300


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    folder: Path = tmp_path_factory.mktemp("generated-client")
    env = {
        "ONCEPAY_DATABASE_URL": f"sqlite:///{folder / 'p.db'}",
        "ONCEPAY_ACQUIRER_DATABASE_URL": f"sqlite:///{folder / 'a.db'}",
    }
    merchant = json.loads(cli("merchants", "create", "Generated", env=env).stdout)
    port = free_port()
    args = oncepay_args("serve", "--port", str(port), "--no-worker")
    with running(args, port, {**os.environ, **env}):
        yield {"url": f"http://127.0.0.1:{port}", "key": merchant["api_key"]}


@pytest.fixture(scope="module")
def client_package(
    served: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    folder: Path = tmp_path_factory.mktemp("client")
    spec = folder / "openapi.json"
    spec.write_bytes(httpx.get(f"{served['url']}/openapi.json").content)
    config = folder / "config.yaml"
    config.write_text("post_hooks: []\n")  # no formatter run over the generated code
    generator = Path(sys.executable).parent / "openapi-python-client"
    done = subprocess.run(
        [str(generator), "generate", "--path", str(spec), "--output-path",
         str(folder / PACKAGE), "--meta", "none", "--config", str(config)],
        capture_output=True, text=True, timeout=GENERATE_TIMEOUT, check=False,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    # A warning means some operation or model was left out: the document must not cause any.
    assert "Warning" not in output, output
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(folder))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]


def _api(package: Any, operation: str) -> Any:
    return importlib.import_module(f"{package.__name__}.api.default.{operation}")


def _models(package: Any) -> Any:
    return importlib.import_module(f"{package.__name__}.models")


def test_the_generated_client_makes_a_payment(served: dict[str, str], client_package: Any) -> None:
    models = _models(client_package)
    client = client_package.AuthenticatedClient(base_url=served["url"], token=served["key"])
    body = models.PaymentCreate(
        amount=2500,
        currency=models.PaymentCreateCurrency.EUR,
        payment_method=models.PaymentCreatePaymentMethod.PM_CARD_OK,
        capture_method=models.PaymentCreateCaptureMethod.MANUAL,
        metadata=models.PaymentCreateMetadata.from_dict({"order": "42"}),
    )
    with client:
        created = _api(client_package, "create_payment").sync_detailed(
            client=client, body=body, idempotency_key=str(uuid.uuid4())
        )
        assert created.status_code == 201, created.content
        payment = created.parsed
        assert isinstance(payment, models.Payment)
        assert (payment.status.value, payment.amount_capturable) == ("authorized", 2500)

        captured = _api(client_package, "capture_payment").sync(
            payment.id,
            client=client,
            body=models.CaptureRequest(amount=2000),
            idempotency_key=str(uuid.uuid4()),
        )
        assert isinstance(captured, models.Payment)
        assert (captured.status.value, captured.amount_captured) == ("captured", 2000)

        refund = _api(client_package, "create_refund").sync(
            payment.id,
            client=client,
            body=models.RefundCreate(amount=500),
            idempotency_key=str(uuid.uuid4()),
        )
        assert isinstance(refund, models.Refund)
        assert (refund.payment, refund.amount, refund.status.value) == (
            payment.id,
            500,
            "succeeded",
        )

        read = _api(client_package, "get_payment").sync(payment.id, client=client)
        assert (read.status.value, read.amount_refunded) == ("partially_refunded", 500)
        listed = _api(client_package, "list_payments").sync(
            client=client, status=models.ListPaymentsStatus.PARTIALLY_REFUNDED, limit=5
        )
        assert [p.id for p in listed.data] == [payment.id]
        assert listed.url == "/v1/payments"
        refunds = _api(client_package, "list_refunds").sync(payment.id, client=client)
        assert [r.id for r in refunds.data] == [refund.id]
        currencies = _api(client_package, "list_currencies").sync(client=client)
        assert {c.code: c.exponent for c in currencies.data}["JPY"] == 0


def test_the_generated_client_reads_problems(served: dict[str, str], client_package: Any) -> None:
    models = _models(client_package)
    client = client_package.AuthenticatedClient(base_url=served["url"], token=served["key"])
    body = models.PaymentCreate(
        amount=100_000_000,
        currency=models.PaymentCreateCurrency.JPY,
        payment_method=models.PaymentCreatePaymentMethod.PM_CARD_OK,
    )
    with client:
        refused = _api(client_package, "create_payment").sync_detailed(
            client=client, body=body, idempotency_key=str(uuid.uuid4())
        )
    assert refused.status_code == 400
    assert isinstance(refused.parsed, models.Problem)
    assert "JPY" in refused.parsed.detail
