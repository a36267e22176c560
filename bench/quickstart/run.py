"""The first five minutes, timed: a fresh ``git clone`` of this repository, ``make serve``, and
the first ``201`` from ``POST /v1/payments`` with the test key ``make serve`` prints.

    python bench/quickstart/run.py [--port 8765] [--keep]

It clones the committed HEAD (not the working tree) into a temporary folder, so what it times
is what a newcomer gets. pip's download cache is whatever this machine has: say so with the
figure (``--no-cache`` times a cold one)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KEY = re.compile(r"sk_test_[A-Za-z0-9_\-]+")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--keep", action="store_true", help="keep the clone")
    parser.add_argument("--no-cache", action="store_true", help="pip without its cache")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="oncepay-quickstart-"))
    env = {**os.environ, "ONCEPAY_PORT": str(args.port), "PYTHONUNBUFFERED": "1"}
    if args.no_cache:
        env["PIP_NO_CACHE_DIR"] = "1"
    started = time.perf_counter()
    subprocess.run(["git", "clone", "-q", str(ROOT), str(folder)], check=True)
    cloned = time.perf_counter()
    server = subprocess.Popen(
        ["make", "serve"],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        key, printed = _key(server), time.perf_counter()
        _first_201(args.port, key)
        done = time.perf_counter()
    finally:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(30)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print(
        json.dumps(
            {
                "clone_s": round(cloned - started, 1),
                "make_serve_to_key_s": round(printed - cloned, 1),
                "first_201_s": round(done - started, 1),
                "pip_cache": not args.no_cache,
            }
        )
    )


def _key(server: subprocess.Popen[str]) -> str:
    assert server.stdout is not None
    seen = []
    for line in server.stdout:
        seen.append(line)
        found = KEY.search(line)
        if found:
            return found.group(0)
    sys.exit("make serve ended without printing a test key:\n" + "".join(seen))


def _first_201(port: int, key: str) -> None:
    body = json.dumps({"amount": 1000, "currency": "USD", "payment_method": "pm_card_ok"})
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/payments",
        data=body.encode(),
        headers={
            "Authorization": f"Bearer {key}",
            "Idempotency-Key": "first-payment",
            "Content-Type": "application/json",
        },
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                if response.status == 201:
                    return
                sys.exit(f"first payment answered {response.status}")
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


if __name__ == "__main__":
    main()
