"""Typed records the service passes between its layers."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Merchant"]


@dataclass(frozen=True, slots=True)
class Merchant:
    id: str
    name: str
