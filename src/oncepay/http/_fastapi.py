"""The FastAPI dependency for transactional completion; imported on first use, so that the
middleware needs no FastAPI."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from oncepay.http.transaction import RequestTicket, request_ticket

__all__ = ["RequestTicketDep"]


def _ticket(request: Request) -> RequestTicket | None:
    return request_ticket(request)


# ``ticket: RequestTicketDep`` in an endpoint's parameters: the request's ticket, or None when
# the middleware does not manage the request.
RequestTicketDep = Annotated[RequestTicket | None, Depends(_ticket)]
