"""Remediation where it is safe: an orphaned authorization holds a cardholder's money for a
payment that will never capture it, so it is voided at the acquirer, through the acquirer
client the payments service uses, under a reference derived from the authorization's own.

The acquirer keys every operation by its reference, so the void happens once however many
times it is sent: by a run that dies mid-void and is run again, or by two runs at once. A run
that would void more than ``cap`` authorizations voids none and raises one alert instead: that
many orphans is an incident (a bug, a replayed batch), not routine, and wants a person."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from oncepay.payments.acquirers.base import Acquirer, Outcome
from oncepay.reconciliation.records import Authorization

__all__ = ["DEFAULT_ACTION_CAP", "Remediation", "void_orphans", "void_reference"]

# Orphans are rare (a crash between the acquirer's approval and OncePay's commit, with the
# payment then failed over or abandoned); fifty in one day is already an incident.
DEFAULT_ACTION_CAP = 50


@dataclass(frozen=True, slots=True)
class Remediation:
    voided: tuple[str, ...] = ()  # authorization ids the acquirer voided (now or before)
    failed: tuple[str, ...] = ()  # refused or unanswered: left open for a person
    withheld: bool = False  # over the cap: nothing was done
    alert: str = ""


def void_reference(auth: Authorization) -> str:
    """The void's idempotency key at the acquirer: one per authorization, never a payment's own
    ``{payment}_void`` (that payment may be canceled on its own)."""
    return f"{auth.reference}_orphan_void"


async def void_orphans(
    acquirer: Acquirer, orphans: Sequence[Authorization], *, cap: int = DEFAULT_ACTION_CAP
) -> Remediation:
    if len(orphans) > cap:
        alert = f"{len(orphans)} orphaned authorizations at {acquirer.name}, over the cap of {cap}"
        return Remediation(withheld=True, alert=alert + ": none voided, a person must look")
    voided: list[str] = []
    failed: list[str] = []
    for auth in orphans:
        answer = await acquirer.void(reference=void_reference(auth), authorization_id=auth.id)
        (voided if answer.outcome is Outcome.APPROVED else failed).append(auth.id)
    return Remediation(tuple(voided), tuple(failed))
