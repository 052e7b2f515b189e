"""Helpers of the API tests: the type of the ``make_api`` fixture (tests/conftest.py) and the
check of a problem+json answer."""

from __future__ import annotations

from collections.abc import Callable

from schemas.jobs import PROBLEM_JSON
from testbed.api import ApiHarness

MakeApi = Callable[..., ApiHarness]
"""``make_api(**settings_overrides)``: a new app on the test's database (see conftest)."""


def assert_problem(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    body = response.json()
    assert body["status"] == status
    assert body["title"] and body["detail"]
    return body
