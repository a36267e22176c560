"""What ``@idempotent`` stores and gives back (issue 12, items 18 and 20).

A replay returns a value equal to the first call's and of the same type, at every depth: the
whole return annotation is restored. A result that cannot be stored never makes the function
run a second time.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest
from pydantic import BaseModel

from oncepay.errors import ConfigurationError
from oncepay.idempotency.decorator import CustomSerializer, idempotent
from oncepay.idempotency.engine import Engine
from oncepay.idempotency.stores.memory import MemoryStore
from tests.clock import FakeClock


@dataclass
class Line:
    sku: str
    price: Decimal


@dataclass
class Charge:
    id: str
    amount: int
    at: dt.datetime


@dataclass
class Order:
    id: str
    charge: Charge
    refund: Charge | None = None
    lines: list[Line] = field(default_factory=list)
    tags: tuple[str, int] = ("", 0)


class Receipt(BaseModel):
    order: Order
    charges: list[Charge]
    total: Decimal


AT = dt.datetime(2025, 3, 1, 12, 30, tzinfo=dt.UTC)
CHARGE = Charge("ch_1", 1250, AT)
ORDER = Order("o1", CHARGE, None, [Line("sku_1", Decimal("12.50"))], ("x", 1))


def _deep_types(value: Any) -> Any:
    """The value's shape with every type in it, so 'equal types' is checked at every depth."""
    if isinstance(value, dict):
        return (dict, {k: _deep_types(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return (type(value), [_deep_types(v) for v in value])
    if hasattr(value, "__dict__"):
        return (type(value), {k: _deep_types(v) for k, v in vars(value).items()})
    return type(value)


RESULTS: list[tuple[str, Any, Any]] = [
    ("nested dataclasses", Order, ORDER),
    ("an optional dataclass that is set", Charge | None, CHARGE),
    ("an optional dataclass that is None", Charge | None, None),
    ("a list of dataclasses", list[Charge], [CHARGE, Charge("ch_2", 5, AT)]),
    ("a pydantic model holding dataclasses", Receipt, Receipt(
        order=ORDER, charges=[CHARGE], total=Decimal("12.50"))),
    ("a dict of decimals", dict[str, Decimal], {"eur": Decimal("0.10"), "usd": Decimal("3")}),
    ("a datetime", dt.datetime, AT),
    ("a tuple", tuple[str, int], ("a", 1)),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "value"), [r[1:] for r in RESULTS], ids=[r[0] for r in RESULTS])
async def test_a_replay_equals_the_first_result_in_value_and_type(kind: Any, value: Any) -> None:
    calls: list[str] = []

    async def produce(key: str) -> Any:
        calls.append(key)
        return value

    produce.__annotations__["return"] = kind
    produce = idempotent(MemoryStore(), key="key")(produce)

    first = await produce("k")
    again = await produce("k")
    assert calls == ["k"]
    assert again == first == value
    assert _deep_types(again) == _deep_types(first)


def test_a_sync_function_restores_its_annotation_too() -> None:
    @idempotent(MemoryStore(), key="key")
    def place(key: str) -> Order:
        return ORDER

    assert place("k") == ORDER
    again = place("k")
    assert again == ORDER
    assert isinstance(again.charge, Charge)
    assert isinstance(again.lines[0], Line)


async def test_records_stored_before_this_release_still_replay() -> None:
    """Results used to be stored as sorted-keys JSON; those records restore the same way."""
    store = MemoryStore()

    @idempotent(store, key="key")
    async def place(key: str) -> Order:
        raise AssertionError("a stored record must be replayed, not run")

    from oncepay.idempotency.keys import fingerprint
    from oncepay.idempotency.records import StoredResponse

    fp = fingerprint("CALL", f"{__name__}.{place.__qualname__}", b"{}")
    claim = await store.claim("default", "k", fp, now=0.0, lease=60, ttl=1e12)
    old = {
        "charge": {"amount": 1250, "at": "2025-03-01T12:30:00Z", "id": "ch_1"},
        "id": "o1",
        "lines": [{"price": "12.50", "sku": "sku_1"}],
        "refund": None,
        "tags": ["x", 1],
    }
    body = json.dumps(old, sort_keys=True, separators=(",", ":")).encode()
    await store.complete("default", "k", claim.record.fence, StoredResponse(200, (), body), now=0)
    assert await place("k") == ORDER


# -- results that cannot be stored ---------------------------------------------------------------


class Opaque:
    """Nothing any serializer knows how to write."""


async def test_an_unstorable_return_annotation_is_refused_when_decorating() -> None:
    with pytest.raises(ConfigurationError, match="Opaque"):

        @idempotent(MemoryStore(), key="key")
        async def f(key: str) -> Opaque:
            return Opaque()


async def test_a_result_that_cannot_be_stored_never_makes_the_function_run_again() -> None:
    """The function ran: its key must never look unused. The first caller hears so loudly,
    and so does every later call with that key, however long after the lease."""
    clock = FakeClock()
    runs: list[str] = []

    @idempotent(Engine(MemoryStore(), lease=1.0, clock=clock), key="key")
    async def charge(key: str) -> Any:  # annotated Any, so only the value can be wrong
        runs.append(key)
        return Opaque()

    with pytest.raises(ConfigurationError, match="ran, but its result could not be stored"):
        await charge("k")
    clock.advance(5.0)  # well past the lease: a locked key would now be taken over and run
    with pytest.raises(ConfigurationError, match="ran, but its result could not be stored"):
        await charge("k")
    assert runs == ["k"]


async def test_a_result_that_is_not_its_annotation_is_not_stored_as_something_else() -> None:
    """A dict returned from ``-> Charge`` would replay as a Charge: a replay unlike the first
    result. It is refused as a result that cannot be stored, the function not run again."""
    runs: list[str] = []

    @idempotent(MemoryStore(), key="key")
    async def charge(key: str) -> Charge:
        runs.append(key)
        return {"id": "ch_1", "amount": 1, "at": AT}  # type: ignore[return-value]

    for _ in range(2):
        with pytest.raises(ConfigurationError, match="could not be stored"):
            await charge("k")
    assert runs == ["k"]


# -- serializers of your own ------------------------------------------------------------------


class Money:
    def __init__(self, cents: int) -> None:
        self.cents = cents

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Money) and other.cents == self.cents

    __hash__ = None  # type: ignore[assignment]


async def test_a_custom_serializer_pair_stores_and_restores_any_type() -> None:
    seen: list[bytes] = []

    def dumps(value: Money) -> bytes:
        seen.append(body := str(value.cents).encode())
        return body

    @idempotent(
        MemoryStore(),
        key="key",
        serializer=CustomSerializer(dumps=dumps, loads=lambda b: Money(int(b))),
    )
    async def pay(key: str) -> Money:
        return Money(42)

    assert await pay("k") == await pay("k") == Money(42)
    assert seen == [b"42"]


async def test_a_module_with_dumps_and_loads_is_a_serializer() -> None:
    @idempotent(MemoryStore(), key="key", serializer=json)
    async def pay(key: str) -> dict[str, int]:
        return {"a": 1}

    assert await pay("k") == await pay("k") == {"a": 1}


def test_without_pydantic_plain_json_results_still_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pydantic", None)  # import pydantic -> ImportError

    @idempotent(MemoryStore(), key="key")
    def plain(key: str) -> dict[str, list[int]]:
        return {"a": [1]}

    assert plain("k") == plain("k") == {"a": [1]}
    with pytest.raises(ConfigurationError, match="pip install pydantic"):

        @idempotent(MemoryStore(), key="key")
        def typed(key: str) -> Charge:
            return CHARGE
