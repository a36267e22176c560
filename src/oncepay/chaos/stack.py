"""The chaos stack: every part of OncePay as a real OS process on this machine's loopback —
two simulated acquirers, two API processes, the worker, a webhook receiver, the fault-injecting
proxy, and optionally a Redis server of its own — each of which can be killed with SIGKILL and
started again."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

__all__ = ["ChaosStack", "Service", "free_port"]

# A Python process that imports the service binds within a few seconds on this machine; a
# minute leaves room for a loaded one without hiding a process that never comes up.
START_TIMEOUT = 60.0
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _listening(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class Service:
    """One process: its command, environment, port (if it serves) and log file."""

    name: str
    args: list[str]
    env: dict[str, str]
    log: Path
    port: int | None = None
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        self._log_file = self.log.open("ab")
        self.process = subprocess.Popen(  # noqa: S603 - our own commands, no shell
            self.args,
            env={**os.environ, **self.env},
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.starts += 1

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while self.port is not None and not _listening(self.port):
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}; see {self.log}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} does not listen on {self.port}; see {self.log}")
            time.sleep(0.05)

    def kill9(self) -> None:
        """SIGKILL: no cleanup, no graceful shutdown — a crash."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._close_log()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._close_log()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def _oncepay(*args: str) -> list[str]:
    return [sys.executable, "-m", "oncepay", *args]


def _uvicorn(app: str, port: int) -> list[str]:
    options = f"--host {HOST} --port {port} --log-level error --timeout-graceful-shutdown 1"
    return [sys.executable, "-m", "uvicorn", app, "--factory", *options.split()]


@dataclass
class ChaosStack:
    workdir: Path
    database_url: str
    redis: bool = False
    proxy_drop_rate: float = 0.0
    seed: int = 1
    settings: dict[str, str] = field(default_factory=dict)  # more ONCEPAY_* for the services
    services: dict[str, Service] = field(default_factory=dict)
    # One lock a service: a restart still running in a thread (the fault loop that asked for it
    # was cancelled when the clients finished, which does not stop the thread) and the calm
    # phase's restart of the same service would otherwise both start it; the one that lost the
    # port race exits, the other keeps the port, and neither ``stop`` nor anything else knows
    # it (seen: an API process left running after a CI run).
    _locks: defaultdict[str, threading.Lock] = field(
        default_factory=lambda: defaultdict(threading.Lock), repr=False
    )
    _stopped: bool = field(default=False, repr=False)

    def build(self) -> None:
        w = self.workdir
        self.metrics_dir.mkdir(exist_ok=True)
        for name in ("primary", "secondary"):
            port = self._free_port()
            database = f"sqlite:///{w / f'acquirer-{name}.db'}"
            args = _oncepay("acquirer", "--port", str(port), "--database-url", database)
            self._add(name, [*args, "--seed", str(self.seed)], {}, port)
        if self.redis:
            binary = shutil.which("redis-server") or "redis-server"
            port = self._free_port()
            args = [binary, "--port", str(port), "--bind", HOST, "--save", ""]
            self._add("redis", [*args, "--appendonly", "no", "--dir", str(w)], {}, port)
        service_env = self.service_env()
        # The API processes run the worker too (the default of `oncepay serve`), beside the
        # dedicated worker: three claimants of every recovery and webhook delivery, which the
        # audit then checks never act twice.
        for name in ("api-1", "api-2"):
            port = self._free_port()
            self._add(name, _oncepay("serve", "--port", str(port)), service_env, port)
        self._add("worker", _oncepay("worker"), service_env, None)
        port = self._free_port()
        self._add(
            "receiver",
            _uvicorn("oncepay.chaos.receiver:create_app", port),
            {"ONCEPAY_RECEIVER_STORE": f"sqlite:///{w / 'receiver.db'}"},
            port,
        )
        port = self._free_port()
        upstreams = ",".join(self.services[n].url for n in ("api-1", "api-2"))
        self._add(
            "proxy",
            _uvicorn("oncepay.chaos.proxy:create_app", port),
            {
                "ONCEPAY_PROXY_UPSTREAMS": upstreams,
                "ONCEPAY_PROXY_DROP_RATE": str(self.proxy_drop_rate),
                "ONCEPAY_PROXY_SEED": str(self.seed),
            },
            port,
        )

    def _free_port(self) -> int:
        """A port nothing listens on and no service of this stack was given: the kernel may
        hand the same free port out twice while the first service has not bound it yet (seen
        in CI: the private Redis and an API process both given one port, the API process
        failing to start)."""
        given = {service.port for service in self.services.values()}
        while (port := free_port()) in given:
            pass
        return port

    def service_env(self) -> dict[str, str]:
        """The settings of the API processes and the worker, tuned so that faults are
        recovered from within seconds rather than minutes."""
        env = {
            "ONCEPAY_DATABASE_URL": self.database_url,
            "ONCEPAY_ACQUIRER_URL": f"http://{HOST}:{self.services['primary'].port}",
            "ONCEPAY_SECONDARY_ACQUIRER_URL": f"http://{HOST}:{self.services['secondary'].port}",
            # An acquirer answers in milliseconds here; a second means it will not.
            "ONCEPAY_ACQUIRER_TIMEOUT": "1",
            "ONCEPAY_ACQUIRER_ATTEMPTS": "2",
            # Outlasts two acquirers' attempts and look-ups (about 8 s at worst)...
            "ONCEPAY_LEASE": "10",
            # ...while an unknown outcome is asked again within seconds.
            "ONCEPAY_RECOVERY_BACKOFF": json.dumps([0.5, 1, 2, 4, 8]),
            "ONCEPAY_WEBHOOK_SCHEDULE": json.dumps([0.5, 1, 2, 4, 8, 16]),
            "ONCEPAY_WEBHOOK_ALLOW_PRIVATE": "true",  # the receiver listens on loopback
            "ONCEPAY_WORKER_INTERVAL": "0.2",
            # One metrics folder for the API processes and the worker: their counters outlive
            # a kill -9, and the run reads them (retry amplification, chaos/amplification.py).
            "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
            **self.settings,
        }
        if self.redis:
            env["ONCEPAY_REDIS_URL"] = f"redis://{HOST}:{self.services['redis'].port}/0"
        return env

    @property
    def metrics_dir(self) -> Path:
        return self.workdir / "metrics"

    def _add(self, name: str, args: list[str], env: dict[str, str], port: int | None) -> None:
        self.services[name] = Service(name, args, env, self.workdir / f"{name}.log", port)

    def start(self) -> None:
        order = ["primary", "secondary", "redis", "receiver", "api-1", "api-2", "worker", "proxy"]
        for name in order:
            if name in self.services:
                self.services[name].start()
        for name in order:
            if name in self.services:
                self.services[name].wait_ready()

    def restart(self, name: str, attempts: int = 5) -> None:
        """Start a killed process again; a start that fails (the database still full of the
        dead process's connections, say) is tried again a few times before giving up."""
        service = self.services[name]
        with self._locks[name]:
            self._restart(service, attempts)

    def _restart(self, service: Service, attempts: int) -> None:
        for attempt in range(attempts):
            if self._stopped or service.alive():
                return
            service.start()
            try:
                service.wait_ready()
                return
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
                time.sleep(1.0)  # let the dead process's connections close

    def stop(self) -> None:
        """Stop every process, waiting for a restart in flight; none starts afterwards."""
        self._stopped = True
        for service in reversed(list(self.services.values())):
            with self._locks[service.name]:
                service.stop()
