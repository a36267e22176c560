"""Redis servers of our own: a throw-away Redis Cluster, or one private standalone node.

The shared server on 6379 is busy with other work (benchmarks flush its script cache and run
EVALSHA by the hundred thousand), so tests that must count commands, and every cluster test,
run against ``redis-server`` processes started here on spare ports, in a temporary folder
removed on exit. Nothing is slept for: each step polls the condition it waits for.

    with running_cluster(masters=3) as url:   # redis+cluster://127.0.0.1:<seed port>
        ...
    with running_server() as url:             # redis://127.0.0.1:<port>/0
        ...
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path

import redis

__all__ = ["running_cluster", "running_server"]

# Redis Cluster nodes talk to each other on the client port + 10000 (the cluster bus), so a
# node needs both ports free, and the bus port must stay below 65536.
CLUSTER_BUS_OFFSET = 10000
HIGHEST_PORT = 65535
# A node that has not answered PING within this long will not: redis-server starts in a few ms.
NODE_START_TIMEOUT = 10.0
# Forming a cluster takes a few gossip rounds (about 100 ms each); 30 s covers a loaded CI box.
CLUSTER_FORM_TIMEOUT = 30.0
# How long to let a node shut down on SIGTERM before killing it; it saves nothing, so it is quick.
NODE_STOP_TIMEOUT = 5.0
# How often a waiting step re-checks its condition: cheap local round trips.
POLL_INTERVAL = 0.02
# Ports taken by someone else between our check and the node's bind make the node exit at once;
# we then retry with fresh ports, this many times.
PORT_ATTEMPTS = 20


@contextmanager
def running_cluster(masters: int = 3) -> Iterator[str]:
    """A Redis Cluster of ``masters`` primaries and no replicas; yields its seed URL."""
    with _scratch_dir() as folder, ExitStack() as nodes:
        ports = [nodes.enter_context(_node(folder, cluster=True)) for _ in range(masters)]
        _create_cluster(ports)
        _wait_until(lambda: all(_cluster_ok(port) for port in ports), CLUSTER_FORM_TIMEOUT)
        yield f"redis+cluster://127.0.0.1:{ports[0]}"


@contextmanager
def running_server() -> Iterator[str]:
    """One private standalone Redis; yields its URL."""
    with _scratch_dir() as folder, _node(folder, cluster=False) as port:
        yield f"redis://127.0.0.1:{port}/0"


@contextmanager
def _scratch_dir() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="oncepay-redis-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def _node(folder: Path, *, cluster: bool) -> Iterator[int]:
    """Start one ``redis-server`` on spare ports; yield its port once it answers PING."""
    for _ in range(PORT_ATTEMPTS):
        port = _spare_port(cluster=cluster)
        process = subprocess.Popen(
            _server_command(folder, port, cluster=cluster),
            cwd=folder,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_until(partial(_answers_or_exited, process, port), NODE_START_TIMEOUT)
            if process.poll() is None:
                yield port
                return
        finally:
            _stop(process)
    raise RuntimeError(f"could not start redis-server in {PORT_ATTEMPTS} attempts")


def _server_command(folder: Path, port: int, *, cluster: bool) -> list[str]:
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)]
    command += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
    command += ["--logfile", str(folder / f"{port}.log")]
    if cluster:
        config = str(folder / f"nodes-{port}.conf")
        command += ["--cluster-enabled", "yes", "--cluster-config-file", config]
    return command


def _spare_port(*, cluster: bool) -> int:
    """A port nobody listens on (and, for a cluster node, whose bus port is free too)."""
    while True:
        port = _free_port(0)
        if not cluster:
            return port
        bus = port + CLUSTER_BUS_OFFSET
        if bus <= HIGHEST_PORT and _free_port(bus) == bus:
            return port


def _free_port(port: int) -> int:
    """Bind ``port`` (0: any) on loopback and return the port bound, or -1 if it is taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return -1
        bound: int = sock.getsockname()[1]
        return bound


def _create_cluster(ports: list[int]) -> None:
    addresses = [f"127.0.0.1:{port}" for port in ports]
    subprocess.run(
        [
            "redis-cli",
            "--cluster",
            "create",
            *addresses,
            "--cluster-replicas",
            "0",
            "--cluster-yes",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=CLUSTER_FORM_TIMEOUT,
    )


def _answers_or_exited(process: subprocess.Popen[bytes], port: int) -> bool:
    return process.poll() is not None or _answers(port)


def _answers(port: int) -> bool:
    try:
        with redis.Redis(port=port, socket_timeout=1) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


def _cluster_ok(port: int) -> bool:
    with redis.Redis(port=port, socket_timeout=1) as client:
        info = client.execute_command("CLUSTER INFO")  # redis-py parses it into a dict
    return bool(info.get("cluster_state") == "ok")


def _wait_until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        time.sleep(POLL_INTERVAL)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(NODE_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
