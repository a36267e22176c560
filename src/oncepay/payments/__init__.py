"""The payments service: payments as atomic phases over a double-entry ledger, calling
acquirers that are idempotent themselves. ``oncepay serve`` runs it."""
