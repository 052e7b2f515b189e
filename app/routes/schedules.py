"""``/v1/schedules``: cron-fired jobs (rules in infra.schedules, storage in
infra.db.schedules). Cron expressions are evaluated in UTC."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response, status

from app.dependencies import PrincipalDep, ServiceDep
from app.limits import CheckedBodyRoute, checked_cursor, checked_id
from infra.db import InvalidCursor
from infra.db.models import Job
from infra.db.schedules import MAX_PAGE_SIZE, Schedule, ScheduleFields, ScheduleRun
from infra.schedules import next_run_for
from schemas.jobs import ProblemDetail
from schemas.limits import MAX_CURSOR_CHARS
from schemas.schedules import (
    RunOutcome,
    ScheduleCreate,
    ScheduleList,
    ScheduleRunList,
    ScheduleRunView,
    ScheduleUpdate,
    ScheduleView,
)
from service.context import Principal
from service.errors import Problem, not_found
from service.scheduling import Scheduling
from service.submission import check_publish, pin_recipe
from service.webhooks import refuse_unsafe_url

router = APIRouter(prefix="/v1/schedules", tags=["schedules"], route_class=CheckedBodyRoute)

_PROBLEM = {"model": ProblemDetail, "content": {"application/problem+json": {}}}
_Cursor = Annotated[
    str | None,
    Query(description="next_cursor of the previous page", max_length=MAX_CURSOR_CHARS),
]


def get_scheduling(request: Request, service: ServiceDep) -> Scheduling:
    """Built on first use and kept on the app (the Service is shared with other routes)."""
    scheduling: Scheduling | None = getattr(request.app.state, "scheduling", None)
    if scheduling is None or scheduling.submitter.service is not service:
        scheduling = Scheduling.for_service(service)
        request.app.state.scheduling = scheduling
    return scheduling


SchedulingDep = Annotated[Scheduling, Depends(get_scheduling)]


def _run_view(run: ScheduleRun, job: Job | None) -> ScheduleRunView:
    return ScheduleRunView(
        id=run.id,
        schedule_id=run.schedule_id,
        scheduled_for=run.scheduled_for,
        outcome=RunOutcome(run.outcome),
        job_id=run.job_id,
        job=job.to_view() if job is not None and job.state != "pending" else None,
        reason=run.reason,
        input_fingerprint=run.input_fingerprint,
        created_at=run.created_at,
    )


def _view(scheduling: Scheduling, schedule: Schedule) -> ScheduleView:
    last = scheduling.store.last_run(schedule.id)
    last_view = _run_view(*last) if last is not None else None
    return ScheduleView.model_validate(
        {
            "id": schedule.id,
            "kind": schedule.kind,
            "cron": schedule.cron,
            "recipe": schedule.recipe,
            "artifact_name": schedule.artifact_name,
            "job_options": schedule.job_options,
            "enabled": schedule.enabled,
            "only_if_inputs_changed": schedule.only_if_inputs_changed,
            "next_run_at": schedule.next_run_at,
            "last_run_at": last_view.scheduled_for if last_view else None,
            "last_outcome": last_view.outcome if last_view else None,
            "last_run": last_view,
            "created_at": schedule.created_at,
            "updated_at": schedule.updated_at,
        }
    )


def _sync_failed(e: Exception) -> Problem:
    return Problem(
        503,
        f"the schedule could not be stored for the beat scheduler (Redis): "
        f"{type(e).__name__}: {e}; nothing was changed, try again later",
        title="Scheduler unavailable",
        headers={"Retry-After": "5"},
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ScheduleView,
    summary="Create a schedule",
    description=(
        "`cron` is a 5-field expression (minute hour day-of-month month day-of-week) "
        "evaluated in UTC. The recipe is validated and its references pinned as by "
        "`POST /v1/jobs` (so a bad reference is refused now); each fire pins them anew. "
        "With `only_if_inputs_changed`, a fire whose inputs resolve as for the last job is "
        "recorded as a skip."
    ),
    responses={422: _PROBLEM, 503: _PROBLEM},
)
def create_schedule(
    body: ScheduleCreate,
    response: Response,
    service: ServiceDep,
    principal: PrincipalDep,
    scheduling: SchedulingDep,
) -> ScheduleView:
    job = body.job_request()
    # The checks POST /v1/jobs makes before recording a job, so a schedule that could never
    # submit one is refused now.
    check_publish(service, principal, job)
    if job.callback_url is not None:
        refuse_unsafe_url(service.settings, str(job.callback_url), "/callback_url")
    pin_recipe(service, principal, job.kind, job.recipe)
    store = scheduling.store
    schedule = store.create(
        principal.tenant_id,
        ScheduleFields(
            kind=job.kind.value,
            cron=body.cron,
            recipe=job.recipe,
            artifact_name=job.artifact_name,
            job_options=body.job_options(),
            enabled=body.enabled,
            only_if_inputs_changed=body.only_if_inputs_changed,
        ),
        next_run_at=next_run_for(body.cron, body.enabled, store.now()),
    )
    if scheduling.redbeat is not None:
        try:
            scheduling.redbeat.put(schedule)
        except Exception as e:
            store.delete(principal.tenant_id, schedule.id)
            raise _sync_failed(e) from e
    response.headers["Location"] = f"/v1/schedules/{schedule.id}"
    return _view(scheduling, schedule)


@router.get("", response_model=ScheduleList, summary="List schedules, newest first")
def list_schedules(
    principal: PrincipalDep,
    scheduling: SchedulingDep,
    cursor: _Cursor = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 50,
) -> ScheduleList:
    try:
        page = scheduling.store.list_schedules(
            principal.tenant_id, cursor=checked_cursor(cursor), limit=limit
        )
    except InvalidCursor as e:
        raise Problem(422, str(e), title="Invalid cursor") from e
    return ScheduleList(
        items=[_view(scheduling, s) for s in page.schedules], next_cursor=page.next_cursor
    )


def _owned(scheduling: Scheduling, principal: Principal, schedule_id: str) -> Schedule:
    schedule = scheduling.store.get(principal.tenant_id, checked_id(schedule_id, "schedule"))
    if schedule is None:
        raise not_found(f"schedule {schedule_id!r}")
    return schedule


@router.get(
    "/{schedule_id}",
    response_model=ScheduleView,
    responses={404: _PROBLEM},
    summary="One schedule, with its next and last run",
)
def get_schedule(
    schedule_id: str, principal: PrincipalDep, scheduling: SchedulingDep
) -> ScheduleView:
    return _view(scheduling, _owned(scheduling, principal, schedule_id))


@router.patch(
    "/{schedule_id}",
    response_model=ScheduleView,
    responses={404: _PROBLEM, 422: _PROBLEM, 503: _PROBLEM},
    summary="Enable, disable or re-time a schedule",
)
def update_schedule(
    schedule_id: str, body: ScheduleUpdate, principal: PrincipalDep, scheduling: SchedulingDep
) -> ScheduleView:
    store = scheduling.store
    before = _owned(scheduling, principal, schedule_id)
    values = body.model_dump(exclude_none=True)
    cron = values.get("cron", before.cron)
    enabled = values.get("enabled", before.enabled)
    if "cron" in values or "enabled" in values:
        values["next_run_at"] = next_run_for(cron, enabled, store.now())
    after = store.update(principal.tenant_id, schedule_id, values) if values else before
    if after is None:  # deleted meanwhile
        raise not_found(f"schedule {schedule_id!r}")
    if scheduling.redbeat is not None and ("cron" in values or "enabled" in values):
        try:
            scheduling.redbeat.put(after)
        except Exception as e:
            restore = {k: getattr(before, k) for k in values}
            store.update(principal.tenant_id, schedule_id, restore)
            raise _sync_failed(e) from e
    return _view(scheduling, after)


@router.delete(
    "/{schedule_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={404: _PROBLEM, 503: _PROBLEM},
    summary="Delete a schedule and its run history (its jobs stay)",
)
def delete_schedule(schedule_id: str, principal: PrincipalDep, scheduling: SchedulingDep) -> None:
    _owned(scheduling, principal, schedule_id)
    if scheduling.redbeat is not None:
        try:
            scheduling.redbeat.remove(schedule_id)
        except Exception as e:
            raise _sync_failed(e) from e
    scheduling.store.delete(principal.tenant_id, schedule_id)


@router.get(
    "/{schedule_id}/runs",
    response_model=ScheduleRunList,
    responses={404: _PROBLEM},
    summary="A schedule's runs (jobs and skips), newest first",
)
def list_runs(
    schedule_id: str,
    principal: PrincipalDep,
    scheduling: SchedulingDep,
    cursor: _Cursor = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 50,
) -> ScheduleRunList:
    _owned(scheduling, principal, schedule_id)
    try:
        page = scheduling.store.list_runs(schedule_id, cursor=checked_cursor(cursor), limit=limit)
    except InvalidCursor as e:
        raise Problem(422, str(e), title="Invalid cursor") from e
    return ScheduleRunList(
        items=[_run_view(run, job) for run, job in page.runs], next_cursor=page.next_cursor
    )
