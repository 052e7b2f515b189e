"""Schedules and their runs in the job store's database (migration 0003).

A **schedule** is a job body (kind, recipe as sent, artifact name, other options) plus a cron
expression (UTC). Each time it fires, one **run** row records what happened: ``job`` (with
the job id; the job's ``schedule_id`` points back), ``skipped`` or ``failed`` (with the
reason), or ``pending`` while the fire is in progress. Runs are unique per (schedule,
scheduled time): :meth:`ScheduleStore.claim_run` is the idempotency key of a fire, so a
duplicate message (Celery redelivery, two beats) finds the run taken and does nothing.
A ``pending`` run older than ``pending_timeout`` belongs to a fire that died; the next
delivery takes it over (the job it may have submitted is found again by its
Idempotency-Key, so there is still one job).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Engine,
    ForeignKey,
    Index,
    String,
    Text,
    UniqueConstraint,
    and_,
    delete,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column, sessionmaker

from infra.db.jobstore import decode_cursor, encode_cursor
from infra.db.models import Base, Job, JSONDocument, Tenant, UTCDateTime
from schemas.jobs import JobKind
from schemas.schedules import RunOutcome

MAX_PAGE_SIZE = 200


class Schedule(Base):
    __tablename__ = "schedules"
    __table_args__ = (
        CheckConstraint(f"kind IN {tuple(k.value for k in JobKind)!r}", name="kind"),
        Index("ix_schedules_tenant_created", "tenant_id", "created_at", "id"),
        # The embedded ticker's query: enabled schedules that are due.
        Index("ix_schedules_enabled_next", "enabled", "next_run_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    cron: Mapped[str] = mapped_column(String(200))
    recipe: Mapped[dict[str, Any]] = mapped_column(JSONDocument)
    artifact_name: Mapped[str] = mapped_column(String(100))
    # The job body's other fields (callback_url, publish, reuse, …), as JobCreate dumps them.
    job_options: Mapped[dict[str, Any]] = mapped_column(JSONDocument)
    enabled: Mapped[bool] = mapped_column(Boolean)
    only_if_inputs_changed: Mapped[bool] = mapped_column(Boolean)
    # Stored so the embedded ticker can find due schedules; None when disabled.
    next_run_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


_OUTCOMES = tuple(o.value for o in RunOutcome)


class ScheduleRun(Base):
    __tablename__ = "schedule_runs"
    __table_args__ = (
        CheckConstraint(f"outcome IN {_OUTCOMES!r}", name="outcome"),
        # The idempotency key of a fire; also serves listing a schedule's runs newest first.
        UniqueConstraint("schedule_id", "scheduled_for"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    schedule_id: Mapped[str] = mapped_column(ForeignKey("schedules.id", ondelete="CASCADE"))
    scheduled_for: Mapped[datetime] = mapped_column(UTCDateTime())
    outcome: Mapped[str] = mapped_column(String(16))
    job_id: Mapped[str | None] = mapped_column(String(36), default=None)
    reason: Mapped[str | None] = mapped_column(Text, default=None)
    input_fingerprint: Mapped[dict[str, Any] | None] = mapped_column(JSONDocument, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


@dataclass(frozen=True)
class ScheduleFields:
    """What a new schedule is made of (schemas.schedules.ScheduleCreate, flattened)."""

    kind: str
    cron: str
    recipe: dict[str, Any]
    artifact_name: str
    job_options: dict[str, Any]
    enabled: bool
    only_if_inputs_changed: bool


@dataclass(frozen=True)
class RunClaim:
    run: ScheduleRun
    claimed: bool  # False: another delivery fired (or is firing) this scheduled time


@dataclass(frozen=True)
class SchedulePage:
    schedules: list[Schedule]
    next_cursor: str | None


@dataclass(frozen=True)
class RunPage:
    runs: list[tuple[ScheduleRun, Job | None]]
    next_cursor: str | None


def _utcnow() -> datetime:
    return datetime.now(UTC)


class ScheduleStore:
    """Schedules of all tenants. Thread-safe; one instance per process."""

    def __init__(
        self,
        engine: Engine,
        *,
        pending_timeout: timedelta = timedelta(minutes=10),
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.engine = engine
        self.pending_timeout = pending_timeout
        self._clock = clock
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    def now(self) -> datetime:
        return self._clock().astimezone(UTC)

    # ---- API side ------------------------------------------------------------------------

    def create(
        self, tenant_id: int, fields: ScheduleFields, *, next_run_at: datetime | None
    ) -> Schedule:
        now = self.now()
        schedule = Schedule(
            id=str(uuid.uuid4()),
            tenant_id=tenant_id,
            kind=fields.kind,
            cron=fields.cron,
            recipe=dict(fields.recipe),
            artifact_name=fields.artifact_name,
            job_options=dict(fields.job_options),
            enabled=fields.enabled,
            only_if_inputs_changed=fields.only_if_inputs_changed,
            next_run_at=next_run_at if fields.enabled else None,
            created_at=now,
            updated_at=now,
        )
        with self._sessions.begin() as s:
            s.add(schedule)
        return schedule

    def get(self, tenant_id: int, schedule_id: str) -> Schedule | None:
        """The tenant's schedule; None for another tenant's or an unknown id."""
        with self._sessions() as s:
            return s.scalar(
                select(Schedule).where(Schedule.id == schedule_id, Schedule.tenant_id == tenant_id)
            )

    def get_with_tenant(self, schedule_id: str) -> tuple[Schedule, str, bool] | None:
        """A schedule of any tenant, its tenant's name and whether that tenant is disabled
        (for firing)."""
        with self._sessions() as s:
            row = s.execute(
                select(Schedule, Tenant.name, Tenant.disabled_at)
                .join(Tenant, Tenant.id == Schedule.tenant_id)
                .where(Schedule.id == schedule_id)
            ).one_or_none()
        return None if row is None else (row[0], row[1], row[2] is not None)

    def update(self, tenant_id: int, schedule_id: str, values: dict[str, Any]) -> Schedule | None:
        """Change fields (enabled, cron, only_if_inputs_changed, next_run_at)."""
        allowed = {"enabled", "cron", "only_if_inputs_changed", "next_run_at"}
        unknown = set(values) - allowed
        if unknown:
            raise ValueError(f"schedule fields {sorted(unknown)} cannot be changed")
        with self._sessions.begin() as s:
            return s.scalar(
                update(Schedule)
                .where(Schedule.id == schedule_id, Schedule.tenant_id == tenant_id)
                .values(**values, updated_at=self.now())
                .returning(Schedule)
                .execution_options(synchronize_session=False, populate_existing=True)
            )

    def delete(self, tenant_id: int, schedule_id: str) -> bool:
        """Delete a schedule and its runs (its jobs stay, with their schedule_id)."""
        with self._sessions.begin() as s:
            result = s.execute(
                delete(Schedule).where(Schedule.id == schedule_id, Schedule.tenant_id == tenant_id)
            )
        return bool(getattr(result, "rowcount", 0))

    def list_schedules(
        self, tenant_id: int, *, cursor: str | None = None, limit: int = 50
    ) -> SchedulePage:
        """The tenant's schedules, newest first."""
        limit = max(1, min(limit, MAX_PAGE_SIZE))
        query = select(Schedule).where(Schedule.tenant_id == tenant_id)
        if cursor is not None:
            created_at, last_id = decode_cursor(cursor)
            query = query.where(
                or_(
                    Schedule.created_at < created_at,
                    and_(Schedule.created_at == created_at, Schedule.id < last_id),
                )
            )
        query = query.order_by(Schedule.created_at.desc(), Schedule.id.desc()).limit(limit + 1)
        with self._sessions() as s:
            found = list(s.scalars(query))
        if len(found) <= limit:
            return SchedulePage(found, None)
        found = found[:limit]
        return SchedulePage(found, encode_cursor(found[-1].created_at, found[-1].id))

    def enabled_schedules(self) -> list[Schedule]:
        """Every enabled schedule of every tenant (what beat's Redis must hold)."""
        with self._sessions() as s:
            return list(s.scalars(select(Schedule).where(Schedule.enabled.is_(True))))

    def due(self, now: datetime) -> list[Schedule]:
        """Enabled schedules whose stored next run time has come (embedded ticker)."""
        with self._sessions() as s:
            return list(
                s.scalars(
                    select(Schedule)
                    .where(Schedule.enabled.is_(True), Schedule.next_run_at <= now)
                    .order_by(Schedule.next_run_at)
                )
            )

    def advance(self, schedule_id: str, expected: datetime | None, next_run_at: datetime) -> bool:
        """Move next_run_at from ``expected`` to ``next_run_at``; False if someone else did."""
        condition = (
            Schedule.next_run_at.is_(None) if expected is None else Schedule.next_run_at == expected
        )
        with self._sessions.begin() as s:
            moved = s.scalar(
                update(Schedule)
                .where(Schedule.id == schedule_id, Schedule.enabled.is_(True), condition)
                .values(next_run_at=next_run_at)
                .returning(Schedule.id)
                .execution_options(synchronize_session=False)
            )
        return moved is not None

    def advance_next_run(self, schedule_id: str, next_run_at: datetime) -> None:
        """Set next_run_at after a fire, never moving it backwards (nor enabling)."""
        with self._sessions.begin() as s:
            s.execute(
                update(Schedule)
                .where(
                    Schedule.id == schedule_id,
                    Schedule.enabled.is_(True),
                    or_(Schedule.next_run_at.is_(None), Schedule.next_run_at < next_run_at),
                )
                .values(next_run_at=next_run_at)
                .execution_options(synchronize_session=False)
            )

    # ---- runs ----------------------------------------------------------------------------

    def claim_run(self, schedule_id: str, scheduled_for: datetime) -> RunClaim:
        """Take the fire of ``schedule_id`` at ``scheduled_for`` (a pending run), or find
        that another delivery has it. A pending run older than ``pending_timeout`` is taken
        over."""
        now = self.now()
        run = ScheduleRun(
            id=str(uuid.uuid4()),
            schedule_id=schedule_id,
            scheduled_for=scheduled_for,
            outcome=RunOutcome.PENDING.value,
            created_at=now,
            updated_at=now,
        )
        try:
            with self._sessions.begin() as s:
                s.add(run)
            return RunClaim(run, claimed=True)
        except IntegrityError:
            pass
        with self._sessions.begin() as s:
            existing = s.scalar(
                select(ScheduleRun).where(
                    ScheduleRun.schedule_id == schedule_id,
                    ScheduleRun.scheduled_for == scheduled_for,
                )
            )
            if existing is None:  # the schedule itself is gone
                raise LookupError(f"schedule {schedule_id} does not exist")
            if existing.outcome != RunOutcome.PENDING.value or (
                existing.updated_at > now - self.pending_timeout
            ):
                return RunClaim(existing, claimed=False)
            taken = s.scalar(
                update(ScheduleRun)
                .where(
                    ScheduleRun.id == existing.id,
                    ScheduleRun.outcome == RunOutcome.PENDING.value,
                    ScheduleRun.updated_at == existing.updated_at,
                )
                .values(updated_at=now)
                .returning(ScheduleRun)
                .execution_options(synchronize_session=False, populate_existing=True)
            )
        return RunClaim(taken or existing, claimed=taken is not None)

    def finish_run(
        self,
        run_id: str,
        outcome: RunOutcome,
        *,
        job_id: str | None = None,
        reason: str | None = None,
        input_fingerprint: dict[str, Any] | None = None,
    ) -> ScheduleRun | None:
        """Record a pending run's outcome; a job's ``schedule_id`` is set in the same
        transaction. None: the run was not pending (finished by a takeover)."""
        now = self.now()
        with self._sessions.begin() as s:
            run = s.scalar(
                update(ScheduleRun)
                .where(ScheduleRun.id == run_id, ScheduleRun.outcome == RunOutcome.PENDING.value)
                .values(
                    outcome=outcome.value,
                    job_id=job_id,
                    reason=reason,
                    input_fingerprint=input_fingerprint,
                    updated_at=now,
                )
                .returning(ScheduleRun)
                .execution_options(synchronize_session=False, populate_existing=True)
            )
            if run is not None and job_id is not None:
                s.execute(
                    update(Job)
                    .where(Job.id == job_id)
                    .values(schedule_id=run.schedule_id)
                    .execution_options(synchronize_session=False)
                )
        return run

    def last_job_run(self, schedule_id: str, *, before: datetime) -> ScheduleRun | None:
        """The newest run before ``before`` that submitted a job."""
        with self._sessions() as s:
            return s.scalar(
                select(ScheduleRun)
                .where(
                    ScheduleRun.schedule_id == schedule_id,
                    ScheduleRun.outcome == RunOutcome.JOB.value,
                    ScheduleRun.scheduled_for < before,
                )
                .order_by(ScheduleRun.scheduled_for.desc())
                .limit(1)
            )

    def last_run(self, schedule_id: str) -> tuple[ScheduleRun, Job | None] | None:
        page = self.list_runs(schedule_id, limit=1)
        return page.runs[0] if page.runs else None

    def list_runs(self, schedule_id: str, *, cursor: str | None = None, limit: int = 50) -> RunPage:
        """A schedule's runs, newest scheduled time first, each with its job if any."""
        limit = max(1, min(limit, MAX_PAGE_SIZE))
        query = (
            select(ScheduleRun, Job)
            .outerjoin(Job, Job.id == ScheduleRun.job_id)
            .where(ScheduleRun.schedule_id == schedule_id)
        )
        if cursor is not None:
            when, last_id = decode_cursor(cursor)
            query = query.where(
                or_(
                    ScheduleRun.scheduled_for < when,
                    and_(ScheduleRun.scheduled_for == when, ScheduleRun.id < last_id),
                )
            )
        query = query.order_by(ScheduleRun.scheduled_for.desc(), ScheduleRun.id.desc()).limit(
            limit + 1
        )
        with self._sessions() as s:
            rows: list[tuple[ScheduleRun, Job | None]] = [(r[0], r[1]) for r in s.execute(query)]
        if len(rows) <= limit:
            return RunPage(rows, None)
        rows = rows[:limit]
        last = rows[-1][0]
        return RunPage(rows, encode_cursor(last.scheduled_for, last.id))

    def count_jobs(self, schedule_id: str) -> int:
        """Jobs that name this schedule (tests and metrics)."""
        with self._sessions() as s:
            return int(
                s.scalar(
                    select(func.count()).select_from(Job).where(Job.schedule_id == schedule_id)
                )
                or 0
            )


__all__ = [
    "RunClaim",
    "RunPage",
    "Schedule",
    "ScheduleFields",
    "SchedulePage",
    "ScheduleRun",
    "ScheduleStore",
]
