"""``/v1/jobs``: submit, read, list and cancel jobs (rules in service.submission and JobStore)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response, status
from starlette.concurrency import run_in_threadpool

from app.bodies import parse_job_request
from app.dependencies import PrincipalDep, ServiceDep
from app.limits import CheckedBodyRoute, checked_cursor, checked_id
from infra.db import InvalidCursor
from infra.db.jobstore import MAX_PAGE_SIZE
from schemas.jobs import (
    JobKind,
    JobList,
    JobState,
    JobView,
    ProblemDetail,
    job_create_json_schema,
)
from schemas.limits import MAX_CURSOR_CHARS, MAX_IDEMPOTENCY_KEY_CHARS
from service.errors import Problem, not_found
from service.submission import submit_job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], route_class=CheckedBodyRoute)

_PROBLEM = {"model": ProblemDetail, "content": {"application/problem+json": {}}}
_JOB_CREATE_SCHEMA = job_create_json_schema()
_SUBMIT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _JOB_CREATE_SCHEMA},
            "application/yaml": {"schema": _JOB_CREATE_SCHEMA},
            "text/yaml": {"schema": _JOB_CREATE_SCHEMA},
        },
    }
}


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobView,
    summary="Submit a merge or edit job",
    description=(
        "The body is `{kind, recipe, artifact_name}` as JSON, or the same fields as YAML "
        "(`Content-Type: application/yaml`). Every model reference is pinned (hub commit "
        "sha, artifact version) before the job is queued. With an `Idempotency-Key` header, "
        "the same key and body replay the first response, a different body is refused "
        "(422), and a first request still in progress answers 409."
    ),
    openapi_extra=_SUBMIT_BODY,
    responses={409: _PROBLEM, 413: _PROBLEM, 415: _PROBLEM, 422: _PROBLEM, 503: _PROBLEM},
)
async def submit(
    request: Request,
    response: Response,
    service: ServiceDep,
    principal: PrincipalDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=MAX_IDEMPOTENCY_KEY_CHARS,
            pattern=r"^[\x20-\x7e]+$",
            description="printable ASCII, at most 255 characters",
        ),
    ] = None,
) -> JobView:
    body = await request.body()
    # in a thread: a YAML body of 1 MiB takes a fraction of a second to parse
    job_request = await run_in_threadpool(
        parse_job_request, body, request.headers.get("content-type")
    )
    submitted = await run_in_threadpool(
        submit_job, service, principal, job_request, idempotency_key
    )
    response.headers["Location"] = f"/v1/jobs/{submitted.view.id}"
    if submitted.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return submitted.view


@router.get("", response_model=JobList, summary="List jobs, newest first")
def list_jobs(
    service: ServiceDep,
    principal: PrincipalDep,
    state: JobState | None = None,
    kind: JobKind | None = None,
    cursor: Annotated[
        str | None,
        Query(description="next_cursor of the previous page", max_length=MAX_CURSOR_CHARS),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 50,
) -> JobList:
    try:
        page = service.jobs.list_jobs(
            principal.tenant_id, state=state, kind=kind, cursor=checked_cursor(cursor), limit=limit
        )
    except InvalidCursor as e:
        raise Problem(422, str(e), title="Invalid cursor") from e
    return JobList(items=[job.to_view() for job in page.jobs], next_cursor=page.next_cursor)


@router.get("/{job_id}", response_model=JobView, responses={404: _PROBLEM}, summary="One job")
def get_job(job_id: str, service: ServiceDep, principal: PrincipalDep) -> JobView:
    job = service.jobs.get(principal.tenant_id, checked_id(job_id, "job"))
    if job is None:
        raise not_found(f"job {job_id!r}")
    return job.to_view()


@router.post(
    "/{job_id}/cancel",
    response_model=JobView,
    responses={202: {"model": JobView}, 404: _PROBLEM},
    summary="Cancel a job",
    description=(
        "A queued job is cancelled at once (200). A running job is asked to stop: the worker "
        "checks between tensors, publishes nothing and ends it `cancelled` (202, "
        "`cancel_requested: true`). A finished job is returned unchanged (200)."
    ),
)
def cancel_job(
    job_id: str, response: Response, service: ServiceDep, principal: PrincipalDep
) -> JobView:
    job = service.jobs.request_cancel(principal.tenant_id, checked_id(job_id, "job"))
    if job is None:
        raise not_found(f"job {job_id!r}")
    view = job.to_view()
    if not view.state.is_terminal:
        response.status_code = status.HTTP_202_ACCEPTED
    return view
