"""The payments service: payments as atomic phases over a double-entry ledger, calling
acquirers that are idempotent themselves. ``oncepay serve`` runs it.

Bottom to top (nothing imports upward; ``tests/test_import_graph.py``): records and settings;
``storage/``; ``acquirers/`` (clients); ``context`` (the fields every layer takes as ``svc``);
reads, merchants, ``webhooks/``, ledger and events; ``phases`` and ``failover``;
``operations/``; ``idempotent``; ``recovery``; ``bootstrap`` (start-up); ``api/``."""
