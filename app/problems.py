"""Errors as ``application/problem+json`` (RFC 9457), for every route and FastAPI's own.

Routes and the service layer raise :class:`service.errors.Problem`; the handlers installed
by :func:`install_problem_handlers` turn it, FastAPI's request validation errors and
Starlette's HTTP errors (unknown route, wrong method) into a
:class:`schemas.jobs.ProblemDetail` body.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from schemas.jobs import PROBLEM_JSON, ProblemDetail
from service.errors import Problem, phrase

log = logging.getLogger("weightsmith.api")


def problem_response(
    problem: ProblemDetail, request: Request | None = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    if problem.instance is None and request is not None:
        problem.instance = request.url.path
    body = problem.model_dump(mode="json", exclude_none=True)
    if not body.get("errors"):
        body.pop("errors", None)
    return JSONResponse(body, status_code=problem.status, media_type=PROBLEM_JSON, headers=headers)


async def _on_api_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    return problem_response(exc.problem, request, exc.headers)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problem = ProblemDetail.from_errors(exc.errors(), loc_root="body")
    return problem_response(problem, request)


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404 and exc.detail == "Not Found":
        detail = f"no route {request.url.path!r}; see /docs for the API"
    elif exc.status_code == 405:
        detail = f"method {request.method} is not allowed on {request.url.path!r}"
    else:
        detail = str(exc.detail)
    problem = ProblemDetail(title=phrase(exc.status_code), status=exc.status_code, detail=detail)
    return problem_response(problem, request, exc.headers)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    problem = ProblemDetail(
        title="Internal Server Error",
        status=500,
        detail="the service failed to handle this request; it has been logged",
    )
    return problem_response(problem, request)


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(Problem, _on_api_problem)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
