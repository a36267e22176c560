"""The payments HTTP API (SPEC §5): :func:`~oncepay.payments.api.app.create_app` assembles one
router per resource (``routes/``) with the shared dependencies (``deps.py``), the problem
mapping (``errors.py``) and the ASGI layers (``middleware.py``). Routes hold no SQL: they call
the domain (operations, reads, webhooks.endpoints)."""
