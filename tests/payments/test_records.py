"""The typed row views of ``oncepay.payments.records`` match their tables: a renamed, added or
dropped column, or one whose nullability changed, fails here instead of at run time."""

from __future__ import annotations

import pytest
from sqlalchemy import Table

from oncepay.payments.records import (
    AttemptRow,
    DeliveryRow,
    EndpointRow,
    EventRow,
    PaymentRow,
    RefundRow,
)
from oncepay.payments.storage.schema import (
    events,
    payments,
    refunds,
    webhook_attempts,
    webhook_deliveries,
    webhook_endpoints,
)

VIEWS = [
    (PaymentRow, payments),
    (RefundRow, refunds),
    (EventRow, events),
    (EndpointRow, webhook_endpoints),
    (DeliveryRow, webhook_deliveries),
    (AttemptRow, webhook_attempts),
]


@pytest.mark.parametrize(("view", "table"), VIEWS)
def test_a_row_view_names_its_tables_columns_with_their_nullability(
    view: type, table: Table
) -> None:
    fields = view.__annotations__
    assert list(fields) == list(table.c.keys())
    optional = {name for name, annotation in fields.items() if annotation.endswith("| None")}
    assert optional == {column.name for column in table.c if column.nullable}
