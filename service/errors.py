"""The service's refusals: what was wrong with a request, as an RFC 9457 problem.

The service layer raises :class:`Problem` (status, title, a precise detail, per-field
``errors`` with JSON Pointers, extension members such as ``model``); the API renders it as
``application/problem+json`` (app/problems.py), the schedule fire records it as a refusal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from schemas.jobs import ProblemDetail, ProblemItem


class Problem(Exception):
    """An error response: status, a short title, a precise detail, per-field ``errors``.

    ``extra`` adds extension members (e.g. ``model``, ``job_id``); ``headers`` are sent as
    well (``Retry-After``, ``WWW-Authenticate``).
    """

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        title: str | None = None,
        errors: Sequence[ProblemItem] = (),
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.problem = ProblemDetail(
            title=title or phrase(status),
            status=status,
            detail=detail,
            errors=list(errors),
            **extra,
        )
        self.headers = dict(headers or {})

    @classmethod
    def from_detail(cls, problem: ProblemDetail, **headers: str) -> Problem:
        error = cls(problem.status, problem.detail or problem.title, headers=headers)
        error.problem = problem
        return error


def not_found(what: str) -> Problem:
    return Problem(404, f"{what} does not exist", title="Not found")


def phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
