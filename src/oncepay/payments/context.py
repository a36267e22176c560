"""What one payments process holds, as fields only: its settings, database, idempotency
engine and HTTP policy, and acquirers. Every layer above takes it as ``svc``; it imports
nothing of theirs (:mod:`oncepay.payments.bootstrap` builds it)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from oncepay.http.gate import Gate
from oncepay.idempotency.engine import Engine
from oncepay.insight.ttl_policy import TtlPolicy
from oncepay.payments.acquirers.pool import AcquirerPool
from oncepay.payments.records import Merchant
from oncepay.payments.settings import Settings
from oncepay.storage.db import Database

__all__ = ["Services"]


@dataclass
class Services:
    settings: Settings
    db: Database
    engine: Engine
    gate: Gate
    acquirers: AcquirerPool
    # API key hash -> (merchant, when checked): see oncepay.payments.merchants.authenticate
    known_keys: dict[str, tuple[Merchant, float]] = field(default_factory=dict)
    # Learned TTLs (settings.adaptive_ttl), the gate's own; None when off. The worker's live
    # analysis replaces what it holds with ttl_policy.update(analyzer.ttl()).
    ttl_policy: TtlPolicy | None = None

    async def aclose(self) -> None:
        await self.acquirers.aclose()
        await self.engine.store.aclose()
        if self.gate.usage_log is not None:  # its last batch written, off the event loop
            await asyncio.to_thread(self.gate.usage_log.close)
        await self.db.aclose()
