"""Faults, injected on request from flags or ``PUT /admin/faults``: latency, 5xx before doing
anything, a stall *after* committing (the caller times out although the operation happened), a
connection dropped after committing, and a full outage.

Their dice are one ``random.Random(seed)`` per simulator, so a run with a seed is reproducible.
"""

from __future__ import annotations

import asyncio
import random
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from oncepay.simulator.problems import Problem

__all__ = [
    "ConnectionDropped",
    "Faults",
    "Operation",
    "is_dropped",
    "strike_after",
    "strike_before",
]

Operation = Literal["authorize", "capture", "void", "refund", "lookup", "settlements"]
Rate = Annotated[float, Field(ge=0.0, le=1.0)]


class Faults(BaseModel):
    """What goes wrong, and how often. Rates are probabilities per request in [0, 1].

    ``error_rate`` answers 503 before doing anything; ``timeout_after_commit_rate`` commits,
    then stalls ``stall_seconds`` before answering; ``drop_rate`` commits, then drops the
    connection without a complete answer; ``outage`` answers 503 to everything but ``/admin``
    and ``/health``. ``operations`` limits every fault to the named operations (all if None).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    latency_ms: Annotated[float, Field(ge=0)] = 0.0
    latency_jitter_ms: Annotated[float, Field(ge=0)] = 0.0
    error_rate: Rate = 0.0
    timeout_after_commit_rate: Rate = 0.0
    # Longer than any sane client timeout, so a stalled answer is one nobody waits for.
    stall_seconds: Annotated[float, Field(ge=0)] = 30.0
    drop_rate: Rate = 0.0
    outage: bool = False
    operations: frozenset[Operation] | None = None

    def applies_to(self, operation: Operation) -> bool:
        return self.operations is None or operation in self.operations


class ConnectionDropped(Exception):
    """Raised on purpose after the response started: the server closes the connection."""


async def strike_before(faults: Faults, dice: random.Random, operation: Operation) -> None:
    """Faults that strike before anything is done: outage, latency, 5xx."""
    if not faults.applies_to(operation):
        return
    if faults.outage:
        raise Problem(503, "acquirer_unavailable", "the acquirer is down (outage)")
    if faults.latency_ms or faults.latency_jitter_ms:
        jitter = dice.uniform(0, faults.latency_jitter_ms)
        await asyncio.sleep((faults.latency_ms + jitter) / 1000)
    if _rolls(dice, faults.error_rate):
        raise Problem(503, "injected_error", "fault injection: 503 before doing anything")


async def strike_after(
    faults: Faults, dice: random.Random, operation: Operation, response: Response
) -> Response:
    """Faults that strike after the commit: a stall, or a dropped connection."""
    if not faults.applies_to(operation):
        return response
    if _rolls(dice, faults.timeout_after_commit_rate):
        await asyncio.sleep(faults.stall_seconds)
    if _rolls(dice, faults.drop_rate):
        return _DroppedResponse(response.body, response.status_code)
    return response


def is_dropped(response: Response) -> bool:
    """Whether ``response`` is a dropped connection's (it breaks off once started)."""
    return isinstance(response, _DroppedResponse)


def _rolls(dice: random.Random, rate: float) -> bool:
    return rate > 0 and dice.random() < rate


class _DroppedResponse(Response):
    """Starts the answer, then fails: uvicorn closes the connection mid-response, and
    in-process the exception reaches the caller's transport."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        raise ConnectionDropped("fault injection: connection dropped after commit")
