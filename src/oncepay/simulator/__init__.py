"""The simulated acquirer: an HTTP service with its own database, idempotent by reference,
with faults on request. ``oncepay acquirer`` runs it; a payments process with no acquirer URL
embeds it (docs/acquirer.md)."""

from oncepay.simulator.app import (
    DEFAULT_DATABASE_URL,
    ConnectionDropped,
    Faults,
    Simulator,
    create_app,
)

__all__ = ["DEFAULT_DATABASE_URL", "ConnectionDropped", "Faults", "Simulator", "create_app"]
