"""Limits a request meets before any work is done for it (caps themselves: schemas.limits).

:class:`RequestLimits` is a pure ASGI middleware, in front of routing and body parsing:

1. A ``Content-Length`` over the route's body limit is answered 413 at once.
2. Every ``/v1/`` request is authenticated (bearer API key) before its body is read; the
   principal is left in the scope for :func:`app.dependencies.current_principal`. FastAPI reads
   and parses a body parameter before it resolves any dependency, so authentication as a
   dependency alone would come too late.
3. The body is counted as it streams in; past the limit the request is answered 413 and
   nothing more is read, so memory stays at most one limit per request.

The limit is ``WEIGHTSMITH_MAX_BODY_BYTES`` unless a :data:`BODY_LIMITS` entry names a
larger setting for the route. Then :class:`CheckedBodyRoute` parses JSON bodies with the
caps of :mod:`schemas.limits` (422 naming the place), and :func:`checked_id` /
:func:`checked_cursor` turn malformed path segments into 404 and cursors into 422.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.dependencies import PRINCIPAL_SCOPE_KEY, authenticate
from app.problems import problem_response
from infra.db import InvalidCursor
from infra.db.jobstore import decode_cursor
from infra.settings import ENV_PREFIX, Settings
from schemas.jobs import ProblemItem
from schemas.limits import MAX_CURSOR_CHARS, DocumentRefused, load_json_document
from service.context import Service
from service.errors import Problem, not_found

# ---- body size ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BodyLimit:
    """A route whose bodies may exceed ``WEIGHTSMITH_MAX_BODY_BYTES``: ``setting`` names
    the :class:`~infra.settings.Settings` attribute holding its limit in bytes."""

    method: str
    path: re.Pattern[str]
    setting: str


BODY_LIMITS: list[BodyLimit] = [
    # One line per route that takes larger bodies; the first match wins.
    # An upload's chunk (app.routes.uploads; that route also caps it while streaming).
    BodyLimit("PUT", re.compile(r"^/v1/uploads/[^/]+/files/.+$"), "max_upload_chunk_bytes"),
]


def body_limit(settings: Settings, method: str, path: str) -> tuple[int, str]:
    """The body limit of a request in bytes, and the variable that sets it."""
    for rule in BODY_LIMITS:
        if rule.method == method and rule.path.match(path):
            return int(getattr(settings, rule.setting)), ENV_PREFIX + rule.setting.upper()
    return settings.max_body_bytes, "WEIGHTSMITH_MAX_BODY_BYTES"


def _too_large_detail(limit: int, variable: str) -> str:
    return f"the request body is larger than {limit} bytes, this route's limit ({variable})"


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once the body passes its limit. An HTTPException, so FastAPI
    re-raises it from its body parsing and the problem handlers answer 413."""

    def __init__(self, limit: int, variable: str) -> None:
        super().__init__(413, _too_large_detail(limit, variable))


def needs_api_key(path: str) -> bool:
    """Every ``/v1/`` route is a tenant's; health, metrics and the docs are not."""
    return path == "/v1" or path.startswith("/v1/")


class RequestLimits:
    """Body limit and authentication before routing and parsing (see the module doc)."""

    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        for rule in BODY_LIMITS:
            if not isinstance(getattr(settings, rule.setting, None), int):
                raise ValueError(f"BODY_LIMITS names {rule.setting!r}, not an integer setting")
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, variable = body_limit(self.settings, scope["method"], scope["path"])
        headers = Headers(scope=scope)
        try:
            declared = _content_length(headers)
            if declared is not None and declared > limit:
                raise Problem(413, _too_large_detail(limit, variable))
            if needs_api_key(scope["path"]):
                service: Service = scope["app"].state.service
                principal = await authenticate(service, headers.get("authorization"))
                scope[PRINCIPAL_SCOPE_KEY] = principal
        except Problem as problem:
            await _answer(scope, receive, send, problem)
            return

        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            if received > limit:  # asked again after the 413: still too large
                raise BodyTooLarge(limit, variable)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit, variable)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge as e:  # raised where no handler turned it into a response
            if started:
                raise
            await _answer(scope, receive, send, Problem(413, str(e.detail)))


def _content_length(headers: Headers) -> int | None:
    values = headers.getlist("content-length")
    if not values:
        return None
    if len(set(values)) != 1 or not re.fullmatch(r"[0-9]{1,19}", values[0].strip()):
        raise Problem(400, "the Content-Length header is not one whole number of bytes")
    return int(values[0])


async def _answer(scope: Scope, receive: Receive, send: Send, problem: Problem) -> None:
    """Answer before routing; the route is looked up all the same, so that request metrics
    name its template rather than '<unmatched>'."""
    route = _route_of(getattr(getattr(scope.get("app"), "router", None), "routes", ()), scope)
    if route is not None:
        scope["route"] = route
    response = problem_response(problem.problem, Request(scope), problem.headers)
    await response(scope, receive, send)


def _route_of(routes: Iterable[BaseRoute], scope: Scope) -> BaseRoute | None:
    """The route the router would pick (a full match, else a method mismatch). Newer FastAPI
    keeps an included router as one entry holding the original router: its routes are
    searched in turn."""
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.NONE:
            continue
        inner = getattr(getattr(route, "original_router", None), "routes", None)
        found = _route_of(inner, scope) if inner is not None else route
        if found is not None and match is Match.FULL:
            return found
        partial = partial or found
    return partial


# ---- JSON bodies ---------------------------------------------------------------------------


def refused(e: DocumentRefused) -> Problem:
    """The 422 for a body beyond a cap of schemas.limits, pointing at the place."""
    return Problem(
        422,
        str(e),
        title="Invalid request",
        errors=[ProblemItem(detail=e.message, pointer=e.pointer or None)],
    )


def is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


class _CheckedJsonRequest(Request):
    """A request whose ``json()`` is parsed within the caps of schemas.limits."""

    async def json(self) -> Any:
        if not hasattr(self, "_checked_json"):
            try:
                self._checked_json = load_json_document(await self.body())
            except DocumentRefused as e:
                raise refused(e) from None
        return self._checked_json


class CheckedBodyRoute(APIRoute):
    """A route whose JSON body parameter is parsed within the caps of schemas.limits.

    The body is parsed before FastAPI's own handler runs, so a refusal is answered as a 422
    problem (FastAPI turns any error while it parses a body into a bare 400); FastAPI then
    gets the parsed document from ``json()``. Routers use it with
    ``APIRouter(route_class=CheckedBodyRoute)``.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def checked(request: Request) -> Response:
            checked_request = _CheckedJsonRequest(request.scope, request.receive)
            if is_json(checked_request.headers.get("content-type")) and (
                await checked_request.body()
            ):
                await checked_request.json()
            return await handler(checked_request)

        return checked


# ---- path and query parameters -------------------------------------------------------------

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def checked_id(value: str, what: str) -> str:
    """A path segment naming a stored row (a UUID): anything else names nothing (404),
    and never reaches the database (PostgreSQL refuses NUL characters with an error)."""
    if not _ID.match(value):
        raise not_found(f"{what} {value[:64]!r}")
    return value


def checked_cursor(cursor: str | None) -> str | None:
    """A ``cursor`` query parameter the stores can use, or a 422 saying it is not one."""
    if cursor is None:
        return None
    try:
        if len(cursor) > MAX_CURSOR_CHARS:
            raise InvalidCursor("too long")
        _, row_id = decode_cursor(cursor)
        if not _ID.match(row_id):
            raise InvalidCursor("not a row id")
    except InvalidCursor:
        raise Problem(
            422,
            f"invalid cursor {cursor[:40]!r}: pass back a next_cursor from a previous page",
            title="Invalid cursor",
            errors=[
                ProblemItem(detail="not a cursor this service handed out", pointer="/query/cursor")
            ],
        ) from None
    return cursor
