"""The read-only web console at ``/ui``: static files of this package (no Node at run time),
served from the API's own origin. The page holds no data of its own: its scripts call the
JSON API (``/v1/…``) with the API key the user typed, kept in the tab's ``sessionStorage``
and sent only in the ``Authorization`` header, so the console sees exactly what the key's
tenant sees through the API. Every ``/ui`` response carries a strict Content-Security-Policy
(scripts, styles and connections from this origin only; no inline code; no framing).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONSOLE_PATH = "/ui"
STATIC_DIR = Path(__file__).resolve().parent / "ui" / "static"

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
    "cache-control": "no-cache",
}


class ConsoleHeaders:
    """Adds :data:`SECURITY_HEADERS` to every response under ``/ui`` (pure ASGI: the API's
    streaming downloads pass through untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not (path == CONSOLE_PATH or path.startswith(CONSOLE_PATH + "/")):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v)
                    for k, v in message.get("headers", [])
                    if k.decode("latin-1").lower() not in SECURITY_HEADERS
                ]
                headers += [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def install_console(app: FastAPI) -> None:
    """``GET /ui/`` (the page), ``/ui/static/…`` (its scripts and styles), ``/ui`` → ``/ui/``."""

    @app.get(CONSOLE_PATH, include_in_schema=False)
    def console_redirect() -> RedirectResponse:
        return RedirectResponse(CONSOLE_PATH + "/", status_code=308)

    @app.get(CONSOLE_PATH + "/", include_in_schema=False)
    def console_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount(CONSOLE_PATH + "/static", StaticFiles(directory=STATIC_DIR), name="console")
    app.add_middleware(ConsoleHeaders)
