"""The record both store benchmarks claim, complete and replay: one merchant's key, a
fingerprint, and a 200-byte JSON response (the size of a payment)."""

from __future__ import annotations

from oncepay.idempotency.records import StoredResponse

SCOPE = "merchant-bench"
FP = "f" * 64
BODY = b'{"id":"pay_0123456789","status":"succeeded","amount":4200}'.ljust(200, b" ")
RESPONSE = StoredResponse(201, (("content-type", "application/json"),), BODY)
