"""The operator dashboard at ``/dashboard`` (SPEC §11; docs/dashboard.md), and ``/docs`` and
``/redoc`` served from the package's own copies of Swagger UI and ReDoc (offline, no CDN)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from oncepay.payments.dashboard.auth import NotSignedIn
from oncepay.payments.dashboard.routes import STATIC, not_signed_in, problem_page, router

__all__ = ["mount"]

VENDOR = "/dashboard/static/vendor"


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
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{title} · Swagger UI",
            swagger_js_url=f"{VENDOR}/swagger-ui-bundle.js",
            swagger_css_url=f"{VENDOR}/swagger-ui.css",
            swagger_favicon_url=f"{VENDOR}/favicon-32x32.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title=f"{title} · ReDoc",
            redoc_js_url=f"{VENDOR}/redoc.standalone.js",
            redoc_favicon_url=f"{VENDOR}/favicon-32x32.png",
            with_google_fonts=False,
        )
