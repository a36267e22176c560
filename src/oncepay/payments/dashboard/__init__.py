"""The operator dashboard at ``/dashboard`` (SPEC §11; docs/dashboard.md), and ``/docs`` and
``/redoc`` served from the package's own copies of Swagger UI and ReDoc (offline, no CDN)."""

from __future__ import annotations

import base64
import hashlib
import re

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from oncepay.payments.dashboard.auth import NotSignedIn
from oncepay.payments.dashboard.routes import STATIC, not_signed_in, problem_page, router

__all__ = ["mount"]

VENDOR = "/dashboard/static/vendor"
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


def _reference_page(page: HTMLResponse) -> HTMLResponse:
    """``page`` (Swagger UI's or ReDoc's, as FastAPI draws it) with a Content-Security-Policy:
    scripts from the service itself and the page's own inline start-up script (by its hash),
    nothing from elsewhere, no framing. The libraries inject their styles and draw images
    and fonts as ``data:``; ReDoc's search runs in a ``blob:`` worker."""
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"
        for script in _INLINE_SCRIPT.findall(bytes(page.body).decode())
    )
    page.headers["Content-Security-Policy"] = (
        f"default-src 'self'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    )
    page.headers["X-Content-Type-Options"] = "nosniff"
    page.headers["Referrer-Policy"] = "same-origin"
    return page


def mount(app: FastAPI) -> None:
    """The dashboard's routes and assets, and the offline API reference pages, on ``app``
    (created with ``docs_url=None, redoc_url=None``)."""
    app.router.routes.extend(router.routes)
    app.mount("/dashboard/static", StaticFiles(directory=STATIC), name="dashboard-static")
    app.add_exception_handler(NotSignedIn, not_signed_in)  # type: ignore[arg-type]
    app.state.problem_page = problem_page  # api/errors.py: a dashboard page's 4xx as a page
    title = app.title

    @app.get("/docs", include_in_schema=False)
    async def swagger() -> HTMLResponse:
        return _reference_page(
            get_swagger_ui_html(
                openapi_url="/openapi.json",
                title=f"{title} · Swagger UI",
                swagger_js_url=f"{VENDOR}/swagger-ui-bundle.js",
                swagger_css_url=f"{VENDOR}/swagger-ui.css",
                swagger_favicon_url=f"{VENDOR}/favicon-32x32.png",
            )
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return _reference_page(
            get_redoc_html(
                openapi_url="/openapi.json",
                title=f"{title} · ReDoc",
                redoc_js_url=f"{VENDOR}/redoc.standalone.js",
                redoc_favicon_url=f"{VENDOR}/favicon-32x32.png",
                with_google_fonts=False,
            )
        )
