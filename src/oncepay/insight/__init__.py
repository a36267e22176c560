"""Insight: how clients use their idempotency keys (SPEC §9)."""
