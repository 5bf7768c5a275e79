"""``/docs`` (Swagger UI) and ``/redoc``, with their scripts served by the server itself.

The scripts and styles come from the ``fastapi-offline`` package (mounted at :data:`STATIC_URL`),
so the pages work where no CDN is reachable. The pages themselves are module-level handlers that
read the app from the request: FastAPI keeps every route callable it has classified in a
process-wide LRU of 4,096, and a handler that closes over its app (as ``FastAPIOffline``'s own do)
keeps that app, its database engine and its whole route table alive after the server stops, for
as long as the process runs. A process that starts many servers (replicas in one process, a
test suite) would carry every one of them.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from fleet_server.routes.mount import mount_routes

STATIC_URL = "/static-offline-docs"
STATIC_DIR = Path(fastapi_offline.__file__).parent / "static"
DOCS_URL = "/docs"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
REDOC_URL = "/redoc"

router = APIRouter(include_in_schema=False)


def _root(request: Request) -> str:
    """The prefix a proxy serves the app under, as FastAPI's own pages take it."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def _openapi_url(app: FastAPI) -> str:
    if app.openapi_url is None:  # no document: the pages have nothing to show
        raise HTTPException(status_code=404, detail="the API document is not served")
    return app.openapi_url


@router.get(DOCS_URL)
async def swagger_ui(request: Request) -> HTMLResponse:
    app: FastAPI = request.app
    root = _root(request)
    return get_swagger_ui_html(
        openapi_url=f"{root}{_openapi_url(app)}",
        title=f"{app.title} - Swagger UI",
        oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT_URL}",
        swagger_js_url=f"{root}{STATIC_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{STATIC_URL}/swagger-ui.css",
        swagger_favicon_url=f"{root}{STATIC_URL}/favicon.png",
        swagger_ui_parameters=app.swagger_ui_parameters,
    )


@router.get(OAUTH2_REDIRECT_URL)
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get(REDOC_URL)
async def redoc(request: Request) -> HTMLResponse:
    app: FastAPI = request.app
    root = _root(request)
    return get_redoc_html(
        openapi_url=f"{root}{_openapi_url(app)}",
        title=f"{app.title} - ReDoc",
        redoc_js_url=f"{root}{STATIC_URL}/redoc.standalone.js",
        with_google_fonts=False,
        redoc_favicon_url=f"{root}{STATIC_URL}/favicon.png",
    )


def install_docs(app: FastAPI) -> None:
    """Serve the documentation pages and their static files on ``app`` (built with ``docs_url=None``
    and ``redoc_url=None``, so FastAPI adds none of its own)."""
    app.mount(STATIC_URL, StaticFiles(directory=STATIC_DIR), name="static-offline-docs")
    mount_routes(app, router)


__all__ = ["STATIC_URL", "install_docs"]
