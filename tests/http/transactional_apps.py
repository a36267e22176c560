"""Real apps that complete their request's record inside their own database transaction
(oncepay.http.transaction), one per framework and driver, over one database they share with
the store. Each ``POST /payments`` inserts a row and completes the record in one transaction;
``x-rollback: 1`` fails it after the completion (rolled back), ``x-crash: 1`` kills the
process with SIGKILL right after the commit, before anything is answered.

Everything here is picklable or built from picklable parts, so a child process can rebuild
an app (the crash tests kill a real process). No ``from __future__ import annotations``:
FastAPI reads the endpoints' annotations, which name classes imported inside the builders."""

import json
import os
import signal
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import psycopg

from oncepay.http import RequestTicket, request_ticket
from oncepay.idempotency import StoredResponse
from oncepay.idempotency.stores import Store, store_from_url
from tests.servers import POSTGRES_URL

KEY_HEADER = "idempotency-key"
AUTH = "Bearer tenant-a"


# What the apps built in this process must close at the end of a test: their SQLAlchemy
# engines' pooled connections (left to the garbage collector, psycopg warns).
_engines: list[Any] = []


def dispose_engines() -> None:
    while _engines:
        _engines.pop().dispose()


async def adispose_engines() -> None:
    while _engines:
        engine = _engines.pop()
        disposed = engine.dispose()
        if disposed is not None:
            await disposed


class Rollback(Exception):
    """Raised inside the app's transaction, after the completion, to roll it back."""


@dataclass(frozen=True)
class Database:
    """The app's database and the store's: the same SQLite file or PostgreSQL database."""

    kind: str  # "sqlite" or "postgres"
    target: str  # the SQLite path, or the PostgreSQL URL
    table: str  # the app's payments table (schema-qualified on PostgreSQL)
    store_options: dict[str, Any] = field(default_factory=dict)

    @property
    def store_url(self) -> str:
        return f"sqlite:///{self.target}" if self.kind == "sqlite" else self.target

    def build_store(self) -> Store:
        return store_from_url(self.store_url, **self.store_options)

    def sqlalchemy_url(self, *, asynchronous: bool) -> str:
        if self.kind == "sqlite":
            return f"sqlite+{'aiosqlite' if asynchronous else 'pysqlite'}:///{self.target}"
        driver = "asyncpg" if asynchronous else "psycopg"
        return self.target.replace("postgresql://", f"postgresql+{driver}://", 1)

    def rows(self, key: str) -> int:
        """How many payment rows hold ``key``, read on a connection of our own."""
        query = f"SELECT count(*) FROM {self.table} WHERE idempotency_key = "
        if self.kind == "sqlite":
            with sqlite3.connect(self.target) as lite:
                (count,) = lite.execute(query + "?", (key,)).fetchone()
        else:
            with psycopg.connect(self.target) as pg:
                (count,) = pg.execute(query + "%s", (key,)).fetchone() or (None,)
        assert isinstance(count, int)
        return count


def sqlite_database(folder: str) -> Database:
    path = os.path.join(folder, "app.db")
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE payments (idempotency_key TEXT NOT NULL, amount INTEGER)")
    return Database("sqlite", path, "payments")


def postgres_database(schema: str) -> Database:
    unique = uuid.uuid4().hex[:12]
    table = f"{schema}.payments_{unique}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (idempotency_key text NOT NULL, amount integer)")
    return Database("postgres", POSTGRES_URL, table, {"table": f"{schema}.rec_{unique}"})


def answer(key: str) -> dict[str, Any]:
    return {"id": f"pay_{key}", "amount": 100}


def after_commit(headers: Any) -> None:
    """The crash window the issue is about: the app's commit is done, the answer not sent."""
    if headers.get("x-crash") == "1":
        os.kill(os.getpid(), signal.SIGKILL)


def then(headers: Any) -> None:
    if headers.get("x-rollback") == "1":
        raise Rollback


# -- ASGI apps -----------------------------------------------------------------------------------


def fastapi_sqlalchemy_async(db: Database) -> Any:
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import JSONResponse
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

    from oncepay.http import RequestTicketDep

    engine = create_async_engine(db.sqlalchemy_url(asynchronous=True))
    _engines.append(engine)
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    async def session() -> AsyncIterator[AsyncSession]:
        async with sessions() as opened:
            yield opened

    app = FastAPI()

    @app.post("/payments", status_code=201)
    async def pay(
        request: Request,
        ticket: RequestTicketDep,
        session: Annotated[AsyncSession, Depends(session)],
    ) -> JSONResponse:
        key = request.headers[KEY_HEADER]
        async with session.begin():
            insert = text(f"INSERT INTO {db.table} VALUES (:key, 100)")
            await session.execute(insert, {"key": key})
            response = JSONResponse(answer(key), status_code=201)
            assert ticket is not None
            await ticket.acomplete_in(session, response)
            then(request.headers)
        after_commit(request.headers)
        return response

    return app


def fastapi_sqlalchemy_sync(db: Database) -> Any:
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import JSONResponse
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import Session, sessionmaker

    from oncepay.http import RequestTicketDep

    engine = create_engine(db.sqlalchemy_url(asynchronous=False))
    _engines.append(engine)
    sessions = sessionmaker(engine)

    def session() -> Any:
        with sessions() as opened:
            yield opened

    app = FastAPI()

    @app.post("/payments", status_code=201)
    def pay(
        request: Request, ticket: RequestTicketDep, session: Annotated[Session, Depends(session)]
    ) -> JSONResponse:
        key = request.headers[KEY_HEADER]
        with session.begin():
            session.execute(text(f"INSERT INTO {db.table} VALUES (:key, 100)"), {"key": key})
            response = JSONResponse(answer(key), status_code=201)
            assert ticket is not None
            ticket.complete_in(session, response)
            then(request.headers)
        after_commit(request.headers)
        return response

    return app


def starlette_asyncpg(db: Database) -> Any:
    import asyncpg
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def pay(request: Request) -> JSONResponse:
        key = request.headers[KEY_HEADER]
        ticket = request_ticket(request)
        assert ticket is not None
        conn = await asyncpg.connect(db.target)
        try:
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {db.table} VALUES ($1, 100)", key)
                response = JSONResponse(answer(key), status_code=201)
                await ticket.acomplete_in(conn, response)
                then(request.headers)
        finally:
            await conn.close()
        after_commit(request.headers)
        return response

    return Starlette(routes=[Route("/payments", pay, methods=["POST"])])


def asgi_psycopg(db: Database) -> Any:
    """A plain ASGI app: it builds the StoredResponse itself and sends exactly that."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        key = headers[KEY_HEADER]
        ticket: RequestTicket | None = request_ticket(scope)
        assert ticket is not None
        body = json.dumps(answer(key)).encode()
        response = StoredResponse(201, (("content-type", "application/json"),), body)
        connecting = psycopg.AsyncConnection.connect(db.target)
        async with await connecting as conn, conn.transaction():
            await conn.execute(f"INSERT INTO {db.table} VALUES (%s, 100)", (key,))
            await ticket.acomplete_in(conn, response)
            then(headers)
        after_commit(headers)
        raw = [(k.encode(), v.encode()) for k, v in response.headers]
        await send({"type": "http.response.start", "status": 201, "headers": raw})
        await send({"type": "http.response.body", "body": body})

    return app


ASGI_APPS: dict[str, Callable[[Database], Any]] = {
    "fastapi-sqlalchemy-async": fastapi_sqlalchemy_async,
    "fastapi-sqlalchemy-sync": fastapi_sqlalchemy_sync,
    "starlette-asyncpg": starlette_asyncpg,
    "asgi-psycopg": asgi_psycopg,
}


# -- WSGI apps -----------------------------------------------------------------------------------


def flask_sqlalchemy(db: Database) -> Any:
    from flask import Flask, jsonify, request
    from flask_sqlalchemy import SQLAlchemy
    from sqlalchemy import text

    app = Flask("oncepay-transactional")
    app.config["SQLALCHEMY_DATABASE_URI"] = db.sqlalchemy_url(asynchronous=False)
    orm = SQLAlchemy(app)
    with app.app_context():
        _engines.append(orm.engine)

    @app.post("/payments")
    def pay() -> Any:
        key = request.headers[KEY_HEADER]
        ticket = request_ticket(request)
        assert ticket is not None
        orm.session.execute(text(f"INSERT INTO {db.table} VALUES (:key, 100)"), {"key": key})
        response = jsonify(answer(key))
        response.status_code = 201
        ticket.complete_in(orm.session, response)
        try:
            then(request.headers)
        except Rollback:
            orm.session.rollback()
            raise
        orm.session.commit()
        after_commit(request.headers)
        return response

    return app.wsgi_app


# -- Django (settings are per process: every Django app runs in a child process of its own) ------

_django: dict[str, Any] = {}


def django_app(db: Database) -> Any:
    """A Django project whose view writes through the ORM inside ``transaction.atomic()``."""
    import django
    from django.conf import settings

    schema, _, table = db.table.rpartition(".")
    settings.configure(
        DEBUG=False,
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=__name__,
        SECRET_KEY="test-only",
        MIDDLEWARE=[],
        INSTALLED_APPS=["django.contrib.contenttypes"],
        USE_TZ=True,
        DATABASES={"default": _django_database(db, schema)},
    )
    django.setup()
    from django.db import models

    class Payment(models.Model):  # type: ignore[misc]
        idempotency_key = models.TextField(primary_key=True)
        amount = models.IntegerField()

        class Meta:
            app_label = "contenttypes"
            db_table = table
            managed = False

    _django["Payment"] = Payment
    from django.core.wsgi import get_wsgi_application

    return get_wsgi_application()


def _django_database(db: Database, schema: str) -> dict[str, Any]:
    if db.kind == "sqlite":
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": db.target}
    from urllib.parse import urlsplit

    url = urlsplit(db.target)
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": url.path.lstrip("/") or "postgres",
        "USER": url.username or "postgres",
        "PASSWORD": url.password or "",
        "HOST": url.hostname or "127.0.0.1",
        "PORT": str(url.port or 5432),
        "OPTIONS": {"options": f"-c search_path={schema}"},
    }


def _django_pay(request: Any) -> Any:
    from django.db import connection, transaction
    from django.http import JsonResponse

    key = request.headers[KEY_HEADER]
    ticket = request_ticket(request)
    assert ticket is not None
    with transaction.atomic():
        _django["Payment"].objects.create(idempotency_key=key, amount=100)
        response = JsonResponse(answer(key), status=201)
        ticket.complete_in(connection, response)
        then(request.headers)
    after_commit(request.headers)
    return response


def __getattr__(name: str) -> Any:  # Django reads ROOT_URLCONF.urlpatterns lazily
    if name == "urlpatterns":
        from django.urls import path
        from django.views.decorators.csrf import csrf_exempt

        return [path("payments", csrf_exempt(_django_pay))]
    raise AttributeError(name)
