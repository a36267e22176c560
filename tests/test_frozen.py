"""The hot-path records keep every dataclass behaviour under their faster ``__init__``."""

from __future__ import annotations

import dataclasses
import inspect
import pickle

import pytest

from oncepay._drivers.frozen import quick_init
from oncepay.http.gate import Request, Respond, Run
from oncepay.idempotency.engine import Execute, Ticket
from oncepay.idempotency.records import Claim, ClaimOutcome, Record, RecordState, StoredResponse


def _record(**changes: object) -> Record:
    fields: dict[str, object] = {
        "scope": "s", "key": "k", "fingerprint": "f", "state": RecordState.EXECUTING,
        "fence": 7, "created_at": 1.0, "lease_expires_at": 2.0, "expires_at": 3.0,
    }  # fmt: skip
    return Record(**{**fields, **changes})  # type: ignore[arg-type]


def test_positional_keyword_and_default_arguments_fill_the_same_fields() -> None:
    by_position = Record("s", "k", "f", RecordState.EXECUTING, 7, 1.0, 2.0, 3.0)
    assert by_position == _record()
    assert by_position.recovery_point is None
    assert by_position.response is None
    assert StoredResponse(201) == StoredResponse(201, (), b"")
    assert Ticket("s", "k", "f", 1, 2.0).resumed is False


def test_the_signature_is_the_dataclass_one() -> None:
    params = inspect.signature(Record).parameters
    assert list(params) == [f.name for f in dataclasses.fields(Record)]
    assert params["recovery_point"].default is None
    with pytest.raises(TypeError):
        Record("s", "k")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        _record(colour="blue")


def test_still_frozen_comparable_hashable_replaceable_and_picklable() -> None:
    record = _record(response=StoredResponse(201, (("a", "b"),), b"{}"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.fence = 8  # type: ignore[misc]
    assert dataclasses.replace(record, fence=8).fence == 8
    assert hash(record) == hash(_record(response=StoredResponse(201, (("a", "b"),), b"{}")))
    assert pickle.loads(pickle.dumps(record)) == record
    assert "response" not in repr(record)  # field(repr=False) still holds
    claim = Claim(ClaimOutcome.CREATED, record)
    assert claim.claimed
    run = Run(Ticket("s", "k", "f", 1, 2.0), "date")
    assert dataclasses.replace(run, expires="x").ticket is run.ticket
    assert Execute(run.ticket).expires_at == 2.0
    assert Respond(200, [], b"").status == 200
    assert Request("POST", "/p", "", []).target == "/p"


def test_refuses_what_it_cannot_speed_up() -> None:
    @dataclasses.dataclass(slots=True)
    class Mutable:
        a: int

    @dataclasses.dataclass(frozen=True, slots=True)
    class WithFactory:
        a: list[int] = dataclasses.field(default_factory=list)

    for cls in (Mutable, WithFactory):
        with pytest.raises(TypeError):
            quick_init(cls)
