"""``oncepay insight``: the key-usage log analysed (``analyze``), simulated with labels
(``simulate``) and the analysis scored against them (``score``). SPEC §9."""

from __future__ import annotations

import contextlib
import gc
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Annotated, Any

import typer
from rich.markup import escape

from oncepay.cli._common import console
from oncepay.insight.analyzer import Analyzer, analyze
from oncepay.insight.findings import report
from oncepay.insight.records import Usage, UsageReader, to_line
from oncepay.insight.score import score_findings, score_ttl
from oncepay.insight.simulate import Label, Simulation
from oncepay.insight.ttl import TtlBounds
from oncepay.insight.ttl_policy import TtlPolicy

__all__ = ["insight_app"]

insight_app = typer.Typer(
    help="How clients use their idempotency keys: anomalies and learned TTLs.",
    no_args_is_help=True,
)

LogPath = Annotated[str, typer.Argument(help="The key-usage log (JSON Lines), or - for stdin.")]
TtlMin = Annotated[
    float, typer.Option("--ttl-min", envvar="ONCEPAY_TTL_MIN", min=1, help="Shortest TTL (s).")
]
TtlMax = Annotated[
    float, typer.Option("--ttl-max", envvar="ONCEPAY_TTL_MAX", min=1, help="Longest TTL (s).")
]
TtlDefault = Annotated[
    float,
    typer.Option(
        "--ttl-default",
        envvar="ONCEPAY_TTL_DEFAULT",
        min=1,
        help="TTL (s) for tenants with too few retries.",
    ),
]
TtlCoverage = Annotated[
    float,
    typer.Option(
        "--ttl-coverage",
        envvar="ONCEPAY_TTL_COVERAGE",
        min=0.5,
        max=1,
        help="Share of all retries TTLs must cover.",
    ),
]


@contextlib.contextmanager
def _opened(path: str) -> Iterator[IO[bytes]]:
    """The log as bytes (the reader decodes it: bytes that are not UTF-8 become U+FFFD, and
    the line is then bad JSON or a record with an odd name, never a crash)."""
    if path == "-":
        yield sys.stdin.buffer
        return
    try:
        file = open(path, "rb")  # noqa: SIM115 -- closed below
    except OSError as exc:
        console.print(f"[red]error:[/red] cannot read {path}: {exc.strerror}")
        raise typer.Exit(2) from exc
    with file:
        yield file


def _analyzed(path: str, bounds: TtlBounds, stored: _Stored | None = None) -> Analyzer:
    with _opened(path) as file, _no_collection():
        reader = UsageReader(file)
        records = reader if stored is None else stored.watch(reader, bounds.default)
        analyzer = analyze(records, bounds=bounds)
    if reader.bad_lines:
        where = ", ".join(str(n) for n in reader.bad_examples)
        console.print(
            f"warning: {reader.bad_lines} of {reader.lines} lines were not decision records "
            f"and were skipped (first at line {where})",
            soft_wrap=True,
        )
    return analyzer


class _Stored:
    """The records a log shows stored (its ``executed`` decisions) per tenant and route, with
    the key-seconds their logged TTLs kept: what learned TTLs are compared with."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], tuple[int, float]] = {}

    def watch(self, records: Iterable[Usage], default: float) -> Iterator[Usage]:
        routes = self.routes
        for usage in records:
            if usage.decision == "executed":
                name = (usage.tenant, usage.route)
                count, kept = routes.get(name, (0, 0.0))
                routes[name] = (count + 1, kept + (usage.ttl or default))
            yield usage


@contextlib.contextmanager
def _no_collection() -> Iterator[None]:
    """The cyclic garbage collector off while a log is read: the analysis makes hundreds of
    thousands of small objects and no cycles, and the collector's passes over them cost a fifth
    of the run."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _bounds(ttl_min: float, ttl_max: float, ttl_default: float, coverage: float) -> TtlBounds:
    try:
        return TtlBounds(minimum=ttl_min, maximum=ttl_max, default=ttl_default, coverage=coverage)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc


@insight_app.command("analyze", short_help="Findings and learned TTLs from a key-usage log.")
def analyze_command(
    log: LogPath,
    as_json: Annotated[bool, typer.Option("--json", help="Print SPEC §9's JSON.")] = False,
    ttl_min: TtlMin = 60.0,
    ttl_max: TtlMax = 7 * 86400.0,
    ttl_default: TtlDefault = 86400.0,
    ttl_coverage: TtlCoverage = 0.9995,
) -> None:
    """Find clients misusing their keys, and learn each tenant's TTL per route."""
    bounds = _bounds(ttl_min, ttl_max, ttl_default, ttl_coverage)
    stored = None if as_json else _Stored()  # the JSON is SPEC §9's, nothing added
    analyzer = _analyzed(log, bounds, stored)
    findings, ttl = analyzer.findings(), analyzer.ttl()
    if as_json:
        print(json.dumps(report(findings, ttl)))
        return
    for finding in findings:
        print(f"{finding.tenant}  {finding.kind}  {finding.events} events  {finding.detail}")
    for advice in ttl:
        print(f"{advice.tenant}  {advice.route}  ttl {advice.ttl_seconds}s  ({advice.basis})")
    if not findings:
        print(f"no findings in {analyzer.records} decisions")
    if stored is not None and stored.routes:
        policy = TtlPolicy(minimum=bounds.minimum, maximum=bounds.maximum, fallback=bounds.default)
        policy.update(ttl)
        saving = policy.estimate(stored.routes)
        print(
            f"learned TTLs applied: {saving.ratio:.1%} of the key-seconds the logged TTLs kept "
            f"for its {saving.records} stored records "
            f"({saving.fixed_seconds - saving.learned_seconds:,.0f} key-seconds saved)"
        )


@insight_app.command(short_help="Write a labelled traffic log (and a held-out week).")
def simulate(
    out: Annotated[
        Path, typer.Option(envvar="ONCEPAY_OUT", help="The labelled week's log.")
    ] = Path("insight.jsonl"),
    seed: Annotated[int, typer.Option(envvar="ONCEPAY_SEED", help="Seed of every die.")] = 1,
    tenants: Annotated[int, typer.Option(envvar="ONCEPAY_TENANTS", min=1, help="Tenants.")] = 30,
    days: Annotated[int, typer.Option(envvar="ONCEPAY_DAYS", min=3, help="Days in each week.")] = 7,
    scale: Annotated[
        float, typer.Option(envvar="ONCEPAY_SCALE", min=0.01, help="Volume multiplier.")
    ] = 1.0,
) -> None:
    """Write a labelled log (OUT), its labels (OUT.labels.jsonl) and a clean held-out week
    after it (OUT.heldout.jsonl), from SEED."""
    if not out.absolute().parent.is_dir():
        console.print(
            f"[red]error:[/red] --out {escape(str(out))}: its directory does not exist",
            soft_wrap=True,
        )
        raise typer.Exit(2)
    simulation = Simulation(seed=seed, tenants=tenants, days=days, scale=scale)
    written = _write(out, simulation, held_out=False)
    held = _write(_beside(out, "heldout.jsonl"), simulation, held_out=True)
    labels = _beside(out, "labels.jsonl")
    labels.write_text("".join(json.dumps(label.as_json()) + "\n" for label in simulation.labels))
    console.print(f"{written} + {held} decisions, {len(simulation.labels)} labels -> {out}")


def _beside(path: Path, suffix: str) -> Path:
    return path.with_name(f"{path.name.removesuffix('.jsonl')}.{suffix}")


def _write(path: Path, simulation: Simulation, *, held_out: bool) -> int:
    count = 0
    with path.open("w") as file:
        for usage in simulation.records(held_out=held_out):
            file.write(to_line(usage))
            count += 1
    return count


@insight_app.command(short_help="Score the analyzer against a log's labels.")
def score(
    log: LogPath,
    labels: Annotated[Path, typer.Argument(help="Labels: JSON Lines {tenant, kind, start, end}.")],
    held_out: Annotated[
        Path | None,
        typer.Option(
            envvar="ONCEPAY_HELD_OUT", help="A later week of the same tenants, to score TTLs on."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the scores as JSON.")] = False,
) -> None:
    """Precision and recall per kind against LABELS; TTL coverage and key-seconds against a
    fixed 24 h on the held-out week."""
    analyzer = _analyzed(log, TtlBounds())
    truth = _labels(labels)
    kinds = score_findings(analyzer.findings(), truth)
    result: dict[str, Any] = {
        "kinds": [
            {
                "kind": k.kind,
                "labels": k.labels,
                "findings": k.findings,
                "precision": k.precision,
                "recall": k.recall,
            }
            for k in kinds
        ]
    }
    if held_out is not None:
        with held_out.open("rb") as file:
            ttl = score_ttl(UsageReader(file), analyzer.ttl())
        result["ttl"] = {
            "retries": ttl.repeats,
            "coverage": ttl.coverage,
            "coverage_fixed_24h": ttl.coverage_fixed,
            "key_seconds_vs_24h": ttl.storage,
        }
    if as_json:
        print(json.dumps(result))
        return
    for k in kinds:
        print(
            f"{k.kind:20} labels {k.labels:3}  findings {k.findings:3}  "
            f"precision {k.precision:.3f}  recall {k.recall:.3f}"
        )
    if "ttl" in result:
        t = result["ttl"]
        print(
            f"TTL: {t['retries']} retries, coverage {t['coverage']:.5f} "
            f"(fixed 24 h {t['coverage_fixed_24h']:.5f}), "
            f"key-seconds {t['key_seconds_vs_24h']:.3f} of fixed 24 h"
        )


def _label(obj: dict[str, Any]) -> Label:
    return Label(obj["tenant"], obj["kind"], float(obj["start"]), float(obj["end"]))


def _labels(path: Path) -> list[Label]:
    """The labels file's lines as labels; a line that is not one is a clear error, exit 2."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        console.print(
            f"[red]error:[/red] {escape(str(path))}: cannot be read: {escape(str(exc))}",
            soft_wrap=True,
        )
        raise typer.Exit(2) from exc
    found = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            found.append(_label(json.loads(line)))
        except (ValueError, KeyError, TypeError) as exc:  # not JSON, or not {tenant, kind, …}
            console.print(
                f"[red]error:[/red] {escape(str(path))} line {number} is not a label "
                f'{{"tenant", "kind", "start", "end"}}: {escape(repr(exc))}',
                soft_wrap=True,
            )
            raise typer.Exit(2) from exc
    return found
