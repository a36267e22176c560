"""The payments service's answer to an HTTP request, as sent and as stored for replay under
its Idempotency-Key. The phases and operations produce one; the API sends it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from oncepay._jsontext import encoder
from oncepay.errors import OncePayError
from oncepay.http.problems import problem_for
from oncepay.idempotency.records import StoredResponse

__all__ = ["JSON", "Reply"]

JSON = (("content-type", "application/json"),)
# json.dumps(document, separators=(",", ":")) with its encoder built once, not per call.
_compact = encoder()


@dataclass(frozen=True, slots=True)
class Reply:
    """An HTTP answer, as sent and as stored for replay."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = JSON
    completed: bool = False  # stored under the key: a retry replays it
    # The idempotency decision behind it (SPEC §9's names), for the access log; never stored.
    decision: str | None = None

    @classmethod
    def json(cls, status: int, document: dict[str, Any]) -> Reply:
        return cls(status, _compact(document).encode())

    # json.dumps(document, separators=(",", ":")), the encoding of every JSON answer.
    compact = staticmethod(_compact)

    @classmethod
    def problem(cls, error: OncePayError) -> Reply:
        problem = problem_for(error)
        return cls(problem.status, problem.body, tuple(problem.headers))

    def stored(self) -> StoredResponse:
        kept = tuple((k, v) for k, v in self.headers if k != "retry-after")
        return StoredResponse(self.status, kept, self.body)
