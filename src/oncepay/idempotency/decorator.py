"""``@idempotent``: exactly-once for any sync or async function, keyed by its arguments.

    @idempotent("sqlite:///keys.db", key="message_id")
    async def handle(message_id: str, order: Order) -> Receipt: ...

The first call with a key runs the function and stores its result; later calls with the same
key and the same other arguments return the stored result without running it; the same key
with different arguments raises :class:`~oncepay.errors.IdempotencyKeyReused`; a call while
the first still runs raises :class:`~oncepay.errors.RequestInProgress` (or waits, with
``wait=``). An exception releases the key, so a retry runs again.

Results round-trip as JSON: JSON types, dataclasses and pydantic models, restored to the
function's return annotation when it names a dataclass or a pydantic model.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import typing
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar, cast

from oncepay.errors import ConfigurationError, IdempotencyKeyReused, RequestInProgress
from oncepay.idempotency.engine import (
    DEFAULT_LEASE,
    DEFAULT_TTL,
    Engine,
    Execute,
    InProgress,
    Invalid,
    Replay,
    Reused,
)
from oncepay.idempotency.keys import fingerprint, parse_key
from oncepay.idempotency.records import StoredResponse
from oncepay.idempotency.stores import Store

__all__ = ["idempotent"]

P = ParamSpec("P")
R = TypeVar("R")

_JSON = (("content-type", "application/json"),)


def idempotent(
    store: Store | Engine | str,
    *,
    key: str | Callable[..., str],
    scope: str = "default",
    ttl: float = DEFAULT_TTL,
    lease: float = DEFAULT_LEASE,
    wait: float = 0.0,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Make a function idempotent. ``key`` names the argument that carries the idempotency
    key, or is a function of the same arguments returning it. ``scope`` separates callers
    that may reuse each other's keys (e.g. one scope per queue)."""

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        call = _Call(func, _engine(store, ttl, lease, wait), key, scope)
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def run_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                return await call(args, kwargs)

            return cast(Callable[P, R], run_async)

        @functools.wraps(func)
        def run_sync(*args: P.args, **kwargs: P.kwargs) -> R:
            return cast(R, call.loop().run(call(args, kwargs)))

        return run_sync

    return decorate


def _engine(store: Store | Engine | str, ttl: float, lease: float, wait: float) -> Engine:
    if isinstance(store, Engine):
        return store
    return Engine.for_store(store, ttl=ttl, lease=lease, wait=wait)


class _Call:
    """Everything one decorated function needs, computed once at decoration time."""

    def __init__(
        self, func: Callable[..., Any], engine: Engine, key: str | Callable[..., str], scope: str
    ) -> None:
        self.func = func
        self.engine = engine
        self.signature = inspect.signature(func)
        if isinstance(key, str) and key not in self.signature.parameters:
            raise ConfigurationError(f"{func.__qualname__} has no argument named {key!r}")
        self.key = key
        self.scope = scope
        self.target = f"{func.__module__}.{func.__qualname__}"
        self.returns = typing.get_type_hints(func).get("return")
        self._loop: Any = None

    def loop(self) -> Any:
        from oncepay._loop import LoopThread  # only sync functions need a loop thread

        if self._loop is None:
            self._loop = LoopThread(f"oncepay-{self.func.__name__}")
        return self._loop

    async def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        key = parse_key(self._key_of(bound, args, kwargs))
        others = {k: v for k, v in bound.arguments.items() if k != self.key}
        fp = fingerprint("CALL", self.target, _dumps(others))
        decision = await self.engine.begin(self.scope, key, fp)
        if isinstance(decision, Replay):
            return self._load(decision.response.body)
        if isinstance(decision, InProgress):
            raise RequestInProgress(
                f"{self.target} is still running for key {key!r}",
                retry_after=decision.retry_after,
            )
        if isinstance(decision, Reused):
            raise IdempotencyKeyReused(
                f"key {key!r} was used with other arguments for {self.target}"
            )
        if isinstance(decision, Invalid):  # pragma: no cover - begin() never returns Invalid
            raise decision.error
        return await self._execute(decision, args, kwargs)

    async def _execute(
        self, decision: Execute, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        try:
            result = self.func(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
        except BaseException:
            await self.engine.release(decision.ticket)
            raise
        # A result that cannot be serialised raises here and leaves the key locked until its
        # lease lapses: the function ran, so releasing the key would invite a second run.
        await self.engine.complete(decision.ticket, StoredResponse(200, _JSON, _dumps(result)))
        return result

    def _key_of(
        self, bound: inspect.BoundArguments, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> str:
        if callable(self.key):  # called as the function was: same positional/keyword split
            return self.key(*args, **kwargs)
        return str(bound.arguments[self.key])

    def _load(self, body: bytes) -> Any:
        value = json.loads(body)
        kind = self.returns
        if kind is None or value is None or not isinstance(kind, type):
            return value
        if dataclasses.is_dataclass(kind):
            return kind(**value)
        validate = getattr(kind, "model_validate", None)  # pydantic v2
        return validate(value) if validate else value


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
