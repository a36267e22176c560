"""The detectors on the live key-usage log (SPEC §9): the worker's insight job.

:class:`LogTail` follows the log as it grows: each read takes the whole lines appended since the
last one (a line still being written waits for the next), at most ``chunk`` bytes at a time so
that a long backlog is worked off in slices. A rotated log (another file at the path: the old
one renamed) is read to its end, then the new one from its start; a truncated one (shorter
than what was read) is read again from its start.

:class:`LiveInsight` feeds what the tail reads to one incremental
:class:`~oncepay.insight.analyzer.Analyzer` (the same detectors as ``oncepay insight analyze``),
and stores the findings of the tenants that had new decisions (:mod:`oncepay.insight.store`):
a new one opened (with its event, through ``announce``), a continuing one extended. The reading
and the analysis run in a thread, off the event loop; the findings are written from it.

A worker starts at the beginning of the log, so that each tenant's baseline has its history:
findings it stored before a restart, or that another worker stored, are found again and
extended, never duplicated. Its memory is the analyzer's (a week of buckets per tenant and the
keys inside their TTL), whatever the length of the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import BinaryIO

from oncepay.insight.analyzer import Analyzer, Evidence
from oncepay.insight.findings import Finding, TtlAdvice
from oncepay.insight.records import parse_block
from oncepay.insight.store import QUIET, Announce, close_quiet, record
from oncepay.storage.db import Database

__all__ = ["LiveInsight", "LogTail", "Step"]

# Bytes read per step: about 16,000 decisions, a tenth of a second of analysis, so a backlog
# (a worker starting on a day's log) never holds the thread for long; the next step follows at
# once while more is waiting.
CHUNK = 4 << 20
# How often the learned TTLs are worked out again (seconds): they move over hours, not seconds.
TTL_EVERY = 60.0
# How often quiet findings are closed (seconds): a write, so not on every step.
CLOSE_EVERY = 60.0


class LogTail:
    """The whole lines appended to the file at ``path`` since the last :meth:`read`."""

    def __init__(self, path: str | os.PathLike[str], *, chunk: int = CHUNK) -> None:
        self.path = os.fspath(path)
        self.chunk = chunk
        self.offset = 0  # bytes of the current file read so far
        self.more = False  # whether the last read stopped short of the end
        self._file: BinaryIO | None = None
        self._inode: tuple[int, int] | None = None
        self._rest = b""  # a line still being written

    def read(self) -> bytes:
        """Whole lines (ending in a newline), possibly none."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:  # not written yet, or rotated away: what is open is read out
            return self._read_open()
        inode = (stat.st_dev, stat.st_ino)
        if self._file is not None and inode != self._inode:  # rotated: the old file first
            data = self._read_open()
            if data or self.more:
                return data
            self._close()
        if self._file is None:
            try:
                self._file = open(self.path, "rb")  # noqa: SIM115 -- kept open between reads
            except FileNotFoundError:
                return b""
            self._inode, self.offset, self._rest = inode, 0, b""
        elif stat.st_size < self.offset:  # truncated (copytruncate): from the start again
            self.offset, self._rest = 0, b""
        return self._read_open()

    def _read_open(self) -> bytes:
        if self._file is None:
            self.more = False
            return b""
        self._file.seek(self.offset)
        chunk = self._file.read(self.chunk)
        self.offset += len(chunk)
        self.more = len(chunk) == self.chunk
        data = self._rest + chunk
        end = data.rfind(b"\n") + 1
        self._rest = data[end:]
        return data[:end]

    def _close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        self._file, self._inode, self.offset, self._rest = None, None, 0, b""

    def close(self) -> None:
        self._close()


@dataclass
class Step:
    """What one step did: decisions read, lines skipped, findings opened, whether more of the
    log is waiting, and the learned TTLs when they were worked out again (else None)."""

    records: int = 0
    bad_lines: int = 0
    opened: list[Finding] = field(default_factory=list)
    more: bool = False
    ttl: list[TtlAdvice] | None = None


class LiveInsight:
    """The live log at ``path`` analysed into findings stored in ``db``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        db: Database,
        *,
        announce: Announce | None = None,
        analyzer: Analyzer | None = None,
        chunk: int = CHUNK,
        ttl_every: float = TTL_EVERY,
    ) -> None:
        self.tail = LogTail(path, chunk=chunk)
        self.db = db
        self.announce = announce
        self.analyzer = analyzer or Analyzer()
        self.ttl_every = ttl_every
        # What was stored of each finding: (tenant, kind, first_at) -> (last_at, events).
        self._stored: dict[tuple[str, str, float], tuple[float, int]] = {}
        self._ttl_at = -float("inf")
        self._closed_at = -float("inf")
        self._trimmed = -float("inf")

    async def step(self, now: float | None = None) -> Step:
        """Read what was appended, analyse it, store what changed."""
        now = time.time() if now is None else now
        step, reports = await asyncio.to_thread(self._analyse, now)
        for done, (finding, evidence) in enumerate(reports):
            try:
                stored = await record(self.db, finding, evidence, announce=self.announce, now=now)
            except Exception:  # the database is away: these tenants are looked at again next time
                self.analyzer.evidenced.update(f.tenant for f, _ in reports[done:])
                raise
            self._stored[(finding.tenant, finding.kind, finding.first_at)] = (
                finding.last_at,
                finding.events,
            )
            if stored.opened:
                step.opened.append(finding)
        if now - self._closed_at >= CLOSE_EVERY:
            self._closed_at = now
            await close_quiet(self.db, now - QUIET, now=now)
        return step

    def _analyse(self, now: float) -> tuple[Step, list[tuple[Finding, Evidence]]]:
        """In a thread: the new lines read and fed, the changed findings and (now and then)
        the learned TTLs worked out."""
        data = self.tail.read()
        rows, bad = parse_block(data) if data else ([], [])
        analyzer = self.analyzer
        analyzer.feed_rows(rows)
        step = Step(records=len(rows), bad_lines=len(bad), more=self.tail.more)
        reports: list[tuple[Finding, Evidence]] = []
        if analyzer.evidenced:  # only a tenant with new evidence can have a new or grown finding
            touched, analyzer.evidenced = analyzer.evidenced, set()
            reports = [r for r in analyzer.reports(touched) if self._changed(r[0])]
        if now - self._ttl_at >= self.ttl_every and analyzer.records:
            self._ttl_at = now
            step.ttl = analyzer.ttl()
        if analyzer.latest - self._trimmed >= 3600.0:  # once an hour of the log: a week kept
            self._trimmed = analyzer.latest
            analyzer.trim(analyzer.latest)
            self._forget_stored(analyzer.latest - analyzer.tuning.history * analyzer.tuning.bucket)
        return step, reports

    def _changed(self, finding: Finding) -> bool:
        stored = self._stored.get((finding.tenant, finding.kind, finding.first_at))
        return stored != (finding.last_at, finding.events)

    def _forget_stored(self, before: float) -> None:
        for name in [name for name, (last, _) in self._stored.items() if last < before]:
            del self._stored[name]

    def close(self) -> None:
        self.tail.close()
