"""TtlPolicy: learned TTLs held to their bounds, the fixed TTL as the fallback, templates that
match paths, replacement that is all or nothing and safe across threads, files that are read
from ``oncepay insight analyze --json`` or refused with a reason, and the savings counted."""

from __future__ import annotations

import json
import os
import random
import threading
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from oncepay import ConfigurationError, TtlPolicy
from oncepay.cli import app
from oncepay.insight.analyzer import analyze
from oncepay.insight.findings import TtlAdvice
from oncepay.insight.records import to_line
from tests.insight.traffic import ROUTE, normal

DAY = 86400.0


def entry(tenant: str, route: str, ttl: Any, basis: Any = 100) -> dict[str, Any]:
    return {"tenant": tenant, "route": route, "ttl_seconds": ttl, "basis": basis}


def test_learned_ttls_are_clamped_to_the_bounds() -> None:
    policy = TtlPolicy(minimum=300, maximum=2 * DAY)
    applied = policy.update(
        [entry("m_1", ROUTE, 60), entry("m_2", ROUTE, 9 * DAY), entry("m_3", ROUTE, 4000)]
    )
    assert applied == 3
    assert policy.ttl_for("m_1", ROUTE, DAY) == 300
    assert policy.ttl_for("m_2", ROUTE, DAY) == 2 * DAY
    assert policy.ttl_for("m_3", ROUTE, DAY) == 4000


def test_the_fixed_ttl_applies_where_nothing_or_too_little_was_learned() -> None:
    policy = TtlPolicy(min_basis=30, fallback=7200)
    policy.update([entry("m_1", ROUTE, 900, basis=29), entry("m_2", ROUTE, 900, basis=30)])
    assert policy.ttl_for("m_1", ROUTE, DAY) == DAY  # 29 retries: not a quantile
    assert policy.ttl_for("m_2", ROUTE, DAY) == 900
    assert policy.ttl_for("m_2", "POST /v1/refunds", 3600) == 3600  # another route: its own
    assert policy.ttl_for("m_9", ROUTE, DAY) == DAY  # another tenant
    assert policy.ttl_for("m_9", ROUTE) == 7200  # no fixed TTL named: the fallback
    assert policy.learned() == {("m_2", ROUTE): 900}


def test_a_template_matches_paths_one_segment_per_parameter() -> None:
    policy = TtlPolicy()
    policy.update([entry("m_1", "POST /v1/payments/{id}/refunds", 1200)])
    assert policy.ttl_for("m_1", "POST /v1/payments/{id}/refunds", DAY) == 1200
    assert policy.ttl_for("m_1", "POST /v1/payments/pay_7/refunds", DAY) == 1200
    assert policy.ttl_for("m_1", "POST /v1/payments/a/b/refunds", DAY) == DAY
    assert policy.ttl_for("m_1", "PATCH /v1/payments/pay_7/refunds", DAY) == DAY
    assert policy.ttl_for("m_2", "POST /v1/payments/pay_7/refunds", DAY) == DAY


def test_the_analyzers_own_advice_is_accepted() -> None:
    records = list(normal(random.Random(1)))
    advice = analyze(records).ttl()
    assert advice
    assert all(isinstance(a, TtlAdvice) for a in advice)
    policy = TtlPolicy(minimum=120)
    assert policy.update(advice) == len(advice)
    (learned,) = advice
    assert policy.ttl_for(learned.tenant, learned.route, DAY) == max(learned.ttl_seconds, 120)


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        (entry("m_1", ROUTE, "600"), "ttl_seconds must be a number > 0, not '600'"),
        (entry("m_1", ROUTE, 0), "ttl_seconds must be a number > 0"),
        (entry("m_1", ROUTE, float("inf")), "ttl_seconds must be a number > 0"),
        (entry("m_1", ROUTE, True), "ttl_seconds must be a number > 0"),
        (entry("m_1", ROUTE, 600, basis=-1), "basis must be an integer >= 0"),
        (entry("m_1", ROUTE, 600, basis=2.5), "basis must be an integer >= 0"),
        (entry(7, ROUTE, 600), "needs a string tenant and route"),  # type: ignore[arg-type]
        ({"tenant": "m_1"}, "needs a string tenant and route"),
        ("POST /v1/payments", "needs a string tenant and route"),
    ],
)
def test_a_bad_entry_is_refused_whole_and_named(bad: Any, says: str) -> None:
    policy = TtlPolicy()
    policy.update([entry("m_1", ROUTE, 900)])
    with pytest.raises(ValueError, match="ttl entry 1: ") as raised:
        policy.update([entry("m_2", ROUTE, 600), bad])
    assert says in str(raised.value)
    assert policy.learned() == {("m_1", ROUTE): 900}  # nothing half-applied


def test_impossible_bounds_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="0 < minimum <= maximum"):
        TtlPolicy(minimum=600, maximum=300)
    with pytest.raises(ConfigurationError, match="0 < minimum <= maximum"):
        TtlPolicy(minimum=0)


# -- files -------------------------------------------------------------------------------------


def test_a_file_written_by_insight_analyze_json_loads(tmp_path: Path) -> None:
    log = tmp_path / "usage.jsonl"
    log.write_text("".join(to_line(u) for u in normal(random.Random(2))))
    result = CliRunner().invoke(app, ["insight", "analyze", str(log), "--json"])
    assert result.exit_code == 0, result.output
    learned = tmp_path / "ttl.json"
    learned.write_text(result.stdout)
    (advice,) = json.loads(result.stdout)["ttl"]
    policy = TtlPolicy(minimum=60)
    assert policy.load(learned) == 1
    assert policy.ttl_for(advice["tenant"], advice["route"], DAY) == advice["ttl_seconds"]


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "cannot read it (No such file or directory)"),
        ("{not json", "not JSON"),
        ('{"findings": []}', 'no "ttl" list; write it with `oncepay insight analyze LOG --json'),
        ("[1, 2]", 'no "ttl" list'),
        ('{"ttl": [{"tenant": "m_1", "route": "POST /", "ttl_seconds": -1, "basis": 40}]}',
         "ttl entry 0: ttl_seconds must be a number > 0, not -1"),
        (b"\xff\xfe", "not UTF-8 text"),
    ],
)  # fmt: skip
def test_a_file_that_cannot_be_used_is_refused_with_its_name_and_why(
    tmp_path: Path, content: str | bytes | None, says: str
) -> None:
    path = tmp_path / "ttl.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    policy = TtlPolicy()
    policy.update([entry("m_1", ROUTE, 900)])
    with pytest.raises(ConfigurationError) as raised:
        policy.load(path)
    assert f"adaptive TTL file {path}: " in raised.value.detail
    assert says in raised.value.detail
    assert policy.learned() == {("m_1", ROUTE): 900}


def test_reload_reads_the_file_again_only_when_it_changed(tmp_path: Path) -> None:
    path = tmp_path / "ttl.json"
    path.write_text(json.dumps({"findings": [], "ttl": [entry("m_1", ROUTE, 900)]}))
    policy = TtlPolicy()
    assert policy.reload() is False  # nothing loaded yet: nothing to reload
    policy.load(path)
    assert policy.reload() is False
    path.write_text(json.dumps({"findings": [], "ttl": [entry("m_1", ROUTE, 1800)]}))
    os.utime(path, ns=(1, 1))  # a new modification time, whatever the file system's resolution
    assert policy.reload() is True
    assert policy.ttl_for("m_1", ROUTE, DAY) == 1800
    path.write_text("{half a fi")
    with pytest.raises(ConfigurationError, match="not JSON"):
        policy.reload()
    assert policy.reload() is False  # reported once, not at every check
    assert policy.ttl_for("m_1", ROUTE, DAY) == 1800  # the last good TTLs stay


# -- threads -----------------------------------------------------------------------------------


def test_readers_see_one_generation_or_the_next_never_a_mix() -> None:
    """Writers replace 50 routes at once with their generation's TTL while readers take
    snapshots and ask ttl_for: every snapshot holds one generation only."""
    routes = [f"POST /r{n}" for n in range(50)]
    policy = TtlPolicy(minimum=1, maximum=1e9)
    policy.update([entry("m_1", route, 1000) for route in routes])
    start = threading.Barrier(6)
    mixed: list[set[float]] = []
    strays: list[float] = []

    def write(offset: int) -> None:
        start.wait()
        for generation in range(300):
            ttl = 1000 + offset * 1000 + generation
            policy.update([entry("m_1", route, ttl) for route in routes])

    def read() -> None:
        start.wait()
        for _ in range(2000):
            values = set(policy.learned().values())
            if len(values) != 1:
                mixed.append(values)
            ttl = policy.ttl_for("m_1", "POST /r7", DAY)
            if not 1000 <= ttl < 4000:
                strays.append(ttl)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(3)]
    threads += [threading.Thread(target=read) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert mixed == []
    assert strays == []


def test_savings_are_counted_exactly_from_many_threads() -> None:
    seen: list[tuple[float, float]] = []
    policy = TtlPolicy(on_stored=lambda ttl, fixed: seen.append((ttl, fixed)))
    start = threading.Barrier(8)

    def store() -> None:
        start.wait()
        for _ in range(5000):
            policy.stored(600.0, DAY)

    threads = [threading.Thread(target=store) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    savings = policy.savings()
    assert savings.records == 40000 == len(seen)
    assert (savings.learned_seconds, savings.fixed_seconds) == (40000 * 600.0, 40000 * DAY)
    assert savings.ratio == pytest.approx(600 / DAY)


# -- what the learned TTLs save ------------------------------------------------------------------


def test_an_estimate_compares_learned_ttls_with_the_fixed_ones_route_by_route() -> None:
    policy = TtlPolicy(minimum=60)
    policy.update([entry("m_1", ROUTE, 600), entry("m_2", ROUTE, 600, basis=3)])
    saving = policy.estimate({("m_1", ROUTE): (10, 10 * DAY), ("m_2", ROUTE): (5, 5 * DAY)})
    assert saving.records == 15
    assert saving.learned_seconds == 10 * 600 + 5 * DAY  # m_2 learned too little: its own
    assert saving.fixed_seconds == 15 * DAY


def test_insight_analyze_reports_the_savings_of_its_learned_ttls(tmp_path: Path) -> None:
    log = tmp_path / "usage.jsonl"
    log.write_text("".join(to_line(u) for u in normal(random.Random(3))))
    result = CliRunner().invoke(app, ["insight", "analyze", str(log)])
    assert result.exit_code == 0, result.output
    (line,) = [line for line in result.stdout.splitlines() if "learned TTLs applied" in line]
    assert "of the key-seconds the logged TTLs kept" in line
    assert "key-seconds saved" in line
    share = float(line.split("learned TTLs applied: ")[1].split("%")[0])
    assert 0 < share < 10  # retries within minutes: far less than a fixed day
