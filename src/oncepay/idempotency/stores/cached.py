"""An in-process cache of completed records, in front of any store.

    store = CachedStore(store_from_url("redis://cache:6379/0"), max_items=1000)

A completed record cannot change until it expires (SPEC §2: whatever comes later with its key
is a replay or a reuse error), so this process may answer a claim that finds one from memory,
without a round trip. That is all it answers: every other claim goes to the store, so records
that are executing or were released are never cached, and a miss only costs the round trip it
would have cost anyway. Records enter the cache when this process completes them, or when a
claim finds them completed (done by another process); they leave it when they expire (by the
engine's clock), or when the cache is full, least recently used first.

The cache is per process and per store object: several processes each keep their own, which is
safe because what they keep cannot change. Powertools calls this ``use_local_cache``.

Not kept: completion inside the caller's transaction (``complete_in``). Put the cache in front
of the store you hand to ``@idempotent`` or the middleware, not of the payments service's.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import AbstractAsyncContextManager
from dataclasses import replace

from oncepay.errors import ConfigurationError
from oncepay.idempotency.records import Claim, ClaimOutcome, Record, RecordState, StoredResponse
from oncepay.idempotency.stores.base import DEFAULT_PURGE_BATCH, Store, Watch

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_ITEMS", "CachedStore"]

# Retries come back within seconds to minutes, so the records worth keeping are the few
# thousand most recent ones; Powertools keeps 256. A thousand covers a busy process's minute.
DEFAULT_MAX_ITEMS = 1000
# Bounds memory whatever the results weigh: a thousand records of 1 MiB (the middleware's largest
# stored body) would be a gigabyte. 64 MiB is small next to a Python service, ample for JSON.
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# What a record costs beyond the characters of its strings and body: the Record and
# StoredResponse objects, string headers, the entry and its key tuple (tracemalloc over 10,000
# small records: about 400 bytes each), rounded up.
_RECORD_OVERHEAD = 512

_Id = tuple[str, str]


class CachedStore:
    """``store`` with its completed records kept in this process for replays."""

    def __init__(
        self,
        store: Store,
        *,
        max_items: int = DEFAULT_MAX_ITEMS,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if max_items < 1 or max_bytes < 1:
            raise ConfigurationError(
                f"a cache needs room: max_items={max_items}, max_bytes={max_bytes}"
            )
        self.store = store
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._completed: OrderedDict[_Id, tuple[Record, int]] = OrderedDict()
        self._bytes = 0
        # Claims this process holds, so that their completion can be cached without a read;
        # bounded like the cache (a claim never completed just drops out).
        self._claimed: OrderedDict[_Id, Record] = OrderedDict()

    def __len__(self) -> int:
        return len(self._completed)

    async def claim(
        self, scope: str, key: str, fingerprint: str, *, now: float, lease: float, ttl: float
    ) -> Claim:
        cached = self._cached((scope, key), now)
        if cached is not None:
            return Claim(ClaimOutcome.EXISTING, cached)
        claim = await self.store.claim(scope, key, fingerprint, now=now, lease=lease, ttl=ttl)
        if claim.claimed:
            self._hold(claim.record)
        elif claim.record.state is RecordState.COMPLETED:
            self._keep(claim.record)
        return claim

    async def complete(
        self, scope: str, key: str, fence: int, response: StoredResponse, *, now: float
    ) -> None:
        await self.store.complete(scope, key, fence, response, now=now)
        claimed = self._claimed.pop((scope, key), None)
        if claimed is not None and claimed.fence == fence:  # the store took it: it is final
            self._keep(replace(claimed, state=RecordState.COMPLETED, response=response))

    async def release(self, scope: str, key: str, fence: int, *, now: float) -> None:
        self._claimed.pop((scope, key), None)
        await self.store.release(scope, key, fence, now=now)

    async def checkpoint(
        self, scope: str, key: str, fence: int, recovery_point: str, *, now: float, lease: float
    ) -> None:
        await self.store.checkpoint(scope, key, fence, recovery_point, now=now, lease=lease)

    async def get(self, scope: str, key: str) -> Record | None:
        return await self.store.get(scope, key)

    async def purge_expired(self, *, now: float, limit: int = DEFAULT_PURGE_BATCH) -> int:
        for rid in [rid for rid, (record, _) in self._completed.items() if record.is_expired(now)]:
            self._drop(rid)
        return await self.store.purge_expired(now=now, limit=limit)

    def watch(self, scope: str, key: str) -> AbstractAsyncContextManager[Watch]:
        return self.store.watch(scope, key)

    async def aclose(self) -> None:
        self._completed.clear()
        self._claimed.clear()
        self._bytes = 0
        await self.store.aclose()

    # -- the cache ------------------------------------------------------------------------------

    def _cached(self, rid: _Id, now: float) -> Record | None:
        entry = self._completed.get(rid)
        if entry is None:
            return None
        if entry[0].is_expired(now):
            self._drop(rid)
            return None
        self._completed.move_to_end(rid)
        return entry[0]

    def _keep(self, record: Record) -> None:
        rid = (record.scope, record.key)
        size = _size(record)
        if size > self.max_bytes:
            return
        self._drop(rid)
        self._completed[rid] = (record, size)
        self._bytes += size
        while len(self._completed) > self.max_items or self._bytes > self.max_bytes:
            self._drop(next(iter(self._completed)))

    def _drop(self, rid: _Id) -> None:
        entry = self._completed.pop(rid, None)
        if entry is not None:
            self._bytes -= entry[1]

    def _hold(self, record: Record) -> None:
        rid = (record.scope, record.key)
        self._claimed.pop(rid, None)
        self._claimed[rid] = record
        while len(self._claimed) > self.max_items:
            self._claimed.popitem(last=False)


def _size(record: Record) -> int:
    response = record.response
    assert response is not None  # only completed records are kept
    headers = sum(len(name) + len(value) for name, value in response.headers)
    strings = len(record.scope) + len(record.key) + len(record.fingerprint)
    return _RECORD_OVERHEAD + len(response.body) + headers + strings
