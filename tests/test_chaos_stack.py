"""The chaos stack's process control: a service is never started twice at once, and nothing
starts once the stack has stopped (a leaked process outlives the run and holds its port)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from oncepay.chaos.stack import ChaosStack, Service, _listening, free_port


class Watched(Service):
    """A service whose first start waits until a second caller has asked whether it is alive
    (or a second has passed): the interleaving in which two restarts both see it dead."""

    second_look: threading.Event
    looks: int

    def alive(self) -> bool:
        self.looks += 1
        if self.looks >= 2:
            self.second_look.set()
        return super().alive()

    def start(self) -> None:
        if self.starts == 0:
            self.second_look.wait(timeout=1.0)
        super().start()


def stack_with_one_server(tmp_path: Path) -> tuple[ChaosStack, Watched, int]:
    port = free_port()
    stack = ChaosStack(tmp_path, "sqlite://")
    args = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    service = Watched("web", args, {}, tmp_path / "web.log", port)
    service.second_look, service.looks = threading.Event(), 0
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
        assert service.starts == 1
        assert service.alive()
        assert _listening(port)
    finally:
        stack.stop()
    assert not service.alive()
    assert not _listening(port)


def test_nothing_starts_after_the_stack_stopped(tmp_path: Path) -> None:
    stack, service, port = stack_with_one_server(tmp_path)
    stack.stop()
    stack.restart("web")  # a fault loop's restart still running when the run ended
    assert service.starts == 0
    assert not _listening(port)
