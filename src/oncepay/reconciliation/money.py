"""Amounts as integers in minor units, parsed from text exactly: never a float, never a
silent zero. Reports from real processors write major units ("12.50"); the currency's ISO 4217
exponent (the one table, in ``payments.currencies``) turns them into minor units, and a
fraction finer than the currency allows is an error rather than a rounding."""

from __future__ import annotations

import re

from oncepay.payments.currencies import exponent

__all__ = ["parse_major", "parse_minor"]

_MINOR = re.compile(r"^-?\d{1,18}$")
_SCALE = (1, 10, 100, 1000)  # 10**exponent, typed int
_MAJOR = re.compile(r"^(-?)(\d{1,18})(?:\.(\d{1,4}))?$")


def parse_minor(text: str) -> int:
    """``"1250"`` -> 1250; anything else raises ``ValueError``."""
    if not _MINOR.match(text):
        if text.lstrip("-").isdigit():
            raise ValueError(f"{text!r} has more than 18 digits: no amount is that large")
        raise ValueError(f"{text!r} is not an integer amount in minor units")
    return int(text)


def parse_major(text: str, currency: str) -> int:
    """``"12.50"`` in EUR -> 1250; ``"12.505"`` in EUR raises ``ValueError``."""
    found = _MAJOR.match(text)
    if found is None:
        raise ValueError(f"{text!r} is not a decimal amount")
    sign, whole, fraction = found.group(1), found.group(2), found.group(3) or ""
    places = exponent(currency)
    if len(fraction.rstrip("0")) > places:
        raise ValueError(f"{text!r} has more decimals than {currency} allows ({places})")
    minor = int(whole) * _SCALE[places] + int((fraction + "0" * places)[:places] or "0")
    return -minor if sign == "-" else minor
