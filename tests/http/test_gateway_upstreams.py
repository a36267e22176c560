"""Request bodies reach upstreams that read them by ``Content-Length`` (issue 12 #4).

wsgiref, Python's http.server and Django's own server read a body by its length and take a
chunked one for empty. Each runs in its own process behind a real gateway process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.http.test_gateway import body_upstream, gateway

pytestmark = pytest.mark.slow

# Above one receive() message (uvicorn hands a body over as it arrives, 64 KiB at a time) and,
# for the unmanaged case, above the 1 MiB a managed body may have.
MANAGED_SIZE = 300_000
STREAMED_SIZE = 3 * 1024 * 1024


@pytest.fixture(scope="module", params=["wsgiref", "http.server", "django"])
def upstream(request: pytest.FixtureRequest) -> Iterator[str]:
    process, url = body_upstream(request.param)
    with process:
        yield url


def pattern(size: int) -> bytes:
    return bytes(range(256)) * (size // 256) + b"x" * (size % 256)


@pytest.mark.parametrize("size", [15, MANAGED_SIZE])
def test_a_managed_body_goes_upstream_whole_with_its_length(
    upstream: str, tmp_path: Path, size: int
) -> None:
    body = pattern(size)
    process, url = gateway(upstream, f"sqlite:///{tmp_path / 'g.db'}")
    with process, httpx.Client(timeout=30) as client:
        first = client.post(f"{url}/echo", content=body, headers={"idempotency-key": "b"})
        replay = client.post(f"{url}/echo", content=body, headers={"idempotency-key": "b"})
    assert first.json() == {
        "size": size,
        "sha256": hashlib.sha256(body).hexdigest(),
        "content-length": str(size),
        "transfer-encoding": None,
    }
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == first.content  # what was stored is the answer to the whole body


def test_a_streamed_body_keeps_the_clients_length(upstream: str, tmp_path: Path) -> None:
    body = pattern(STREAMED_SIZE)
    process, url = gateway(upstream, f"sqlite:///{tmp_path / 'g.db'}", "--optional-key")
    with process, httpx.Client(timeout=30) as client:
        streamed = client.post(f"{url}/echo", content=body)  # no key: streamed, not read first
    assert streamed.json() == {
        "size": STREAMED_SIZE,
        "sha256": hashlib.sha256(body).hexdigest(),
        "content-length": str(STREAMED_SIZE),
        "transfer-encoding": None,
    }
