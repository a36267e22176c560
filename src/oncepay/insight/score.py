"""Scoring the analyzer against labels: precision and recall per kind, and learned TTLs against
a fixed 24 h on a held-out week.

A finding matches a label when tenant and kind agree and its time window overlaps the label's
(widened by ``slack`` seconds either side). Precision per kind: findings that match a label over
all findings of that kind; recall: labels matched by a finding over all labels of that kind.
Retry coverage: the share of repeat sends (any send of a key after its first) arriving within
the TTL learned for the tenant and route; key storage: the key-seconds those TTLs keep (each
key for its TTL) over what a fixed TTL keeps.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from oncepay.insight.findings import KINDS, Finding, TtlAdvice
from oncepay.insight.records import Usage
from oncepay.insight.simulate import Label

__all__ = ["KindScore", "TtlScore", "score_findings", "score_ttl"]

FIXED_TTL = 86400.0


@dataclass(frozen=True, slots=True)
class KindScore:
    kind: str
    labels: int
    findings: int
    true_findings: int
    found_labels: int

    @property
    def precision(self) -> float:
        return self.true_findings / self.findings if self.findings else 1.0

    @property
    def recall(self) -> float:
        return self.found_labels / self.labels if self.labels else 1.0


@dataclass(frozen=True, slots=True)
class TtlScore:
    repeats: int
    covered: int
    covered_fixed: int
    key_seconds: float
    key_seconds_fixed: float

    @property
    def coverage(self) -> float:
        return self.covered / self.repeats if self.repeats else 1.0

    @property
    def coverage_fixed(self) -> float:
        return self.covered_fixed / self.repeats if self.repeats else 1.0

    @property
    def storage(self) -> float:
        return self.key_seconds / self.key_seconds_fixed if self.key_seconds_fixed else 0.0


def _matches(finding: Finding, label: Label, slack: float) -> bool:
    return (
        finding.tenant == label.tenant
        and finding.kind == label.kind
        and finding.first_at <= label.end + slack
        and finding.last_at >= label.start - slack
    )


def score_findings(
    findings: Sequence[Finding], labels: Sequence[Label], slack: float = 3600.0
) -> list[KindScore]:
    out = []
    for kind in KINDS:
        mine = [f for f in findings if f.kind == kind]
        truth = [label for label in labels if label.kind == kind]
        true = sum(any(_matches(f, label, slack) for label in truth) for f in mine)
        found = sum(any(_matches(f, label, slack) for f in mine) for label in truth)
        out.append(KindScore(kind, len(truth), len(mine), true, found))
    return out


def score_ttl(
    records: Iterable[Usage], advice: Sequence[TtlAdvice], fixed: float = FIXED_TTL
) -> TtlScore:
    """Learned TTLs (``advice``; a route without one keeps ``fixed``) against ``fixed``."""
    learned = {(a.tenant, a.route): float(a.ttl_seconds) for a in advice}
    first: dict[tuple[str, str], float] = {}
    repeats = covered = covered_fixed = 0
    key_seconds = key_seconds_fixed = 0.0
    for usage in records:
        if not usage.key or usage.decision not in ("executed", "replayed", "in_progress"):
            continue
        ttl = learned.get((usage.tenant, usage.route), fixed)
        sent = first.get((usage.tenant, usage.key))
        if sent is None:
            first[(usage.tenant, usage.key)] = usage.at
            key_seconds += ttl
            key_seconds_fixed += fixed
            continue
        repeats += 1
        covered += usage.at - sent <= ttl
        covered_fixed += usage.at - sent <= fixed
    return TtlScore(repeats, covered, covered_fixed, key_seconds, key_seconds_fixed)
