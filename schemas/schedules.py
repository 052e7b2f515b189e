"""Schedules: a job recipe fired by a cron expression (evaluated in UTC), and its runs.

- :class:`CronExpression` — the 5-field cron syntax (minute hour day-of-month month
  day-of-week) with ``*``, numbers, names (``jan``, ``mon``), ranges ``a-b``, steps ``*/n``
  and ``a-b/n``, and lists ``a,b``. As in Vixie cron, when both day fields are restricted a
  day matches either; when one is ``*`` (or starts with it), both must match.
- ``ScheduleCreate`` — the body of ``POST /v1/schedules``: a :class:`schemas.jobs.JobCreate`
  (validated exactly like ``POST /v1/jobs``) plus ``cron``, ``enabled`` and
  ``only_if_inputs_changed``.
- ``ScheduleView`` / ``ScheduleRunView`` — what the API returns.

Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas.jobs import JobCreate, JobKind, JobView

CRON_TIMEZONE = "UTC"
# How far ahead a cron expression must match at least once (Feb 29 comes every 4 years,
# or 8 around a skipped leap year).
_HORIZON = timedelta(days=366 * 9)

_MONTH_NAMES = {
    name: i + 1
    for i, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
    )
}
_DAY_NAMES = {name: i for i, name in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: dict[str, int]


_FIELDS = (
    _Field("minute", 0, 59, {}),
    _Field("hour", 0, 23, {}),
    _Field("day of month", 1, 31, {}),
    _Field("month", 1, 12, _MONTH_NAMES),
    _Field("day of week", 0, 7, _DAY_NAMES),  # 0 and 7 are Sunday
)
_SYNTAX = (
    "each field is '*', a number, a range 'a-b', a step '*/n' or 'a-b/n', "
    "or a comma-separated list of these"
)


class CronError(ValueError):
    """A cron expression that cannot be used; the message names the field and what is valid."""


@dataclass(frozen=True)
class CronExpression:
    """A parsed 5-field cron expression; times are UTC datetimes at whole minutes."""

    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday … 6 = Saturday (7 folded into 0)
    day_restricted: bool  # the day-of-month field does not start with '*'
    weekday_restricted: bool

    @classmethod
    def parse(cls, text: str) -> CronExpression:
        parts = text.split()
        if len(parts) != 5:
            raise CronError(
                f"a cron expression has 5 fields (minute hour day-of-month month day-of-week), "
                f"got {len(parts)} in {text!r}; e.g. '0 3 * * *' is every day at 03:00 UTC"
            )
        values = [
            _parse_field(part, spec, i + 1)
            for i, (part, spec) in enumerate(zip(parts, _FIELDS, strict=True))
        ]
        weekdays = frozenset(d % 7 for d in values[4])
        cron = cls(
            text=" ".join(parts),
            minutes=values[0],
            hours=values[1],
            days=values[2],
            months=values[3],
            weekdays=weekdays,
            day_restricted=not parts[2].startswith("*"),
            weekday_restricted=not parts[4].startswith("*"),
        )
        if not cron.day_restricted or cron.weekday_restricted:
            return cron
        # Only the day of month restricts days: some dates never exist (30 February).
        if not any(d <= _MONTH_LENGTH[m] for m in cron.months for d in cron.days):
            raise CronError(
                f"cron expression {text!r} never fires: no month in field 4 (month) has any "
                "of the days in field 3 (day of month)"
            )
        return cron

    def matches(self, t: datetime) -> bool:
        return (
            t.minute in self.minutes
            and t.hour in self.hours
            and t.month in self.months
            and self._day_matches(t)
        )

    def _day_matches(self, t: datetime) -> bool:
        day_ok = t.day in self.days
        weekday_ok = (t.isoweekday() % 7) in self.weekdays
        if self.day_restricted and self.weekday_restricted:
            return day_ok or weekday_ok  # Vixie cron: either day field may match
        return day_ok and weekday_ok

    def next_after(self, t: datetime) -> datetime:
        """The first matching minute strictly after ``t``."""
        t = _as_utc(t).replace(second=0, microsecond=0) + timedelta(minutes=1)
        end = t + _HORIZON
        while t < end:
            if t.month not in self.months:
                t = _first_of_next_month(t)
            elif not self._day_matches(t):
                t = (t + timedelta(days=1)).replace(hour=0, minute=0)
            elif t.hour not in self.hours:
                t = (t + timedelta(hours=1)).replace(minute=0)
            elif t.minute not in self.minutes:
                t += timedelta(minutes=1)
            else:
                return t
        raise CronError(f"cron expression {self.text!r} does not fire within 9 years")

    def latest_at_or_before(self, t: datetime) -> datetime:
        """The last matching minute at or before ``t`` (the fire time a late message meant)."""
        t = _as_utc(t).replace(second=0, microsecond=0)
        end = t - _HORIZON
        while t > end:
            if t.month not in self.months:
                t = t.replace(day=1, hour=0, minute=0) - timedelta(minutes=1)
            elif not self._day_matches(t):
                t = t.replace(hour=0, minute=0) - timedelta(minutes=1)
            elif t.hour not in self.hours:
                t = t.replace(minute=0) - timedelta(minutes=1)
            elif t.minute not in self.minutes:
                t -= timedelta(minutes=1)
            else:
                return t
        raise CronError(f"cron expression {self.text!r} did not fire within 9 years")

    def field_texts(self) -> tuple[str, str, str, str, str]:
        """The five fields as plain numbers ('*' where unrestricted), e.g. for Celery's
        ``crontab``; day of week 0-6 with 0 = Sunday."""
        sets = (self.minutes, self.hours, self.days, self.months, self.weekdays)
        full = [frozenset(range(f.low, f.high + 1)) for f in _FIELDS[:4]] + [frozenset(range(7))]
        return tuple(  # type: ignore[return-value]
            "*" if values == whole else ",".join(str(v) for v in sorted(values))
            for values, whole in zip(sets, full, strict=True)
        )


_MONTH_LENGTH = {
    1: 31,
    2: 29,
    3: 31,
    4: 30,
    5: 31,
    6: 30,
    7: 31,
    8: 31,
    9: 30,
    10: 31,
    11: 30,
    12: 31,
}


def _as_utc(t: datetime) -> datetime:
    if t.tzinfo is None:
        raise ValueError("cron times must be timezone-aware (UTC)")
    return t.astimezone(UTC)


def _first_of_next_month(t: datetime) -> datetime:
    year, month = (t.year + 1, 1) if t.month == 12 else (t.year, t.month + 1)
    return t.replace(year=year, month=month, day=1, hour=0, minute=0)


def _parse_field(text: str, spec: _Field, position: int) -> frozenset[int]:
    where = f"cron field {position} ({spec.name}) {text!r}"
    valid = f"valid values are {spec.low}-{spec.high}"
    if spec.names:
        valid += " or names (" + ", ".join(list(spec.names)[:3]) + ", …)"

    def number(token: str) -> int:
        token = token.strip().lower()
        if token in spec.names:
            return spec.names[token]
        if not (token.isascii() and token.isdigit()):
            raise CronError(f"{where}: {token!r} is not a number; {valid}; {_SYNTAX}")
        value = int(token)
        if not spec.low <= value <= spec.high:
            raise CronError(f"{where}: {value} is out of range; {valid}")
        return value

    result: set[int] = set()
    for item in text.split(","):
        if not item:
            raise CronError(f"{where}: empty list item; {_SYNTAX}")
        base, _, step_text = item.partition("/")
        step = 1
        if step_text or item.endswith("/"):
            if not (step_text.isascii() and step_text.isdigit()) or int(step_text) < 1:
                raise CronError(f"{where}: step {step_text!r} must be a whole number ≥ 1")
            step = int(step_text)
        if base == "*":
            low, high = spec.low, spec.high
        elif "-" in base:
            a, _, b = base.partition("-")
            low, high = number(a), number(b)
            if low > high:
                raise CronError(f"{where}: range {base!r} runs backwards; write it low-high")
        else:
            low = number(base)
            high = spec.high if step_text else low  # 'a/n': from a to the end, every n
        result.update(range(low, high + 1, step))
    return frozenset(result)


def parse_cron(text: str) -> CronExpression:
    return CronExpression.parse(text)


# ---- API contracts ------------------------------------------------------------------------


class ScheduleCreate(JobCreate):
    """Body of ``POST /v1/schedules``: a job body (validated as ``POST /v1/jobs`` does) plus
    when to run it. Each fire pins the recipe's references anew (``main`` → today's sha)."""

    kind: JobKind = JobKind.MERGE
    cron: str = Field(
        description="5-field cron expression (minute hour day-of-month month day-of-week), "
        "evaluated in UTC",
        examples=["0 3 * * *"],
        max_length=200,
    )
    enabled: bool = Field(default=True, description="a disabled schedule does not fire")
    only_if_inputs_changed: bool = Field(
        default=False,
        description="skip a fire when every input resolves to what the last job used (hub "
        "commit sha, artifact version); s3:// and local inputs count as changed every time",
    )

    @field_validator("cron")
    @classmethod
    def _cron(cls, text: str) -> str:
        return parse_cron(text).text

    def job_request(self) -> JobCreate:
        """The job each fire submits."""
        return JobCreate.model_validate(self.model_dump(include=set(JobCreate.model_fields)))

    def job_options(self) -> dict[str, Any]:
        """The job fields besides kind, recipe and artifact name (callback_url, publish, …),
        as JSON, to store with the schedule; :func:`job_request_of` puts them back."""
        other = set(JobCreate.model_fields) - {"kind", "recipe", "artifact_name"}
        return self.model_dump(mode="json", include=other, exclude_unset=True)


def job_request_of(
    kind: str, recipe: dict[str, Any], artifact_name: str, job_options: dict[str, Any]
) -> JobCreate:
    """The job a stored schedule submits at each fire."""
    return JobCreate.model_validate(
        {**job_options, "kind": kind, "recipe": recipe, "artifact_name": artifact_name}
    )


class ScheduleUpdate(BaseModel):
    """Body of ``PATCH /v1/schedules/{id}``: fields left out stay as they are."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = None
    cron: str | None = Field(default=None, max_length=200, examples=["30 2 * * 1-5"])
    only_if_inputs_changed: bool | None = None

    @field_validator("cron")
    @classmethod
    def _cron(cls, text: str | None) -> str | None:
        return None if text is None else parse_cron(text).text


class RunOutcome(StrEnum):
    PENDING = "pending"  # being fired right now
    JOB = "job"  # a job was submitted (job_id)
    SKIPPED = "skipped"  # nothing to do (reason), e.g. inputs unchanged
    FAILED = "failed"  # the job could not be submitted (reason), e.g. a repo is gone


class ScheduleRunView(BaseModel):
    """One fire of a schedule: a job, or a recorded skip or failure with its reason."""

    id: str
    schedule_id: str
    scheduled_for: datetime = Field(description="the cron time this run stands for (UTC)")
    outcome: RunOutcome
    job_id: str | None = None
    job: JobView | None = Field(default=None, description="the job, when one was submitted")
    reason: str | None = None
    input_fingerprint: dict[str, Any] | None = Field(
        default=None, description="each input as it resolved at fire time"
    )
    created_at: datetime


class ScheduleRunList(BaseModel):
    """Runs newest first (by scheduled time). Pass ``next_cursor`` back as ``cursor``."""

    items: list[ScheduleRunView]
    next_cursor: str | None = None


class ScheduleView(BaseModel):
    id: str
    kind: JobKind
    cron: str
    timezone: str = CRON_TIMEZONE
    recipe: dict[str, Any] = Field(description="the recipe as sent (pinned anew at each fire)")
    artifact_name: str
    job_options: dict[str, Any] = Field(
        default_factory=dict,
        description="the other job fields given at creation (callback_url, publish, reuse)",
    )
    enabled: bool
    only_if_inputs_changed: bool
    next_run_at: datetime | None = Field(description="the next fire time (UTC); None if disabled")
    last_run_at: datetime | None = None
    last_outcome: RunOutcome | None = None
    last_run: ScheduleRunView | None = None
    created_at: datetime
    updated_at: datetime


class ScheduleList(BaseModel):
    items: list[ScheduleView]
    next_cursor: str | None = None
