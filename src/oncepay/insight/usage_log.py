"""The key-usage log (SPEC §9): every idempotency decision as one JSON line, off the hot path.

A request pays for one tuple appended to a bounded in-memory buffer. A writer thread wakes a
few times a second, formats what has accumulated (hashing the keys, encoding JSON) and writes
it with one ``write``. Nothing here can slow or fail a request:

* a full buffer (the writer stalled behind a slow disk) drops the new record and counts it;
* a write that fails (a full or vanished disk) drops its batch, counts it and logs it.

Both counts are attributes (``dropped``, ``write_errors``) and, when prometheus-client is
installed, the counters ``oncepay_usage_log_dropped_total`` and
``oncepay_usage_log_write_errors_total`` in its default registry.

Keys are written as a keyed BLAKE2b hash unless ``raw_keys=True``. The hash key is ``secret``,
else ``ONCEPAY_USAGE_LOG_SECRET``, else (for a path) a random one kept beside the log in
``<path>.secret`` (mode 0600), so that the processes and restarts writing one log hash a key
alike (the analyzer follows a key across them); a log given as a file object with none of these
gets a random secret of its own.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import os
import secrets
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable
from json.encoder import encode_basestring_ascii as _quoted
from pathlib import Path
from typing import BinaryIO, Protocol

__all__ = ["DECISIONS", "SECRET_ENV", "UsageLog", "UsageSink"]

log = logging.getLogger("oncepay.insight")

DECISIONS = frozenset({"executed", "replayed", "in_progress", "reused", "invalid", "missing"})
SECRET_ENV = "ONCEPAY_USAGE_LOG_SECRET"  # noqa: S105 -- the variable's name, not a secret

# 50,000 records (~15 MB) is five seconds of a busy process at 10,000 decisions/s: room for a
# disk that stalls for a moment, while a dead one cannot take the process's memory with it.
DEFAULT_CAPACITY = 50_000
# How often the writer wakes: a quarter second keeps batches large (hundreds of lines a write)
# and the log no more than a moment behind, for the worker reading it live.
DEFAULT_INTERVAL = 0.25
# 16 bytes (32 hex digits) of keyed hash: collisions are out of reach for any log's keys.
_DIGEST_SIZE = 16

# at, tenant, route, key, fingerprint, decision, status, source, ttl
Entry = tuple[float, str, str, str, str, str, int, "str | None", "float | None"]


class UsageSink(Protocol):
    """What the surfaces record decisions into: :class:`UsageLog`, or your own (a queue, say).

    ``record`` is called on the request's path and must neither block nor raise."""

    def record(
        self,
        tenant: str,
        route: str,
        key: str,
        fingerprint: str,
        decision: str,
        status: int,
        source: str | None,
        ttl: float | None,
    ) -> None: ...

    def close(self) -> None: ...


try:
    from prometheus_client import Counter
except ImportError:  # pragma: no cover - prometheus-client is an optional dependency
    _DROPPED_METRIC: Counter | None = None
    _ERRORS_METRIC: Counter | None = None
else:
    _DROPPED_METRIC = Counter(
        "oncepay_usage_log_dropped",
        "Key-usage log records dropped because the buffer was full.",
    )
    _ERRORS_METRIC = Counter(
        "oncepay_usage_log_write_errors",
        "Key-usage log batches lost to a failed write.",
    )


class UsageLog:
    """A key-usage log written to ``target`` (a path, appended to, or a binary file object).

    ``capacity`` bounds the buffer (records); ``interval`` is how often the writer flushes, in
    seconds. :meth:`close` writes what is buffered and stops the writer; it is also called at
    interpreter exit.
    """

    def __init__(
        self,
        target: str | os.PathLike[str] | BinaryIO,
        *,
        secret: bytes | str | None = None,
        raw_keys: bool = False,
        capacity: int = DEFAULT_CAPACITY,
        interval: float = DEFAULT_INTERVAL,
    ) -> None:
        if capacity < 1 or interval <= 0:
            raise ValueError("capacity must be at least 1 and interval positive")
        self.path: Path | None = None
        self._file: BinaryIO | None = None
        if isinstance(target, (str, os.PathLike)):
            self.path = Path(target)
        else:
            self._file = target
        self.raw_keys = raw_keys
        # BLAKE2b keyed once: each key's hash starts from a copy of this state.
        self._hasher = hashlib.blake2b(
            key=b"" if raw_keys else _secret_for(secret, self.path), digest_size=_DIGEST_SIZE
        )
        self.capacity = capacity
        self.interval = interval
        self.dropped = 0
        self.write_errors = 0
        self.written = 0
        self._buffer: deque[Entry] = deque()
        self._stop = threading.Event()
        self._writing = threading.Lock()  # one flush at a time: the writer's, or close()'s
        self._thread: threading.Thread | None = None
        self._failing = False
        self._closed = False
        _every_log.add(self)

    # -- on the request's path ------------------------------------------------------------------

    def record(
        self,
        tenant: str,
        route: str,
        key: str,
        fingerprint: str,
        decision: str,
        status: int,
        source: str | None,
        ttl: float | None,
    ) -> None:
        """Buffer one decision, or drop and count it when the buffer is full. Never blocks."""
        buffer = self._buffer
        if len(buffer) >= self.capacity or self._closed:
            self._drop(1)
            return
        buffer.append((time.time(), tenant, route, key, fingerprint, decision, status, source, ttl))
        if self._thread is None:
            self._start()

    def _drop(self, count: int) -> None:
        self.dropped += count
        if _DROPPED_METRIC is not None:
            _DROPPED_METRIC.inc(count)

    def _start(self) -> None:
        with self._writing:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(
                    target=self._run, name="oncepay-usage-log", daemon=True
                )
                self._thread.start()
                _open_logs.add(self)

    # -- the writer thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()

    def flush(self) -> None:
        """Write what is buffered now (the writer does this every ``interval``)."""
        with self._writing:
            self._write_batch()

    def _write_batch(self) -> None:
        buffer = self._buffer
        entries = [buffer.popleft() for _ in range(len(buffer))]
        if not entries:
            return
        try:
            self._write("".join(self._lines(entries)).encode())
        except Exception as exc:  # a dead disk (or a bad record): count, say so once, carry on
            self._failed(len(entries), exc)
            return
        self.written += len(entries)
        if self._failing:
            self._failing = False
            log.warning("the key-usage log %s is being written again", self._name())

    def _lines(self, entries: Iterable[Entry]) -> Iterable[str]:
        hasher = None if self.raw_keys else self._hasher
        known = _Encoded()  # tenants, routes, sources and TTLs repeat: each encoded once a batch
        for at, tenant, route, raw, fp, decision, status, source, ttl in entries:
            # No key (``missing``) is written as none: a hash of "" would read as some key.
            key = _quoted(raw) if hasher is None or not raw else f'"{_hashed(hasher, raw)}"'  # hex
            yield (
                f'{{"at":{at!r},"tenant":{known[tenant]},"route":{known[route]},'
                f'"key":{key},"fingerprint":{_quoted(fp)},"decision":"{decision}",'
                f'"status":{status},"source":{known[source]},"ttl":{known[ttl]}}}\n'
            )

    def _write(self, data: bytes) -> None:
        if self._file is None:  # unbuffered, appending: a batch is one write() of its own
            assert self.path is not None
            self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 -- kept open
        view = memoryview(data)
        while view:  # a short write (a signal, a nearly full disk) goes on where it stopped
            view = view[self._file.write(view) or len(view) :]
        self._file.flush()

    def _failed(self, lost: int, error: Exception) -> None:
        self.write_errors += 1
        self._drop(lost)
        if _ERRORS_METRIC is not None:
            _ERRORS_METRIC.inc()
        if self.path is not None and self._file is not None:  # reopened on the next batch
            _close_quietly(self._file)
            self._file = None
        if not self._failing:
            self._failing = True
            log.error(
                "the key-usage log %s cannot be written (%r): records are being dropped "
                "until it can",
                self._name(),
                error,
            )

    def _name(self) -> str:
        return str(self.path) if self.path is not None else repr(self._file)

    # -- shutdown -------------------------------------------------------------------------------

    def close(self) -> None:
        """Write what is buffered, stop the writer and close the file (once; idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._writing:
            self._write_batch()
            if self.path is not None and self._file is not None:
                _close_quietly(self._file)
                self._file = None
        _open_logs.discard(self)

    def _forked(self) -> None:
        """In a forked child: the writer thread did not come along; a new one starts on the
        first record, and the parent's buffered records stay the parent's to write."""
        self._thread = None
        self._buffer.clear()
        self._writing = threading.Lock()
        self._stop = threading.Event()
        if self.path is not None:
            self._file = None  # the child opens its own (appending)


def _hashed(keyed: hashlib.blake2b, key: str) -> str:
    hasher = keyed.copy()
    hasher.update(key.encode())
    return hasher.hexdigest()


class _Encoded(dict[object, str]):
    """A value's JSON text, computed the first time it is asked for."""

    def __missing__(self, value: object) -> str:
        if isinstance(value, str):
            text = _quoted(value)
        elif value is None:
            text = "null"
        else:
            text = repr(float(value))  # type: ignore[arg-type]  # a TTL: an int or a float
        self[value] = text
        return text


def _close_quietly(file: BinaryIO) -> None:
    with contextlib.suppress(OSError):
        file.close()


def _secret_for(secret: bytes | str | None, path: Path | None) -> bytes:
    """The hash key: given, from the environment, kept beside the log, or random."""
    secret = secret or os.environ.get(SECRET_ENV) or None
    if secret is not None:
        given = secret.encode() if isinstance(secret, str) else secret
        return given if len(given) <= 64 else hashlib.blake2b(given).digest()  # BLAKE2b's limit
    if path is None:
        return secrets.token_bytes(32)
    return _kept_secret(path.with_name(path.name + ".secret"))


def _kept_secret(where: Path) -> bytes:
    """The secret in ``where``, created (0600, atomically) if absent: several processes
    starting at once agree on the first one written."""
    try:
        return bytes.fromhex(where.read_text().strip())
    except FileNotFoundError:
        pass
    draft = where.with_name(f"{where.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(secrets.token_hex(32))
    try:
        os.link(draft, where)  # fails if another process got there first: theirs wins
    except FileExistsError:
        pass
    finally:
        draft.unlink()
    return bytes.fromhex(where.read_text().strip())


# Logs with a running writer, closed (flushed) at interpreter exit: the writer is a daemon
# thread, and what it had not yet written would otherwise be lost.
_open_logs: set[UsageLog] = set()
# Every log, for the fork hook (weakly: a log dropped by its owner goes away).
_every_log: weakref.WeakSet[UsageLog] = weakref.WeakSet()


def _close_all() -> None:
    for usage_log in list(_open_logs):
        usage_log.close()


def _forked() -> None:
    for usage_log in list(_every_log):
        usage_log._forked()


atexit.register(_close_all)
os.register_at_fork(after_in_child=_forked)
