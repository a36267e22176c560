"""Retry amplification in a chaos run: HTTP attempts sent to the acquirers ÷ logical operations
the payments service asked of them (docs/acquirer.md, "Retry control").

The API processes and the worker keep their metrics in one ``PROMETHEUS_MULTIPROC_DIR``
(prometheus-client's multiprocess mode: a file per process, written as the counters move), so
the figures survive the ``kill -9``s of the run and this process can read them at any moment:
before and after the full outage of the primary, and at the end.

* attempts sent: ``oncepay_acquirer_attempts_total`` (first attempts and retries);
* logical operations: ``oncepay_acquirer_calls_total`` over every final outcome (approved,
  declined, unknown, not_found, breaker_open, throttled) — its ``error`` samples count failed
  attempts, not operations.

How fast traffic returns after the outage heals is read from the primary's own operations: the
first authorization it recorded after the heal.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = ["Tally", "amplification", "read_tally", "summary", "traffic_returned"]


@dataclass(frozen=True)
class Tally:
    """Counts per acquirer at one moment."""

    sent: Counter[str] = field(default_factory=Counter)
    logical: Counter[str] = field(default_factory=Counter)

    def __sub__(self, earlier: Tally) -> Tally:
        return Tally(self.sent - earlier.sent, self.logical - earlier.logical)


def read_tally(directory: Path) -> Tally:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    tally = Tally()
    for family in registry.collect():
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            acquirer = sample.labels.get("acquirer", "")
            if family.name == "oncepay_acquirer_attempts":
                tally.sent[acquirer] += int(sample.value)
            elif family.name == "oncepay_acquirer_calls" and sample.labels["outcome"] != "error":
                tally.logical[acquirer] += int(sample.value)
    return tally


def amplification(tally: Tally, acquirer: str | None = None) -> float | None:
    """Attempts sent ÷ logical operations, for one acquirer or all; None with no operation."""
    if acquirer is None:
        sent, logical = sum(tally.sent.values()), sum(tally.logical.values())
    else:
        sent, logical = tally.sent[acquirer], tally.logical[acquirer]
    return round(sent / logical, 3) if logical else None


def traffic_returned(operations: list[dict[str, Any]], healed_at: float) -> float | None:
    """Seconds from the heal to the first authorization the primary recorded after it."""
    after = [
        datetime.fromisoformat(op["created_at"]).timestamp() - healed_at
        for op in operations
        if op["acquirer"] == "primary" and op["type"] == "authorization"
    ]
    later = [seconds for seconds in after if seconds >= 0]
    return round(min(later), 2) if later else None


def summary(
    directory: Path, marks: dict[str, Any], operations: list[dict[str, Any]]
) -> dict[str, Any]:
    """The report's ``retry_control`` section: amplification over the whole run and during
    the full outage (overall and into the primary), and how fast the primary took traffic
    again once it healed."""
    whole = read_tally(directory)
    found: dict[str, Any] = {
        "amplification": amplification(whole),
        "attempts_sent": sum(whole.sent.values()),
        "logical_operations": sum(whole.logical.values()),
    }
    if "during" in marks:
        outage = marks["during"] - marks["before"]
        found |= {
            "outage_amplification": amplification(outage),
            "outage_amplification_primary": amplification(outage, "primary"),
            "outage_attempts_sent_primary": outage.sent["primary"],
            "outage_logical_operations": sum(outage.logical.values()),
        }
    if "healed_at" in marks:
        found["traffic_returned_seconds"] = traffic_returned(operations, marks["healed_at"])
    return found
