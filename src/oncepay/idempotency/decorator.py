"""``@idempotent``: exactly-once for any sync or async function, keyed by its arguments.

    @idempotent("sqlite:///keys.db", key="message_id")
    async def handle(message_id: str, order: Order) -> Receipt: ...

The first call with a key runs the function and stores its result; later calls with the same
key and the same other arguments return the stored result without running it; the same key
with different arguments raises :class:`~oncepay.errors.IdempotencyKeyReused`; a call while
the first still runs raises :class:`~oncepay.errors.RequestInProgress` (or waits, with
``wait=``). An exception releases the key, so a retry runs again.

Results are stored as JSON and restored to the function's whole return annotation (see
:mod:`oncepay.idempotency.results`; ``serializer=`` for another format). A result that cannot be
stored does not make the function run again: the record is completed without it, and that call
and every later one with its key raise :class:`~oncepay.errors.ConfigurationError`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import typing
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar, cast

from oncepay._loop import LoopThread
from oncepay.errors import (
    ConfigurationError,
    IdempotencyKeyReused,
    OncePayError,
    RequestInProgress,
    StoreUnavailable,
)
from oncepay.idempotency import results
from oncepay.idempotency.engine import (
    DEFAULT_LEASE,
    DEFAULT_TTL,
    Decision,
    Engine,
    Execute,
    InProgress,
    Invalid,
    Replay,
    Reused,
    Ticket,
)
from oncepay.idempotency.keys import fingerprint, parse_key
from oncepay.idempotency.records import StoredResponse
from oncepay.idempotency.results import CustomSerializer, Serializer
from oncepay.idempotency.stores import Store

__all__ = ["CustomSerializer", "Serializer", "idempotent"]

log = logging.getLogger("oncepay.idempotency")

P = ParamSpec("P")
R = TypeVar("R")

_JSON = (("content-type", "application/json"),)
_JSON_SERIALIZERS = (results.TypedJSON, results.PlainJSON)
# What a record holds in place of a result that could not be serialised: the function ran, so
# its key stays completed, and every call with it raises instead of running it again.
_NOT_STORED = (("content-type", "text/plain"), ("oncepay-result", "not-stored"))
# One loop thread for the store calls of every sync function in the process: a store (or an
# engine) shared by several decorated functions keeps its connections on one loop.
_LOOP = LoopThread("oncepay-idempotent")


def idempotent(
    store: Store | Engine | str,
    *,
    key: str | Callable[..., str],
    scope: str = "default",
    ttl: float = DEFAULT_TTL,
    lease: float = DEFAULT_LEASE,
    wait: float = 0.0,
    serializer: Serializer | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Make a function idempotent. ``key`` names the argument that carries the idempotency
    key, or is a function of the same arguments returning it. ``scope`` separates callers
    that may reuse each other's keys (e.g. one scope per queue). ``serializer`` stores the
    results (default: JSON, restored to the return annotation)."""

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        call = _Call(func, _engine(store, ttl, lease, wait), key, scope, serializer)
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def run_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                return await call.acall(args, kwargs)

            return cast(Callable[P, R], run_async)

        @functools.wraps(func)
        def run_sync(*args: P.args, **kwargs: P.kwargs) -> R:
            return cast(R, call.call(args, kwargs))

        return run_sync

    return decorate


def _engine(store: Store | Engine | str, ttl: float, lease: float, wait: float) -> Engine:
    if isinstance(store, Engine):
        return store
    return Engine.for_store(store, ttl=ttl, lease=lease, wait=wait)


class _Call:
    """Everything one decorated function needs, computed once at decoration time."""

    def __init__(
        self,
        func: Callable[..., Any],
        engine: Engine,
        key: str | Callable[..., str],
        scope: str,
        serializer: Serializer | None,
    ) -> None:
        self.func = func
        self.engine = engine
        self.signature = inspect.signature(func)
        if isinstance(key, str) and key not in self.signature.parameters:
            raise ConfigurationError(f"{func.__qualname__} has no argument named {key!r}")
        self.key = key
        self.scope = scope
        self.target = f"{func.__module__}.{func.__qualname__}"
        returns = typing.get_type_hints(func).get("return", Any)
        self.serializer = serializer or results.for_return_type(returns)
        self.kept_as = _JSON if isinstance(self.serializer, _JSON_SERIALIZERS) else ()

    async def acall(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The async twin of :meth:`call`: the store calls and the function on this loop."""
        key, fp = self._request(args, kwargs)
        decision = await self.engine.begin(self.scope, key, fp)
        if not isinstance(decision, Execute):
            return self._answer(decision, key)
        try:
            result = await self.func(*args, **kwargs)
        except BaseException:
            await self._release(decision.ticket)
            raise
        stored, error = self._stored(result)
        await self._complete(decision.ticket, key, stored)
        if error is not None:
            raise self._not_stored(key, stored) from error
        return result

    def call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A sync function runs in its caller's thread; only the store calls go to the loop
        thread, so callers in other threads (and their store calls) never wait for it."""
        run = _LOOP.run
        key, fp = self._request(args, kwargs)
        decision = run(self.engine.begin(self.scope, key, fp))
        if not isinstance(decision, Execute):
            return self._answer(decision, key)
        try:
            result = self.func(*args, **kwargs)
        except BaseException:
            run(self._release(decision.ticket))
            raise
        stored, error = self._stored(result)
        run(self._complete(decision.ticket, key, stored))
        if error is not None:
            raise self._not_stored(key, stored) from error
        return result

    def _request(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, str]:
        """The call's key and fingerprint."""
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        key = parse_key(self._key_of(bound, args, kwargs))
        others = {k: v for k, v in bound.arguments.items() if k != self.key}
        return key, fingerprint("CALL", self.target, _dumps(others))

    def _answer(self, decision: Decision, key: str) -> Any:
        """What a call that does not run returns (a replay) or raises."""
        if isinstance(decision, Replay):
            return self._restored(key, decision.response)
        if isinstance(decision, InProgress):
            raise RequestInProgress(
                f"{self.target} is still running for key {key!r}",
                retry_after=decision.retry_after,
            )
        if isinstance(decision, Reused):
            raise IdempotencyKeyReused(
                f"key {key!r} was used with other arguments for {self.target}"
            )
        assert isinstance(decision, Invalid)  # begin() never returns Invalid; Execute ran
        raise decision.error

    async def _release(self, ticket: Ticket) -> None:
        """Free the key after the function raised; the function's own error is what the
        caller must see, so a store failure here is only logged (the lease frees the key)."""
        try:
            await self.engine.release(ticket)
        except OncePayError as exc:
            log.warning("%s: key %r not released: %s", self.target, ticket.key, exc.detail)

    def _stored(self, result: Any) -> tuple[StoredResponse, Exception | None]:
        """The record of a result; for one that cannot be serialised, a record that says so.
        The function ran: its key must neither be released (a retry would run it again) nor
        stay locked (once the lease lapses a retry would take it over and run it again)."""
        try:
            body = self.serializer.dumps(result)
        except Exception as exc:  # any serializer's failure: the result cannot be kept
            reason = f"{type(exc).__name__}: {exc}"
            return StoredResponse(200, _NOT_STORED, reason.encode()), exc
        return StoredResponse(200, self.kept_as, _bytes(body)), None

    def _restored(self, key: str, response: StoredResponse) -> Any:
        if response.headers == _NOT_STORED:
            raise self._not_stored(key, response)
        try:
            return self.serializer.loads(response.body)
        except Exception as exc:  # a record this serializer did not write, or cannot read
            raise ConfigurationError(
                f"{self.target}: the stored result for key {key!r} cannot be restored: {exc}"
            ) from exc

    def _not_stored(self, key: str, response: StoredResponse) -> ConfigurationError:
        return ConfigurationError(
            f"{self.target} ran, but its result could not be stored "
            f"({response.body.decode(errors='replace')}); it is not run again: calls with key "
            f"{key!r} raise this error until the key expires. Return what the return annotation "
            "says, or pass serializer="
        )

    async def _complete(self, ticket: Ticket, key: str, stored: StoredResponse) -> None:
        try:
            await self.engine.complete(ticket, stored)
        except StoreUnavailable as exc:  # on its own it says "nothing executed": not so here
            raise StoreUnavailable(
                f"{self.target} ran, but its result could not be stored ({exc.detail}); key "
                f"{key!r} stays locked until its lease lapses, then a call runs it again"
            ) from exc

    def _key_of(
        self, bound: inspect.BoundArguments, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> str:
        if callable(self.key):  # called as the function was: same positional/keyword split
            return self.key(*args, **kwargs)
        return str(bound.arguments[self.key])


def _bytes(body: bytes | str) -> bytes:
    return body.encode() if isinstance(body, str) else body


def _dumps(value: Any) -> bytes:
    return json.dumps(value, default=_encode, sort_keys=True, separators=(",", ":")).encode()


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    raise TypeError(
        f"{type(value).__name__} is not JSON serialisable: return JSON types, a dataclass or "
        "a pydantic model from an @idempotent function"
    )
