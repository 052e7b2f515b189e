"""Schedules on the service side: what a fire does, and the submission path it uses.

**A fire** (:func:`fire_schedule`) is idempotent by (schedule id, scheduled time): it claims
a run row, then either records a skip (``only_if_inputs_changed`` and nothing changed) or
submits an ordinary job through the API's submission path (a :class:`JobSubmitter`, which
pins every reference) with the Idempotency-Key ``schedule:<id>:<time>``, and records the
run. Beat passes the scheduled time; without one (a plain ``RedBeatScheduler``) the task
takes the latest cron time at or before now.

**Input fingerprint.** Each input as it resolved at fire time: a hub branch → its commit
sha, ``artifact://name`` → its newest version. ``s3://`` and local inputs have no version
to compare, so a schedule with any of them counts as changed at every fire (it always
runs); the fingerprint lists them under ``unversioned``.

Used by the light Celery worker (``weightsmith.fire_schedule``), the embedded ticker of
``weightsmith serve`` and the API's routes; torch-free.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from pydantic import ValidationError

from infra.db import make_engine
from infra.db.schedules import Schedule, ScheduleRun, ScheduleStore
from infra.queue import JobQueue
from infra.schedules import RedBeatSchedules, ScheduleTicker, redis_url_for
from infra.settings import Settings
from schemas.jobs import JobCreate, JobKind
from schemas.references import ReferenceError_, parse_reference
from schemas.schedules import RunOutcome, job_request_of, parse_cron
from service.context import Principal, Service
from service.errors import Problem
from service.submission import pin_recipe, pinned_references, submit_job

log = logging.getLogger("weightsmith.schedules")


# ---- submitting a job ---------------------------------------------------------------------


class SubmissionRefused(Exception):
    """The job could not be submitted; ``message`` says why (recorded on the run)."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable


@dataclass(frozen=True)
class SubmittedJob:
    job_id: str
    references: dict[str, str]  # each reference as written → as pinned in the job
    replayed: bool = False


class JobSubmitter(Protocol):
    """The submission path, as the fire function needs it (:class:`ServiceSubmitter`)."""

    def pin(
        self, tenant_id: int, tenant: str, kind: JobKind, recipe: dict[str, Any]
    ) -> dict[str, str]:
        """Each model reference in ``recipe`` → pinned now. Raises SubmissionRefused."""
        ...

    def submit(
        self, tenant_id: int, tenant: str, request: JobCreate, idempotency_key: str
    ) -> SubmittedJob:
        """Pin, record and queue a job (replaying an earlier one with the same key)."""
        ...


# ---- fingerprint --------------------------------------------------------------------------


def input_fingerprint(references: Mapping[str, str]) -> dict[str, Any]:
    """``{"inputs": {as written: pinned}, "unversioned": [as written, …]}``."""
    unversioned = []
    for raw, pinned in references.items():
        try:
            ref = parse_reference(pinned)
        except ReferenceError_:
            unversioned.append(raw)
            continue
        if not ref.is_immutable:
            unversioned.append(raw)
    return {"inputs": dict(sorted(references.items())), "unversioned": sorted(unversioned)}


def inputs_unchanged(current: Mapping[str, Any], previous: Mapping[str, Any] | None) -> bool:
    return (
        previous is not None
        and not current.get("unversioned")
        and not previous.get("unversioned")
        and current.get("inputs") == previous.get("inputs")
    )


# ---- the fire -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FireResult:
    run: ScheduleRun | None  # None: the schedule is gone or disabled
    duplicate: bool = False  # another delivery fired this scheduled time


def idempotency_key(schedule_id: str, scheduled_for: datetime) -> str:
    return f"schedule:{schedule_id}:{scheduled_for.astimezone(UTC):%Y-%m-%dT%H:%MZ}"


def fire_schedule(
    store: ScheduleStore,
    submitter: JobSubmitter,
    schedule_id: str,
    scheduled_for: datetime | None = None,
) -> FireResult:
    """Fire ``schedule_id`` for the cron time ``scheduled_for`` (default: the latest cron
    time at or before now), at most once per (schedule, time)."""
    found = store.get_with_tenant(schedule_id)
    if found is None:
        log.info("schedule %s no longer exists; nothing fired", schedule_id)
        return FireResult(None)
    schedule, tenant, tenant_disabled = found
    if not schedule.enabled:
        log.info("schedule %s is disabled; nothing fired", schedule_id)
        return FireResult(None)
    if tenant_disabled:
        log.info("schedule %s: tenant %r is disabled; nothing fired", schedule_id, tenant)
        return FireResult(None)
    cron = parse_cron(schedule.cron)
    now = store.now()
    when = (
        cron.latest_at_or_before(now)
        if scheduled_for is None
        else scheduled_for.astimezone(UTC).replace(second=0, microsecond=0)
    )
    try:
        claim = store.claim_run(schedule_id, when)
    except LookupError:
        return FireResult(None)
    if not claim.claimed:
        log.info("schedule %s at %s was fired already (run %s)", schedule_id, when, claim.run.id)
        return FireResult(claim.run, duplicate=True)
    run = _fire_claimed(store, submitter, schedule, tenant, claim.run, when)
    store.advance_next_run(schedule_id, cron.next_after(max(now, when)))
    return FireResult(run)


def _fire_claimed(
    store: ScheduleStore,
    submitter: JobSubmitter,
    schedule: Schedule,
    tenant: str,
    run: ScheduleRun,
    when: datetime,
) -> ScheduleRun | None:
    kind = JobKind(schedule.kind)
    try:
        if schedule.only_if_inputs_changed:
            current = input_fingerprint(
                submitter.pin(schedule.tenant_id, tenant, kind, dict(schedule.recipe))
            )
            previous = store.last_job_run(schedule.id, before=when)
            if previous is not None and inputs_unchanged(current, previous.input_fingerprint):
                return store.finish_run(
                    run.id,
                    RunOutcome.SKIPPED,
                    reason=f"inputs unchanged since job {previous.job_id}",
                    input_fingerprint=current,
                )
        try:
            request = job_request_of(
                schedule.kind, dict(schedule.recipe), schedule.artifact_name, schedule.job_options
            )
        except ValidationError as e:  # valid at creation; the job contract changed since
            raise SubmissionRefused(f"the stored job body is no longer valid: {e}") from e
        submitted = submitter.submit(
            schedule.tenant_id, tenant, request, idempotency_key(schedule.id, when)
        )
    except SubmissionRefused as e:
        log.warning("schedule %s at %s: no job: %s", schedule.id, when, e.message)
        return store.finish_run(run.id, RunOutcome.FAILED, reason=e.message)
    except Exception as e:  # never leave a run pending for an unexpected error
        log.exception("schedule %s at %s: fire failed", schedule.id, when)
        reason = f"internal error while submitting the job ({type(e).__name__}); see the logs"
        return store.finish_run(run.id, RunOutcome.FAILED, reason=reason)
    return store.finish_run(
        run.id,
        RunOutcome.JOB,
        job_id=submitted.job_id,
        input_fingerprint=input_fingerprint(submitted.references),
    )


# ---- the service as the submitter -------------------------------------------------------


class ServiceSubmitter:
    """Submits a schedule's job exactly as ``POST /v1/jobs`` would, for the tenant that owns
    the schedule (service.submission: pin every reference, record, queue)."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def pin(
        self, tenant_id: int, tenant: str, kind: JobKind, recipe: dict[str, Any]
    ) -> dict[str, str]:
        try:
            pinned = pin_recipe(self.service, Principal(tenant_id, tenant), kind, recipe)
        except Problem as e:
            raise _refused(e) from e
        return pinned_references(kind, recipe, pinned)

    def submit(
        self, tenant_id: int, tenant: str, request: JobCreate, idempotency_key: str
    ) -> SubmittedJob:
        try:
            submitted = submit_job(
                self.service, Principal(tenant_id, tenant), request, idempotency_key
            )
        except Problem as e:
            raise _refused(e) from e
        view = submitted.view
        return SubmittedJob(
            job_id=view.id,
            references=pinned_references(request.kind, request.recipe, view.recipe),
            replayed=submitted.replayed,
        )


def _refused(problem: Problem) -> SubmissionRefused:
    detail = problem.problem.detail or problem.problem.title
    return SubmissionRefused(detail, retryable=problem.problem.status >= 500)


@dataclass
class Scheduling:
    """What the schedule routes need: the store, the redbeat entries (None without a
    broker: the embedded ticker reads the database) and the fire function's submitter."""

    store: ScheduleStore
    redbeat: RedBeatSchedules | None
    submitter: ServiceSubmitter

    @classmethod
    def for_service(cls, service: Service) -> Scheduling:
        url = redis_url_for(service.settings)
        return cls(
            store=ScheduleStore(service.engine),
            redbeat=RedBeatSchedules.for_url(url) if url else None,
            submitter=ServiceSubmitter(service),
        )

    def fire(self, schedule_id: str, scheduled_for: datetime | None = None) -> FireResult:
        return fire_schedule(self.store, self.submitter, schedule_id, scheduled_for)


def service_for_firing(settings: Settings, queue: JobQueue | None = None) -> Service:
    """A Service for a process that fires schedules but serves no requests (the light
    worker, the embedded ticker): no migrations, no bootstrap key (the API does those)."""
    return Service.connect(settings, make_engine(settings.database_url), queue)


def start_embedded_ticker(
    settings: Settings, queue: JobQueue, *, interval_s: float = 15.0
) -> tuple[ScheduleTicker, Service]:
    """The ticker of ``weightsmith serve`` without a broker; jobs go to ``queue`` (the
    embedded worker's). Stop the ticker, then close the service."""
    service = service_for_firing(settings, queue)
    scheduling = Scheduling(
        store=ScheduleStore(service.engine), redbeat=None, submitter=ServiceSubmitter(service)
    )
    ticker = ScheduleTicker(scheduling.store, scheduling.fire, interval_s=interval_s).start()
    return ticker, service
