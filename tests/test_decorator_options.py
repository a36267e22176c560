"""``@idempotent``'s options (issue 12, items 19-21): a missing key, what is fingerprinted, a
replay hook, the in-process cache, keyed fingerprints and the switch for test suites."""

from __future__ import annotations

import logging
from collections import Counter
from decimal import Decimal
from typing import Any

import pytest

from oncepay.errors import ConfigurationError, IdempotencyKeyMissing, IdempotencyKeyReused
from oncepay.idempotency.decorator import DISABLED_ENV, idempotent
from oncepay.idempotency.keys import fingerprint
from oncepay.idempotency.records import Claim, Record, RecordState
from oncepay.idempotency.stores.memory import MemoryStore


class Session:
    """Stands in for what a function takes besides its request: a DB session, a logger."""


# -- 19: a missing key ------------------------------------------------------------------------


async def test_a_none_key_is_refused_and_nothing_runs() -> None:
    runs: list[Any] = []

    @idempotent(MemoryStore(), key="key")
    async def charge(key: str | None, amount: int) -> int:
        runs.append(key)
        return amount

    with pytest.raises(IdempotencyKeyMissing, match="'key' is None"):
        await charge(None, 5)
    assert runs == []


def test_a_key_function_returning_none_is_refused_too() -> None:
    @idempotent(MemoryStore(), key=lambda message: message.get("id"))
    def handle(message: dict[str, Any]) -> str:
        return "handled"

    with pytest.raises(IdempotencyKeyMissing):
        handle({"body": "no id"})


async def test_with_required_false_a_call_without_a_key_runs_unprotected() -> None:
    store, runs = MemoryStore(), Counter[Any]()

    @idempotent(store, key="key", required=False)
    async def charge(key: str | None) -> int:
        runs[key] += 1
        return runs[key]

    assert [await charge(None), await charge(None)] == [1, 2]  # no record: runs each time
    assert [await charge("k"), await charge("k")] == [1, 1]  # with a key: idempotent
    assert await store.get("default", "None") is None


# -- 20: what is fingerprinted ----------------------------------------------------------------


async def test_excluded_arguments_are_not_fingerprinted() -> None:
    runs: list[str] = []

    @idempotent(MemoryStore(), key="key", exclude=["session", "log"])
    async def charge(key: str, amount: int, session: Session, log: logging.Logger) -> int:
        runs.append(key)
        return amount

    log = logging.getLogger("t")
    assert await charge("k", 5, Session(), log) == await charge("k", 5, Session(), log) == 5
    with pytest.raises(IdempotencyKeyReused):
        await charge("k", 6, Session(), log)
    assert runs == ["k"]


class Payments:
    """A service object: what a method is called on is no part of the request."""

    def __init__(self) -> None:
        self.runs: list[str] = []

    @idempotent(MemoryStore(), key="key")
    async def charge(self, key: str, amount: int) -> int:
        self.runs.append(key)
        return amount

    @classmethod
    @idempotent(MemoryStore(), key="key")
    def refund(cls, key: str, amount: int) -> int:
        return -amount


async def test_a_methods_receiver_is_not_fingerprinted() -> None:
    first, second = Payments(), Payments()  # e.g. one per request, as a framework makes them
    assert await first.charge("k", 5) == await second.charge("k", 5) == 5
    with pytest.raises(IdempotencyKeyReused):
        await second.charge("k", 6)
    assert (first.runs, second.runs) == (["k"], [])
    assert Payments.refund("r", 3) == Payments.refund("r", 3) == -3


async def test_only_included_arguments_are_fingerprinted() -> None:
    @idempotent(MemoryStore(), key="key", include=["amount"])
    async def charge(key: str, amount: int, session: Session, note: str = "") -> int:
        return amount

    assert await charge("k", 5, Session(), "a") == await charge("k", 5, Session(), "b") == 5
    with pytest.raises(IdempotencyKeyReused):
        await charge("k", 6, Session())


async def test_a_payload_function_chooses_what_is_fingerprinted() -> None:
    @idempotent(MemoryStore(), key="key", payload=lambda key, order, session: order["lines"])
    async def place(key: str, order: dict[str, Any], session: Session) -> str:
        return "placed"

    await place("k", {"lines": [1], "received_at": 1}, Session())
    assert await place("k", {"lines": [1], "received_at": 2}, Session()) == "placed"
    with pytest.raises(IdempotencyKeyReused):
        await place("k", {"lines": [2], "received_at": 2}, Session())


async def test_an_argument_that_cannot_be_fingerprinted_is_named_before_anything_runs() -> None:
    runs: list[str] = []

    @idempotent(MemoryStore(), key="key")
    async def charge(key: str, amount: int, session: Session) -> int:
        runs.append(key)
        return amount

    with pytest.raises(ConfigurationError, match=r"'session' \(Session\).*exclude="):
        await charge("k", 5, Session())
    assert runs == []


async def test_decimal_and_datetime_arguments_are_fingerprinted() -> None:
    import datetime as dt

    @idempotent(MemoryStore(), key="key")
    async def charge(key: str, amount: Decimal, at: dt.datetime) -> str:
        return "ok"

    at = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    assert await charge("k", Decimal("1.50"), at) == await charge("k", Decimal("1.50"), at)
    with pytest.raises(IdempotencyKeyReused):
        await charge("k", Decimal("1.51"), at)


async def test_the_default_fingerprint_is_unchanged_so_existing_records_still_replay() -> None:
    store = MemoryStore()

    @idempotent(store, key="key")
    async def pay(key: str, amount: int, note: str = "x") -> int:
        return amount

    await pay("k", 5)
    record = await store.get("default", "k")
    assert record is not None
    target = f"{__name__}.{pay.__qualname__}"
    assert record.fingerprint == fingerprint("CALL", target, b'{"amount":5,"note":"x"}')


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"include": ["nope"]}, "no argument named 'nope'"),
        ({"exclude": ["nope"]}, "no argument named 'nope'"),
        ({"include": ["a"], "exclude": ["b"]}, "one of include=, exclude= or payload="),
        ({"exclude": ["a"], "payload": lambda **_: 1}, "one of include=, exclude= or payload="),
    ],
)
def test_fingerprint_options_are_checked_when_decorating(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):

        @idempotent(MemoryStore(), key="key", **options)
        def f(key: str, a: int, b: int) -> None:
            return None


async def test_a_fingerprint_secret_keys_the_fingerprint() -> None:
    plain, keyed = MemoryStore(), MemoryStore()

    async def pay(key: str, amount: int) -> int:
        return amount

    await idempotent(plain, key="key")(pay)("k", 5)
    await idempotent(keyed, key="key", fingerprint_secret="s3cret")(pay)("k", 5)
    target = f"{__name__}.{pay.__qualname__}"
    stored = {name: await s.get("default", "k") for name, s in (("p", plain), ("k", keyed))}
    assert stored["k"] is not None
    assert stored["p"] is not None
    assert stored["k"].fingerprint == fingerprint("CALL", target, b'{"amount":5}', secret=b"s3cret")
    assert stored["k"].fingerprint != stored["p"].fingerprint


# -- 21: replay hook, cache, switch --------------------------------------------------------------


async def test_on_replay_sees_the_replayed_value_and_its_record() -> None:
    seen: list[tuple[Any, Record]] = []

    def on_replay(value: dict[str, int], record: Record) -> dict[str, int]:
        seen.append((value, record))
        return {**value, "replayed": 1}

    @idempotent(MemoryStore(), key="key", on_replay=on_replay)
    async def pay(key: str) -> dict[str, int]:
        return {"amount": 5}

    assert await pay("k") == {"amount": 5}
    assert seen == []
    assert await pay("k") == {"amount": 5, "replayed": 1}
    [(value, record)] = seen
    assert value == {"amount": 5}
    assert (record.key, record.state) == ("k", RecordState.COMPLETED)


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.claims = 0

    async def claim(self, scope: str, key: str, fingerprint: str, **kw: Any) -> Claim:
        self.claims += 1
        return await super().claim(scope, key, fingerprint, **kw)


def test_cache_replays_from_this_process_without_the_store() -> None:
    store = CountingStore()

    @idempotent(store, key="key", cache=100)
    def pay(key: str) -> int:
        return 5

    assert [pay("k") for _ in range(4)] == [5, 5, 5, 5]
    assert store.claims == 1


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", " yes "])
def test_the_test_suite_switch_calls_the_function_directly(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    store, runs = CountingStore(), Counter[Any]()

    @idempotent(store, key="key")
    def pay(key: str | None) -> int:
        runs[key] += 1
        return runs[key]

    monkeypatch.setenv(DISABLED_ENV, value)  # read at call time, not when decorating
    assert [pay("k"), pay("k"), pay(None)] == [1, 2, 1]
    assert store.claims == 0
    monkeypatch.setenv(DISABLED_ENV, "0")
    assert [pay("k"), pay("k")] == [3, 3]


async def test_the_switch_works_for_async_functions(monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[str] = []

    @idempotent(MemoryStore(), key="key")
    async def pay(key: str) -> int:
        runs.append(key)
        return len(runs)

    monkeypatch.setenv("ONCEPAY_IDEMPOTENCY_DISABLED", "true")
    assert [await pay("k"), await pay("k")] == [1, 2]


def test_cache_takes_a_store_not_an_engine() -> None:
    from oncepay.idempotency.engine import Engine

    with pytest.raises(ConfigurationError, match="CachedStore"):
        idempotent(Engine(MemoryStore()), key="key", cache=10)


async def test_argument_annotations_for_the_type_checker_only_are_no_concern() -> None:
    """``if TYPE_CHECKING:`` imports leave argument annotations unresolvable at run time;
    only the return annotation is resolved (it says how to restore results)."""

    @idempotent(MemoryStore(), key="key", exclude=["session"])
    async def charge(key: str, session: NotImportedAtRunTime) -> int:  # type: ignore[name-defined]  # noqa: F821
        return 1

    assert await charge("k", Session()) == await charge("k", Session()) == 1
