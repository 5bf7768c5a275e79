"""The web console: the fleet server's own pages under ``/ui`` (docs/console.md).

Server-rendered HTML (Jinja2 templates in ``templates/``), one small stylesheet and one small
script of our own in ``static/``, charts as inline SVG drawn on the server: nothing is fetched
from elsewhere, so it works on an air-gapped site and ships inside the Python package.
``install_console`` mounts it on the app ``create_app`` builds, in the same process and with the
same tokens as the API.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from fleet_server.console.access import NeedsSignIn, Refused
from fleet_server.console.pages import render, router
from fleet_server.console.session import SessionCodec, console_secret
from fleet_server.routes.mount import mount_routes
from fleet_server.settings import ServerSettings

STATIC = Path(__file__).parent / "static"


def install_console(app: FastAPI, settings: ServerSettings) -> None:
    app.state.console_codec = SessionCodec(console_secret(settings), settings.console_session_seconds)
    mount_routes(app, router)
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="console-static")

    async def needs_sign_in(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, NeedsSignIn)
        if request.method != "GET" or request.url.path.endswith("/live"):
            # a form post or the poller without a session: say so, a redirect would lose the post
            return HTMLResponse(f"<p>Not signed in: {exc.why or 'sign in first'}.</p>", status_code=401)
        query = {"next": request.url.path}
        if exc.why:
            query["why"] = exc.why
        return RedirectResponse(f"/ui/login?{urlencode(query)}", status_code=303)

    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Refused)
        return render(request, "error.html", exc.user, status=403, message=exc.message, title="Not allowed")

    app.add_exception_handler(NeedsSignIn, needs_sign_in)
    app.add_exception_handler(Refused, refused)


__all__ = ["install_console"]
