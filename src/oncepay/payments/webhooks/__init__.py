"""Webhooks (SPEC §6), in three parts:

* :mod:`.outbox` — the fan-out of an event into deliveries, inside the event's transaction;
* :mod:`.delivery` — the worker that sends them, at least once, signed;
* :mod:`.addresses` — the guard that keeps them to public addresses (SSRF);

and :mod:`.endpoints`, the merchant's endpoints as the API changes them.
"""
