"""The simulated acquirer: an HTTP service with its own database, idempotent by reference,
with faults on request. ``oncepay acquirer`` runs it; a payments process with no acquirer URL
embeds it in-process (docs/acquirer.md).

Modules, top to bottom: ``command`` (``oncepay acquirer``) and ``app`` (routes, problems to
answers); the handlers ``money`` (authorize, capture, void, refund), ``references`` (idempotency
by reference, the fencing look-up), ``settlements`` and ``admin``; ``state`` (one simulator's
database, faults, clock); ``faults``, ``bodies``, ``schema``, ``documents``, ``problems``.
"""

from oncepay.simulator.app import DEFAULT_DATABASE_URL, create_app
from oncepay.simulator.faults import ConnectionDropped, Faults
from oncepay.simulator.state import Simulator

__all__ = ["DEFAULT_DATABASE_URL", "ConnectionDropped", "Faults", "Simulator", "create_app"]
