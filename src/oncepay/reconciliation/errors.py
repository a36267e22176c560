"""What reconciliation refuses: a settlement report it cannot read as a whole.

A report that is not UTF-8, is empty, lacks a mapped column, has a blank line or a cell that
is not money is refused before anything is matched, naming the line and the column; it is
never read as a zero. The error is a :class:`~oncepay.errors.ClientError`: the file has to be
fixed (or the right mapping chosen), trying again changes nothing."""

from __future__ import annotations

from oncepay.errors import ClientError

__all__ = ["ReportError"]


class ReportError(ClientError):
    """The settlement report cannot be read; ``detail`` says where and why."""

    status = 422
    code = "invalid_settlement_report"
    title = "Invalid settlement report"
