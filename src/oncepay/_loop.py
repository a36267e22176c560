"""One private event loop on a daemon thread, for sync callers of the async core.

Async store drivers bind their connections to the loop that opened them, so every sync caller
(WSGI workers in many threads, sync functions under ``@idempotent``) hands its coroutine to this
one loop instead of starting loops of its own.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["LoopThread"]


class LoopThread:
    """Started on first use, and again in a forked child (``gunicorn --preload`` forks after
    the app is built, and a child inherits no threads: the old loop would never answer)."""

    def __init__(self, name: str = "oncepay-loop") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its result in the calling thread."""
        return asyncio.run_coroutine_threadsafe(coro, self._running()).result()

    def _running(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=self._loop.run_forever, name=self._name, daemon=True
                )
                self._thread.start()
            return self._loop

    def close(self) -> None:
        with self._lock:
            loop, thread, started_here = self._loop, self._thread, self._pid == os.getpid()
            self._loop = self._thread = None
        if loop is None or thread is None or not started_here:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
