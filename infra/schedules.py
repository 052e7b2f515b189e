"""Firing schedules: the one fire function, its Celery beat (celery-redbeat) and the
embedded ticker. Torch-free and app-independent: the API, the light Celery worker, beat and
``weightsmith serve`` all use it.

**Source of truth.** Schedules live in the database (:mod:`infra.db.schedules`). Celery beat
reads its entries from Redis (celery-redbeat, one entry per schedule named
``weightsmith.schedule.<id>``, sending :data:`FIRE_SCHEDULE_TASK` to the light queue). The
API writes the entry when a schedule is created, changed or deleted
(:class:`RedBeatSchedules`); beat reconciles Redis with the database when it starts and
every few minutes (:class:`ScheduleBeat`), so a flushed Redis or a missed write heals.
RedBeat holds a lock in Redis: of several beat processes one sends, the others wait.

**Cron in Redis.** Celery's ``crontab`` needs a day to match both day fields; cron (and
:class:`schemas.schedules.CronExpression`) needs either when both are restricted. Such a
schedule gets two entries (``…<id>.dom`` and ``…<id>.dow``); a day matching both makes two
messages for one fire time, and the fire's idempotency keeps it to one run.

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
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from celery.schedules import crontab
from pydantic import ValidationError
from redbeat import RedBeatScheduler, RedBeatSchedulerEntry
from redbeat.decoder import RedBeatJSONEncoder
from redbeat.schedulers import get_redis

from infra.db.schedules import Schedule, ScheduleRun, ScheduleStore
from schemas.jobs import JobCreate, JobKind
from schemas.references import ReferenceError_, parse_reference
from schemas.schedules import CronExpression, RunOutcome, job_request_of, parse_cron

if TYPE_CHECKING:
    from celery import Celery

    from infra.settings import Settings

log = logging.getLogger("weightsmith.schedules")

FIRE_SCHEDULE_TASK = "weightsmith.fire_schedule"
# Small control tasks (fires) go here, never behind a long merge on "default" or "gpu".
LIGHT_QUEUE = "light"
REDBEAT_KEY_PREFIX = "weightsmith:redbeat:"
ENTRY_PREFIX = "weightsmith.schedule."
RECONCILE_INTERVAL_S = 300.0


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
    """The API's submission path, as the fire function needs it (see app.scheduling)."""

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
        if ref.kind.value not in ("hub", "artifact") or not ref.is_pinned:
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


# ---- redbeat entries ----------------------------------------------------------------------


def redbeat_config(redis_url: str | None) -> dict[str, Any]:
    """Celery settings for celery-redbeat, shared by the workers' app (beat) and the API."""
    return {
        "redbeat_redis_url": redis_url,
        "redbeat_redis_options": {},  # do not inherit the broker's transport options
        "redbeat_key_prefix": REDBEAT_KEY_PREFIX,
        "timezone": "UTC",  # cron expressions are evaluated in UTC
        "enable_utc": True,
    }


def entry_name(schedule_id: str, part: str = "") -> str:
    return ENTRY_PREFIX + schedule_id + (f".{part}" if part else "")


def _crontabs(cron: CronExpression, app: Celery) -> dict[str, crontab]:
    minute, hour, day, month, weekday = cron.field_texts()

    def tab(day_of_month: str, day_of_week: str) -> crontab:
        return crontab(
            minute=minute,
            hour=hour,
            day_of_month=day_of_month,
            month_of_year=month,
            day_of_week=day_of_week,
            app=app,
        )

    if cron.day_restricted and cron.weekday_restricted:  # cron's OR of the day fields
        return {"dom": tab(day, "*"), "dow": tab("*", weekday)}
    return {"": tab(day, weekday)}


@dataclass
class ReconcileReport:
    written: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0


class RedBeatSchedules:
    """The redbeat entries of the schedules, in the Redis of ``app`` (its redbeat config)."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    @classmethod
    def for_url(cls, redis_url: str) -> RedBeatSchedules:
        """A client for the API: a small Celery app that only talks to redbeat's Redis."""
        from celery import Celery

        app = Celery("weightsmith-schedules", broker=redis_url, set_as_current=False)
        app.conf.update(redbeat_config(redis_url))
        return cls(app)

    @property
    def _redis(self) -> Any:
        return get_redis(self.app)

    def _key(self, name: str) -> str:
        return str(RedBeatSchedulerEntry.generate_key(self.app, name))

    def entries(self, schedule: Schedule) -> list[RedBeatSchedulerEntry]:
        """The entries a schedule should have (none when disabled)."""
        if not schedule.enabled:
            return []
        return [
            RedBeatSchedulerEntry(
                name=entry_name(schedule.id, part),
                task=FIRE_SCHEDULE_TASK,
                schedule=tab,
                args=[schedule.id],
                kwargs={},
                options={"queue": LIGHT_QUEUE},
                app=self.app,
            )
            for part, tab in _crontabs(parse_cron(schedule.cron), self.app).items()
        ]

    def _definition(self, entry: RedBeatSchedulerEntry) -> str:
        # What RedBeatSchedulerEntry.save() stores, to tell a changed entry from a kept one.
        return json.dumps(
            {
                "name": entry.name,
                "task": entry.task,
                "args": entry.args,
                "kwargs": entry.kwargs,
                "options": entry.options,
                "schedule": entry.schedule,
                "enabled": entry.enabled,
            },
            cls=RedBeatJSONEncoder,
        )

    def _stored_keys(self, schedule_id: str | None = None) -> set[str]:
        pattern = self._key(entry_name(schedule_id) if schedule_id else ENTRY_PREFIX) + "*"
        keys = {str(k) for k in self._redis.scan_iter(match=pattern, count=500)}
        if schedule_id is not None:  # 'id*' would also match ids that start with this one
            exact = self._key(entry_name(schedule_id))
            keys = {k for k in keys if k == exact or k.startswith(exact + ".")}
        return keys

    def _write(self, entry: RedBeatSchedulerEntry) -> None:
        # Due from now on: without a last run, redbeat would fire a new entry at once.
        RedBeatSchedulerEntry(name=entry.name, app=self.app).delete()
        entry.last_run_at = datetime.now(UTC)
        entry.save()

    def put(self, schedule: Schedule) -> None:
        """Make Redis hold exactly this schedule's entries (none if disabled)."""
        wanted = self.entries(schedule)
        for key in self._stored_keys(schedule.id) - {e.key for e in wanted}:
            self._delete_key(key)
        for entry in wanted:
            self._write(entry)

    def remove(self, schedule_id: str) -> None:
        for key in self._stored_keys(schedule_id):
            self._delete_key(key)

    def _delete_key(self, key: str) -> None:
        with self._redis.pipeline() as pipe:
            pipe.zrem(self.app.redbeat_conf.schedule_key, key)
            pipe.delete(key)
            pipe.execute()

    def reconcile(self, schedules: list[Schedule]) -> ReconcileReport:
        """Make Redis match ``schedules`` (the database's enabled ones): write missing or
        changed entries, delete entries of schedules that are gone or disabled, and leave
        matching ones alone (so their last run time, and the next fire, are kept)."""
        report = ReconcileReport()
        wanted: dict[str, RedBeatSchedulerEntry] = {}
        for schedule in schedules:
            try:
                for entry in self.entries(schedule):
                    wanted[entry.key] = entry
            except ValueError as e:  # a cron the database should never hold
                log.error("schedule %s has an unusable cron: %s", schedule.id, e)
        for key in self._stored_keys() - set(wanted):
            self._delete_key(key)
            report.removed.append(key)
        schedule_key = self.app.redbeat_conf.schedule_key
        for key, entry in wanted.items():
            stored = self._redis.hget(key, "definition")
            in_zset = self._redis.zscore(schedule_key, key) is not None
            if stored == self._definition(entry) and in_zset:
                report.unchanged += 1
                continue
            self._write(entry)
            report.written.append(key)
        return report

    def ping(self) -> None:
        self._redis.ping()


# ---- beat ---------------------------------------------------------------------------------


def scheduled_time_of(entry: Any, now: datetime) -> datetime:
    """The cron time a due redbeat entry stands for: its crontab's latest time ≤ now."""
    tab = entry.schedule
    text = " ".join(
        str(getattr(tab, name))
        for name in (
            "_orig_minute",
            "_orig_hour",
            "_orig_day_of_month",
            "_orig_month_of_year",
            "_orig_day_of_week",
        )
    )
    return parse_cron(text).latest_at_or_before(now)


class ScheduleBeat(RedBeatScheduler):
    """celery-redbeat's scheduler, plus: Redis is reconciled with the database at start and
    every :data:`RECONCILE_INTERVAL_S`, and each fire message carries its scheduled time.

    Use it with ``celery beat -S infra.schedules:ScheduleBeat`` (``weightsmith beat``).
    """

    reconcile_interval_s = RECONCILE_INTERVAL_S

    def __init__(self, app: Celery, *args: Any, store: ScheduleStore | None = None, **kwargs: Any):
        self._store = store
        self._reconciled_at = 0.0
        super().__init__(app, *args, **kwargs)

    @property
    def store(self) -> ScheduleStore:
        if self._store is None:
            from infra.db import make_engine
            from infra.settings import get_settings

            self._store = ScheduleStore(make_engine(get_settings().database_url))
        return self._store

    def setup_schedule(self) -> None:
        super().setup_schedule()
        self.reconcile()

    def reconcile(self) -> ReconcileReport | None:
        try:
            report = RedBeatSchedules(self.app).reconcile(self.store.enabled_schedules())
        except Exception:
            log.exception("beat: reconciling schedules with the database failed; will retry")
            return None
        finally:
            self._reconciled_at = time.monotonic()
        if report.written or report.removed:
            log.info(
                "beat: schedules reconciled: %d written, %d removed, %d unchanged",
                len(report.written),
                len(report.removed),
                report.unchanged,
            )
        return report

    def tick(self, *args: Any, **kwargs: Any) -> float:
        if time.monotonic() - self._reconciled_at >= self.reconcile_interval_s:
            self.reconcile()
        return float(super().tick(*args, **kwargs))

    def apply_async(
        self, entry: Any, producer: Any = None, advance: bool = True, **kwargs: Any
    ) -> Any:
        if entry.task == FIRE_SCHEDULE_TASK and "scheduled_for" not in (entry.kwargs or {}):
            when = scheduled_time_of(entry, datetime.now(UTC))
            entry.kwargs = {**(entry.kwargs or {}), "scheduled_for": when.isoformat()}
        return super().apply_async(entry, producer=producer, advance=advance, **kwargs)


# ---- embedded ticker ----------------------------------------------------------------------


class ScheduleTicker:
    """Fires due schedules from a thread, for ``weightsmith serve`` without a broker.

    Every ``interval_s`` it takes the schedules whose stored ``next_run_at`` has passed,
    moves each one's next run forward (a compare-and-set, so two processes do not both fire
    it) and fires it for its latest cron time. A fire missed while the service was down is
    made once, at start; older ones are not replayed.
    """

    def __init__(
        self,
        store: ScheduleStore,
        fire: Callable[[str, datetime], Any],
        *,
        interval_s: float = 15.0,
    ) -> None:
        self.store = store
        self.fire = fire
        self.interval_s = interval_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="schedule-ticker", daemon=True)

    def start(self) -> ScheduleTicker:
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def tick(self, now: datetime | None = None) -> list[str]:
        """Fire what is due at ``now``; returns the ids of the schedules fired."""
        now = now or self.store.now()
        fired = []
        for schedule in self.store.due(now):
            try:
                cron = parse_cron(schedule.cron)
                if not self.store.advance(schedule.id, schedule.next_run_at, cron.next_after(now)):
                    continue  # another process took it
                self.fire(schedule.id, cron.latest_at_or_before(now))
                fired.append(schedule.id)
            except Exception:
                log.exception("schedule %s: fire failed", schedule.id)
        return fired

    def _run(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:
                log.exception("schedule ticker: tick failed; trying again")
            if self._stopped.wait(self.interval_s):
                return


def next_run_for(cron_text: str, enabled: bool, now: datetime) -> datetime | None:
    return parse_cron(cron_text).next_after(now) if enabled else None


def redis_url_for(settings: Settings) -> str | None:
    """Where redbeat keeps its entries: the broker's Redis (None: embedded, no beat)."""
    return settings.broker_url
