"""Real Flask and Django apps for the WSGI tests; each counts its executions."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import django
from django.conf import settings
from flask import Flask, Response, request

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class Runs(Counter[str]):
    def __init__(self) -> None:
        super().__init__()
        self.hold = threading.Event()
        self.held = threading.Event()
        self.hold.set()


def flask_app(runs: Runs) -> WSGIApp:
    app = Flask("oncepay-test")

    @app.post("/payments")
    def pay() -> tuple[dict[str, Any], int]:
        runs["pay"] += 1
        return {"run": runs["pay"], "got": request.get_json(silent=True)}, 201

    @app.post("/slow")
    def slow() -> tuple[dict[str, Any], int]:
        runs["slow"] += 1
        runs.held.set()
        runs.hold.wait(10)
        return {"run": runs["slow"]}, 201

    @app.post("/fail")
    def fail() -> tuple[dict[str, Any], int]:
        runs["fail"] += 1
        return {"error": "downstream"}, 503

    @app.post("/headers")
    def headers() -> Response:
        runs["headers"] += 1
        response = Response("ok", status=200)
        response.headers.add("X-Multi", "one")
        response.headers.add("X-Multi", "two")
        response.set_cookie("session", "secret")
        return response

    @app.post("/status/<int:code>")
    def status(code: int) -> tuple[dict[str, Any], int]:
        runs["status"] += 1
        return {"run": runs["status"]}, code

    @app.post("/refuse")
    def refuse() -> tuple[dict[str, Any], int, dict[str, str]]:
        runs["refuse"] += 1  # refused before anything ran, and says so
        return {"error": "try again"}, 400, {"Idempotency-Outcome": "not-executed"}

    return app.wsgi_app


_django_runs: dict[str, Runs] = {}


def django_app(runs: Runs) -> WSGIApp:
    if not settings.configured:
        settings.configure(
            DEBUG=False,
            ALLOWED_HOSTS=["*"],
            ROOT_URLCONF=__name__,
            SECRET_KEY="test-only",
            MIDDLEWARE=[],
            INSTALLED_APPS=[],
            USE_TZ=True,
        )
        django.setup()
    _django_runs["current"] = runs
    from django.core.wsgi import get_wsgi_application

    application: WSGIApp = get_wsgi_application()
    return application


def _pay(req: Any) -> Any:
    from django.http import JsonResponse

    runs = _django_runs["current"]
    runs["pay"] += 1
    return JsonResponse({"run": runs["pay"], "got": json.loads(req.body or b"null")}, status=201)


def _slow(req: Any) -> Any:
    from django.http import JsonResponse

    runs = _django_runs["current"]
    runs["slow"] += 1
    runs.held.set()
    runs.hold.wait(10)
    return JsonResponse({"run": runs["slow"]}, status=201)


def _fail(req: Any) -> Any:
    from django.http import JsonResponse

    runs = _django_runs["current"]
    runs["fail"] += 1
    return JsonResponse({"error": "downstream"}, status=503)


def _headers(req: Any) -> Any:
    from django.http import HttpResponse

    runs = _django_runs["current"]
    runs["headers"] += 1
    response = HttpResponse("ok")
    response.headers["X-Multi"] = "one, two"
    response.set_cookie("session", "secret")
    return response


def _status(req: Any, code: int) -> Any:
    from django.http import JsonResponse

    runs = _django_runs["current"]
    runs["status"] += 1
    return JsonResponse({"run": runs["status"]}, status=code)


def _refuse(req: Any) -> Any:
    from django.http import JsonResponse

    runs = _django_runs["current"]
    runs["refuse"] += 1
    response = JsonResponse({"error": "try again"}, status=400)
    response.headers["Idempotency-Outcome"] = "not-executed"
    return response


def _urls() -> list[Any]:
    from django.urls import path
    from django.views.decorators.csrf import csrf_exempt

    return [
        path("payments", csrf_exempt(_pay)),
        path("slow", csrf_exempt(_slow)),
        path("fail", csrf_exempt(_fail)),
        path("headers", csrf_exempt(_headers)),
        path("status/<int:code>", csrf_exempt(_status)),
        path("refuse", csrf_exempt(_refuse)),
    ]


def __getattr__(name: str) -> Any:  # Django reads ROOT_URLCONF.urlpatterns lazily
    if name == "urlpatterns":
        return _urls()
    raise AttributeError(name)
