"""Schedules' machinery: their Celery beat (celery-redbeat) and the embedded ticker. What a
fire does is the service layer's (:mod:`service.scheduling`).

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

"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from celery.schedules import crontab
from redbeat import RedBeatScheduler, RedBeatSchedulerEntry
from redbeat.decoder import RedBeatJSONEncoder
from redbeat.schedulers import get_redis

from infra.db.schedules import Schedule, ScheduleStore
from schemas.schedules import CronExpression, parse_cron

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
