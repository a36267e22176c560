"""The configured acquirers, in order of preference: which one takes a new payment, and which
one a payment moves on to when an attempt is proven not to have authorized."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from oncepay.payments.acquirers.base import Acquirer

__all__ = ["AcquirerPool"]


class AcquirerPool:
    def __init__(self, acquirers: Sequence[Acquirer]) -> None:
        if not acquirers:
            raise ValueError("at least one acquirer is needed")
        self._by_name = {a.name: a for a in acquirers}
        self._order = list(acquirers)

    def __getitem__(self, name: str) -> Acquirer:
        return self._by_name[name]

    def __iter__(self) -> Iterator[Acquirer]:
        return iter(self._order)

    def choose(self) -> Acquirer:
        """The first available acquirer — its breaker lets calls through and its recent health
        is not degraded (see ``HttpAcquirer.available``) — or the primary when none is: its
        call then fails fast and the payment fails cleanly."""
        return next((a for a in self._order if a.available()), self._order[0])

    def successor(self, current: str, tried: set[str], *, stay: bool) -> Acquirer | None:
        """Where an attempt on ``current`` goes next: ``current`` again when ``stay`` and it
        is available, else the first available acquirer not yet ``tried``."""
        if stay and self[current].available():
            return self[current]
        return next((a for a in self._order if a.name not in tried and a.available()), None)

    async def aclose(self) -> None:
        for acquirer in self._order:
            await acquirer.aclose()
