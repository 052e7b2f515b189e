"""Schedules on the service side: the API's submission path as the fire function's
:class:`infra.schedules.JobSubmitter`, and the wiring shared by the routes, the light Celery
worker (``weightsmith.fire_schedule``) and the embedded ticker of ``weightsmith serve``.

Torch-free (imports neither torch nor ``workers``), so the light worker stays light.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from app.submission import pin_recipe, reference_locations, submit_job
from infra.db import make_engine
from infra.db.schedules import ScheduleStore
from infra.queue import JobQueue
from infra.schedules import (
    FireResult,
    RedBeatSchedules,
    ScheduleTicker,
    SubmissionRefused,
    SubmittedJob,
    fire_schedule,
    redis_url_for,
)
from infra.settings import Settings
from schemas.jobs import JobCreate, JobKind
from service.context import Principal, Service
from service.errors import Problem

log = logging.getLogger("weightsmith.schedules")


def _references(
    kind: JobKind, recipe: dict[str, Any], pinned: dict[str, Any]
) -> Iterator[tuple[str, str]]:
    for loc in reference_locations(kind, recipe):
        raw: Any = recipe
        fixed: Any = pinned
        for part in loc:
            raw, fixed = raw[part], fixed[part]
        yield str(raw), str(fixed)


class ServiceSubmitter:
    """Submits a schedule's job exactly as ``POST /v1/jobs`` would, for the tenant that owns
    the schedule (``app.submission``: pin every reference, record, queue)."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def pin(
        self, tenant_id: int, tenant: str, kind: JobKind, recipe: dict[str, Any]
    ) -> dict[str, str]:
        try:
            pinned = pin_recipe(self.service, Principal(tenant_id, tenant), kind, recipe)
        except Problem as e:
            raise _refused(e) from e
        return dict(_references(kind, recipe, pinned))

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
            references=dict(_references(request.kind, request.recipe, view.recipe)),
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
