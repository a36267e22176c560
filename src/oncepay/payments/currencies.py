"""ISO 4217 currency codes a card can be charged in (the standard's list one, as of its 2025
amendments), without the codes that are not money one pays with: precious metals (XAU, XAG,
XPD, XPT), the testing and no-currency codes (XTS, XXX), bond-market units (XBA-XBD), special
drawing rights and settlement units (XDR, XSU, XUA) and the fund codes (BOV, CHE, CHW, CLF,
COU, MXV, USN, UYI, UYW).

Each code has its **exponent** (ISO 4217's "minor unit": JPY 0, USD 2, KWD 3): an amount is an
integer count of minor units, so 1000 is ¥1000, $10.00 or 1.000 KWD. And each has a **limit**
in minor units, by exponent: eight digits (99,999,999) for zero- and two-decimal currencies
(Stripe's ceiling for one charge: above it a number is far more likely a bug, cents sent as
micro-units, than a payment), nine (999,999,999) for three-decimal ones, so that their ceiling
in whole units (999,999.999) is the two-decimal currencies' (999,999.99).

Kept here rather than taken from a package: it is one frozen table, changes a few times a
decade, and a payments API must not accept a code just because a library version is old or new."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CURRENCIES", "ISO_4217", "MAX_AMOUNT", "Currency", "currency", "exponent"]

# Every other code of the list has two decimals.
_ZERO_DECIMAL = frozenset(
    {
        "BIF",
        "CLP",
        "DJF",
        "GNF",
        "ISK",
        "JPY",
        "KMF",
        "KRW",
        "PYG",
        "RWF",
        "UGX",
        "VND",
        "VUV",
        "XAF",
        "XOF",
        "XPF",
    }
)
_THREE_DECIMAL = frozenset(
    {
        "BHD",
        "IQD",
        "JOD",
        "KWD",
        "LYD",
        "OMR",
        "TND",
    }
)

ISO_4217: frozenset[str] = frozenset(
    {
        "AED",
        "AFN",
        "ALL",
        "AMD",
        "ANG",
        "AOA",
        "ARS",
        "AUD",
        "AWG",
        "AZN",
        "BAM",
        "BBD",
        "BDT",
        "BGN",
        "BHD",
        "BIF",
        "BMD",
        "BND",
        "BOB",
        "BRL",
        "BSD",
        "BTN",
        "BWP",
        "BYN",
        "BZD",
        "CAD",
        "CDF",
        "CHF",
        "CLP",
        "CNY",
        "COP",
        "CRC",
        "CUP",
        "CVE",
        "CZK",
        "DJF",
        "DKK",
        "DOP",
        "DZD",
        "EGP",
        "ERN",
        "ETB",
        "EUR",
        "FJD",
        "FKP",
        "GBP",
        "GEL",
        "GHS",
        "GIP",
        "GMD",
        "GNF",
        "GTQ",
        "GYD",
        "HKD",
        "HNL",
        "HTG",
        "HUF",
        "IDR",
        "ILS",
        "INR",
        "IQD",
        "IRR",
        "ISK",
        "JMD",
        "JOD",
        "JPY",
        "KES",
        "KGS",
        "KHR",
        "KMF",
        "KPW",
        "KRW",
        "KWD",
        "KYD",
        "KZT",
        "LAK",
        "LBP",
        "LKR",
        "LRD",
        "LSL",
        "LYD",
        "MAD",
        "MDL",
        "MGA",
        "MKD",
        "MMK",
        "MNT",
        "MOP",
        "MRU",
        "MUR",
        "MVR",
        "MWK",
        "MXN",
        "MYR",
        "MZN",
        "NAD",
        "NGN",
        "NIO",
        "NOK",
        "NPR",
        "NZD",
        "OMR",
        "PAB",
        "PEN",
        "PGK",
        "PHP",
        "PKR",
        "PLN",
        "PYG",
        "QAR",
        "RON",
        "RSD",
        "RUB",
        "RWF",
        "SAR",
        "SBD",
        "SCR",
        "SDG",
        "SEK",
        "SGD",
        "SHP",
        "SLE",
        "SOS",
        "SRD",
        "SSP",
        "STN",
        "SVC",
        "SYP",
        "SZL",
        "THB",
        "TJS",
        "TMT",
        "TND",
        "TOP",
        "TRY",
        "TTD",
        "TWD",
        "TZS",
        "UAH",
        "UGX",
        "USD",
        "UYU",
        "UZS",
        "VED",
        "VES",
        "VND",
        "VUV",
        "WST",
        "XAF",
        "XCD",
        "XCG",
        "XOF",
        "XPF",
        "YER",
        "ZAR",
        "ZMW",
        "ZWG",
    }
)


# The limit in minor units, by exponent (see the module docstring for why these).
_LIMITS = {0: 99_999_999, 2: 99_999_999, 3: 999_999_999}
MAX_AMOUNT = max(_LIMITS.values())  # the largest amount any currency takes


@dataclass(frozen=True, slots=True)
class Currency:
    """One currency as the API knows it (``GET /v1/currencies``)."""

    code: str
    exponent: int  # digits after the decimal point: minor units per major unit = 10**exponent
    max_amount: int  # in minor units

    def public(self) -> dict[str, object]:
        return {
            "object": "currency",
            "code": self.code,
            "exponent": self.exponent,
            "min_amount": 1,
            "max_amount": self.max_amount,
        }


def exponent(code: str) -> int:
    """The ISO 4217 exponent of ``code``: 0 or 3 where the standard says so, 2 for any other
    code (also one this table leaves out, as a settlement report may carry)."""
    return 0 if code in _ZERO_DECIMAL else 3 if code in _THREE_DECIMAL else 2


CURRENCIES: dict[str, Currency] = {
    code: Currency(code, exponent(code), _LIMITS[exponent(code)]) for code in sorted(ISO_4217)
}


def currency(code: str) -> Currency:
    """The currency of an upper-case ISO 4217 ``code`` (KeyError for any other)."""
    return CURRENCIES[code]
