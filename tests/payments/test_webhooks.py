"""Events and webhooks (SPEC §6) against a real HTTP receiver process built on the receiver
helper: signed deliveries that verify, the same ``webhook-id`` on every retry, 410 disabling,
dead letters and redelivery, a crash between sending and recording, secret rotation, and the
endpoint API's bad input."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from oncepay.payments.dashboard import queries
from oncepay.payments.records import EventRow
from oncepay.payments.webhooks import delivery
from oncepay.payments.webhooks.delivery import deliver_due
from oncepay.storage.db import read
from tests.payments.stack import Stack, database_url, running_stack
from tests.processes import free_port, running, uvicorn_args
from tests.servers import require_postgres

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def receiver_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder: Path = tmp_path_factory.mktemp("receiver")
    port = free_port()
    args = [*uvicorn_args("oncepay.chaos.receiver:create_app", port), "--factory"]
    env = {"ONCEPAY_RECEIVER_STORE": f"sqlite:///{folder / 'seen.db'}"}
    with running(args, port, env):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
async def hooks(payments_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(payments_url, tmp_path, webhook_schedule=[10.0, 20.0]) as stack:
        yield stack


class Receiver:
    def __init__(self, url: str) -> None:
        self.url = url

    def configure(self, **config: Any) -> None:
        httpx.put(f"{self.url}/config", json={"fail_first": 0, "gone": False, **config})

    def stats(self) -> dict[str, Any]:
        found: dict[str, Any] = httpx.get(f"{self.url}/stats").json()
        return found


@pytest.fixture
def receiver(receiver_url: str) -> Receiver:
    return Receiver(receiver_url)


async def subscribe(stack: Stack, receiver: Receiver, events: list[str] | None = None) -> Any:
    body: dict[str, Any] = {"url": f"{receiver.url}/hook"}
    if events is not None:
        body["events"] = events
    response = await stack.post("/v1/webhook_endpoints", body)
    assert response.status_code == 201, response.text
    endpoint = response.json()
    receiver.configure(secrets=[endpoint["secret"]])
    return endpoint


async def deliver(stack: Stack, *, at: float | None = None) -> dict[str, int]:
    """Every delivery due at ``at``: passes until one finds nothing (a pass takes at most
    PER_ENDPOINT deliveries of one endpoint)."""
    async with httpx.AsyncClient() as client:
        return dict(await drain(stack, client, at=at))


async def drain(
    stack: Stack, client: httpx.AsyncClient, *, at: float | None = None
) -> Counter[str]:
    results: Counter[str] = Counter()
    while (report := await deliver_due(stack.services, client, now=at)).total:
        results.update(report.results)
    return results


async def test_events_arrive_signed_and_are_handled_once(hooks: Stack, receiver: Receiver) -> None:
    await subscribe(hooks, receiver, events=["payment.captured", "payment.refunded"])
    pid = (await hooks.pay()).json()["id"]
    await hooks.post(f"/v1/payments/{pid}/refunds", {"amount": 10})
    assert await deliver(hooks) == {"succeeded": 2}
    events = (await hooks.client.get("/v1/events", params={"limit": 100})).json()["data"]
    wanted = {e["id"] for e in events if e["type"] in {"payment.captured", "payment.refunded"}}
    stats = receiver.stats()
    assert wanted <= set(stats["handled"])
    assert all(stats["handled"][event_id] == 1 for event_id in wanted)
    assert all(stats["signatures"][event_id].startswith("v1,") for event_id in wanted)
    assert await deliver(hooks) == {}  # nothing left to send


async def test_a_failing_receiver_gets_the_same_webhook_id_until_it_succeeds(
    hooks: Stack, receiver: Receiver
) -> None:
    endpoint = await subscribe(hooks, receiver, events=["payment.captured"])
    receiver.configure(secrets=[endpoint["secret"]], fail_first=2)
    await hooks.pay()
    now = time.time()  # events carry the wall clock; so does the receiver's tolerance
    assert await deliver(hooks, at=now) == {"retry": 1}
    assert await deliver(hooks, at=now + 1) == {}  # not due before its back-off
    assert await deliver(hooks, at=now + 12) == {"retry": 1}
    assert await deliver(hooks, at=now + 40) == {"succeeded": 1}
    [event] = (await hooks.client.get("/v1/events", params={"type": "payment.captured"})).json()[
        "data"
    ]
    stats = receiver.stats()
    assert stats["arrived"][event["id"]] == 3  # three attempts, one webhook-id
    assert stats["handled"][event["id"]] == 1
    [row] = (await hooks.client.get(f"/v1/events/{event['id']}/deliveries")).json()["data"]
    detail = (await hooks.client.get(f"/v1/webhook_deliveries/{row['id']}")).json()
    assert [a["status_code"] for a in detail["attempt_log"]] == [500, 500, 200]
    assert detail["status"] == "succeeded"


async def _deliveries_of(stack: Stack, payment_id: str) -> set[tuple[str, str]]:
    """(event type, endpoint id) of every delivery queued for a payment's events."""
    from sqlalchemy import text

    query = text(
        "SELECT e.type, d.endpoint_id, d.status, d.attempts, d.merchant_id "
        "FROM webhook_deliveries d JOIN events e ON e.id = d.event_id WHERE e.object_id = :p"
    )
    async with read(stack.db) as conn:
        rows = (await conn.execute(query, {"p": payment_id})).all()
    assert all((r.status, r.attempts, r.merchant_id) == ("pending", 0, stack.merchant.id)
               for r in rows)  # fmt: skip
    return {(row.type, row.endpoint_id) for row in rows}


async def test_fan_out_queues_one_delivery_per_enabled_subscriber_as_of_each_commit(
    hooks: Stack, receiver: Receiver
) -> None:
    """Each event gets a delivery for exactly the endpoints enabled and subscribed to its
    type when its transaction committed: not a disabled or deleted one, and an endpoint
    created, disabled or deleted between two payments counts from the next one on."""
    everything = await subscribe(hooks, receiver)
    captured = await subscribe(hooks, receiver, events=["payment.captured"])
    await subscribe(hooks, receiver, events=["payment.refunded"])  # no payment event of its
    disabled = await subscribe(hooks, receiver)
    deleted = await subscribe(hooks, receiver)
    await hooks.post(f"/v1/webhook_endpoints/{disabled['id']}", {"disabled": True})
    assert (await hooks.client.delete(f"/v1/webhook_endpoints/{deleted['id']}")).is_success
    kinds = ("payment.created", "payment.authorized", "payment.captured")
    first = (await hooks.pay()).json()["id"]
    assert await _deliveries_of(hooks, first) == {
        *((kind, everything["id"]) for kind in kinds),
        ("payment.captured", captured["id"]),
    }
    late = await subscribe(hooks, receiver, events=["payment.authorized"])
    assert (await hooks.client.delete(f"/v1/webhook_endpoints/{everything['id']}")).is_success
    second = (await hooks.pay()).json()["id"]
    assert await _deliveries_of(hooks, second) == {
        ("payment.captured", captured["id"]),
        ("payment.authorized", late["id"]),
    }


async def test_410_disables_the_endpoint(hooks: Stack, receiver: Receiver) -> None:
    endpoint = await subscribe(hooks, receiver)
    receiver.configure(secrets=[endpoint["secret"]], gone=True)
    await hooks.pay()  # payment.created, .authorized, .captured
    # The first 410 disables the endpoint and cancels its deliveries not sent yet (those
    # sent alongside it got their own 410).
    report = await deliver(hooks)
    assert report["gone"] >= 1
    assert set(report) <= {"gone", "canceled"}
    assert sum(report.values()) <= 3
    now = (await hooks.client.get(f"/v1/webhook_endpoints/{endpoint['id']}")).json()
    assert now["disabled"] is True
    path = f"/v1/webhook_endpoints/{endpoint['id']}/deliveries"
    rows = (await hooks.client.get(path)).json()["data"]
    assert [row["status"] for row in rows] == ["canceled"] * 3
    assert "410" in now["disabled_reason"]
    await hooks.pay()
    assert await deliver(hooks) == {}  # a disabled endpoint gets nothing new


async def test_dead_letter_then_redeliver(hooks: Stack, receiver: Receiver) -> None:
    endpoint = await subscribe(hooks, receiver, events=["payment.captured"])
    receiver.configure(secrets=[endpoint["secret"]], fail_first=99)
    await hooks.pay()
    now = time.time()  # events carry the wall clock; so does the receiver's tolerance
    results = [await deliver(hooks, at=now + t) for t in (0, 12, 40)]
    assert results == [{"retry": 1}, {"retry": 1}, {"dead": 1}]
    dead = await hooks.client.get(
        f"/v1/webhook_endpoints/{endpoint['id']}/deliveries", params={"status": "dead"}
    )
    [letter] = dead.json()["data"]
    assert letter["attempts"] == 3
    receiver.configure(secrets=[endpoint["secret"]])
    again = await hooks.post(f"/v1/events/{letter['event']}/redeliver")
    assert again.status_code == 200
    assert len(again.json()["data"]) == 1
    assert await deliver(hooks, at=now + 50) == {"succeeded": 1}
    assert receiver.stats()["handled"][letter["event"]] == 1


async def test_a_crash_between_sending_and_recording_is_redelivered_and_deduplicated(
    hooks: Stack, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    await subscribe(hooks, receiver, events=["payment.captured"])
    await hooks.pay()

    class Crash(BaseException):
        pass

    async def dies(*args: Any, **kwargs: Any) -> str:
        raise Crash

    now = time.time()  # events carry the wall clock; so does the receiver's tolerance
    with monkeypatch.context() as patch:
        patch.setattr(delivery, "_record", dies)
        with pytest.raises(Crash):
            await deliver(hooks, at=now)  # sent; the worker dies before writing it down
    assert await deliver(hooks, at=now + 1) == {}  # its lock still holds
    assert await deliver(hooks, at=now + delivery.LOCK_SECONDS + 1) == {"succeeded": 1}
    [event] = (await hooks.client.get("/v1/events", params={"type": "payment.captured"})).json()[
        "data"
    ]
    stats = receiver.stats()
    assert stats["arrived"][event["id"]] == 2  # sent twice, with one webhook-id
    assert stats["handled"][event["id"]] == 1  # handled once


async def captured_event(stack: Stack) -> str:
    latest = await stack.client.get("/v1/events", params={"type": "payment.captured", "limit": 1})
    event_id: str = latest.json()["data"][0]["id"]
    return event_id


async def test_secret_rotation_signs_with_both_during_the_overlap(
    hooks: Stack, receiver: Receiver
) -> None:
    endpoint = await subscribe(hooks, receiver, events=["payment.captured"])
    old = endpoint["secret"]
    path = f"/v1/webhook_endpoints/{endpoint['id']}/rotate_secret"
    new = (await hooks.post(path, {"overlap_seconds": 3600})).json()["secret"]
    assert new != old
    receiver.configure(secrets=[old])  # a receiver not yet redeployed still verifies...
    await hooks.pay()
    assert await deliver(hooks) == {"succeeded": 1}
    assert len(receiver.stats()["signatures"][await captured_event(hooks)].split()) == 2
    receiver.configure(secrets=[new])  # ...and so does one that was
    await hooks.pay()
    assert await deliver(hooks) == {"succeeded": 1}
    newest = (await hooks.post(path, {"overlap_seconds": 0})).json()["secret"]
    receiver.configure(secrets=[new])  # no overlap: `new` no longer signs
    await hooks.pay()
    assert await deliver(hooks) == {"retry": 1}  # the receiver refused it (400)
    assert len(receiver.stats()["signatures"][await captured_event(hooks)].split()) == 1
    receiver.configure(secrets=[newest])
    assert await deliver(hooks, at=time.time() + 15) == {"succeeded": 1}


async def test_endpoint_api(hooks: Stack, receiver: Receiver) -> None:
    url = f"{receiver.url}/hook"
    created = await hooks.post("/v1/webhook_endpoints", {"url": url}, key="we")
    endpoint = created.json()
    assert endpoint["secret"].startswith("whsec_")
    assert endpoint["events"] == ["*"]
    replay = await hooks.post("/v1/webhook_endpoints", {"url": url}, key="we")
    assert replay.json() == endpoint  # a retried create is the same endpoint, not a second
    fetched = (await hooks.client.get(f"/v1/webhook_endpoints/{endpoint['id']}")).json()
    assert fetched["secret"] is None  # shown once
    updated = await hooks.post(f"/v1/webhook_endpoints/{endpoint['id']}",
                               {"events": ["refund.created"], "disabled": True})  # fmt: skip
    assert (updated.json()["events"], updated.json()["disabled"]) == (["refund.created"], True)
    listed = (await hooks.client.get("/v1/webhook_endpoints")).json()["data"]
    assert [e["id"] for e in listed] == [endpoint["id"]]
    deleted = await hooks.client.delete(f"/v1/webhook_endpoints/{endpoint['id']}")
    assert deleted.json() == {"id": endpoint["id"], "object": "webhook_endpoint", "deleted": True}
    assert (await hooks.client.get(f"/v1/webhook_endpoints/{endpoint['id']}")).status_code == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": "ftp://example.com/hook"}, "url"),
        ({"url": "http:///nohost"}, "url"),
        ({"url": "https://user:pw@example.com/hook"}, "url"),
        ({"url": "https://example.com:99999/hook"}, "url"),
        ({"url": "https://exa mple.com/hook"}, "url"),
        ({"url": "https://example.com/" + "x" * 2100}, "url"),
        ({"url": "not a url"}, "url"),
        ({"url": "https://example.com", "events": ["payment.exploded"]}, "events"),
        ({"url": "https://example.com", "events": []}, "events"),
        ({"url": "https://example.com", "colour": "red"}, "colour"),
        ({}, "url"),
    ],
)
async def test_endpoint_bad_input(hooks: Stack, body: dict[str, Any], field: str) -> None:
    response = await hooks.post("/v1/webhook_endpoints", body)
    assert response.status_code == 400, response.text
    assert field in response.json()["detail"]
    assert await hooks.count("webhook_endpoints") == 0


async def test_redeliver_and_deliveries_of_unknown_objects_are_404(hooks: Stack) -> None:
    for path in ("/v1/events/evt_000000000000000000000000/redeliver",):
        assert (await hooks.post(path)).status_code == 404
    for path in ("/v1/events/evt_nope/deliveries", "/v1/webhook_deliveries/whd_x",
                 "/v1/webhook_endpoints/we_x/deliveries"):  # fmt: skip
        assert (await hooks.client.get(path)).status_code == 404


def test_payload_is_the_event_as_the_api_shows_it() -> None:
    class Row:
        id, type, created_at = "evt_1", "payment.captured", 5.5
        data = json.dumps({"id": "pay_1"})

    assert json.loads(delivery.event_payload(cast(EventRow, Row()))) == {
        "id": "evt_1",
        "object": "event",
        "type": "payment.captured",
        "created": 5,
        "data": {"object": {"id": "pay_1"}},
    }


# -- several workers -----------------------------------------------------------------------------

WORKERS = 2


async def _worker_in_child(url: str, barrier: Any) -> list[str]:
    """Deliver, a few at a time, until nothing is left; the deliveries this worker made."""
    from oncepay.payments.bootstrap import start
    from oncepay.payments.settings import Settings
    from oncepay.payments.webhooks.delivery import claim_due

    # One endpoint here: what is tested is that two workers never take the same delivery, not
    # the share of one endpoint (test_webhook_fairness.py), so its cap is out of the way.
    settings = Settings(
        database_url=url,
        run_worker=False,
        webhook_allow_private=True,
        webhook_endpoint_concurrency=100,
    )
    services = await start(settings, acquirers=_no_acquirers())
    sent: list[str] = []
    original = claim_due

    async def recording(svc: Any, **kwargs: Any) -> Any:
        claimed = await original(svc, **kwargs)
        sent.extend(c.id for c in claimed)
        return claimed

    delivery.claim_due = recording
    try:
        await asyncio.to_thread(barrier.wait)
        async with httpx.AsyncClient() as client:
            while (await deliver_due(services, client, limit=3)).total:
                pass
    finally:
        await services.aclose()
    return sent


def _no_acquirers() -> Any:
    from oncepay.payments.acquirers.pool import AcquirerPool

    class Idle:
        name = "primary"

        def available(self) -> bool:
            return True

        async def aclose(self) -> None:
            return None

    return AcquirerPool([Idle()])  # type: ignore[list-item]


def _child(url: str, barrier: Any, out: Any) -> None:
    out.put(asyncio.run(_worker_in_child(url, barrier)))


@pytest.mark.postgres
async def test_two_workers_on_postgres_deliver_each_attempt_once(
    tmp_path: Path, receiver: Receiver
) -> None:
    import multiprocessing

    from tests.payments.stack import database_url
    from tests.servers import require_postgres

    require_postgres()
    url = database_url("postgres", tmp_path)
    async with running_stack(url, tmp_path) as stack:
        await subscribe(stack, receiver)
        for _ in range(20):
            await stack.pay()  # three events each: 60 deliveries
        ctx = multiprocessing.get_context("spawn")
        barrier, out = ctx.Barrier(WORKERS), ctx.Queue()
        children = [ctx.Process(target=_child, args=(url, barrier, out)) for _ in range(WORKERS)]
        for child in children:
            child.start()
        sent = [await asyncio.to_thread(out.get, True, 120) for _ in children]
        for child in children:
            child.join(30)
            assert child.exitcode == 0
        events = (await stack.client.get("/v1/events", params={"limit": 100})).json()["data"]
        ids = {e["id"] for e in events}
        assert len(ids) == 60
        assert all(sent), "both workers delivered"
        assert sorted(sent[0] + sent[1]) == sorted(set(sent[0]) | set(sent[1]))  # no overlap
        arrived = receiver.stats()["arrived"]
        assert all(arrived[event_id] == 1 for event_id in ids)
        rows = (await stack.client.get("/v1/events/" + events[0]["id"] + "/deliveries")).json()
        assert rows["data"][0]["status"] == "succeeded"


async def test_delivery_attempts_are_in_the_metrics(hooks: Stack, receiver: Receiver) -> None:
    await subscribe(hooks, receiver, events=["payment.captured"])
    await hooks.pay()
    await deliver(hooks)
    metrics = (await hooks.client.get("/metrics")).text
    assert 'oncepay_webhook_attempts_total{result="succeeded"}' in metrics
    assert "oncepay_webhook_attempt_seconds_count" in metrics


# -- regressions found by review -----------------------------------------------------------------


def mock_client(handler: Any) -> httpx.AsyncClient:
    """Deliveries answered in-process: nothing leaves this process."""
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


@pytest.mark.parametrize(
    "url",
    ["http://xn--zz.com/", "http://xn--/", "http://x.com/\x7f", "http://\u200b.com/",
     "http://e\u0308.com"],
)  # fmt: skip
async def test_urls_the_sender_cannot_use_are_refused(hooks: Stack, url: str) -> None:
    response = await hooks.post("/v1/webhook_endpoints", {"url": url})
    assert response.status_code == 400, response.text
    assert "url" in response.json()["detail"]


async def test_a_send_that_fails_in_any_way_is_a_failed_attempt_not_a_stuck_worker(
    hooks: Stack,
) -> None:
    """An endpoint whose requests raise something other than an HTTP error (planted in the
    database, past validation) must not stop the pass for everyone else."""
    from sqlalchemy import update

    from oncepay.payments.storage.schema import webhook_endpoints
    from oncepay.storage.db import write

    bad = (await hooks.post("/v1/webhook_endpoints", {"url": "http://bad.invalid/"})).json()
    good = (await hooks.post("/v1/webhook_endpoints", {"url": "http://good.invalid/"})).json()
    async with write(hooks.db) as conn:
        await conn.execute(update(webhook_endpoints).where(webhook_endpoints.c.id == bad["id"])
                           .values(url="http://poison.invalid/"))  # fmt: skip

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "poison.invalid":
            raise UnicodeError("the sender cannot encode this host")
        return httpx.Response(200)

    await hooks.pay()
    async with mock_client(handler) as client:
        results = await drain(hooks, client)
    assert results == {"retry": 3, "succeeded": 3}
    rows = (await hooks.client.get(f"/v1/webhook_endpoints/{good['id']}/deliveries")).json()
    assert {d["status"] for d in rows["data"]} == {"succeeded"}


async def test_a_delivery_whose_lock_lapsed_is_not_sent_twice_at_once(hooks: Stack) -> None:
    """Worker A claimed a batch; before A reaches one delivery, its lock lapses and worker B
    takes and sends it. A must then skip it, not send it alongside B."""
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers["webhook-id"])
        return httpx.Response(200)

    await hooks.post("/v1/webhook_endpoints", {"url": "http://hooks.invalid/",
                                              "events": ["payment.captured"]})  # fmt: skip
    await hooks.pay()
    now = time.time()
    [a] = await delivery.claim_due(hooks.services, now=now)
    async with mock_client(handler) as client:
        later = now + delivery.LOCK_SECONDS + 1
        assert (await deliver_due(hooks.services, client, now=later)).results == {"succeeded": 1}
        assert await delivery._deliver(hooks.services, client, a, now) == "lost"
    assert len(sent) == 1


async def test_each_attempt_is_signed_when_it_is_sent(hooks: Stack) -> None:
    stamps: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        stamps.append(int(request.headers["webhook-timestamp"]))
        return httpx.Response(200)

    await hooks.post("/v1/webhook_endpoints", {"url": "http://hooks.invalid/"})
    await hooks.pay()
    async with mock_client(handler) as client:
        while claimed := await delivery.claim_due(hooks.services, now=time.time()):
            for one in claimed:  # as if the pass had begun 1000 s ago (a slow batch)
                await delivery._deliver(hooks.services, client, one, time.time() - 1000)
    assert len(stamps) == 3
    assert all(abs(stamp - time.time()) < 60 for stamp in stamps)


# Found in a review of 8289179: the endpoints read in the statement that locks the payment
# were as of that statement's start, before it waited for the lock (READ COMMITTED: a row
# lock waited for does not renew the statement's snapshot), so an endpoint created while it
# waited missed the events of a transaction that committed after it.


# How long the refund may take to reach the payment's lock on a loaded machine.
LOCK_WAIT_BOUND = 30.0


@pytest.fixture
async def postgres_stack(tmp_path: Path) -> AsyncIterator[Stack]:
    """PostgreSQL only: SQLite's writers wait for each other before their transactions
    begin, so no statement there waits for a row lock."""
    require_postgres()
    async with running_stack(database_url("postgres", tmp_path), tmp_path) as stack:
        yield stack


@pytest.mark.postgres
async def test_an_endpoint_created_while_the_payment_lock_is_awaited_gets_the_events(
    postgres_stack: Stack,
) -> None:
    from sqlalchemy import text

    from oncepay.storage.db import write

    stack = postgres_stack
    payment_id = (await stack.pay()).json()["id"]
    async with write(stack.db) as holder:  # another transaction holds the payment's lock
        await holder.execute(
            text("SELECT id FROM payments WHERE id = :p FOR UPDATE"), {"p": payment_id}
        )
        holder_pid = (await holder.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        refund = asyncio.create_task(
            stack.post(f"/v1/payments/{payment_id}/refunds", {"amount": 100})
        )
        waiting = text(
            "SELECT count(*) FROM pg_stat_activity WHERE :h = ANY(pg_blocking_pids(pid))"
        )
        deadline = time.monotonic() + LOCK_WAIT_BOUND
        while True:  # until the refund waits for the lock: polling an observed state
            # A transaction of its own each time: pg_stat_activity is read once a transaction
            # (its snapshot stays until the transaction ends), so one transaction around the
            # loop kept reading the first poll's answer and waited until the suite's timeout.
            async with read(stack.db) as watcher:
                if (await watcher.execute(waiting, {"h": holder_pid})).scalar_one():
                    break
            assert not refund.done(), (await refund).text
            assert time.monotonic() < deadline, "the refund never waited for the payment's lock"
            await asyncio.sleep(0.01)
        body = {"url": "https://example.com/hook", "events": ["*"]}
        created = await stack.post("/v1/webhook_endpoints", body)
        assert created.status_code == 201, created.text  # committed before the refund's
    answer = await refund
    assert answer.status_code == 201, answer.text
    refund_id = answer.json()["id"]
    async with read(stack.db) as conn:
        reached = (
            await conn.execute(
                text(
                    "SELECT e.type, d.endpoint_id FROM webhook_deliveries d "
                    "JOIN events e ON e.id = d.event_id WHERE e.object_id = :r"
                ),
                {"r": refund_id},
            )
        ).all()
    assert {tuple(row) for row in reached} >= {("refund.created", created.json()["id"])}


async def test_the_dashboard_rates_webhook_deliveries_from_the_database(
    payments_url: str, tmp_path: Path
) -> None:
    """SPEC §11: the dashboard shows webhook delivery health (the live stream sends the same
    snapshot as the page). A contract review found its
    success rate 0.0 % when every delivery had succeeded (it counted a metric label that does not
    exist), and it was the serving process's own counters: a worker in another process left it
    empty. It is the share of the latest attempts answered 2xx, read from the database."""
    token = "dashboard-operator-token-0123"
    async with running_stack(payments_url, tmp_path, admin_token=token) as stack:
        await stack.post("/v1/webhook_endpoints", {"url": "http://good.invalid/",
                                                   "events": ["payment.captured"]})  # fmt: skip
        await stack.post("/v1/webhook_endpoints", {"url": "http://flaky.invalid/",
                                                   "events": ["payment.captured"]})  # fmt: skip
        answers = {"good.invalid": 200, "flaky.invalid": 503}

        def handler(request: httpx.Request) -> httpx.Response:
            return httpx.Response(answers[request.url.host])

        async def overview() -> dict[str, Any]:
            found: dict[str, Any] = (await queries.overview(stack.db))["webhooks"]
            return found

        assert (await overview())["success_rate"] is None  # nothing sent yet: no rate
        for _ in range(3):
            await stack.pay()
        async with mock_client(handler) as client:
            assert await drain(stack, client) == {"succeeded": 3, "retry": 3}
        health = await overview()
        assert (health["success_rate"], health["attempts_rated"]) == (0.5, 6)
        answers["flaky.invalid"] = 200
        async with mock_client(handler) as client:
            later = time.time() + 3600
            assert await drain(stack, client, at=later) == {"succeeded": 3}
        health = await overview()
        assert (health["success_rate"], health["attempts_rated"]) == (round(6 / 9, 4), 9)
        assert (health["succeeded"], health.get("pending", 0)) == (6, 0)
        page = await stack.client.get("/dashboard", headers={"Authorization": f"Bearer {token}"})
        assert "66.7%" in page.text
