"""The log reader: records in order, bad lines counted and skipped, never a crash."""

from __future__ import annotations

import io
import json

import pytest

from oncepay.insight import records
from oncepay.insight.records import Usage, UsageReader, parse_line, to_line

GOOD = Usage(1.5, "m_1", "POST /v1/payments", "k", "ab", "executed", 201, "10.0.0.1", 86400.0)


def test_a_record_survives_a_round_trip_through_its_line() -> None:
    assert parse_line(to_line(GOOD)) == GOOD


def test_the_sinks_own_format_is_read() -> None:
    line = (
        '{"at":1733400000.25,"tenant":"m_1","route":"POST /v1/payments","key":"9f86",'
        '"fingerprint":"a3f1","decision":"replayed","status":201,"source":null,"ttl":null}'
    )
    assert parse_line(line) == Usage(
        1733400000.25, "m_1", "POST /v1/payments", "9f86", "a3f1", "replayed", 201, None, None
    )


def test_bad_lines_are_counted_and_skipped_and_the_rest_is_read() -> None:
    lines: list[str | bytes] = [
        to_line(GOOD),
        "not json\n",
        json.dumps({"at": 2, "tenant": "m_1", "decision": "teleported"}) + "\n",
        json.dumps({"tenant": "m_1", "decision": "executed"}) + "\n",  # no time
        "[1, 2]\n",
        "\n",  # blank: neither a record nor an error
        b"\xff\xfe\n",
        to_line(GOOD._replace(at=3.0, decision="missing", key="")),
    ]
    text = "".join(_text(line) for line in lines)
    reader = UsageReader(io.BytesIO(text.encode("latin-1")))
    records = list(reader)
    assert [r.at for r in records] == [1.5, 3.0]
    assert reader.bad_lines == 5
    assert reader.lines == 7
    assert reader.bad_examples == [2, 3, 4]


@pytest.mark.parametrize(
    "at",
    ["1e400", "-1e400", "NaN", "Infinity", "9" * 400],
    ids=["inf", "-inf", "nan", "Infinity", "400-digits"],
)
def test_a_time_that_is_no_finite_number_is_a_bad_line_not_a_crash(at: str) -> None:
    """A black-box review: ``"at":1e400`` (or NaN) crashed ``oncepay insight analyze``."""
    sink_shaped = (
        f'{{"at":{at},"tenant":"t","route":"","key":"","fingerprint":"","decision":"replayed",'
        '"status":200,"source":null,"ttl":null}\n'
    )
    loose = f'{{"at":{at},"tenant":"t","decision":"replayed"}}\n'
    for bad in (sink_shaped, loose):
        lines = [to_line(GOOD), bad, to_line(GOOD._replace(at=2.0))]
        reader = UsageReader(io.BytesIO("".join(lines).encode()))
        assert [r.at for r in reader] == [1.5, 2.0]
        assert reader.bad_examples == [2]
        assert parse_line(bad) is None


@pytest.mark.parametrize(
    "field",
    [
        {"key": {"a": 1}},
        {"key": ["k"]},
        {"route": {"x": 1}},
        {"status": "200"},
        {"status": True},
        {"ttl": "86400"},
        {"source": 7},
    ],
    ids=str,
)
def test_an_optional_field_of_the_wrong_type_makes_a_bad_line(field: dict[str, object]) -> None:
    """A black-box review: these were read with the field blanked, silently."""
    line = json.dumps({"at": 5, "tenant": "m_2", "decision": "replayed", **field})
    assert parse_line(line) is None
    reader = UsageReader(iter([to_line(GOOD), line + "\n"]))
    assert len(list(reader)) == 1
    assert reader.bad_examples == [2]


def test_a_missing_key_or_fields_the_analysis_can_do_without_are_tolerated() -> None:
    record = parse_line('{"at": 5, "tenant": "m_2", "decision": "missing", "key": null}')
    assert record == Usage(5.0, "m_2", "", "", "", "missing", 0, None, None)


def test_many_lines_are_read_in_batches_one_bad_line_spoiling_none() -> None:
    lines = [to_line(GOOD._replace(at=float(i))) for i in range(5000)]
    lines[2500] = "{broken\n"
    reader = UsageReader(iter(lines))
    assert len(list(reader)) == 4999
    assert reader.bad_examples == [2501]


def _text(line: str | bytes) -> str:
    return line.decode("latin-1") if isinstance(line, bytes) else line


def _mixed_log() -> bytes:
    good = [to_line(GOOD._replace(at=float(i), key=f"k{i}")) for i in range(3000)]
    odd = [
        '{"at": 7, "tenant": "m_2", "decision": "replayed", "route": null}\n',  # lenient path
        '{"at":8.5,"tenant":"m_\\u00e9","route":"POST /x","key":"a\\"b","fingerprint":"",'
        '"decision":"reused","status":422,"source":null,"ttl":60}\n',  # escapes
        "not json\n",
        "\n",
    ]
    return "".join(good[:1500] + odd + good[1500:]).encode()


def test_the_fast_paths_read_what_the_lenient_one_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """msgspec (when installed), the regular expression, and line-by-line json agree."""
    data = _mixed_log()
    expected = [parse_line(line) for line in data.decode().splitlines() if line.strip()]
    results = []
    for fast in (records._decode_fast, None):
        monkeypatch.setattr(records, "_decode_fast", fast)
        reader = UsageReader(io.BytesIO(data))
        results.append((list(reader), reader.bad_lines, reader.bad_examples, reader.lines))
    assert results[0] == results[1]
    found, bad, examples, lines = results[0]
    assert found == [u for u in expected if u is not None]
    assert (bad, examples, lines) == (1, [1503], 3003)
    assert found[1500] == Usage(7.0, "m_2", "", "", "", "replayed", 0, None, None)
    assert found[1501].tenant == "m_é"
    assert found[1501].key == 'a"b'
