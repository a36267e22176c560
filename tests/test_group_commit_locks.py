"""Group commit must not drop SQLite's locks: POSIX (fcntl) locks belong to a process and a file,
so closing *any* descriptor of the ``-shm`` file in the process drops every lock its SQLite
connections hold there (sqlite.org/howtocorrupt.html §2.2). Without the "in use" lock another
process takes the database for unused and rebuilds its WAL index; without the read marks a
checkpoint overwrites pages a reader still uses. The chaos audit's kill -9 found exactly that
("database disk image is malformed") when GroupCommit read the WAL index header by opening and
closing the ``-shm`` file itself.

Checked from another process, as SQLite's own peers see it: the byte of the "in use" lock
(UNIX_SHM_DMS in os_unix.c: byte 128 of ``-shm``) stays read-locked by this process through
writes and barriers, so an exclusive lock on it is refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sqlalchemy import text

from oncepay.storage.db import Database, write

# Byte (22 + 8) * 4 + 8 of the -shm file: SQLite's dead-man switch, read-locked by every process
# that has the WAL index open.
DMS = 128

PROBE = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, int(sys.argv[2]))
except BlockingIOError:
    print("held")
else:
    print("free")
"""


def in_use_lock(shm: Path) -> str:
    """'held' when another process (this test's) read-locks the dead-man byte, else 'free'."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(shm), str(DMS)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return out.stdout.strip()


async def test_writes_and_barriers_keep_the_processes_locks_on_the_wal_index(
    tmp_path: Path,
) -> None:
    path = tmp_path / "locks.db"
    db = Database.from_url(f"sqlite:///{path}")
    assert db.group is not None
    try:
        async with write(db) as conn:
            await conn.execute(text("CREATE TABLE t (n INTEGER PRIMARY KEY)"))
        shm = Path(f"{path}-shm")
        assert in_use_lock(shm) == "held"  # the pooled connection has the WAL index open
        for n in range(5):
            async with write(db) as conn:  # each write passes the barrier: a sync, a look
                await conn.execute(text("INSERT INTO t VALUES (:n)"), {"n": n})
            await db.durable()  # nothing new: the barrier only looks
            assert in_use_lock(shm) == "held"
        assert db.group.syncs >= 1
    finally:
        await db.aclose()


def test_the_probe_tells_a_free_byte(tmp_path: Path) -> None:
    unused = tmp_path / "unused-shm"
    unused.write_bytes(bytes(DMS + 1))
    assert in_use_lock(unused) == "free"
