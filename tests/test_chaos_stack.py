"""The chaos stack's process control: a service is never started twice at once, and nothing
starts once the stack has stopped (a leaked process outlives the run and holds its port)."""

from __future__ import annotations

import sys
import threading
from collections import defaultdict
from pathlib import Path
from types import TracebackType

import pytest

from oncepay.chaos import stack as stack_module
from oncepay.chaos.stack import ChaosStack, Service, _listening, free_port

HANG_GUARD = 30.0  # seconds; the interleaving below is signalled, never waited out


class Arrival:
    """Set once a second thread has got as far as it can while the first one is starting:
    inside a restart (it asked whether the service is alive) or at the service's lock."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._threads: set[int] = set()
        self._mutex = threading.Lock()

    def arrive(self) -> None:
        with self._mutex:
            self._threads.add(threading.get_ident())
            if len(self._threads) >= 2:
                self.event.set()


class NoticingLock:
    """The stack's per-service lock, telling ``arrival`` whenever someone tries to take it."""

    def __init__(self, arrival: Arrival) -> None:
        self._lock = threading.Lock()
        self._arrival = arrival

    def __enter__(self) -> bool:
        self._arrival.arrive()
        return self._lock.__enter__()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._lock.__exit__(kind, exc, tb)


class Watched(Service):
    """A service whose first start waits until the second restart has arrived: without the
    lock, that is the interleaving in which both restarts see it dead and both start it."""

    arrival: Arrival
    forced: bool

    def alive(self) -> bool:
        self.arrival.arrive()
        return super().alive()

    def start(self) -> None:
        if self.starts == 0:
            self.forced = self.arrival.event.wait(timeout=HANG_GUARD)
        super().start()


def stack_with_one_server(tmp_path: Path) -> tuple[ChaosStack, Watched, int]:
    port = free_port()
    stack = ChaosStack(tmp_path, "sqlite://")
    args = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    service = Watched("web", args, {}, tmp_path / "web.log", port)
    service.arrival, service.forced = Arrival(), False
    # a lock that notices arrivals, in the place of the stack's own
    stack._locks = defaultdict(lambda: NoticingLock(service.arrival))  # type: ignore[arg-type,return-value]
    stack.services["web"] = service
    return stack, service, port


def test_two_restarts_at_once_start_one_process(tmp_path: Path) -> None:
    stack, service, port = stack_with_one_server(tmp_path)
    try:
        threads = [threading.Thread(target=stack.restart, args=("web",)) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert service.forced  # the second restart arrived while the first was starting
        assert service.starts == 1
        assert service.alive()
        assert _listening(port)
    finally:
        stack.stop()
    assert not service.alive()
    assert not _listening(port)


def test_nothing_starts_after_the_stack_stopped(tmp_path: Path) -> None:
    stack, service, port = stack_with_one_server(tmp_path)
    service.arrival.event.set()  # one restart alone: nothing to wait for
    stack.stop()
    stack.restart("web")  # a fault loop's restart still running when the run ended
    assert service.starts == 0
    assert not _listening(port)


def test_no_two_services_of_a_stack_are_given_one_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The kernel handed one free port out twice while the first service had not bound it yet
    # (CI: the private Redis and api-1 both on one port). Every port twice, as the worst case.
    handed = iter([p for port in range(41000, 41020) for p in (port, port)])
    monkeypatch.setattr(stack_module, "free_port", lambda: next(handed))
    stack = ChaosStack(tmp_path, "sqlite://", redis=True)
    stack.build()
    ports = [s.port for s in stack.services.values() if s.port is not None]
    assert len(ports) == 7  # two acquirers, Redis, two API processes, receiver, proxy
    assert len(set(ports)) == len(ports), ports
