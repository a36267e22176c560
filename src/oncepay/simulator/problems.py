"""Problems: how the simulated acquirer says no (``application/problem+json``), and the
exception that carries a problem out of a handler to the app's one exception handler."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse, Response

__all__ = ["PROBLEM", "Problem", "problem"]

PROBLEM = "application/problem+json"


class Problem(Exception):
    """Answer ``status`` with a problem document; nothing of the request is committed."""

    def __init__(self, status: int, code: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.extra = status, code, detail, extra


def problem(status: int, code: str, detail: str, **extra: Any) -> Response:
    document = {"type": f"urn:oncepay:problem:{code}", "status": status, "code": code}
    document |= {"detail": detail, **extra}
    return JSONResponse(document, status, media_type=PROBLEM)
