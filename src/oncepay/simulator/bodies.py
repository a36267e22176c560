"""Request bodies of the simulated acquirer, and the fingerprint that tells a retry from a
different request under the same reference."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from starlette.requests import Request

from oncepay._jsontext import encoder
from oncepay.simulator.problems import Problem

__all__ = [
    "AmountBody",
    "AuthorizeBody",
    "LookupBody",
    "VoidBody",
    "explain",
    "parse",
    "parse_payload",
]

KEY_HEADER = "idempotency-key"
# Our bodies are a few hundred bytes; 64 KiB refuses garbage before it is parsed.
MAX_BODY = 64 * 1024
# Far above any real card payment in minor units, far below BIGINT: no overflow, ever.
MAX_AMOUNT = 10**12

Reference = Annotated[
    str, StringConstraints(min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$")
]
Amount = Annotated[int, Field(gt=0, le=MAX_AMOUNT)]
Currency = Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class AuthorizeBody(_Body):
    reference: Reference
    order_id: Reference | None = None  # the payment; defaults to the reference
    amount: Amount
    currency: Currency
    payment_method: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    capture: bool = False


class AmountBody(_Body):
    reference: Reference
    amount: Amount


class VoidBody(_Body):
    reference: Reference


LookupBody = VoidBody
B = TypeVar("B", bound=_Body)


async def parse(request: Request, model: type[B]) -> tuple[B, str]:
    """The validated body and its fingerprint (canonical JSON of path and body)."""
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise Problem(413, "request_too_large", f"bodies are at most {MAX_BODY} bytes")
    try:
        body = model.model_validate_json(raw)
    except ValidationError as exc:
        raise Problem(400, "invalid_request", explain(exc)) from None
    return body, _checked(body, request.url.path, json.loads(raw), request.headers.get(KEY_HEADER))


def parse_payload(path: str, payload: dict[str, Any], model: type[B], key: str) -> tuple[B, str]:
    """:func:`parse` for a body handed over as a dict (the simulator called as a function):
    the same checks, and the same fingerprint as the JSON of ``payload`` sent to ``path``."""
    try:
        body = model.model_validate(payload)
    except ValidationError as exc:
        raise Problem(400, "invalid_request", explain(exc)) from None
    return body, _checked(body, path, payload, key)


# json.dumps(value, sort_keys=True, separators=(",", ":")) with its encoder built once.
_canonical = encoder(sort_keys=True)


def _checked(body: _Body, path: str, document: Any, header: str | None) -> str:
    """The fingerprint of a valid body, once its reference matches the key it came with."""
    reference = getattr(body, "reference", None)
    if header is not None and header != reference:
        raise Problem(400, "reference_mismatch", "Idempotency-Key must equal the reference")
    canonical = _canonical([path, document])
    return hashlib.sha256(canonical.encode()).hexdigest()


def explain(exc: ValidationError) -> str:
    error = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in error["loc"]) or "body"
    return f"{where}: {error['msg']}"
