"""Real upstream services for the gateway tests, each in its own process.

``app`` (run by uvicorn) counts executions per path, echoes what it received, streams, sets
cookies, compresses when asked, and can hang or be slow. ``python -m tests.http.upstream KIND
PORT`` runs a body-echoing upstream on a server that reads a body by its ``Content-Length``
only, as many do: ``wsgiref``, ``http.server`` or ``django`` (Django on its own runserver
server). Its ``/drop`` route reads the request and closes the connection without an answer.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

counts: Counter[str] = Counter()


async def pay(request: Request) -> Response:
    counts["pay"] += 1
    body = await request.body()
    await asyncio.sleep(0.05)  # a realistic service time, so duplicates overlap the first
    return JSONResponse({"execution": counts["pay"], "got": json.loads(body or b"{}")}, 201)


async def echo(request: Request) -> Response:
    counts["echo"] += 1
    body = await request.body()
    headers = [[k, v] for k, v in request.headers.items()]
    return JSONResponse({"headers": headers, "size": len(body), "query": request.url.query})


async def stream(request: Request) -> Response:
    counts["stream"] += 1

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(10):
            yield f"part-{i}\n".encode()

    return StreamingResponse(chunks(), media_type="text/plain", status_code=201)


async def hang(request: Request) -> Response:
    counts["hang"] += 1
    await asyncio.sleep(30)
    return Response(status_code=200)


async def utf8(request: Request) -> Response:
    counts["utf8"] += 1
    response = Response(b"ok", status_code=201)
    response.raw_headers.append((b"x-merchant", "Z\u00fcrich \u20ac".encode()))
    return response


async def set_cookie(request: Request) -> Response:
    counts["set-cookie"] += 1
    response = JSONResponse({"set": request.query_params["user"]})
    response.set_cookie("upstream-session", request.query_params["user"])
    return response


async def whoami(request: Request) -> Response:
    """An answer that belongs to one signed-in user: whoever the session cookie names."""
    counts["whoami"] += 1
    user = request.cookies.get("session", "nobody")
    return JSONResponse({"user": user, "execution": counts["whoami"]}, 201)


# Long enough that gzip visibly shrinks it.
TEXT = b"idempotent " * 200


async def compressible(request: Request) -> Response:
    """gzip only for a client that asked for it, as any well-behaved server does."""
    counts["compressible"] += 1
    asked = request.headers.get("accept-encoding", "")
    headers = {"x-seen-accept-encoding": asked or "(none)"}
    if "gzip" in asked:
        headers["content-encoding"] = "gzip"
        return Response(gzip.compress(TEXT), 201, headers=headers, media_type="text/plain")
    return Response(TEXT, 201, headers=headers, media_type="text/plain")


async def count(request: Request) -> Response:
    return JSONResponse(dict(counts))


app = Starlette(
    routes=[
        Route("/pay", pay, methods=["POST"]),
        Route("/echo", echo, methods=["POST", "GET"]),
        Route("/stream", stream, methods=["POST"]),
        Route("/hang", hang, methods=["POST"]),
        Route("/utf8", utf8, methods=["POST"]),
        Route("/count", count, methods=["GET"]),
        Route("/set-cookie", set_cookie, methods=["POST"]),
        Route("/whoami", whoami, methods=["POST"]),
        Route("/compressible", compressible, methods=["POST"]),
    ]
)


# -- upstreams that read a body by its Content-Length only ----------------------------------


def received(body: bytes, content_length: str | None, transfer_encoding: str | None) -> bytes:
    return json.dumps(
        {
            "size": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
            "content-length": content_length,
            "transfer-encoding": transfer_encoding,
        }
    ).encode()


def wsgi_echo(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """PEP 3333: the app reads CONTENT_LENGTH bytes; without it, the body is empty."""
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else b""
    answer = received(
        body, environ.get("CONTENT_LENGTH") or None, environ.get("HTTP_TRANSFER_ENCODING")
    )
    start_response("200 OK", [("Content-Type", "application/json")])
    return [answer]


_CUTS = [0]  # executions of http.server's /cut


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        length = self.headers.get("content-length")
        body = self.rfile.read(int(length)) if length else b""
        if self.path == "/drop":  # read it all, then hang up without a word
            self.close_connection = True
            return
        if self.path == "/cut":  # run, answer a head promising 100 bytes, send 7, hang up
            _CUTS[0] += 1
            self.close_connection = True
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", "100")
            self.end_headers()
            self.wfile.write(b"partial")
            return
        if self.path == "/cuts":  # how many times /cut ran
            self.send_response(200)
            self.send_header("content-length", str(len(str(_CUTS[0]))))
            self.end_headers()
            self.wfile.write(str(_CUTS[0]).encode())
            return
        if self.path == "/hang":  # past any gateway timeout a test sets
            time.sleep(30)
            return
        answer = received(body, length, self.headers.get("transfer-encoding"))
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    do_GET = do_POST

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the test output is no access log


def django_echo() -> Any:
    import django
    from django.conf import settings

    settings.configure(
        DEBUG=False, ALLOWED_HOSTS=["*"], ROOT_URLCONF=__name__, SECRET_KEY="test-only",
        MIDDLEWARE=[], INSTALLED_APPS=[], USE_TZ=True,
        DATA_UPLOAD_MAX_MEMORY_SIZE=None,  # the tests send bodies above its 2.5 MB default
    )  # fmt: skip
    django.setup()
    from django.core.wsgi import get_wsgi_application

    return get_wsgi_application()


def _django_view(request: Any) -> Any:
    from django.http import HttpResponse

    meta = request.META
    answer = received(request.body, meta.get("CONTENT_LENGTH") or None,
                      meta.get("HTTP_TRANSFER_ENCODING"))  # fmt: skip
    return HttpResponse(answer, content_type="application/json")


def __getattr__(name: str) -> Any:  # Django reads ROOT_URLCONF.urlpatterns lazily
    if name == "urlpatterns":
        from django.urls import path
        from django.views.decorators.csrf import csrf_exempt

        return [path("echo", csrf_exempt(_django_view))]
    raise AttributeError(name)


def serve(kind: str, port: int) -> None:
    if kind == "http.server":
        ThreadingHTTPServer(("127.0.0.1", port), _Handler).serve_forever()
    elif kind == "wsgiref":
        from wsgiref.simple_server import WSGIRequestHandler, make_server

        class Quiet(WSGIRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

        make_server("127.0.0.1", port, wsgi_echo, handler_class=Quiet).serve_forever()
    elif kind == "django":
        from django.core.servers.basehttp import run

        run("127.0.0.1", port, django_echo(), threading=True)
    else:
        raise SystemExit(f"unknown upstream {kind!r}")


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
