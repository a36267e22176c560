"""The acquirers a payments process calls, built from its settings: the embedded simulator
(in-process, on its own database) when no URL is set, else one client per configured URL."""

from __future__ import annotations

from oncepay.payments.acquirers.base import Acquirer
from oncepay.payments.routing import AcquirerSet
from oncepay.payments.settings import Settings

__all__ = ["build_acquirers"]


async def build_acquirers(settings: Settings) -> AcquirerSet:
    from oncepay.payments.acquirers.http import HttpAcquirer

    timeout, attempts = settings.acquirer_timeout, settings.acquirer_attempts
    found: list[Acquirer] = []
    if settings.acquirer_url is None:
        from oncepay.payments.acquirers.simulator import create_app

        app = create_app(settings.acquirer_database_url)
        found.append(HttpAcquirer("primary", app=app, timeout=timeout, attempts=attempts))
    else:
        found.append(
            HttpAcquirer("primary", settings.acquirer_url, timeout=timeout, attempts=attempts)
        )
    if settings.secondary_acquirer_url:
        url = settings.secondary_acquirer_url
        found.append(HttpAcquirer("secondary", url, timeout=timeout, attempts=attempts))
    return AcquirerSet(found)
