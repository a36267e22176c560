"""Python bytecodes per request of micro.py, by layer: where the middleware's time goes, counted.

    .venv/bin/python bench/overhead/opcodes.py                       # Redis store, new path
    .venv/bin/python bench/overhead/opcodes.py --paths replay --variants oncepay-redis,bare

Runs micro.py's in-process harness under ``sys.settrace`` with opcode events on, and counts the
bytecodes each function executes (C code it calls counts as the one opcode that called it).
Deterministic, like callgrind.sh, and it names the Python function, which callgrind cannot on
Python 3.11; but it weighs every opcode alike, so read it beside callgrind's instructions
(RESULTS.md run K relates the two). Slow: ~1 ms per request; a few hundred requests suffice.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: bench imports

from bench.harness.stores import redis_delete
from bench.overhead import micro

Key = tuple[str, str]

# The layer a code object's file belongs to; first match wins.
LAYERS = (
    ("oncepay/http/asgi.py", "OncePay ASGI middleware"),
    ("oncepay/http/", "OncePay HTTP policy (gate)"),
    ("oncepay/idempotency/keys.py", "OncePay key + fingerprint"),
    ("oncepay/idempotency/engine.py", "OncePay engine"),
    ("oncepay/idempotency/stores/", "OncePay store"),
    ("oncepay/idempotency/records.py", "OncePay records"),
    ("oncepay/_drivers/resp.py", "OncePay RESP client"),
    ("<string>", "dataclass __init__s (quick_init)"),
    ("oncepay/", "OncePay other"),
    ("starlette/", "Starlette + endpoint"),
    ("bench/overhead/apps.py", "Starlette + endpoint"),
    ("json/", "Starlette + endpoint"),  # the endpoint's request.json() and JSONResponse
    ("bench/overhead/micro.py", "harness (micro.py)"),
)


def layer(filename: str) -> str:
    for fragment, name in LAYERS:
        if fragment in filename:
            return name
    return "other (stdlib, asyncio)"


def count(
    variant: str, path: str, n: int, concurrency: int
) -> tuple[collections.Counter[Key], int]:
    opcodes: collections.Counter[Key] = collections.Counter()

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        code = frame.f_code
        if event == "call":
            frame.f_trace_opcodes = True
        elif event == "opcode":
            opcodes[code.co_filename, code.co_qualname] += 1
        return tracer

    async def run() -> None:
        prefix = f"oncepay-opcodes-{variant}:"
        app, store = micro.build(variant, prefix)
        sys.settrace(tracer)
        try:
            await micro.drive(app, path, n, concurrency, prefix)
        finally:
            sys.settrace(None)
        if store is not None:
            await store.aclose()
        if variant == "oncepay-redis":
            redis_delete(micro.REDIS, prefix)

    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(run())
    return opcodes, n + n // 10 + 1  # micro.drive: the requests, its warm-up, the first one


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="oncepay-redis")
    p.add_argument("--paths", default="new")
    p.add_argument("-n", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--top", type=int, default=25, help="functions listed")
    args = p.parse_args()
    for path in args.paths.split(","):
        for variant in args.variants.split(","):
            opcodes, requests = count(variant, path, args.n, args.concurrency)
            layers: collections.Counter[str] = collections.Counter()
            for (filename, _), number in opcodes.items():
                layers[layer(filename)] += number
            total = sum(opcodes.values())
            print(f"\n{path} {variant}: {total / requests:,.0f} opcodes per request")
            for name, number in layers.most_common():
                print(f"  {number / requests:8.1f}  {name}")
            print("  top functions:")
            for (filename, function), number in opcodes.most_common(args.top):
                short = filename.split("site-packages/")[-1].split("/src/")[-1]
                print(f"  {number / requests:8.1f}  {function} ({Path(short).as_posix()})")


if __name__ == "__main__":
    main()
