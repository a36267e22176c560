"""``oncepay reconcile`` as a user runs it, in its own process: the SPEC's JSON document, exit
1 while discrepancies remain open and 0 when none (an orphan it voided is resolved), 2 for a
report it cannot read; on the payments
database and the embedded simulator's (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from tests.payments.acquirer_helpers import auth_body, key
from tests.payments.stack import Stack
from tests.processes import oncepay_args


def reconcile(
    stack: Stack, tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "ONCEPAY_DATABASE_URL": stack.services.settings.database_url,
        # the stack's primary simulator: reconcile embeds it on this database, as serve would
        "ONCEPAY_ACQUIRER_DATABASE_URL": f"sqlite:///{tmp_path / 'acquirer-primary.db'}",
        **(env or {}),
    }
    env.pop("ONCEPAY_ACQUIRER_URL", None)
    command = oncepay_args("reconcile", *args)
    return subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=120, check=False
    )


async def test_reconcile_prints_the_spec_document_and_exits_by_discrepancies(
    stack: Stack, tmp_path: Path
) -> None:
    paid = (await stack.pay(amount=1500)).json()
    assert paid["status"] == "captured"
    today = datetime.now(UTC).date().isoformat()
    clean = reconcile(stack, tmp_path, "--date", today, "--grace-days", "0", "--json")
    assert (clean.returncode, json.loads(clean.stdout)) == (0, {"matched": 1, "discrepancies": []})

    orphan = auth_body("pay_nobody_a1", order_id="pay_nobody")
    sim = stack.simulators["primary"]
    answer = await sim.post("/v1/authorizations", json=orphan, headers=key("pay_nobody_a1"))
    assert answer.status_code == 201
    found = reconcile(stack, tmp_path, "--date", today, "--json")
    document = json.loads(found.stdout)
    assert found.returncode == 0, found.stderr  # found, voided: resolved, none left open
    assert document["matched"] == 1
    assert [(d["kind"], d["reference"], d["payment_id"]) for d in document["discrepancies"]] == [
        ("orphaned_authorization", "pay_nobody_a1", None)  # no payment of OncePay's: null
    ]
    assert "its order id: pay_nobody" in document["discrepancies"][0]["detail"]
    # The remediation says what was done, not only what to do (a review: a voided orphan, a
    # refused void and an orphan left open all read the same).
    assert document["discrepancies"][0]["remediation"].endswith(
        "Done: voided at the acquirer (reference pay_nobody_a1_orphan_void); "
        "the discrepancy is resolved."
    )
    assert set(document["discrepancies"][0]) == {
        "kind",
        "reference",
        "payment_id",
        "detail",
        "remediation",
    }
    voids = [op for op in await stack.operations("pay_nobody") if op["type"] == "void"]
    assert len(voids) == 1

    # A second capture never settles: missing, and open (the first one settled above)
    unsettled = (await stack.pay(amount=700)).json()
    report = tmp_path / "empty-day.csv"
    report.write_bytes(b"reference,type,amount,currency,fee,net,settled_at,payout_id\n")
    missing = reconcile(stack, tmp_path, "--report", str(report), "--grace-days", "0", "--json")
    assert missing.returncode == 1, missing.stderr
    assert [(d["kind"], d["payment_id"]) for d in json.loads(missing.stdout)["discrepancies"]] == [
        ("missing_at_acquirer", unsettled["id"])
    ]


async def test_a_report_that_cannot_be_read_is_exit_2_with_the_reason(
    stack: Stack, tmp_path: Path
) -> None:
    report = tmp_path / "bad.csv"
    header = b"reference,type,amount,currency,fee,net,settled_at,payout_id\n"
    report.write_bytes(header + b"r1,capture,12.50,EUR,0,1250,2026-12-01T00:00:00Z,po\n")
    result = reconcile(stack, tmp_path, "--report", str(report), "--json")
    assert result.returncode == 2
    assert "line 2: amount" in result.stderr
    assert result.stdout == ""


async def test_runs_and_discrepancies_are_listed_on_the_command_line(
    stack: Stack, tmp_path: Path
) -> None:
    """SPEC §10: runs and discrepancies are visible through the API and the command line. A
    review found no command to list them (only a re-run printed a day's, without status)."""
    paid = (await stack.pay(amount=1800)).json()
    file = tmp_path / "r.csv"
    file.write_text(
        "reference,type,amount,currency,fee,net,settled_at,payout_id\n"
        f"{paid['id']}_a1,capture,1799,USD,0,1799,2026-12-07T10:00:00Z,po_1\n"
        "stranger,capture,500,USD,0,500,2026-12-07T10:00:00Z,po_1\n"
    )
    ran = reconcile(stack, tmp_path, "--report", str(file), "--grace-days", "0", "--json")
    assert ran.returncode == 1, ran.stderr
    found = json.loads(ran.stdout)["discrepancies"]

    runs = reconcile(stack, tmp_path, "runs", "--json")
    assert runs.returncode == 0, runs.stderr
    listed = json.loads(runs.stdout)
    assert (listed["object"], listed["has_more"]) == ("list", False)
    [run] = listed["data"]
    assert (run["object"], run["acquirer"], run["lines"], run["matched"]) == (
        "reconciliation_run", "primary", 2, 0,
    )  # fmt: skip
    assert run["discrepancies"] == len(found) == 2

    opened = reconcile(stack, tmp_path, "discrepancies", "--status", "open", "--json")
    assert opened.returncode == 1  # some are open
    rows = json.loads(opened.stdout)["data"]
    assert sorted((r["kind"], r["reference"], r["status"]) for r in rows) == sorted(
        (d["kind"], d["reference"], "open") for d in found
    )
    text = reconcile(stack, tmp_path, "discrepancies", "--kind", "amount_mismatch")
    assert text.returncode == 1
    assert f"open\tamount_mismatch\t{paid['id']}_a1\t{paid['id']}" in text.stdout
    assert text.stdout.rstrip().endswith("1 discrepancy")
    closed = reconcile(stack, tmp_path, "discrepancies", "--status", "resolved", "--json")
    assert (closed.returncode, json.loads(closed.stdout)["data"]) == (0, [])
    bad_filters = (
        ["--status", "shut"],
        ["--kind", "nope"],
        ["--day-from", "20261207"],
        ["--day-to", "2026-02-30"],
        ["--acquirer", "tertiary"],
    )
    for bad in bad_filters:
        refused = reconcile(stack, tmp_path, "discrepancies", *bad)
        assert refused.returncode == 2, (bad, refused.stdout, refused.stderr)
        assert "Traceback" not in refused.stderr
    runs_bad = reconcile(stack, tmp_path, "runs", "--acquirer", "tertiary")
    assert runs_bad.returncode == 2
    assert "--acquirer must be primary or secondary" in " ".join(runs_bad.stderr.split())


async def test_the_listings_page_with_starting_after(stack: Stack, tmp_path: Path) -> None:
    """A listing holds at most --limit rows; ``--starting-after`` the last one listed gives the
    next page (the operator API's cursor), so more than 1,000 can be read. A cursor that names
    nothing, or days the wrong way round, are refused (exit 2), not an empty page."""
    file = tmp_path / "r.csv"
    file.write_text(
        "reference,type,amount,currency,fee,net,settled_at,payout_id\n"
        + "".join(
            f"stranger{i},capture,500,USD,0,500,2026-12-07T10:00:00Z,po_1\n" for i in range(5)
        )
    )
    ran = reconcile(stack, tmp_path, "--report", str(file), "--json")
    assert ran.returncode == 1, ran.stderr
    for day in ("2026-12-01", "2026-12-02"):  # the acquirer's own (empty) reports: two runs more
        quiet = reconcile(stack, tmp_path, "--date", day, "--json")
        assert quiet.returncode == 0, quiet.stderr

    def pages(listing: str, limit: int) -> list[list[object]]:
        seen: list[list[object]] = []
        after: list[str] = []
        while True:
            got = reconcile(stack, tmp_path, listing, "--limit", str(limit), *after, "--json")
            assert got.returncode in (0, 1), got.stderr
            document = json.loads(got.stdout)
            seen.append([row["id"] for row in document["data"]])
            if not document["has_more"]:
                return seen
            after = ["--starting-after", str(seen[-1][-1])]

    every = reconcile(stack, tmp_path, "discrepancies", "--limit", "1000", "--json")
    everyone = [row["id"] for row in json.loads(every.stdout)["data"]]
    assert len(everyone) == len(set(everyone)) >= 5
    paged = pages("discrepancies", 2)
    assert [i for page in paged for i in page] == everyone
    assert all(len(page) == 2 for page in paged[:-1])
    runs = pages("runs", 2)
    assert [len(page) for page in runs] == [2, 1]
    text = reconcile(stack, tmp_path, "runs", "--limit", "2")
    assert text.stdout.rstrip().endswith(f"2 run(s), more: --starting-after {runs[0][-1]}")

    nowhere = reconcile(stack, tmp_path, "runs", "--starting-after", "rrun_nothing")
    assert nowhere.returncode == 2
    assert "no run 'rrun_nothing'" in nowhere.stderr
    backwards = reconcile(
        stack, tmp_path, "runs", "--day-from", "2026-12-07", "--day-to", "2026-12-01"
    )
    assert backwards.returncode == 2
    assert "--day-from 2026-12-07 is after --day-to 2026-12-01" in " ".join(
        backwards.stderr.split()
    )
    for bad in ("0", "x"):
        refused = reconcile(stack, tmp_path, "discrepancies", "--starting-after", bad)
        assert refused.returncode == 2, refused.stderr


async def test_grace_days_is_oncepay_grace_days_too(stack: Stack, tmp_path: Path) -> None:
    """SPEC §7: ``--grace-days`` is ``ONCEPAY_GRACE_DAYS``, which was ignored (a black-box
    review). Set, it wins over ``ONCEPAY_RECONCILE_GRACE_DAYS``, the worker's setting, which
    a run by hand reads after it (docs/operations.md, "Settings as variables")."""
    unsettled = (await stack.pay(amount=900)).json()
    report = tmp_path / "empty-day.csv"
    report.write_bytes(b"reference,type,amount,currency,fee,net,settled_at,payout_id\n")
    waiting = reconcile(
        stack, tmp_path, "--report", str(report), "--json",
        env={"ONCEPAY_GRACE_DAYS": "3", "ONCEPAY_RECONCILE_GRACE_DAYS": "0"},
    )  # fmt: skip
    assert (waiting.returncode, json.loads(waiting.stdout)) == (
        0,
        {"matched": 0, "discrepancies": []},
    )
    missing = reconcile(
        stack, tmp_path, "--report", str(report), "--json", env={"ONCEPAY_GRACE_DAYS": "0"}
    )
    assert missing.returncode == 1, missing.stderr
    assert [(d["kind"], d["payment_id"]) for d in json.loads(missing.stdout)["discrepancies"]] == [
        ("missing_at_acquirer", unsettled["id"])
    ]
