"""Report amounts in major units become minor units by the API's own ISO 4217 table."""

from __future__ import annotations

import pytest

from oncepay.payments.currencies import CURRENCIES
from oncepay.reconciliation.money import parse_major, parse_minor


def test_major_units_scale_by_the_api_currency_table() -> None:
    for code, known in CURRENCIES.items():
        assert parse_major("1", code) == 10**known.exponent, code
    assert parse_major("12.50", "EUR") == 1250
    assert parse_major("1250", "JPY") == 1250
    assert parse_major("1.234", "KWD") == 1234
    assert parse_major("-0.5", "USD") == -50
    assert parse_major("1.2", "XTS") == 120  # a code outside the table: ISO's default of 2


@pytest.mark.parametrize(
    ("text", "code"),
    [("12.505", "EUR"), ("1.5", "JPY"), ("1.2345", "KWD"), ("1,50", "EUR"), ("", "EUR")],
)
def test_a_finer_or_malformed_amount_is_an_error_not_a_rounding(text: str, code: str) -> None:
    with pytest.raises(ValueError, match=r"decimal amount|more decimals than"):
        parse_major(text, code)


@pytest.mark.parametrize("text", ["12.5", "1e3", " 12", "", "0x10"])
def test_minor_units_are_integers_only(text: str) -> None:
    with pytest.raises(ValueError, match="not an integer amount in minor units"):
        parse_minor(text)
