"""The garbage collector of a long-running serving process (``oncepay serve``).

Once a serving process has started, what is alive then (the modules, the app, the services and
their caches: some 150,000 objects) lives as long as the process: :func:`settle` moves it out
of every later collection (``gc.freeze()``) and makes young collections rarer. With many
requests in flight each young collection walked all of their objects and moved the survivors
on, so middle and full collections came often too: ~2-3 % of a payment's CPU
(``bench/e2e/PROFILE.md``). A reconciliation run freezes its own books while it runs and hands
every frozen object back when it ends (``gc.unfreeze``); :func:`resettle` freezes again then,
in a settled process only. A program that never calls :func:`settle` (tests, an embedding
application) keeps its collector as it set it."""

from __future__ import annotations

import gc

__all__ = ["YOUNG_COLLECTIONS", "resettle", "settle"]

# Allocations between two young collections in a settled process (Python's default: 700).
YOUNG_COLLECTIONS = 10_000


class _Process:
    settled = False  # settle() was called in this process


def settle() -> None:
    """One full collection, then what survived it out of every later one; fewer young
    collections. Called once the serving process has started."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTIONS, *gc.get_threshold()[1:])
    _Process.settled = True


def resettle() -> None:
    """After ``gc.unfreeze()`` handed the frozen objects back: in a settled process, what is
    alive now is frozen again (after a full collection, so that nothing dead stays frozen)."""
    if _Process.settled:
        gc.collect()
        gc.freeze()
