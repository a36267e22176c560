"""Found by a black-box review with labelled reports the authors had not seen (SPEC §10): ids
that are not payments given as ``payment_id``, impossible days and local times read into
settlement times, the same settlement written another way taken for a second one, and the
simulator's own ``order_id`` column ignored by the built-in mapping. One test a finding, each
failing on the code before."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from oncepay.reconciliation.errors import ReportError
from oncepay.reconciliation.mapping import ADYEN, ONCEPAY
from oncepay.reconciliation.report import count_lines, read_report, report_lines
from oncepay.reconciliation.settlement import _parsed_time
from tests.payments.stack import Stack
from tests.reconciliation.test_cli import reconcile as reconcile_cli
from tests.reconciliation.test_duplicate_across_reports import counts, line, paid, report

HEADER = "reference,type,amount,currency,fee,net,settled_at,payout_id"


def _both_ways(data: bytes) -> list[object]:
    """The lines as both readers give them, and the count: the three must agree."""
    fast = list(report_lines(data))
    assert fast == list(read_report(io.BytesIO(data)))
    assert count_lines(data) == len(fast)
    return list(fast)


@pytest.mark.parametrize(
    "when", ["2026-02-30T10:00:00Z", "2026-04-31T10:00:00Z", "2026-02-29T10:00:00Z", "2100-02-29"]
)
def test_a_day_that_is_not_in_the_calendar_is_refused(when: str) -> None:
    """``2026-02-30`` passed the shape check; the payment was then shown settled at the run's
    time while the settlement row kept the impossible one."""
    data = f"{HEADER}\nr1,capture,100,USD,3,97,{when},po1\n".encode()
    for read in (
        lambda: list(report_lines(data)),
        lambda: list(read_report(io.BytesIO(data))),
        lambda: count_lines(data),
    ):
        with pytest.raises(ReportError, match=r"line 2: settled_at .* is not an ISO 8601 time"):
            read()


def test_a_leap_day_is_a_day() -> None:
    data = f"{HEADER}\nr1,capture,100,USD,3,97,2028-02-29T10:00:00Z,po1\n".encode()
    assert len(_both_ways(data)) == 1


def test_a_time_without_an_offset_is_utc_whatever_the_machines_zone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stripe's ``created_utc`` and the like were read in the machine's local time zone."""
    _parsed_time.cache_clear()
    monkeypatch.setenv("TZ", "America/New_York")
    import time

    time.tzset()
    try:
        assert (
            _parsed_time("2026-12-07 23:30:00")
            == datetime(2026, 12, 7, 23, 30, tzinfo=UTC).timestamp()
        )
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
        _parsed_time.cache_clear()


def test_adyen_times_are_read_in_the_rows_time_zone() -> None:
    """Adyen's ``Creation Date`` is local time in the zone its ``TimeZone`` column names."""
    sample = Path(__file__).parent / "data" / "adyen_settlement_details.csv"
    text = sample.read_text().splitlines()
    header, first = text[0], text[1].replace("2026-12-01 10:00:00,UTC", "2026-12-01 00:30:00,CET")
    found = list(read_report(io.BytesIO(f"{header}\n{first}\n".encode()), ADYEN))
    assert found[0].settled_at == "2026-12-01T00:30:00+01:00"
    assert (
        _parsed_time(found[0].settled_at) == datetime(2026, 11, 30, 23, 30, tzinfo=UTC).timestamp()
    )
    unknown = text[1].replace(",UTC,", ",Mars/Olympus,")
    with pytest.raises(ReportError, match="time zone 'Mars/Olympus'"):
        list(read_report(io.BytesIO(f"{header}\n{unknown}\n".encode()), ADYEN))


def test_the_spec_format_reads_the_simulators_order_id_when_the_header_has_it() -> None:
    with_order = f"{HEADER},order_id\nr1,capture,100,USD,3,97,2026-12-07T10:00:00Z,po1,pay_x\n"
    assert [x.order_id for x in _both_ways(with_order.encode())] == ["pay_x"]  # type: ignore[attr-defined]
    without = f"{HEADER}\nr1,capture,100,USD,3,97,2026-12-07T10:00:00Z,po1\n"
    assert [x.order_id for x in _both_ways(without.encode())] == [""]  # type: ignore[attr-defined]
    assert "order_id" not in ONCEPAY.required()


async def test_an_unknown_line_naming_no_payment_of_ours_has_no_payment_id(
    stack: Stack, tmp_path: Path
) -> None:
    """A line whose order id names no payment at OncePay gave that id as ``payment_id``."""
    known = await paid(stack, 2500)
    file = tmp_path / "r.csv"
    file.write_bytes(
        (
            f"{HEADER},order_id\n"
            f"{line(known, 2500, ('po1', '2026-12-07T10:00:00Z')).rstrip()},\n"
            "stranger_ref,capture,700,USD,0,700,2026-12-07T10:00:00Z,po1,pay_doesnotexist\n"
        ).encode()
    )
    result = reconcile_cli(stack, tmp_path, "--report", str(file), "--grace-days", "0", "--json")
    document = json.loads(result.stdout)
    assert document["matched"] == 1
    [found] = document["discrepancies"]
    assert (found["kind"], found["reference"], found["payment_id"]) == (
        "unknown_at_oncepay",
        "stranger_ref",
        None,
    )
    assert "pay_doesnotexist" in found["detail"]


async def test_the_same_settlement_written_another_way_is_not_a_duplicate(
    stack: Stack, tmp_path: Path
) -> None:
    """A day's report read again with ``Z`` written ``+00:00``, or from a processor's file
    that gives whole seconds, was 24 false ``duplicate_settlement``s: the times were compared
    as text."""
    ids = [await paid(stack, amount) for amount in (1200, 3400)]
    first = tmp_path / "first.csv"
    first.write_bytes(
        report(
            line(ids[0], 1200, ("po_1", "2026-12-07T21:07:41.323Z")),
            line(ids[1], 3400, ("po_1", "2026-12-07T21:07:42Z")),
        )
    )
    args = ("--grace-days", "0", "--json")
    a = reconcile_cli(stack, tmp_path, "--report", str(first), *args)
    assert (a.returncode, json.loads(a.stdout)) == (0, {"matched": 2, "discrepancies": []})
    before = await counts(stack)
    again = tmp_path / "again.csv"
    again.write_bytes(
        report(
            line(ids[0], 1200, ("po_1", "2026-12-07 21:07:41")),  # whole seconds, no offset
            line(ids[1], 3400, ("po_1", "2026-12-07T21:07:42.000+00:00")),
        )
    )
    b = reconcile_cli(stack, tmp_path, "--report", str(again), *args)
    assert (b.returncode, json.loads(b.stdout)) == (0, {"matched": 2, "discrepancies": []})
    assert await counts(stack) == before  # nothing settled twice, nothing opened
    # Another second (or another payout) is still the money paid out twice.
    later = tmp_path / "later.csv"
    later.write_bytes(report(line(ids[0], 1200, ("po_1", "2026-12-07T21:07:43Z"))))
    c = reconcile_cli(stack, tmp_path, "--report", str(later), *args)
    kinds = [d["kind"] for d in json.loads(c.stdout)["discrepancies"]]
    assert (c.returncode, kinds) == (1, ["duplicate_settlement"])


def test_blank_lines_at_the_end_of_a_report_are_passed_over() -> None:
    """A CRLF export ending in a blank line was refused whole ("blank line in the report")."""
    body = f"{HEADER}\r\nr1,capture,100,USD,3,97,2026-12-07T10:00:00Z,po1\r\n"
    assert len(_both_ways(f"{body}\r\n\r\n".encode())) == 1
    between = f"{HEADER}\r\n\r\nr1,capture,100,USD,3,97,2026-12-07T10:00:00Z,po1\r\n"
    with pytest.raises(ReportError, match="line 2: blank line in the report"):
        list(read_report(io.BytesIO(between.encode())))


def test_an_amount_of_too_many_digits_is_named_as_such() -> None:
    data = f"{HEADER}\nr1,capture,10000000000000000000,USD,3,97,2026-12-07T10:00:00Z,po1\n"
    with pytest.raises(ReportError, match="has more than 18 digits"):
        list(report_lines(data.encode()))


def test_a_column_name_in_brackets_is_printed_whole(tmp_path: Path) -> None:
    """``refund_metadata[reference]`` lost its ``[reference]`` to the console's markup."""
    from typer.testing import CliRunner

    from oncepay.cli import app

    file = tmp_path / "stripe.csv"
    file.write_text("balance_transaction_id,created_utc,currency,gross,fee,net\n")
    result = CliRunner().invoke(
        app,
        ["reconcile", "--report", str(file), "--mapping", "stripe"],
        env={"ONCEPAY_DATABASE_URL": f"sqlite:///{tmp_path / 'p.db'}"},
        terminal_width=300,
    )
    assert result.exit_code == 2, result.output
    assert "refund_metadata[reference]" in result.output
    assert "payment_metadata[reference]" in result.output


async def test_an_orphans_refused_void_is_said_in_its_remediation(
    stack: Stack, tmp_path: Path
) -> None:
    """An authorization captured at the acquirer with no payment behind it: the void is
    refused, the discrepancy stays open, and the JSON says so (it read as a done void)."""
    from datetime import UTC, datetime

    from tests.payments.acquirer_helpers import auth_body, key

    sim = stack.simulators["primary"]
    body = auth_body("ghost_cap_1", order_id="ord_ghost", capture=True)
    assert (await sim.post("/v1/authorizations", json=body, headers=key("ghost_cap_1"))).is_success
    today = datetime.now(UTC).date().isoformat()
    result = reconcile_cli(stack, tmp_path, "--date", today, "--grace-days", "0", "--json")
    assert result.returncode == 1, result.stderr  # open: a person must refund it there
    orphans = [
        d
        for d in json.loads(result.stdout)["discrepancies"]
        if d["kind"] == "orphaned_authorization"
    ]
    [orphan] = orphans
    assert orphan["payment_id"] is None
    assert "Refused by the acquirer" in orphan["remediation"]
    assert orphan["remediation"].endswith("the discrepancy stays open for a person.")
    again = reconcile_cli(stack, tmp_path, "--date", today, "--grace-days", "0", "--json")
    assert (again.returncode, again.stdout) == (1, result.stdout)  # a re-run says the same


async def test_a_processors_file_is_read_through_a_mapping_of_ones_own(
    stack: Stack, tmp_path: Path
) -> None:
    """SPEC §10: a file from a real processor is read through a documented column mapping.
    Only the three shipped mappings could be named: another processor's columns could not be
    read without changing code (a review)."""
    paid_id = await paid(stack, 12345)
    refund = await stack.post(f"/v1/payments/{paid_id}/refunds", {"amount": 345})
    assert refund.status_code == 201, refund.text
    file = tmp_path / "checkout.csv"
    refund_id = refund.json()["id"]
    file.write_text(
        "Action Type,Reference,Order,Currency Symbol,Gross,Processing Fee,Net,Posted,Batch\n"
        f"CAPTURE,{paid_id}_a1,{paid_id},usd,123.45,0.00,123.45,2026-12-07 10:00:00,B1\n"
        f"REFUND,{refund_id},{paid_id},usd,-3.45,0.00,-3.45,2026-12-07 11:00:00,B1\n"
        "PAYOUT,,,usd,120.00,0,120.00,2026-12-07 12:00:00,B1\n"
    )
    mapping = tmp_path / "checkout.json"
    mapping.write_text(
        json.dumps(
            {
                "name": "checkout",
                "reference": "Reference",
                "type": "Action Type",
                "types": {"CAPTURE": "capture", "REFUND": "refund"},
                "skipped": ["PAYOUT"],
                "currency": "Currency Symbol",
                "amount": "Gross",
                "fee": "Processing Fee",
                "net": "Net",
                "settled_at": "Posted",
                "payout_id": "Batch",
                "order_id": "Order",
                "units": "major",
                "signed_amounts": True,
            }
        )
    )
    args = ("--report", str(file), "--mapping", str(mapping), "--grace-days", "0", "--json")
    result = reconcile_cli(stack, tmp_path, *args)
    assert (result.returncode, json.loads(result.stdout)) == (
        0,
        {"matched": 2, "discrepancies": []},
    ), result.stderr
    settled = (await stack.client.get(f"/v1/payments/{paid_id}")).json()
    assert (settled["amount_settled"], settled["amount_refund_settled"]) == (12345, 345)

    bad = tmp_path / "bad.json"
    for document, said in (
        ({"reference": "Reference"}, "type: Field required"),
        ({**json.loads(mapping.read_text()), "types": {"CAPTURE": "sale"}}, "types.CAPTURE"),
        ({**json.loads(mapping.read_text()), "colour": "red"}, "colour: Extra inputs"),
        ({**json.loads(mapping.read_text()), "signed_amounts": "yes"}, "signed_amounts:"),
        ([1, 2], "a mapping is a JSON object"),
    ):
        bad.write_text(json.dumps(document))
        refused = reconcile_cli(stack, tmp_path, "--report", str(file), "--mapping", str(bad))
        assert refused.returncode == 2, (document, refused.stdout, refused.stderr)
        assert said in " ".join(refused.stderr.split()), refused.stderr
    missing = reconcile_cli(stack, tmp_path, "--report", str(file), "--mapping", "worldpay")
    assert missing.returncode == 2
    assert "or a JSON file of your own" in " ".join(missing.stderr.split())
