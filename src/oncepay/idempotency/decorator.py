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

With ``transaction="session"`` the function's writes and its stored result commit together
(SPEC §3): the argument so named is a session or connection on the store's own database, the
function runs inside a transaction on it, and the record is completed in that transaction
before it commits (see :mod:`oncepay.idempotency._transactions` and docs/decorator.md).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import types
import typing
from collections.abc import Callable, Collection
from typing import Any, ParamSpec, TypeVar, cast

from oncepay._loop import LoopThread
from oncepay.errors import (
    ConfigurationError,
    IdempotencyKeyMissing,
    IdempotencyKeyReused,
    OncePayError,
    RequestInProgress,
    StoreUnavailable,
)
from oncepay.idempotency import _transactions, results
from oncepay.idempotency.engine import (
    DEFAULT_LEASE,
    DEFAULT_TTL,
    DISABLED_ENV,
    Decision,
    Engine,
    Execute,
    InProgress,
    Invalid,
    Replay,
    Reused,
    Ticket,
    disabled_by_environment,
)
from oncepay.idempotency.keys import fingerprint, parse_key
from oncepay.idempotency.records import Record, StoredResponse
from oncepay.idempotency.results import CustomSerializer, Serializer
from oncepay.idempotency.stores import Store, store_from_url
from oncepay.idempotency.stores.base import TransactionalStore
from oncepay.idempotency.stores.cached import CachedStore

__all__ = [
    "DISABLED_ENV",
    "CachedStore",
    "CustomSerializer",
    "Serializer",
    "idempotent",
]

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
    key: str | Callable[..., Any],
    scope: str = "default",
    ttl: float = DEFAULT_TTL,
    lease: float = DEFAULT_LEASE,
    wait: float = 0.0,
    required: bool = True,
    include: Collection[str] | None = None,
    exclude: Collection[str] | None = None,
    payload: Callable[..., Any] | None = None,
    fingerprint_secret: bytes | str | None = None,
    serializer: Serializer | None = None,
    on_replay: Callable[[Any, Record], Any] | None = None,
    cache: int | None = None,
    transaction: str | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Make a function idempotent; docs/decorator.md says more about every option.

    ``key`` names the argument that carries the idempotency key, or is a function of the same
    arguments returning it; a ``None`` key raises
    :class:`~oncepay.errors.IdempotencyKeyMissing`, or with ``required=False`` runs the
    function unprotected. ``scope`` separates callers that may reuse each other's keys (one
    scope per queue, say). The other arguments are fingerprinted: only those named in
    ``include``, all but those in ``exclude``, or whatever ``payload`` (a function of the same
    arguments) returns; ``fingerprint_secret`` makes it an HMAC. ``serializer`` stores results
    (default: JSON, restored to the return annotation). ``on_replay(value, record)`` sees every
    replay and returns what the caller gets. ``cache=N`` keeps up to N completed records in
    this process (:class:`~oncepay.idempotency.stores.cached.CachedStore`).
    ``transaction`` names the argument holding a session or connection on the store's own
    database: the function's writes and its stored result then commit together.
    """
    if transaction is not None and include is None and payload is None:
        exclude = (*(exclude or ()), transaction)  # a session is no part of the request
    fingerprinting = _Fingerprinting(include, exclude, payload, fingerprint_secret)
    engine = _engine(store, ttl, lease, wait, cache)
    if transaction is not None and not isinstance(engine.store, TransactionalStore):
        raise ConfigurationError(
            f"transaction={transaction!r}: {type(engine.store).__name__} cannot complete inside "
            "your transaction; use the SQLite or PostgreSQL store in the same database as your "
            "data (no cache=)"
        )

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        parts = (func, engine, key, scope, required, fingerprinting, serializer, on_replay)
        call = _Call(*parts) if transaction is None else _TransactionalCall(*parts, transaction)
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def run_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                # ONCEPAY_IDEMPOTENCY_DISABLED, read per call: a test may set it after decorating
                if disabled_by_environment():
                    return await func(*args, **kwargs)
                return await call.acall(args, kwargs)

            return cast(Callable[P, R], run_async)

        @functools.wraps(func)
        def run_sync(*args: P.args, **kwargs: P.kwargs) -> R:
            if disabled_by_environment():
                return func(*args, **kwargs)
            return cast(R, call.call(args, kwargs))

        return run_sync

    return decorate


def _engine(
    store: Store | Engine | str, ttl: float, lease: float, wait: float, cache: int | None
) -> Engine:
    if isinstance(store, Engine):
        if cache is not None:
            raise ConfigurationError(
                "cache= wraps a store, not an engine: pass Engine(CachedStore(store), ...)"
            )
        return store
    if cache is not None:
        built = store_from_url(store) if isinstance(store, str) else store
        store = CachedStore(built, max_items=cache)
    return Engine.for_store(store, ttl=ttl, lease=lease, wait=wait)


@dataclasses.dataclass(frozen=True, slots=True)
class _Arguments:
    """One call's arguments: as given (for the key and payload functions), and bound to the
    signature with defaults applied (for names)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    bound: inspect.BoundArguments


class _Fingerprinting:
    """What of a call is fingerprinted: its arguments but the key (all of them, only some, or
    all but some), or what a function of them returns; keyed with a secret or not."""

    def __init__(
        self,
        include: Collection[str] | None,
        exclude: Collection[str] | None,
        payload: Callable[..., Any] | None,
        secret: bytes | str | None,
    ) -> None:
        if sum(option is not None for option in (include, exclude, payload)) > 1:
            raise ConfigurationError("choose one of include=, exclude= or payload=")
        self.include = None if include is None else tuple(include)
        self.exclude = frozenset(exclude or ())
        self.payload = payload
        self.secret = secret.encode() if isinstance(secret, str) else secret

    def check(self, func: Callable[..., Any], signature: inspect.Signature) -> None:
        for name in (*(self.include or ()), *self.exclude):
            if name not in signature.parameters:
                raise ConfigurationError(f"{func.__qualname__} has no argument named {name!r}")

    def of(self, target: str, call: _Arguments, skip: frozenset[str | None]) -> str:
        """``skip``: the key argument and a method's receiver, never part of the request."""
        bound = call.bound
        if self.payload is not None:  # called as the function was, like a key function
            chosen: Any = self.payload(*call.args, **call.kwargs)
        elif self.include is not None:
            chosen = {name: bound.arguments[name] for name in self.include}
        else:
            left_out = self.exclude | skip
            chosen = {k: v for k, v in bound.arguments.items() if k not in left_out}
        return fingerprint("CALL", target, _fingerprinted(chosen), secret=self.secret)


class _Call:
    """Everything one decorated function needs, computed once at decoration time."""

    def __init__(
        self,
        func: Callable[..., Any],
        engine: Engine,
        key: str | Callable[..., Any],
        scope: str,
        required: bool,
        fingerprinting: _Fingerprinting,
        serializer: Serializer | None,
        on_replay: Callable[[Any, Record], Any] | None,
    ) -> None:
        self.func = func
        self.engine = engine
        self.signature = inspect.signature(func)
        if isinstance(key, str) and key not in self.signature.parameters:
            raise ConfigurationError(f"{func.__qualname__} has no argument named {key!r}")
        fingerprinting.check(func, self.signature)
        self.skip: frozenset[str | None] = _receiver(self.signature)
        self.key = key
        self.scope = scope
        self.required = required
        self.fingerprinting = fingerprinting
        self.target = f"{func.__module__}.{func.__qualname__}"
        self.serializer = serializer or results.for_return_type(_return_type(func))
        self.kept_as = _JSON if isinstance(self.serializer, _JSON_SERIALIZERS) else ()
        self.on_replay = on_replay

    async def acall(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The async twin of :meth:`call`: the store calls and the function on this loop."""
        request = self._request(args, kwargs)
        if request is None:
            return await self.func(*args, **kwargs)
        key, fp = request
        decision = await self.engine.begin(self.scope, key, fp)
        if not isinstance(decision, Execute):
            return self._answer(decision, key)
        return await self._aexecute(decision.ticket, args, kwargs)

    async def _aexecute(self, ticket: Ticket, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run the function, then store its result (or free the key if it raised)."""
        try:
            result = await self.func(*args, **kwargs)
        except BaseException:
            await self._release(ticket)
            raise
        stored, error = self._stored(result)
        await self._complete(ticket, ticket.key, stored)
        if error is not None:
            raise self._not_stored(ticket.key, stored) from error
        return result

    def call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A sync function runs in its caller's thread; only the store calls go to the loop
        thread, so callers in other threads (and their store calls) never wait for it."""
        run = _LOOP.run
        request = self._request(args, kwargs)
        if request is None:
            return self.func(*args, **kwargs)
        key, fp = request
        decision = run(self.engine.begin(self.scope, key, fp))
        if not isinstance(decision, Execute):
            return self._answer(decision, key)
        return self._execute(decision.ticket, args, kwargs)

    def _execute(self, ticket: Ticket, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """:meth:`_aexecute` for a sync function, in the caller's thread."""
        try:
            result = self.func(*args, **kwargs)
        except BaseException:
            _LOOP.run(self._release(ticket))
            raise
        stored, error = self._stored(result)
        _LOOP.run(self._complete(ticket, ticket.key, stored))
        if error is not None:
            raise self._not_stored(ticket.key, stored) from error
        return result

    def _request(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, str] | None:
        """The call's key and fingerprint; ``None`` to run it unprotected (no key, and none
        required)."""
        call = _Arguments(args, kwargs, self.signature.bind(*args, **kwargs))
        call.bound.apply_defaults()
        raw = self._key_of(call)
        if raw is None:
            if self.required:
                raise IdempotencyKeyMissing(self._no_key())
            log.debug("%s: no idempotency key, running unprotected", self.target)
            return None
        name = self.key if isinstance(self.key, str) else None
        return parse_key(str(raw)), self.fingerprinting.of(self.target, call, self.skip | {name})

    def _no_key(self) -> str:
        named = f"argument {self.key!r}" if isinstance(self.key, str) else "key function"
        return f"{self.target}: the idempotency key is missing (the {named} is None)"

    def _answer(self, decision: Decision, key: str) -> Any:
        """What a call that does not run returns (a replay) or raises."""
        if isinstance(decision, Replay):
            value = self._restored(key, decision.response)
            return value if self.on_replay is None else self.on_replay(value, decision.record)
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

    def _key_of(self, call: _Arguments) -> Any:
        if callable(self.key):  # called as the function was: same positional/keyword split
            return self.key(*call.args, **call.kwargs)
        return call.bound.arguments[self.key]


class _TransactionalCall(_Call):
    """A call whose result is completed inside a transaction on one of its arguments, so that
    the function's writes and the record commit together (SPEC §3).

    The function runs inside :func:`~oncepay.idempotency._transactions.holding` on that
    argument: a transaction of the decorator's, committed once the record is completed (rolled
    back, and the key released, if the function raises), or the caller's open transaction,
    joined, whose commit or rollback then carries both. A rollback there, or a crash before
    any commit, leaves the record executing: a retry takes it over once the lease lapses, and
    runs the function again, as nothing of it was kept. The key is not released from inside
    the caller's transaction: that transaction may hold the very lock (SQLite's) the release
    would wait for.
    """

    def __init__(self, *parts: Any) -> None:
        *common, self.transaction = parts
        super().__init__(*common)
        if self.transaction not in self.signature.parameters:
            raise ConfigurationError(
                f"{self.func.__qualname__} has no argument named {self.transaction!r} "
                "(transaction=)"
            )

    def _connection(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self.signature.bind(*args, **kwargs).arguments[self.transaction]

    async def _aexecute(self, ticket: Ticket, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        conn = self._connection(args, kwargs)
        if not _transactions.is_async(conn):
            return await self._aexecute_on_sync(conn, ticket, args, kwargs)
        joined = False
        try:
            async with _transactions.aholding(conn) as joined:
                result = await self.func(*args, **kwargs)
                stored, error = self._stored(result)
                await self.engine.acomplete_in(_transactions.unwrapped(conn), ticket, stored)
        except BaseException:
            if not joined:  # our transaction rolled back: nothing of the call was kept
                await self._release(ticket)
            raise
        return self._returned(ticket, result, stored, error)

    async def _aexecute_on_sync(
        self, conn: Any, ticket: Ticket, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """An async function holding a sync connection (sqlite3, say)."""
        joined = False
        try:
            with _transactions.holding(conn) as joined:
                result = await self.func(*args, **kwargs)
                stored, error = self._stored(result)
                self.engine.complete_in(_transactions.unwrapped(conn), ticket, stored)
        except BaseException:
            if not joined:
                await self._release(ticket)
            raise
        return self._returned(ticket, result, stored, error)

    def _execute(self, ticket: Ticket, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        conn = self._connection(args, kwargs)
        if _transactions.is_async(conn):
            _LOOP.run(self._release(ticket))
            raise ConfigurationError(
                f"{self.target} is a sync function: its {self.transaction!r} must be a sync "
                f"connection or session, not a {type(conn).__qualname__}"
            )
        joined = False
        try:
            with _transactions.holding(conn) as joined:
                result = self.func(*args, **kwargs)
                stored, error = self._stored(result)
                self.engine.complete_in(_transactions.unwrapped(conn), ticket, stored)
        except BaseException:
            if not joined:
                _LOOP.run(self._release(ticket))
            raise
        return self._returned(ticket, result, stored, error)

    def _returned(
        self, ticket: Ticket, result: Any, stored: StoredResponse, error: Exception | None
    ) -> Any:
        if error is not None:
            raise self._not_stored(ticket.key, stored) from error
        return result


def _return_type(func: Callable[..., Any]) -> Any:
    """The return annotation, resolved alone: the arguments' annotations may name types that
    exist only for the type checker (``if TYPE_CHECKING:``), which is no concern of ours."""
    annotations = {"return": getattr(func, "__annotations__", {}).get("return", Any)}
    only_return = types.SimpleNamespace(
        __annotations__=annotations, __globals__=getattr(func, "__globals__", {})
    )
    try:
        return typing.get_type_hints(only_return)["return"]
    except NameError as exc:
        raise ConfigurationError(
            f"{func.__qualname__}'s return annotation cannot be resolved ({exc}): results are "
            "restored to it, so it must name a type importable where the function is defined"
        ) from exc


def _bytes(body: bytes | str) -> bytes:
    return body.encode() if isinstance(body, str) else body


# A method's first parameter by Python's convention: the object (or class) it was called on,
# which is the caller's plumbing (a service, a repository), not part of the request.
_RECEIVERS = frozenset({"self", "cls"})


def _receiver(signature: inspect.Signature) -> frozenset[str | None]:
    """A method's receiver, left out of the default fingerprint (``include=`` may name it)."""
    first = next(iter(signature.parameters), None)
    return frozenset({first}) if first in _RECEIVERS else frozenset()


def _fingerprinted(chosen: Any) -> bytes:
    """The JSON a call's fingerprint is taken over; an argument it cannot hold is named."""
    try:
        return _dumps(chosen)
    except (TypeError, ValueError) as exc:
        named = chosen.items() if isinstance(chosen, dict) else [("payload", chosen)]
        name, value = next(((n, v) for n, v in named if not _encodable(v)), ("?", chosen))
        raise ConfigurationError(
            f"argument {name!r} ({type(value).__name__}) cannot be fingerprinted as JSON: leave "
            "it out with exclude=, or choose what is fingerprinted with include= or payload="
        ) from exc


def _encodable(value: Any) -> bool:
    try:
        _dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _dumps(value: Any) -> bytes:
    return json.dumps(value, default=_encode, sort_keys=True, separators=(",", ":")).encode()


def _encode(value: Any) -> Any:
    """What JSON holds for a non-JSON argument. Dataclasses and models first, as before, so
    existing records keep their fingerprints; then pydantic's JSON mode (Decimal, datetime,
    UUID, enums, sets...) where pydantic is installed."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    try:
        from pydantic_core import PydanticSerializationError, to_jsonable_python
    except ImportError:
        raise TypeError(f"{type(value).__name__} is not JSON serialisable") from None
    try:
        return to_jsonable_python(value)
    except PydanticSerializationError as exc:
        raise TypeError(str(exc)) from exc
