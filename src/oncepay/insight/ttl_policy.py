"""Applying learned TTLs (SPEC §9, opt-in): the TTL a new record is stored with, per tenant and
route, from what ``oncepay insight analyze`` learned, held to configured bounds.

Every surface asks :meth:`TtlPolicy.ttl_for` before it claims a key, with the TTL it would use
without the policy (the route's ``route_ttl``, else the engine's): that fixed TTL is the answer
whenever nothing was learned for the tenant and route, or too little (``basis`` under
``min_basis``). A learned TTL is clamped to ``[minimum, maximum]``; ``minimum`` must outlast the
engine's lease (the surfaces check it when built), so that a record never expires while its
request still runs.

Learned routes are templates (``POST /orders/{id}/pay``, as the key-usage log writes them); a
surface that only knows the path (``POST /orders/7/pay``) finds them too: each ``{name}``
matches one path segment.

What is learned is replaced whole (:meth:`update`, :meth:`load`): one reference swapped under a
lock, so a reader in another thread (the WSGI middleware's) sees the old TTLs or the new ones,
never a mix, and reads take no lock at all. The key-seconds the learned TTLs store, and what the
fixed TTLs would have stored for the same records, are counted (:meth:`savings`).
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oncepay.errors import ConfigurationError

__all__ = ["TtlPolicy", "TtlSavings"]

# Five minutes: five times the default lease (60 s), so that a record always outlives its
# request, and still far below the fixed 24 h for clients that retry within seconds.
DEFAULT_MINIMUM = 300.0
# A week: terminals that retry the next day (or after a weekend) stay covered; what the
# analyzer allows by default, and the payments service's retention of unfinished requests.
DEFAULT_MAXIMUM = 7 * 86400.0
# The fixed TTL when the caller names none: the engine's default (24 h).
DEFAULT_FALLBACK = 86400.0
# Fewer retries than this behind a figure do not make a quantile (the analyzer's own floor).
DEFAULT_MIN_BASIS = 30

# What a route template's ``{name}`` matches in a path: one segment.
_PARAMETER = re.compile(r"\{[^{}/]*\}")


@dataclass(frozen=True, slots=True)
class TtlSavings:
    """Records stored under a learned TTL, their key-seconds, and what the fixed TTLs would
    have kept of them (key-seconds: records x seconds kept)."""

    records: int = 0
    learned_seconds: float = 0.0
    fixed_seconds: float = 0.0

    @property
    def ratio(self) -> float:
        """Learned key-seconds relative to fixed ones (1.0 when nothing was stored)."""
        return self.learned_seconds / self.fixed_seconds if self.fixed_seconds else 1.0


@dataclass(frozen=True, slots=True)
class _Learned:
    """One generation of learned TTLs, never changed once built."""

    exact: dict[tuple[str, str], float] = field(default_factory=dict)
    # tenant -> (pattern, TTL) for its templated routes, to match paths
    patterns: dict[str, tuple[tuple[re.Pattern[str], float], ...]] = field(default_factory=dict)


class TtlPolicy:
    """Learned TTLs per (tenant, route), within ``[minimum, maximum]`` seconds.

    ``on_stored(learned, fixed)`` is called for every record stored under the policy (the
    payments service counts it in Prometheus); it must not block.
    """

    def __init__(
        self,
        *,
        minimum: float = DEFAULT_MINIMUM,
        maximum: float = DEFAULT_MAXIMUM,
        fallback: float = DEFAULT_FALLBACK,
        min_basis: int = DEFAULT_MIN_BASIS,
        on_stored: Callable[[float, float], None] | None = None,
    ) -> None:
        if not 0 < minimum <= maximum or not math.isfinite(maximum):
            raise ConfigurationError(
                f"adaptive TTL bounds must satisfy 0 < minimum <= maximum (got minimum="
                f"{minimum}s, maximum={maximum}s)"
            )
        if fallback <= 0 or min_basis < 0:
            raise ConfigurationError("the fallback TTL must be > 0 and min_basis >= 0")
        self.minimum = float(minimum)
        self.maximum = float(maximum)
        self.fallback = float(fallback)
        self.min_basis = min_basis
        self.on_stored = on_stored
        self._learned = _Learned()
        self._lock = threading.Lock()
        self._records = 0
        self._learned_seconds = 0.0
        self._fixed_seconds = 0.0
        self._file: tuple[str, tuple[int, int] | None] | None = None  # path, (mtime, size) read

    # -- what is learned ----------------------------------------------------------------------

    def update(self, entries: Iterable[Any]) -> int:
        """Replace every learned TTL with ``entries``: what :meth:`Analyzer.ttl` returns
        (``TtlAdvice``) or the ``ttl`` list of ``oncepay insight analyze --json`` (objects with
        ``tenant``, ``route``, ``ttl_seconds``, ``basis``). All or nothing: a bad entry raises
        ``ValueError`` naming it, and the TTLs learned before stay. Answers how many entries
        are applied (those with ``basis`` of at least ``min_basis``)."""
        exact: dict[tuple[str, str], float] = {}
        patterns: dict[str, list[tuple[re.Pattern[str], float]]] = {}
        for index, entry in enumerate(entries):
            tenant, route, ttl, basis = _fields(entry, index)
            if basis < self.min_basis:
                continue  # too few retries: the route keeps its fixed TTL
            held = min(max(ttl, self.minimum), self.maximum)
            exact[(tenant, route)] = held
            if _PARAMETER.search(route):
                patterns.setdefault(tenant, []).append((_pattern(route), held))
        learned = _Learned(exact, {tenant: tuple(found) for tenant, found in patterns.items()})
        with self._lock:
            self._learned = learned
        return len(exact)

    def load(self, path: str | os.PathLike[str]) -> int:
        """Replace what is learned with a file ``oncepay insight analyze LOG --json`` wrote.
        A file that cannot be read or used raises :class:`~oncepay.errors.ConfigurationError`
        saying why, and the TTLs learned before stay."""
        name = os.fspath(path)
        signature = _signature(name)
        try:
            text = Path(name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigurationError(
                f"adaptive TTL file {name}: cannot read it ({reason})"
            ) from exc
        try:
            document = json.loads(text)
        except ValueError as exc:
            raise ConfigurationError(f"adaptive TTL file {name}: not JSON ({exc})") from exc
        entries = document.get("ttl") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise ConfigurationError(
                f'adaptive TTL file {name}: no "ttl" list; write it with '
                f"`oncepay insight analyze LOG --json > {name}`"
            )
        try:
            applied = self.update(entries)
        except ValueError as exc:
            raise ConfigurationError(f"adaptive TTL file {name}: {exc}") from exc
        with self._lock:
            self._file = (name, signature)
        return applied

    def reload(self) -> bool:
        """Load the file :meth:`load` read again if it changed since (its modification time or
        size); True when it was. A file that cannot be used now raises as :meth:`load` does and
        is not tried again until it changes (the TTLs learned before stay)."""
        with self._lock:
            known = self._file
        if known is None:
            return False
        name, seen = known
        now = _signature(name)
        if now == seen:
            return False
        with self._lock:
            self._file = (name, now)  # a broken file is reported once, not at every check
        self.load(name)
        return True

    def learned(self) -> dict[tuple[str, str], float]:
        """Every learned TTL by (tenant, route), as applied (clamped); a copy."""
        return dict(self._learned.exact)

    # -- on every managed request -------------------------------------------------------------

    def ttl_for(self, tenant: str, route: str, fixed: float | None = None) -> float:
        """The TTL a new record of ``tenant`` on ``route`` (``"POST /path"``, a template or a
        path) is stored with: the learned one, else ``fixed`` (else the policy's fallback)."""
        learned = self._learned  # one read: one generation, whatever update() does meanwhile
        ttl = learned.exact.get((tenant, route))
        if ttl is None:
            for pattern, value in learned.patterns.get(tenant, ()):
                if pattern.fullmatch(route):
                    return value
            return self.fallback if fixed is None else fixed
        return ttl

    def stored(self, ttl: float, fixed: float) -> None:
        """Count a record stored with ``ttl`` where ``fixed`` would have applied."""
        with self._lock:
            self._records += 1
            self._learned_seconds += ttl
            self._fixed_seconds += fixed
        if self.on_stored is not None:
            self.on_stored(ttl, fixed)

    def estimate(self, stored: Mapping[tuple[str, str], tuple[int, float]]) -> TtlSavings:
        """What this policy would have stored of the records a log shows: ``stored`` maps
        (tenant, route) to (records, the key-seconds their fixed TTLs kept)."""
        records, learned, fixed = 0, 0.0, 0.0
        for (tenant, route), (count, kept) in stored.items():
            records += count
            fixed += kept
            learned += count * self.ttl_for(tenant, route, kept / count) if count else 0.0
        return TtlSavings(records, learned, fixed)

    def savings(self) -> TtlSavings:
        """What the learned TTLs stored so far, against the fixed ones."""
        with self._lock:
            return TtlSavings(self._records, self._learned_seconds, self._fixed_seconds)


def _fields(entry: Any, index: int) -> tuple[str, str, float, int]:
    """(tenant, route, ttl_seconds, basis) of one entry, or ValueError saying what is wrong."""
    tenant, route, ttl, basis = _values(entry)
    if not isinstance(tenant, str) or not isinstance(route, str) or not route:
        raise ValueError(f"ttl entry {index}: needs a string tenant and route, got {entry!r}")
    if not _number(ttl) or not math.isfinite(ttl) or ttl <= 0:
        raise ValueError(f"ttl entry {index}: ttl_seconds must be a number > 0, not {ttl!r}")
    if not isinstance(basis, int) or isinstance(basis, bool) or basis < 0:
        raise ValueError(f"ttl entry {index}: basis must be an integer >= 0, not {basis!r}")
    return tenant, route, float(ttl), basis


def _values(entry: Any) -> tuple[Any, Any, Any, Any]:
    """An object of the JSON, or a ``TtlAdvice`` (any object with the four attributes)."""
    if isinstance(entry, Mapping):
        return entry.get("tenant"), entry.get("route"), entry.get("ttl_seconds"), entry.get("basis")
    fields = ("tenant", "route", "ttl_seconds", "basis")
    tenant, route, ttl, basis = (getattr(entry, name, None) for name in fields)
    return tenant, route, ttl, basis


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _pattern(route: str) -> re.Pattern[str]:
    """``POST /orders/{id}/pay`` -> a pattern matching ``POST /orders/7/pay``."""
    parts = _PARAMETER.split(route)
    return re.compile("[^/]+".join(re.escape(part) for part in parts))


def _signature(path: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size
