"""``payments/`` in layers, arrows pointing down (DEVELOPERS.md, Layout): a module imports
only from its own layer or the layers below it — read with ``ast``, so imports inside
functions and under ``TYPE_CHECKING`` count."""

from __future__ import annotations

from tests.test_import_graph import import_graph

P = "oncepay.payments"

# Bottom first. A module belongs to the first entry that is it or its package.
LAYERS: list[set[str]] = [
    {"settings", "errors", "states", "currencies", "metrics", "records", "reply", "models"},
    {"tracing"},  # OpenTelemetry hooks: used from every layer above
    {"storage"},
    {"acquirers"},
    {"context"},
    {"reads", "merchants"},
    {"webhooks"},
    {"ledger", "events"},
    {"phases", "failover"},
    {"operations"},
    {"idempotent"},
    {"recovery"},
    {"bootstrap"},
    {"dashboard"},
    {"api"},
]


def layer(module: str) -> int:
    top = module.removeprefix(f"{P}.").split(".")[0]
    return next(n for n, names in enumerate(LAYERS) if top in names)


def test_every_payments_module_has_a_layer() -> None:
    unplaced = []
    for module in import_graph():
        if module.startswith(f"{P}."):
            try:
                layer(module)
            except StopIteration:
                unplaced.append(module)
    assert unplaced == []


def test_no_payments_module_imports_a_layer_above_its_own() -> None:
    upward = sorted(
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        if module.startswith(f"{P}.")
        for target in targets
        if target.startswith(f"{P}.") and layer(target) > layer(module)
    )
    assert upward == []
