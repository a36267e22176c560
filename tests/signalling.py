"""A store wrapper that tells a test when a waiter has subscribed, so a test can force the
order 'waiter subscribed, then the first request completes' without sleeping."""

from __future__ import annotations

import asyncio

from oncepay.idempotency.stores import Store
from oncepay.idempotency.stores.base import Watch


class SignallingStore:
    """Wraps a store and signals once a waiter has subscribed, so a test can force the order
    'waiter subscribed, then the first request completes' without sleeping."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.subscribed = asyncio.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def watch(self, scope: str, key: str) -> _SignallingWatch:
        return _SignallingWatch(self.inner.watch(scope, key), self.subscribed)


class _SignallingWatch:
    def __init__(self, inner: object, subscribed: asyncio.Event) -> None:
        self._inner = inner
        self._subscribed = subscribed

    async def __aenter__(self) -> Watch:
        watch: Watch = await self._inner.__aenter__()  # type: ignore[attr-defined]
        self._subscribed.set()
        return watch

    async def __aexit__(self, *exc: object) -> None:
        await self._inner.__aexit__(*exc)  # type: ignore[attr-defined]
