"""Column mappings: how a processor's settlement report names the fields OncePay matches on.

A mapping is data. Each field names the report's column (several columns for a field summed
from parts, e.g. Adyen's credit less debit); amounts are minor units (``units="minor"``) or
major units converted with the currency's exponent; ``types`` translates the processor's row
type, ``skipped`` lists the row types that are not movements (a payout, a fee adjustment), and
any other type is an error, never a guess.
Three ship: ``oncepay`` (SPEC §10, the simulator's report), ``adyen`` (Adyen's Settlement
details report) and ``stripe`` (Stripe's itemized balance-change report). See
``docs/reconciliation.md`` for each column."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    ValidationError,
)

__all__ = ["ADYEN", "MAPPINGS", "ONCEPAY", "STRIPE", "ColumnMapping", "mapping_from_json"]


@dataclass(frozen=True, slots=True)
class ColumnMapping:
    name: str
    reference: tuple[str, ...]  # the first non-blank of these columns
    type: str
    types: Mapping[str, str]  # the report's type -> capture|refund
    currency: str
    amount: tuple[str, ...]  # summed; minus columns subtracted
    fee: tuple[str, ...]
    net: tuple[str, ...]
    settled_at: str
    payout_id: str
    amount_minus: tuple[str, ...] = ()
    net_minus: tuple[str, ...] = ()
    units: str = "minor"  # minor|major
    signed_amounts: bool = False  # a refund's amount is written negative
    order_id: str = ""  # a column holding OncePay's payment id, for the residual join
    # Columns the header may leave out (read when present): the SPEC's format does not
    # require ``order_id``, which the simulator's report carries.
    optional: frozenset[str] = frozenset()
    # A column naming the time zone of a settlement time written without an offset (Adyen's
    # ``TimeZone``); without one, such a time is UTC.
    time_zone: str = ""
    # Row types that are not a payment's movement (payouts, fees, adjustments): skipped. A
    # type neither mapped nor skipped is an error, so a typo is never a silently lost line.
    skipped: frozenset[str] = frozenset()
    extra: Mapping[str, str] = field(default_factory=dict)  # documentation only

    def required(self) -> frozenset[str]:
        """Every column the header must have."""
        named = (self.type, self.currency, self.settled_at, self.payout_id, self.order_id)
        groups = (
            self.reference,
            self.amount,
            self.amount_minus,
            self.fee,
            self.net,
            self.net_minus,
        )
        every = (*named, *(c for g in groups for c in g))
        return frozenset(c for c in every if c and c not in self.optional)

    def zone_column(self, header: Sequence[str]) -> str:
        """The column of the settlement time's zone in ``header``, or "" (times are UTC)."""
        return self.time_zone if self.time_zone in header else ""

    def order_column(self, header: Sequence[str]) -> str:
        """The column of OncePay's payment id in ``header``, or "" (none: no residual join)."""
        return self.order_id if self.order_id in header else ""


ONCEPAY = ColumnMapping(
    name="oncepay",
    reference=("reference",),
    type="type",
    types={"capture": "capture", "refund": "refund"},
    currency="currency",
    amount=("amount",),
    fee=("fee",),
    net=("net",),
    settled_at="settled_at",
    payout_id="payout_id",
    order_id="order_id",
    optional=frozenset({"order_id"}),
)

# Adyen, Settlement details report (docs.adyen.com/reporting/settlement-detail-report): one
# row per booking; amounts in major units; captures credit the gross, refunds debit it. The
# merchant reference of a modification is the one OncePay sends with a capture or a refund;
# the payment's own merchant reference (OncePay's payment id) is the fallback.
ADYEN = ColumnMapping(
    name="adyen",
    reference=("Modification Merchant Reference", "Merchant Reference"),
    type="Type",
    types={"Settled": "capture", "Refunded": "refund"},
    currency="Gross Currency",
    amount=("Gross Credit (GC)",),
    amount_minus=("Gross Debit (GC)",),
    fee=("Commission (NC)", "Markup (NC)", "Scheme Fees (NC)", "Interchange (NC)"),
    net=("Net Credit (NC)",),
    net_minus=("Net Debit (NC)",),
    settled_at="Creation Date",
    payout_id="Batch Number",
    units="major",
    signed_amounts=True,
    order_id="Merchant Reference",
    time_zone="TimeZone",  # Creation Date is local time in this zone (e.g. CET)
    # Adyen's other journal types (docs: "Settlement details report", Type column).
    skipped=frozenset(
        {
            "Fee",
            "MerchantPayout",
            "DepositCorrection",
            "InvoiceDeduction",
            "Balancetransfer",
            "Chargeback",
            "ChargebackReversed",
            "RefundedReversed",
            "SecondChargeback",
            "PaymentCost",
            "MiscCosts",
            "ReserveAdjustment",
            "SettleReversed",
        }
    ),
)

# Stripe, itemized balance-change report (docs.stripe.com/reports/report-types/balance): one
# row per balance transaction, amounts in major units, refunds negative; OncePay's reference
# travels as metadata (payment_metadata[reference] on charges, refund_metadata[reference] on
# refunds).
STRIPE = ColumnMapping(
    name="stripe",
    reference=("refund_metadata[reference]", "payment_metadata[reference]"),
    type="reporting_category",
    types={"charge": "capture", "refund": "refund"},
    currency="currency",
    amount=("gross",),
    fee=("fee",),
    net=("net",),
    settled_at="created_utc",
    payout_id="automatic_payout_id",
    units="major",
    signed_amounts=True,
    order_id="payment_metadata[payment_id]",
    # Stripe's other reporting categories (docs: "Reporting categories").
    skipped=frozenset(
        {
            "fee",
            "payout",
            "payout_reversal",
            "dispute",
            "dispute_reversal",
            "refund_failure",
            "other_adjustment",
            "transfer",
            "transfer_reversal",
            "tax",
            "platform_earning",
            "connect_reserved_funds",
            "risk_reserved_funds",
            "network_cost",
            "topup",
            "topup_reversal",
            "charge_failure",
            "partial_capture_reversal",
        }
    ),
)

MAPPINGS: Mapping[str, ColumnMapping] = {m.name: m for m in (ONCEPAY, ADYEN, STRIPE)}


# A mapping of one's own, as JSON (``oncepay reconcile --report FILE --mapping MAPPING.json``):
# ColumnMapping's fields; a field of several columns also takes one column name as a string.
def _one_or_many(value: object) -> object:
    return [value] if isinstance(value, str) else value


_Column = Annotated[str, StringConstraints(min_length=1)]
_Columns = Annotated[tuple[_Column, ...], BeforeValidator(_one_or_many), Field(min_length=1)]
_MoreColumns = Annotated[tuple[_Column, ...], BeforeValidator(_one_or_many)]


class _MappingFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: _Column = "custom"
    reference: _Columns
    type: _Column
    types: Annotated[dict[str, Literal["capture", "refund"]], Field(min_length=1)]
    currency: _Column
    amount: _Columns
    amount_minus: _MoreColumns = ()
    fee: _Columns
    net: _Columns
    net_minus: _MoreColumns = ()
    settled_at: _Column
    payout_id: _Column
    units: Literal["minor", "major"] = "minor"
    signed_amounts: StrictBool = False
    order_id: str = ""
    time_zone: str = ""
    skipped: frozenset[str] = frozenset()
    optional: frozenset[str] = frozenset()


def mapping_from_json(document: object) -> ColumnMapping:
    """A :class:`ColumnMapping` from a JSON document (docs/reconciliation.md, "A mapping of
    your own"); ``ValueError`` saying, field by field, what is wrong with it."""
    try:
        found = _MappingFile.model_validate(document)
    except ValidationError as exc:
        said = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
            if e["loc"]
            else "a mapping is a JSON object of the fields below"
            for e in exc.errors(include_url=False)
        )
        raise ValueError(said) from None
    return ColumnMapping(**found.model_dump())
