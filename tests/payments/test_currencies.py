"""Currencies (issue 14): each ISO 4217 code with its exponent and amount limit, exposed at
``GET /v1/currencies`` and enforced on every payment with a clear 400. On SQLite and
PostgreSQL."""

from __future__ import annotations

import pytest

from oncepay.payments.currencies import CURRENCIES, ISO_4217, MAX_AMOUNT
from tests.payments.stack import Stack

pytestmark = pytest.mark.slow


def test_exponents_follow_iso_4217() -> None:
    assert set(CURRENCIES) == ISO_4217
    assert {c: CURRENCIES[c].exponent for c in ("JPY", "KRW", "USD", "EUR", "KWD", "BHD")} == {
        "JPY": 0,
        "KRW": 0,
        "USD": 2,
        "EUR": 2,
        "KWD": 3,
        "BHD": 3,
    }
    assert {m.exponent for m in CURRENCIES.values()} == {0, 2, 3}
    assert max(m.max_amount for m in CURRENCIES.values()) == MAX_AMOUNT


def test_limits_differ_by_exponent() -> None:
    # Two- and three-decimal currencies share a ceiling in whole units (999,999.99 and
    # 999,999.999); zero-decimal ones keep Stripe's eight digits.
    assert CURRENCIES["USD"].max_amount == 99_999_999
    assert CURRENCIES["KWD"].max_amount == 999_999_999
    assert CURRENCIES["JPY"].max_amount == 99_999_999


async def test_currencies_are_listed(stack: Stack) -> None:
    response = await stack.client.get("/v1/currencies")
    assert response.status_code == 200
    listed = response.json()
    assert (listed["object"], listed["has_more"], listed["url"]) == (
        "list",
        False,
        "/v1/currencies",
    )
    by_code = {c["code"]: c for c in listed["data"]}
    assert set(by_code) == ISO_4217
    assert by_code["JPY"] == {
        "object": "currency",
        "code": "JPY",
        "exponent": 0,
        "min_amount": 1,
        "max_amount": 99_999_999,
    }
    assert by_code["KWD"]["exponent"] == 3


@pytest.mark.parametrize(
    ("currency", "amount"),
    [("JPY", 99_999_999), ("USD", 99_999_999), ("KWD", 999_999_999), ("bhd", 123_456_789)],
)
async def test_amounts_up_to_the_limit_are_paid(stack: Stack, currency: str, amount: int) -> None:
    response = await stack.pay(currency=currency, amount=amount)
    assert response.status_code == 201, response.text
    assert response.json()["amount"] == amount
    assert response.json()["currency"] == currency.upper()


@pytest.mark.parametrize(
    ("currency", "amount", "limit"),
    [("JPY", 100_000_000, "99999999"), ("USD", 100_000_000, "99999999"),
     ("USD", 1_000_000_000, "99999999"), ("USD", 10**30, "99999999"),
     ("KWD", 1_000_000_000, "999999999")],
)  # fmt: skip
async def test_amounts_over_the_limit_are_400_and_store_nothing(
    stack: Stack, currency: str, amount: int, limit: str
) -> None:
    # Whatever the amount, the message names the currency's own limit (above the largest
    # one it used to be pydantic's "less than or equal to 999999999", even for USD).
    response = await stack.pay(currency=currency, amount=amount)
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert f"amount {amount} is more than {currency} allows: at most {limit} minor units" in detail
    assert await stack.count("payments") == 0


async def test_a_capture_or_refund_over_any_ceiling_says_so(stack: Stack) -> None:
    pid = (await stack.pay(capture_method="manual")).json()["id"]
    for path in ("capture", "refunds"):
        response = await stack.post(f"/v1/payments/{pid}/{path}", {"amount": 10**12})
        assert response.status_code == 400, response.text
        assert response.json()["detail"] == (
            "amount: 1000000000000 is more than any currency allows: at most 999999999 "
            "minor units (see GET /v1/currencies)"
        )


@pytest.mark.parametrize("currency", ["Usd", "XXX", "XAU", "US", "usd "])
async def test_unknown_or_mixed_case_codes_are_400(stack: Stack, currency: str) -> None:
    response = await stack.pay(currency=currency)
    assert response.status_code == 400
    assert "ISO 4217" in response.json()["detail"]
