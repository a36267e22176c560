"""``memory://``: a store in this process's memory, for tests and single-process use.

Every primitive runs without an ``await`` inside, so on one event loop it is atomic. It is
not shared between processes or threads: use SQLite for that.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

from oncepay.errors import LeaseLost
from oncepay.idempotency.records import Claim, Record, RecordState, StoredResponse
from oncepay.idempotency.stores.base import DEFAULT_PURGE_BATCH, Watch, resolve_claim

__all__ = ["MemoryStore"]

_Id = tuple[str, str]


class _EventWatch:
    def __init__(self, event: asyncio.Event) -> None:
        self._event = event

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            return
        self._event.clear()


class MemoryStore:
    """An in-process store with event-based notifications for wait mode."""

    def __init__(self) -> None:
        self._records: dict[_Id, Record] = {}
        self._watchers: dict[_Id, set[asyncio.Event]] = {}

    @classmethod
    def from_url(cls, url: str) -> MemoryStore:
        return cls()

    async def claim(
        self, scope: str, key: str, fingerprint: str, *, now: float, lease: float, ttl: float
    ) -> Claim:
        claim = resolve_claim(
            self._records.get((scope, key)), scope, key, fingerprint, now=now, lease=lease, ttl=ttl
        )
        if claim.claimed:
            self._records[scope, key] = claim.record
        return claim

    async def complete(
        self, scope: str, key: str, fence: int, response: StoredResponse, *, now: float
    ) -> None:
        record = self._current(scope, key, fence)
        self._records[scope, key] = replace(record, state=RecordState.COMPLETED, response=response)
        self._notify((scope, key))

    async def release(self, scope: str, key: str, fence: int, *, now: float) -> None:
        record = self._current(scope, key, fence)
        self._records[scope, key] = replace(record, state=RecordState.RELEASED)
        self._notify((scope, key))

    async def checkpoint(
        self, scope: str, key: str, fence: int, recovery_point: str, *, now: float, lease: float
    ) -> None:
        record = self._current(scope, key, fence)
        self._records[scope, key] = replace(
            record, recovery_point=recovery_point, lease_expires_at=now + lease
        )

    async def get(self, scope: str, key: str) -> Record | None:
        return self._records.get((scope, key))

    async def purge_expired(self, *, now: float, limit: int = DEFAULT_PURGE_BATCH) -> int:
        expired = [rid for rid, rec in self._records.items() if rec.is_expired(now)][:limit]
        for rid in expired:
            del self._records[rid]
        return len(expired)

    @asynccontextmanager
    async def watch(self, scope: str, key: str) -> AsyncIterator[Watch]:
        event = asyncio.Event()
        watchers = self._watchers.setdefault((scope, key), set())
        watchers.add(event)
        try:
            yield _EventWatch(event)
        finally:
            watchers.discard(event)
            if not watchers:
                self._watchers.pop((scope, key), None)

    async def aclose(self) -> None:
        self._watchers.clear()

    def _current(self, scope: str, key: str, fence: int) -> Record:
        record = self._records.get((scope, key))
        if record is None or record.state is not RecordState.EXECUTING or record.fence != fence:
            raise LeaseLost(f"token {fence} no longer holds key {key!r}")
        return record

    def _notify(self, rid: _Id) -> None:
        for event in self._watchers.get(rid, ()):
            event.set()
