"""The receiver helper, ``oncepay.webhooks``: Standard Webhooks signatures checked within a
tolerance, several secrets during a rotation, and handling de-duplicated by ``webhook-id`` on
a store shared by processes."""

# No `from __future__ import annotations`: the FastAPI route below names a local receiver in
# its Annotated[...] parameter, which FastAPI must see as an object.
import base64
import json
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from oncepay.errors import RequestInProgress
from oncepay.webhooks import InvalidWebhook, WebhookReceiver, sign, verify

SECRET = "whsec_" + base64.b64encode(b"k" * 24).decode()
OTHER = "whsec_" + base64.b64encode(b"o" * 24).decode()
NOW = 1_800_000_000
BODY = json.dumps({"id": "evt_1", "type": "payment.captured"}).encode()


def headers(
    body: bytes = BODY, *, secret: str = SECRET, at: int = NOW, wid: str = "evt_1"
) -> dict[str, str]:
    return {"webhook-id": wid, "webhook-timestamp": str(at),
            "webhook-signature": sign(secret, wid, at, body)}  # fmt: skip


def test_a_signed_delivery_verifies_and_matches_the_reference_library() -> None:
    assert verify(BODY, headers(), SECRET, now=NOW) == json.loads(BODY)
    # Our signature is the standardwebhooks package's own: its verifier accepts it too.
    from datetime import UTC, datetime

    expected = Webhook(SECRET).sign("evt_1", datetime.fromtimestamp(NOW, tz=UTC), BODY.decode())
    assert headers()["webhook-signature"] == expected


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda h: {**h, "webhook-signature": "v1,AAAA"}, "no signature matches"),
        (lambda h: {k: v for k, v in h.items() if k != "webhook-id"}, "missing"),
        (lambda h: {**h, "webhook-timestamp": "soon"}, "not a number"),
        (lambda h: {**h, "webhook-id": "evt_2"}, "no signature matches"),
    ],
)
def test_bad_headers_are_refused(mutate: Any, reason: str) -> None:
    with pytest.raises(InvalidWebhook, match=reason):
        verify(BODY, mutate(headers()), SECRET, now=NOW)


def test_a_forged_signature_with_other_bytes_is_refused_not_an_error() -> None:
    forged = {**headers(), "webhook-signature": "v1,\u00e9\u00e9\u00e9"}
    with pytest.raises(InvalidWebhook):
        verify(BODY, forged, SECRET, now=NOW)


def test_a_changed_body_is_refused() -> None:
    with pytest.raises(InvalidWebhook, match="no signature matches"):
        verify(BODY + b" ", headers(), SECRET, now=NOW)


def test_the_timestamp_tolerance() -> None:
    assert verify(BODY, headers(), SECRET, now=NOW + 299)
    with pytest.raises(InvalidWebhook, match="away from now"):
        verify(BODY, headers(), SECRET, now=NOW + 301)
    with pytest.raises(InvalidWebhook, match="away from now"):
        verify(BODY, headers(), SECRET, now=NOW - 301)
    assert verify(BODY, headers(), SECRET, now=NOW + 3000, tolerance=3600)


def test_any_of_several_secrets_and_signatures_matches() -> None:
    both = {**headers(), "webhook-signature": " ".join(
        [sign(OTHER, "evt_1", NOW, BODY), sign(SECRET, "evt_1", NOW, BODY)])}  # fmt: skip
    assert verify(BODY, both, SECRET, now=NOW)
    assert verify(BODY, headers(secret=OTHER), [SECRET, OTHER], now=NOW)
    with pytest.raises(InvalidWebhook):
        verify(BODY, headers(secret=OTHER), SECRET, now=NOW)


def test_a_payload_that_is_not_a_json_object_is_refused() -> None:
    with pytest.raises(InvalidWebhook, match="JSON object"):
        verify(b"[1]", headers(b"[1]"), SECRET, now=NOW)


@pytest.fixture(params=["memory", "sqlite"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'seen.db'}"


async def test_each_webhook_id_is_handled_once(store_url: str) -> None:
    receiver = WebhookReceiver(SECRET, store_url)
    handled = []
    for _ in range(3):
        async with receiver.receive(BODY, headers(), now=NOW) as delivery:
            if not delivery.duplicate:
                handled.append(delivery.event["id"])
    assert handled == ["evt_1"]
    await receiver.aclose()


async def test_a_failed_handler_lets_the_redelivery_run(store_url: str) -> None:
    receiver = WebhookReceiver(SECRET, store_url)

    async def failing() -> None:
        async with receiver.receive(BODY, headers(), now=NOW) as delivery:
            assert not delivery.duplicate
            raise RuntimeError("the handler failed")

    with pytest.raises(RuntimeError):
        await failing()
    async with receiver.receive(BODY, headers(), now=NOW) as delivery:
        assert not delivery.duplicate  # released: handled now
    async with receiver.receive(BODY, headers(), now=NOW) as delivery:
        assert delivery.duplicate
    await receiver.aclose()


async def test_a_delivery_arriving_while_the_first_is_handled_is_told_to_wait() -> None:
    receiver = WebhookReceiver(SECRET)

    async def again() -> None:
        async with receiver.receive(BODY, headers(), now=NOW):
            pass

    async with receiver.receive(BODY, headers(), now=NOW) as first:
        assert not first.duplicate
        with pytest.raises(RequestInProgress):
            await again()
    await receiver.aclose()


async def test_a_bad_signature_touches_no_record() -> None:
    receiver = WebhookReceiver(SECRET)

    async def forged() -> None:
        async with receiver.receive(BODY, headers(secret=OTHER), now=NOW):
            pass

    with pytest.raises(InvalidWebhook):
        await forged()
    assert await receiver.engine.store.get("oncepay-webhooks", "evt_1") is None
    await receiver.aclose()


async def test_the_fastapi_dependency() -> None:
    from typing import Annotated

    import httpx
    from fastapi import Depends, FastAPI

    from oncepay.webhooks import Delivery

    receiver = WebhookReceiver(SECRET, tolerance=10**10)
    app = FastAPI()

    @app.post("/hook")
    async def hook(delivery: Annotated[Delivery, Depends(receiver.dependency)]) -> dict[str, Any]:
        return {"duplicate": delivery.duplicate, "type": delivery.event["type"]}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://r") as client:
        first = await client.post("/hook", content=BODY, headers=headers())
        second = await client.post("/hook", content=BODY, headers=headers())
        forged = await client.post("/hook", content=BODY, headers=headers(secret=OTHER))
    assert first.json() == {"duplicate": False, "type": "payment.captured"}
    assert second.json() == {"duplicate": True, "type": "payment.captured"}
    assert forged.status_code == 400
    assert forged.headers["content-type"] == "application/problem+json"
    assert "signature" in forged.json()["detail"]
