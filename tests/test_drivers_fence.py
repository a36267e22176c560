"""The fence around ``oncepay/_drivers``: logic never imports a driver directly.

Each driver is imported only by the adapter that wraps it (and translates its errors), and a
driver imports nothing of OncePay's but the exception tree. Imports are read with ``ast``, so an
import inside a function or under ``TYPE_CHECKING`` counts too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
DRIVERS = "oncepay._drivers"

# driver -> the modules allowed to import it
ALLOWED = {
    f"{DRIVERS}.resp": {"oncepay.idempotency.stores.redis"},
    # the PostgreSQL store's pool, and the service database's for its one-statement
    # transactions (Database.once)
    f"{DRIVERS}.pgpool": {"oncepay.idempotency.stores.postgres", "oncepay.storage.db"},
    # the SQLite connection for the event loop, and its retried switch to WAL
    f"{DRIVERS}.sqlite": {"oncepay.storage.db", "oncepay.idempotency.stores.sqlite"},
    f"{DRIVERS}.frozen": {
        "oncepay.idempotency.records",
        "oncepay.idempotency.engine",
        "oncepay.http.gate",
    },
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> Iterator[str]:
    """Every module ``path`` imports, with ``from package import module`` spelled out."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def modules() -> Iterator[tuple[str, set[str]]]:
    for path in sorted((SRC / "oncepay").rglob("*.py")):
        yield module_name(path), set(imports(path))


def test_every_driver_is_imported_only_by_its_adapter() -> None:
    trespassers = sorted(
        f"{importer} imports {driver}"
        for importer, imported in modules()
        if not importer.startswith(DRIVERS)
        for driver in imported & ALLOWED.keys()
        if importer not in ALLOWED[driver]
    )
    assert trespassers == []


def test_the_fence_knows_every_driver() -> None:
    found = {
        module_name(path)
        for path in (SRC / "oncepay" / "_drivers").glob("*.py")
        if path.name != "__init__.py"
    }
    assert found == ALLOWED.keys()


def test_a_driver_imports_nothing_of_oncepay_but_the_errors() -> None:
    reaches = sorted(
        f"{importer} imports {name}"
        for importer, imported in modules()
        if importer.startswith(DRIVERS)
        for name in imported
        if name.startswith("oncepay.") and not name.startswith(("oncepay.errors", DRIVERS))
    )
    assert reaches == []
