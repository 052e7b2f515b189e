"""``/healthz`` (the process answers) and ``/readyz`` (its dependencies answer). No auth."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.dependencies import ServiceDep
from app.problems import problem_response
from schemas.jobs import ProblemDetail
from service.context import Service

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _database(service: Service) -> None:
    with service.engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def _broker(service: Service) -> None:
    service.queue.ping()


def _object_store(service: Service) -> None:
    service.store.ping()


CHECKS: dict[str, Callable[[Service], None]] = {
    "database": _database,
    "broker": _broker,
    "object_store": _object_store,
}


@router.get(
    "/readyz",
    summary="Database, broker and object store are reachable",
    responses={503: {"model": ProblemDetail, "content": {"application/problem+json": {}}}},
)
def readyz(service: ServiceDep) -> JSONResponse:
    checks: dict[str, dict[str, Any]] = {}
    for name, check in CHECKS.items():
        start = time.perf_counter()
        try:
            check(service)
        except Exception as e:
            checks[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        else:
            checks[name] = {"ok": True}
        checks[name]["ms"] = round((time.perf_counter() - start) * 1000, 1)
    failed = [name for name, result in checks.items() if not result["ok"]]
    if not failed:
        return JSONResponse({"status": "ready", "checks": checks})
    problem = ProblemDetail(
        title="Service Unavailable",
        status=503,
        detail="not ready: " + "; ".join(f"{n}: {checks[n]['error']}" for n in failed),
        failed=failed,
        checks=checks,
    )
    return problem_response(problem, headers={"Retry-After": "5"})
