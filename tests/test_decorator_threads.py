"""``@idempotent`` on sync functions called from many threads (issue 12, item 17).

A sync function runs in its caller's thread; only the store calls go to the private loop. So
calls from several threads overlap, and a slow function never holds up another caller's store
calls (on Redis those used to time out: ``StoreUnavailable`` for callers whose function ran).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from oncepay.errors import RequestInProgress, StoreUnavailable
from oncepay.idempotency.decorator import idempotent
from tests.conftest import make_spec

THREADS = 4
# The issue's own measure: four one-second calls from four threads took four seconds.
CALL_SECONDS = 1.0

backends = pytest.mark.parametrize(
    "backend", ["memory", pytest.param("redis", marks=pytest.mark.redis)]
)


def _store_url(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> Any:
    spec = make_spec(request, backend, tmp_path)
    return spec.build() if spec.options else spec.url


def _in_threads(call: Callable[[int], Any], n: int = THREADS) -> list[Any]:
    """Run ``call(i)`` for i in 0..n-1, one thread each, released together."""
    start = threading.Barrier(n)

    def one(i: int) -> Any:
        start.wait(timeout=10)
        return call(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


@backends
def test_four_threads_of_a_one_second_function_finish_in_under_two_seconds(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path
) -> None:
    runs: Counter[str] = Counter()

    @idempotent(_store_url(request, backend, tmp_path), key="key")
    def slow(key: str) -> str:
        runs[key] += 1
        time.sleep(CALL_SECONDS)  # the workload: a function that takes a second
        return f"done {key}"

    began = time.monotonic()
    results = _in_threads(lambda i: slow(f"k{i}"))  # raises any error a caller got
    elapsed = time.monotonic() - began

    assert results == [f"done k{i}" for i in range(THREADS)]
    assert elapsed < 2 * CALL_SECONDS, f"{THREADS} calls took {elapsed:.1f} s: serialised"
    assert runs == {f"k{i}": 1 for i in range(THREADS)}
    assert _in_threads(lambda i: slow(f"k{i}")) == results  # replays, from every thread
    assert runs == {f"k{i}": 1 for i in range(THREADS)}


@backends
def test_a_sync_function_runs_in_its_callers_thread_alongside_the_others(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path
) -> None:
    """No clock: every call waits inside the function until all four are inside at once,
    which is impossible when calls run one at a time."""
    all_inside = threading.Barrier(THREADS)
    ran_in: dict[str, int] = {}

    @idempotent(_store_url(request, backend, tmp_path), key="key")
    def meet(key: str) -> int:
        ran_in[key] = threading.get_ident()
        all_inside.wait(timeout=10)
        return len(key)

    callers: dict[str, int] = {}

    def call(i: int) -> int:
        callers[f"k{i}"] = threading.get_ident()
        return meet(f"k{i}")

    assert _in_threads(call) == [2] * THREADS
    assert ran_in == callers


@backends
def test_concurrent_callers_of_one_key_get_one_run_and_no_store_error(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path
) -> None:
    """The same key from four threads while its first call is still running: one run, the
    others are told it is in progress (never a store error), and all replay it afterwards."""
    inside, leave = threading.Event(), threading.Event()
    runs: list[str] = []

    @idempotent(_store_url(request, backend, tmp_path), key="key")
    def charge(key: str) -> str:
        runs.append(key)
        inside.set()
        assert leave.wait(timeout=10)
        return "charged"

    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(charge, "k")
        assert inside.wait(timeout=10)

        def duplicate(_: int) -> str:
            with pytest.raises(RequestInProgress):
                charge("k")
            return "refused"

        assert _in_threads(duplicate) == ["refused"] * THREADS
        leave.set()
        assert first.result(timeout=10) == "charged"
    assert _in_threads(lambda _: charge("k")) == ["charged"] * THREADS
    assert runs == ["k"]


class _CompleteFails:
    """A store that claims, then cannot reach its backend to complete or release."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def complete(self, *args: Any, **kwargs: Any) -> None:
        raise StoreUnavailable("Redis: no reply within 2 s")

    async def release(self, *args: Any, **kwargs: Any) -> None:
        raise StoreUnavailable("Redis: no reply within 2 s")


def test_a_store_failure_after_the_function_ran_says_that_it_ran() -> None:
    """StoreUnavailable on its own means "nothing executed": a caller whose function ran must
    not be told that, since a retry before the lease lapses is refused, not run."""
    from oncepay.idempotency.stores.memory import MemoryStore

    runs: list[str] = []

    @idempotent(_CompleteFails(MemoryStore()), key="key")
    def charge(key: str) -> str:
        runs.append(key)
        return "charged"

    with pytest.raises(StoreUnavailable, match="ran, but its result could not be stored") as err:
        charge("k")
    assert "no reply within 2 s" in err.value.detail
    with pytest.raises(RequestInProgress):  # the key stays locked: not run a second time
        charge("k")
    assert runs == ["k"]


def test_a_store_failure_after_the_function_raised_keeps_the_functions_error() -> None:
    from oncepay.idempotency.stores.memory import MemoryStore

    @idempotent(_CompleteFails(MemoryStore()), key="key")
    def charge(key: str) -> str:
        raise ConnectionError("acquirer down")

    with pytest.raises(ConnectionError, match="acquirer down"):
        charge("k")
