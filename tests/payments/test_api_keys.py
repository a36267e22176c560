"""API keys (docs/payments-api.md, "API keys"; docs/operations.md, "API keys"): created,
listed, revoked and rolled from the operator API and the CLI, restricted to scopes, their prefix
and last use shown, every change audited, and a revoked key refused by every API process
within the promised 30 s — on SQLite and PostgreSQL, times moved by the test's clock."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from oncepay.payments.api.app import create_app
from oncepay.payments.bootstrap import start
from oncepay.payments.errors import AuthenticationFailed, InvalidRequest
from oncepay.payments.merchants import (
    KEY_CACHE_SECONDS,
    LAST_USED_EVERY,
    READABLE_BY_EVERY_KEY,
    RESOURCES,
    authenticate,
    create_key,
    parse_scopes,
    revoke_key,
    scope_for,
)
from oncepay.payments.settings import Settings
from oncepay.payments.storage.migrations import migrate
from oncepay.storage.db import read, write
from tests.clock import FakeClock
from tests.payments.stack import Stack, drop_schema, running_stack
from tests.processes import PYTHONPATH, ROOT, free_port, oncepay_args, running
from tests.servers import POSTGRES_URL, require_postgres

TOKEN = "op-token-0123456789abcdef"
OPERATOR = {"Authorization": f"Bearer {TOKEN}"}
PAYMENT = {"amount": 1000, "currency": "USD", "payment_method": "pm_card_ok"}
# The docs' promise: a revoked key stops working within this many seconds in every process.
PROMISED = 30.0


@pytest.fixture
async def stack(payments_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(payments_url, tmp_path, admin_token=TOKEN) as running:
        yield running


async def operator_post(
    stack: Stack, path: str, body: Any = None, *, key: str | None = None
) -> httpx.Response:
    headers = {**OPERATOR, "Idempotency-Key": key or uuid.uuid4().hex}
    return await stack.client.post(path, json=body, headers=headers)


def bearer(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"}


async def new_key(stack: Stack, **body: Any) -> dict[str, Any]:
    created = await operator_post(stack, f"/v1/admin/merchants/{stack.merchant.id}/keys", body)
    assert created.status_code == 201, created.text
    document: dict[str, Any] = created.json()
    return document


async def audit(stack: Stack) -> list[dict[str, Any]]:
    answer = await stack.client.get(
        f"/v1/admin/merchants/{stack.merchant.id}/keys/audit", headers=OPERATOR
    )
    assert answer.status_code == 200, answer.text
    found: list[dict[str, Any]] = answer.json()["data"]
    return found


# -- lifecycle -----------------------------------------------------------------------------------


async def test_create_list_revoke_through_the_operator_api(stack: Stack) -> None:
    path = f"/v1/admin/merchants/{stack.merchant.id}/keys"
    created = await operator_post(stack, path, {"name": "checkout"}, key="create-1")
    assert created.status_code == 201, created.text
    key = created.json()
    secret = key["secret"]
    assert secret.startswith("sk_test_")
    assert key["prefix"] == secret[:12]
    assert key["status"] == "active"
    assert key["scopes"] is None
    assert key["name"] == "checkout"

    replay = await operator_post(stack, path, {"name": "checkout"}, key="create-1")
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json() == {**key, "secret": None}  # shown once: never stored for replay

    assert (await stack.client.get("/v1/payments", headers=bearer(secret))).status_code == 200
    listed = (await stack.client.get(path, headers=OPERATOR)).json()["data"]
    assert {k["id"] for k in listed} >= {key["id"]}
    assert secret not in json.dumps(listed)
    assert [k["prefix"] for k in listed if k["id"] == key["id"]] == [secret[:12]]

    revoked = await operator_post(stack, f"{path}/{key['id']}/revoke")
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["status"] == "revoked"
    # The process that revoked it refuses it at once (the others within KEY_CACHE_SECONDS).
    refused = await stack.client.get("/v1/payments", headers=bearer(secret))
    assert refused.status_code == 401
    assert refused.json()["code"] == "invalid_api_key"

    trail = await audit(stack)
    mine = [(row["action"], row["actor"]) for row in trail if row["key"] == key["id"]]
    assert mine == [("revoked", "operator"), ("created", "operator")]
    merchants = (await stack.client.get("/v1/admin/merchants", headers=OPERATOR)).json()
    assert stack.merchant.id in [m["id"] for m in merchants["data"]]


async def test_merchants_are_listed_a_page_at_a_time(stack: Stack) -> None:
    created = await operator_post(stack, "/v1/admin/merchants", {"name": "Second shop"})
    assert created.status_code == 201, created.text
    assert created.json()["secret"].startswith("sk_test_")
    first = (await stack.client.get("/v1/admin/merchants?limit=1", headers=OPERATOR)).json()
    assert len(first["data"]) == 1
    assert first["has_more"] is True
    after = first["data"][0]["id"]
    rest = await stack.client.get(f"/v1/admin/merchants?starting_after={after}", headers=OPERATOR)
    assert rest.json()["has_more"] is False
    names = [m["name"] for m in first["data"] + rest.json()["data"]]
    assert sorted(names) == ["Second shop", "Test shop"]
    unknown = await stack.client.get("/v1/admin/merchants?starting_after=mer_x", headers=OPERATOR)
    assert unknown.status_code == 400
    blank = await operator_post(stack, "/v1/admin/merchants", {"name": " "})
    assert blank.status_code == 400


@pytest.mark.parametrize("name", ["Shop\x1b[2J", "Shop\nInjected: line", "Shop\x00", "\x7f"])
async def test_a_name_with_a_control_character_is_refused(stack: Stack, name: str) -> None:
    # Names are printed by the CLI and logs and shown on the dashboard: an escape sequence
    # would be the operator's terminal's to run, a line break a forged log line.
    created = await operator_post(stack, "/v1/admin/merchants", {"name": name})
    assert created.status_code == 400, created.text
    assert (
        created.json()["detail"] == "name: no control characters (tabs, line breaks, escapes, NUL)"
    )
    merchant = (await stack.client.get("/v1/admin/merchants", headers=OPERATOR)).json()["data"][0]
    path = f"/v1/admin/merchants/{merchant['id']}/keys"
    key = await operator_post(stack, path, {"name": name})
    assert key.status_code == 400, key.text
    listed = (await stack.client.get("/v1/admin/merchants", headers=OPERATOR)).json()["data"]
    assert [m["name"] for m in listed] == ["Test shop"]


async def test_merchant_keys_need_the_operator_token(stack: Stack) -> None:
    path = f"/v1/admin/merchants/{stack.merchant.id}/keys"
    as_merchant = await stack.client.get(path)  # the merchant's own key is no operator's
    assert as_merchant.status_code == 401
    assert as_merchant.json()["code"] == "operator_token_required"
    other = await stack.client.get(
        "/v1/admin/merchants/mer_000000000000000000000000/keys", headers=OPERATOR
    )
    assert other.status_code == 404


async def test_a_rolled_key_works_for_its_overlap_then_stops(stack: Stack) -> None:
    old = await new_key(stack, scopes=["payments:*"])
    for _ in range(2):  # used once, so this process has it cached
        assert (
            await stack.client.get("/v1/payments", headers=bearer(old["secret"]))
        ).status_code == 200
    path = f"/v1/admin/merchants/{stack.merchant.id}/keys/{old['id']}/roll"
    rolled = await operator_post(stack, path, {"overlap": 600})
    assert rolled.status_code == 201, rolled.text
    new = rolled.json()
    assert new["scopes"] == ["payments:*"]
    assert new["rolled"]["status"] == "expiring"
    assert new["rolled"]["expires"] == int(stack.clock() + 600)

    stack.clock.advance(599)
    for secret in (old["secret"], new["secret"]):
        assert (await stack.client.get("/v1/payments", headers=bearer(secret))).status_code == 200
    stack.clock.advance(2)
    expired = await stack.client.get("/v1/payments", headers=bearer(old["secret"]))
    assert expired.status_code == 401
    assert expired.json()["code"] == "api_key_expired"
    assert (
        await stack.client.get("/v1/payments", headers=bearer(new["secret"]))
    ).status_code == 200

    again = await operator_post(stack, path, {"overlap": 0})
    assert again.status_code == 400
    assert "expired" in again.json()["detail"]
    actions = [(r["key"], r["action"]) for r in await audit(stack)]
    assert (old["id"], "rolled") in actions
    assert (new["id"], "created") in actions


async def test_rolling_with_no_overlap_stops_the_old_key_now(stack: Stack) -> None:
    old = await new_key(stack)
    path = f"/v1/admin/merchants/{stack.merchant.id}/keys/{old['id']}/roll"
    assert (await operator_post(stack, path)).status_code == 201
    refused = await stack.client.get("/v1/payments", headers=bearer(old["secret"]))
    assert refused.status_code == 401
    too_long = await operator_post(stack, path, {"overlap": 8 * 86400})
    assert too_long.status_code == 400


# -- restricted keys -----------------------------------------------------------------------------


async def test_a_restricted_key_is_refused_outside_its_scopes(stack: Stack) -> None:
    reader = await new_key(stack, scopes=["payments:read"])
    headers = {**bearer(reader["secret"]), "Idempotency-Key": "k-403"}
    assert (await stack.client.get("/v1/payments", headers=headers)).status_code == 200
    assert (await stack.client.get("/v1/currencies", headers=headers)).status_code == 200
    refused = await stack.client.post("/v1/payments", json=PAYMENT, headers=headers)
    assert refused.status_code == 403
    problem = refused.json()
    assert problem["code"] == "insufficient_scope"
    assert "payments:write" in problem["detail"]
    assert refused.headers["content-type"].startswith("application/problem+json")
    events = await stack.client.get("/v1/events", headers=headers)
    assert events.status_code == 403
    assert "events:read" in events.json()["detail"]
    # Refused before the idempotency layer: the key was never claimed and nothing ran.
    assert await stack.count("payments") == 0
    done = await stack.post("/v1/payments", PAYMENT, key="k-403")
    assert done.status_code == 201
    assert "idempotent-replayed" not in done.headers

    writer = await new_key(stack, scopes=["payments:write", "refunds:write"])
    headers = bearer(writer["secret"])
    paid = await stack.client.post(
        "/v1/payments", json=PAYMENT, headers={**headers, "Idempotency-Key": "w"}
    )
    assert paid.status_code == 201, paid.text
    refund = await stack.client.post(
        f"/v1/payments/{paid.json()['id']}/refunds",
        json={"amount": 100},
        headers={**headers, "Idempotency-Key": "r"},
    )
    assert refund.status_code == 201, refund.text
    hooks = await stack.client.get("/v1/webhook_endpoints", headers=headers)
    assert hooks.status_code == 403

    read_only = await new_key(stack, scopes=["*:read"])
    headers = bearer(read_only["secret"])
    for path in ("/v1/payments", "/v1/events", "/v1/webhook_endpoints", "/v1/refunds"):
        assert (await stack.client.get(path, headers=headers)).status_code == 200, path
    write = await stack.client.post(
        f"/v1/payments/{paid.json()['id']}/cancel", headers={**headers, "Idempotency-Key": "c"}
    )
    assert write.status_code == 403


async def test_a_restricted_key_is_refused_before_its_body_is_judged(stack: Stack) -> None:
    """403 before 400 or 415, as 401 is: a key that may not write learns that first."""
    reader = await new_key(stack, scopes=["*:read"])
    headers = {**bearer(reader["secret"]), "Idempotency-Key": "k", "Content-Type": "text/plain"}
    for body in (b"{not json", b"amount=5"):
        refused = await stack.client.post("/v1/payments", content=body, headers=headers)
        assert refused.status_code == 403, refused.text
        assert refused.json()["code"] == "insufficient_scope"


async def test_unknown_scopes_are_refused_with_the_vocabulary(stack: Stack) -> None:
    path = f"/v1/admin/merchants/{stack.merchant.id}/keys"
    for scopes in (["payment:read"], ["payments:delete"], [], ["payments"]):
        answer = await operator_post(stack, path, {"scopes": scopes})
        assert answer.status_code == 400, (scopes, answer.text)
        assert "scope" in answer.json()["detail"]
    assert await stack.count("api_key_audit") == 1  # the merchant's first key, nothing since


def test_every_merchant_route_belongs_to_a_resource_of_the_vocabulary() -> None:
    """A new route must map onto a scope a restricted key can be given (or be reference data
    every key reads): otherwise restricted keys could never reach it."""
    app = create_app(Settings(database_url="sqlite:///unused.db"))
    checked = 0
    for route in app.routes:
        path = getattr(route, "path", "")
        if not path.startswith("/v1/") or path.startswith("/v1/admin"):
            continue
        for method in getattr(route, "methods", None) or ():
            resource, access = scope_for(path, method)
            assert resource in RESOURCES or (
                resource in READABLE_BY_EVERY_KEY and access == "read"
            ), (method, path)
            checked += 1
    assert checked >= 20
    assert scope_for("/v1/payments/{id}/refunds", "POST") == ("refunds", "write")
    assert scope_for("/v1/payments/{id}/capture", "POST") == ("payments", "write")
    assert scope_for("/v1/events/{event_id}/deliveries", "GET") == ("webhook_endpoints", "read")


def test_scope_vocabulary() -> None:
    assert parse_scopes(None) is None
    assert parse_scopes(["payments:read", " refunds:* "]) == frozenset(
        {"payments:read", "refunds:*"}
    )
    for wrong in (["nope:read"], ["payments:admin"], [""], ["payments"]):
        with pytest.raises(InvalidRequest):
            parse_scopes(wrong)


# -- last use ------------------------------------------------------------------------------------


async def test_last_use_is_written_at_most_once_a_minute(stack: Stack) -> None:
    key = await new_key(stack)

    async def use() -> None:
        answer = await stack.client.get("/v1/payments", headers=bearer(key["secret"]))
        assert answer.status_code == 200

    async def last_used() -> float | None:
        async with read(stack.db) as conn:
            value = (
                await conn.execute(
                    text("SELECT last_used_at FROM api_keys WHERE id = :id"), {"id": key["id"]}
                )
            ).scalar()
        return None if value is None else float(value)

    assert await last_used() is None
    first = stack.clock()
    await use()
    assert await last_used() == first
    for _ in range(3):  # each past the cache time, so each one reads the key again
        stack.clock.advance(KEY_CACHE_SECONDS)
        await use()
    assert stack.clock() - first < LAST_USED_EVERY
    assert await last_used() == first  # read three times, written once
    stack.clock.advance(LAST_USED_EVERY)
    await use()
    assert await last_used() == stack.clock()
    listed = (
        await stack.client.get(f"/v1/admin/merchants/{stack.merchant.id}/keys", headers=OPERATOR)
    ).json()["data"]
    assert [k["last_used"] for k in listed if k["id"] == key["id"]] == [int(stack.clock())]


# -- revocation across processes -----------------------------------------------------------------


async def test_a_key_revoked_elsewhere_is_refused_once_the_cache_time_has_passed(
    stack: Stack, payments_url: str
) -> None:
    """Two processes on one database, interleaved by hand: A has the key cached; B revokes it;
    A accepts it only while its cache entry is younger than KEY_CACHE_SECONDS, which is
    within the promised 30 s."""
    assert KEY_CACHE_SECONDS <= PROMISED
    key = await new_key(stack)
    other = await start(Settings(database_url=payments_url, run_worker=False))
    try:
        other.engine.clock = stack.clock
        authorization = f"Bearer {key['secret']}"
        assert (await authenticate(stack.services, authorization)).key_id == key["id"]
        revoked_at = stack.clock()
        await revoke_key(other.db, stack.merchant.id, key["id"], actor="cli", clock=stack.clock)
        with pytest.raises(AuthenticationFailed):
            await authenticate(other, authorization)  # B never trusted it since
        stack.clock.advance(KEY_CACHE_SECONDS - 0.001)
        await authenticate(stack.services, authorization)  # A: still inside its cache time
        stack.clock.advance(0.001)
        with pytest.raises(AuthenticationFailed):
            await authenticate(stack.services, authorization)
        assert stack.clock() - revoked_at <= PROMISED
    finally:
        await other.aclose()


@pytest.mark.slow
@pytest.mark.postgres
def test_every_api_process_refuses_a_revoked_key_within_30_s(tmp_path: Path) -> None:
    """Two real `oncepay serve` processes on one PostgreSQL, both having used the key: the key
    is revoked through one's operator API; that one refuses it at once, the other within 30 s."""
    require_postgres()
    db = f"{POSTGRES_URL}?schema=oncepay_keys_{uuid.uuid4().hex[:8]}"
    ports = [free_port(), free_port()]
    env = {"ONCEPAY_DATABASE_URL": db, "ONCEPAY_ADMIN_TOKEN": TOKEN, "ONCEPAY_RUN_WORKER": "false"}
    try:
        merchant = json.loads(_cli("merchants", "create", "Shop", env=env).stdout)
        with (
            running(_serve(ports[0]), ports[0], _own_acquirer(env, tmp_path, ports[0])),
            running(_serve(ports[1]), ports[1], _own_acquirer(env, tmp_path, ports[1])),
        ):
            result = asyncio.run(_revoke_and_watch(ports, merchant))
        assert result["revoking_process"] == 0  # refused by the very next request
        assert result["other_process"] <= PROMISED
    finally:
        asyncio.run(drop_schema(db))


def _serve(port: int) -> list[str]:
    return oncepay_args("serve", "--port", str(port), "--quiet")


def _own_acquirer(env: dict[str, str], tmp_path: Path, port: int) -> dict[str, str]:
    """Each process's embedded simulator on a file of its own, in the test's folder."""
    return {**env, "ONCEPAY_ACQUIRER_DATABASE_URL": f"sqlite:///{tmp_path / f'acq-{port}.db'}"}


async def _revoke_and_watch(ports: list[int], merchant: dict[str, Any]) -> dict[str, float]:
    import time

    auth = bearer(merchant["api_key"])
    bases = [f"http://127.0.0.1:{port}" for port in ports]
    async with httpx.AsyncClient(timeout=10) as client:
        for base in bases:  # both processes have checked (and cached) the key
            assert (await client.get(f"{base}/v1/payments", headers=auth)).status_code == 200
        keys = (
            await client.get(
                f"{bases[0]}/v1/admin/merchants/{merchant['id']}/keys", headers=OPERATOR
            )
        ).json()["data"]
        revoke = f"{bases[0]}/v1/admin/merchants/{merchant['id']}/keys/{keys[0]['id']}/revoke"
        answer = await client.post(revoke, headers={**OPERATOR, "Idempotency-Key": "revoke"})
        assert answer.status_code == 200, answer.text
        revoked = time.monotonic()
        refused: dict[str, float] = {}
        first = await client.get(f"{bases[0]}/v1/payments", headers=auth)
        refused["revoking_process"] = 0.0 if first.status_code == 401 else -1.0
        # Polling a condition under a deadline (the promise plus a margin), not a timed guess.
        while time.monotonic() - revoked < PROMISED + 5:
            if (await client.get(f"{bases[1]}/v1/payments", headers=auth)).status_code == 401:
                refused["other_process"] = time.monotonic() - revoked
                break
            await asyncio.sleep(0.5)
        else:
            refused["other_process"] = float("inf")
    return refused


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        oncepay_args(*args),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": PYTHONPATH, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result


# -- the CLI -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_cli_manages_keys_and_says_which_database(tmp_path: Path) -> None:
    env = {"ONCEPAY_DATABASE_URL": f"sqlite:///{tmp_path / 'p.db'}"}
    created = _cli("merchants", "create", "Corner shop", env=env)
    assert f"database: sqlite:///{tmp_path / 'p.db'}" in created.stderr
    merchant = json.loads(created.stdout)
    restricted = _cli(
        "merchants", "keys", "create", "Corner shop", "--name", "reports", "--read-only", env=env
    )
    key = json.loads(restricted.stdout)
    assert key["scopes"] == ["*:read"]
    assert key["secret"].startswith("sk_test_")
    listed = _cli("merchants", "keys", "list", merchant["id"], "--json", env=env)
    rows = json.loads(listed.stdout)
    assert {row["id"] for row in rows} >= {key["id"]}
    assert key["secret"] not in listed.stdout
    assert merchant["api_key"] not in listed.stdout
    table = _cli("merchants", "keys", "list", "Corner shop", env=env).stdout
    assert f"{key['prefix']}…" in table
    assert "*:read" in table
    rolled = json.loads(
        _cli("merchants", "keys", "roll", key["id"], "--overlap", "1h", env=env).stdout
    )
    assert rolled["rolled"]["status"] == "expiring"
    assert rolled["scopes"] == ["*:read"]
    revoked = json.loads(_cli("merchants", "keys", "revoke", rolled["id"], env=env).stdout)
    assert revoked["status"] == "revoked"
    trail = [
        json.loads(line)
        for line in _cli("merchants", "keys", "audit", "Corner shop", env=env).stdout.splitlines()
    ]
    assert [(r["action"], r["actor"]) for r in trail] == [
        ("revoked", "cli"),
        ("rolled", "cli"),
        ("created", "cli"),
        ("created", "cli"),
        ("created", "cli"),
    ]
    bad = subprocess.run(
        oncepay_args("merchants", "keys", "create", "Corner shop", "--scope", "payment:read"),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": PYTHONPATH, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2
    assert "not a scope" in bad.stderr


# -- migration 6 ---------------------------------------------------------------------------------


async def test_migration_6_upgrades_a_database_made_before_it(payments_url: str) -> None:
    """A database made before migration 6 (its columns and table removed, its version row
    gone) gets them, keeping its keys; then the keys work with the new columns."""
    settings = Settings(database_url=payments_url, run_worker=False)
    services = await start(settings)
    try:
        clock = FakeClock()
        services.engine.clock = clock
        from oncepay.payments.merchants import create_merchant

        merchant, api_key = await create_merchant(services.db, "Old shop")
        async with write(services.db) as conn:
            await conn.execute(text("DROP TABLE api_key_audit"))
            for column in ("name", "scopes", "expires_at", "last_used_at"):
                await conn.execute(text(f"ALTER TABLE api_keys DROP COLUMN {column}"))
            await conn.execute(text("DELETE FROM oncepay_schema_migrations WHERE version = 6"))
        assert await migrate(services.db) == [6]
        caller = await authenticate(services, f"Bearer {api_key}")
        assert caller.id == merchant.id
        assert caller.scopes is None
        document, _ = await create_key(
            services.db, merchant.id, actor="cli", scopes=["events:read"]
        )
        assert document["scopes"] == ["events:read"]
    finally:
        await services.aclose()
        await drop_schema(payments_url)
