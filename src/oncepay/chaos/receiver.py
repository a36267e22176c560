"""The webhook receiver of the chaos audit (and of the webhook tests), built on OncePay's own
receiver helper (``oncepay.webhooks``) as a user would build one: a FastAPI route whose
dependency verifies the signature and de-duplicates by ``webhook-id`` on a SQLite store.

    ONCEPAY_RECEIVER_STORE=sqlite:///r.db \
        python -m uvicorn --factory oncepay.chaos.receiver:create_app

``PUT /config`` sets the secrets and the misbehaviour (``fail_first``: answer 500 to the first
N attempts of each id; ``gone``: answer 410); ``GET /stats`` tells what arrived and what was
handled."""

# No `from __future__ import annotations`: FastAPI must see the route's Annotated[...] as an
# object, and it names `receiver`, a local of create_app.
import os
from collections import Counter
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request

from oncepay.webhooks import Delivery, WebhookReceiver


def create_app() -> FastAPI:
    store = os.environ.get("ONCEPAY_RECEIVER_STORE", "memory://")
    receiver = WebhookReceiver(["whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"], store=store)
    state: dict[str, Any] = {"fail_first": 0, "gone": False}
    arrived: Counter[str] = Counter()
    handled: Counter[str] = Counter()
    signatures: dict[str, str] = {}
    app = FastAPI()

    @app.put("/config")
    async def configure(request: Request) -> dict[str, str]:
        config = await request.json()
        receiver.secret = config.pop("secrets", receiver.secret)
        state.update(config)
        return {"status": "ok"}

    async def counted(request: Request) -> None:
        webhook_id = request.headers.get("webhook-id", "")
        arrived[webhook_id] += 1
        signatures[webhook_id] = request.headers.get("webhook-signature", "")
        if state["gone"]:
            raise HTTPException(410, "gone")
        if arrived[webhook_id] <= state["fail_first"]:
            raise HTTPException(500, "failing on purpose")

    @app.post("/hook", dependencies=[Depends(counted)])
    async def hook(delivery: Annotated[Delivery, Depends(receiver.dependency)]) -> dict[str, str]:
        if not delivery.duplicate:
            handled[delivery.webhook_id] += 1
        return {"status": "duplicate" if delivery.duplicate else "handled"}

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return {"arrived": arrived, "handled": handled, "signatures": signatures}

    return app
