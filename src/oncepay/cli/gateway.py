"""``oncepay gateway``: the idempotency gateway, a reverse proxy in front of any HTTP service."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from oncepay._logformat import LogFormat, resolve, uvicorn_logging
from oncepay.cli._common import LOG_FORMAT_HELP, StoreUrl, console
from oncepay.cli._env import given_as
from oncepay.errors import OncePayError
from oncepay.idempotency.stores import store_from_url

__all__ = ["gateway"]


_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def gateway(
    upstream: Annotated[
        str, typer.Option(envvar="ONCEPAY_UPSTREAM", help="Base URL of the service behind.")
    ],
    store: StoreUrl = "sqlite:///oncepay-gateway.db",
    host: Annotated[str, typer.Option(envvar="ONCEPAY_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="ONCEPAY_PORT", min=1, max=65535)] = 8000,
    workers: Annotated[int, typer.Option(envvar="ONCEPAY_WORKERS", min=1)] = 1,
    timeout: Annotated[
        float,
        typer.Option(
            envvar=["ONCEPAY_TIMEOUT", "ONCEPAY_UPSTREAM_TIMEOUT"],  # the second: its older name
            min=0.1,
            help="Upstream timeout, s.",
        ),
    ] = 30.0,
    optional_key: Annotated[
        bool | None,
        typer.Option(
            "--optional-key",
            envvar="ONCEPAY_OPTIONAL_KEY",  # unset: ONCEPAY_KEY_REQUIRED (its inverse) decides
            help="Pass requests without a key through.",
        ),
    ] = None,
    wait: Annotated[
        float, typer.Option(envvar="ONCEPAY_WAIT", min=0, help="Hold duplicates up to N s.")
    ] = 0.0,
    fail_open: Annotated[
        bool,
        typer.Option(
            "--fail-open",
            envvar="ONCEPAY_FAIL_OPEN",
            help="Through a store outage, pass requests upstream unprotected (logged) "
            "instead of answering 503.",
        ),
    ] = False,
    scope_header: Annotated[
        str | None,
        typer.Option(
            envvar="ONCEPAY_SCOPE_HEADER",
            help="Scope keys by this header (hashed) instead of Authorization.",
        ),
    ] = None,
    scope_cookie: Annotated[
        str | None,
        typer.Option(
            envvar="ONCEPAY_SCOPE_COOKIE",
            help="Scope keys by this cookie (hashed); --scope-header is then its fallback.",
        ),
    ] = None,
    fingerprint_secret: Annotated[
        str | None,
        typer.Option(
            envvar="ONCEPAY_FINGERPRINT_SECRET",
            help="HMAC key for request fingerprints (prefer the env var: argv is public).",
        ),
    ] = None,
    stripe_compatible: Annotated[
        bool,
        typer.Option(
            "--stripe-compatible",
            envvar="ONCEPAY_STRIPE_COMPATIBLE",
            help="Answer as Stripe does: 400 idempotency_error for a reused key, 409 "
            "idempotency_key_in_use while it runs, Stripe's error object for every problem.",
        ),
    ] = False,
    usage_log: Annotated[
        str | None,
        typer.Option(
            envvar="ONCEPAY_USAGE_LOG",
            help="Append each idempotency decision to this key-usage log (JSON Lines).",
        ),
    ] = None,
    adaptive_ttl: Annotated[
        str | None,
        typer.Option(
            # --adaptive-ttl FILE, its first name, still works; serve's --adaptive-ttl is a
            # switch, whose ONCEPAY_ADAPTIVE_TTL=true this option must not read as a FILE.
            "--adaptive-ttl-file",
            "--adaptive-ttl",
            envvar="ONCEPAY_ADAPTIVE_TTL_FILE",
            metavar="FILE",
            help="Keep new keys for the TTLs learned per tenant and route in FILE (`oncepay "
            "insight analyze LOG --json`); FILE is read again when it changes.",
        ),
    ] = None,
    adaptive_ttl_min: Annotated[
        float,
        typer.Option(
            envvar="ONCEPAY_ADAPTIVE_TTL_MIN",
            min=61,
            help="Shortest learned TTL applied, s (longer than the 60 s lease).",
        ),
    ] = 300.0,
    adaptive_ttl_max: Annotated[
        float,
        typer.Option(
            envvar="ONCEPAY_ADAPTIVE_TTL_MAX", min=1, help="Longest learned TTL applied, s."
        ),
    ] = 7 * 86400.0,
    adaptive_ttl_reload: Annotated[
        float,
        typer.Option(
            envvar="ONCEPAY_ADAPTIVE_TTL_RELOAD",
            min=0.1,
            help="Seconds between checks of the --adaptive-ttl-file FILE for a change.",
        ),
    ] = 30.0,
    log_format: Annotated[
        LogFormat, typer.Option(envvar="ONCEPAY_LOG_FORMAT", help=LOG_FORMAT_HELP)
    ] = "auto",
) -> None:
    """Run the idempotency gateway: a reverse proxy that makes UPSTREAM idempotent.

    Keys are scoped by a SHA-256 of Authorization, and requests without one share a single
    'anonymous' scope: behind cookie sign-in, use --scope-cookie (docs/gateway.md)."""
    from urllib.parse import urlsplit

    import uvicorn

    from oncepay.http.gateway import GatewaySettings

    if urlsplit(upstream).scheme not in {"http", "https"} or not urlsplit(upstream).netloc:
        console.print(
            f"[red]error:[/red] {given_as('upstream')} must be an http(s) URL, not {upstream!r}"
        )
        raise typer.Exit(2)
    settings = GatewaySettings(
        upstream,
        scope_header=scope_header,
        scope_cookie=scope_cookie,
        adaptive_ttl=adaptive_ttl,
        adaptive_ttl_min=adaptive_ttl_min,
        adaptive_ttl_max=adaptive_ttl_max,
    )
    if optional_key is None:  # neither the flag nor ONCEPAY_OPTIONAL_KEY: the older variable
        optional_key = not _key_required()
    if usage_log and not os.path.isdir(os.path.dirname(os.path.abspath(usage_log))):
        console.print(
            f"[red]error:[/red] {given_as('usage_log')} {usage_log!r}: its directory does not exist"
        )
        raise typer.Exit(2)
    try:  # fail fast on a bad URL or name, before any worker starts
        store_from_url(store)
        settings.scope()
        settings.ttl_policy()  # a bad file or bounds: exit 2 here, not a crash in each worker
    except OncePayError as exc:
        console.print(f"[red]error:[/red] {exc.detail}", soft_wrap=True)
        raise typer.Exit(2) from exc
    os.environ.update(
        ONCEPAY_UPSTREAM=upstream,
        ONCEPAY_STORE_URL=store,
        ONCEPAY_UPSTREAM_TIMEOUT=str(timeout),
        ONCEPAY_KEY_REQUIRED="false" if optional_key else "true",
        ONCEPAY_WAIT=str(wait),
        ONCEPAY_FAIL_OPEN="true" if fail_open else "false",
        ONCEPAY_SCOPE_HEADER=scope_header or "",
        ONCEPAY_SCOPE_COOKIE=scope_cookie or "",
        ONCEPAY_FINGERPRINT_SECRET=fingerprint_secret or "",
        ONCEPAY_USAGE_LOG=usage_log or "",
        ONCEPAY_STRIPE_COMPATIBLE="true" if stripe_compatible else "false",
        ONCEPAY_ADAPTIVE_TTL_FILE=adaptive_ttl or "",
        ONCEPAY_ADAPTIVE_TTL_MIN=str(adaptive_ttl_min),
        ONCEPAY_ADAPTIVE_TTL_MAX=str(adaptive_ttl_max),
        ONCEPAY_ADAPTIVE_TTL_RELOAD=str(adaptive_ttl_reload),
    )
    uvicorn.run(
        "oncepay.http.gateway:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="warning",
        log_config=uvicorn_logging(resolve(log_format)),
        # The gateway drops the upstream's Date and Server: these are the one of each.
        date_header=True,
        server_header=True,
    )


def _key_required() -> bool:
    """``ONCEPAY_KEY_REQUIRED``, ``--optional-key``'s inverse under its older name."""
    required = os.environ.get("ONCEPAY_KEY_REQUIRED", "true").strip().lower()
    if required not in _BOOLEANS:
        console.print(
            f"[red]error:[/red] ONCEPAY_KEY_REQUIRED must be true or false, not {required!r}"
        )
        raise typer.Exit(2)
    return _BOOLEANS[required]
