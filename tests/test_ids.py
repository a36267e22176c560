"""Object ids (oncepay.storage.ids): their shape, and no id handed out twice — across threads
taking them at once, and across a fork (a child must not reuse the bytes its parent read
ahead)."""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import warnings

import pytest

from oncepay.storage import ids
from oncepay.storage.ids import is_id, new_id


def test_an_id_has_the_shape_every_id_has() -> None:
    made = [new_id("pay") for _ in range(1000)]
    assert all(is_id(one) and one.startswith("pay_") for one in made)
    assert len(set(made)) == len(made)


def test_threads_taking_ids_at_once_never_share_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # Threads switched every microsecond (not every 5 ms) and the bytes read ahead every four
    # ids: as many chances as can be made for two threads to take the same position.
    monkeypatch.setattr(ids, "_BATCH", 12 * 4)  # and read ahead often
    monkeypatch.setattr(ids, "_ahead", ids._Ahead())  # (its own state, given back after)
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        _take_at_once()
    finally:
        sys.setswitchinterval(previous)


def _take_at_once() -> None:
    per_thread, threads = 5000, 8
    found: list[list[str]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads)

    def take(n: int) -> None:
        start.wait()  # all at once
        found[n].extend(new_id("evt") for _ in range(per_thread))

    workers = [threading.Thread(target=take, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    everything = [one for taken in found for one in taken]
    assert len(everything) == per_thread * threads
    assert len(set(everything)) == len(everything)


def _child(out: multiprocessing.connection.Connection) -> None:
    out.send([new_id("pay") for _ in range(300)])
    out.close()


def test_a_forked_child_does_not_hand_out_its_parents_read_ahead_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ids, "_ahead", ids._Ahead())
    new_id("pay")  # the parent has read ahead: 255 ids' worth of bytes wait in its buffer
    assert ids._ahead.used < len(ids._ahead.buffer)
    context = multiprocessing.get_context("fork")
    receiving, sending = context.Pipe(duplex=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        child = context.Process(target=_child, args=(sending,))
        child.start()
    sending.close()
    theirs = receiving.recv()
    child.join(10)
    assert child.exitcode == 0
    ours = [new_id("pay") for _ in range(300)]  # the same positions of the same buffer
    assert not set(ours) & set(theirs)
    assert os.getpid() != child.pid
