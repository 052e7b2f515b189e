"""``GET /metrics``: Prometheus text (see app.metrics for what it reports).

Open by default, like ``/healthz``: a scraper holds no tenant's API key, and the figures are
aggregates across tenants (counts, durations, bytes), which no tenant's key should unlock
either. With ``WEIGHTSMITH_METRICS_TOKEN`` set it needs ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from app.dependencies import ServiceDep
from schemas.jobs import ProblemDetail
from service.errors import Problem

router = APIRouter(tags=["observability"])

_scraper = HTTPBearer(
    auto_error=False,
    scheme_name="MetricsToken",
    description="WEIGHTSMITH_METRICS_TOKEN, when the operator set one",
)


def _authorized(
    service: ServiceDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_scraper)],
) -> None:
    expected = service.settings.metrics_token
    if expected is None:
        return
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise Problem(
            401,
            "/metrics needs 'Authorization: Bearer <WEIGHTSMITH_METRICS_TOKEN>'",
            headers={"WWW-Authenticate": 'Bearer realm="weightsmith-metrics"'},
        )


@router.get(
    "/metrics",
    summary="Prometheus metrics: jobs, durations, bytes, queue depth, worker liveness",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"},
        401: {"model": ProblemDetail, "content": {"application/problem+json": {}}},
    },
    dependencies=[Depends(_authorized)],
)
def metrics(request: Request) -> Response:
    registry: CollectorRegistry = request.app.state.metrics_registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
