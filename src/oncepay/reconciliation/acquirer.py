"""The acquirer's side of a reconciliation, over HTTP: its settlement report of a UTC day (the
SPEC CSV) and the authorizations it made that day, from the simulated acquirer's
``GET /v1/settlements`` and ``GET /v1/settlements/authorizations`` (docs/acquirer.md)."""

from __future__ import annotations

from datetime import date
from typing import Any

import httpx

from oncepay.errors import ConfigurationError, RetryableError
from oncepay.payments.acquirers.base import Acquirer
from oncepay.payments.acquirers.http import HttpAcquirer
from oncepay.reconciliation.records import Authorization

__all__ = ["AcquirerReports", "AcquirerUnavailable"]

# A day's report is one query on the acquirer's side; a minute covers a very large day.
REPORT_TIMEOUT = 60.0


class AcquirerUnavailable(RetryableError):
    code = "acquirer_unavailable"
    title = "The acquirer's report could not be fetched"


class AcquirerReports:
    """Reports of the acquirer ``name`` (as payments record it: primary, secondary) through
    ``client``, whose base URL is the acquirer's."""

    def __init__(self, name: str, client: httpx.AsyncClient, *, owned: bool = True) -> None:
        self.name, self.client, self.owned = name, client, owned

    @classmethod
    def of(cls, acquirer: Acquirer) -> AcquirerReports:
        """The reports of an acquirer the payments service already speaks to, over its own
        client (same address, same transport: the embedded simulator included)."""
        if not isinstance(acquirer, HttpAcquirer):
            raise ConfigurationError(f"acquirer {acquirer.name!r} serves no settlement reports")
        return cls(acquirer.name, acquirer._client, owned=False)

    @classmethod
    def at(cls, name: str, url: str) -> AcquirerReports:
        return cls(name, httpx.AsyncClient(base_url=url, timeout=REPORT_TIMEOUT))

    @classmethod
    def serving(cls, name: str, app: Any) -> AcquirerReports:
        """The in-process simulator (``oncepay serve`` with no acquirer URL embeds one)."""
        transport = httpx.ASGITransport(app=app)
        return cls(name, httpx.AsyncClient(base_url="http://acquirer", transport=transport))

    async def settlement_csv(self, day: date) -> bytes:
        return (await self._get("/v1/settlements", day, "csv")).content

    async def authorizations(self, day: date, *, voided: bool = False) -> list[Authorization]:
        """The day's approved authorizations that were not voided (what may still hold money),
        and with ``voided`` the voided ones too, marked."""
        rows = (await self._get("/v1/settlements/authorizations", day, "json")).json()
        return [
            Authorization(
                a["id"], a["reference"], a["order_id"], a["amount"], a["currency"], a["voided"]
            )
            for a in rows["authorizations"]
            if a["status"] == "approved" and (voided or not a["voided"])
        ]

    async def _get(self, path: str, day: date, fmt: str) -> httpx.Response:
        params = {"date": day.isoformat(), "format": fmt}
        try:
            response = await self.client.get(path, params=params, timeout=REPORT_TIMEOUT)
        except httpx.HTTPError as exc:
            raise AcquirerUnavailable(f"{self.name}: {path} failed: {exc!r}") from exc
        if response.status_code != 200:
            detail = f"{self.name}: {path} answered {response.status_code}: {response.text[:200]}"
            raise AcquirerUnavailable(detail)
        return response

    async def aclose(self) -> None:
        if self.owned:
            await self.client.aclose()
