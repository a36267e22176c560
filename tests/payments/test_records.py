"""The typed row views of ``oncepay.payments.records`` match their tables: a renamed, added or
dropped column, or one whose nullability changed, fails here instead of at run time."""

from __future__ import annotations

import pytest
from sqlalchemy import Table

from oncepay.payments.records import PaymentRow, RefundRow
from oncepay.payments.storage.schema import payments, refunds


@pytest.mark.parametrize(("view", "table"), [(PaymentRow, payments), (RefundRow, refunds)])
def test_a_row_view_names_its_tables_columns_with_their_nullability(
    view: type, table: Table
) -> None:
    fields = view.__annotations__
    assert list(fields) == list(table.c.keys())
    optional = {name for name, annotation in fields.items() if annotation.endswith("| None")}
    assert optional == {column.name for column in table.c if column.nullable}
