"""The job store: a job's life as guarded state transitions, the one source of truth.

States (``pending`` is internal, never shown by the API)::

    pending ──activate──▶ queued ──claim──▶ running ──▶ succeeded | failed | cancelled
                            │                  │
                            └─cancel───────────┴─▶ cancelled (running: cooperative)

    back to queued:  running ──release_for_retry──▶ queued       (a transient failure)
                     queued ──fail_unqueued──▶ failed, phase not-queued ──requeue_unqueued──▶ queued

Every transition is a single ``UPDATE … WHERE <expected state> RETURNING``: two processes
racing for the same transition cannot both win, on PostgreSQL (the row lock makes the loser
re-check the WHERE clause on the winner's row) and on SQLite (one writer at a time). Nothing
here needs the broker, so the rules are tested directly.

**Idempotency-Key** (``POST /v1/jobs``). The row carries the key and the sha256 of the request
body as sent (``request_hash``), unique per tenant and key. Submitting is two steps, because
pinning references (a Hub round trip) happens between them:

1. :meth:`JobStore.begin_job` inserts the job as ``pending``, taking the key. If the key is
   already taken: a different body raises :class:`IdempotencyKeyReused` (API: 422); the same
   body for a job past ``pending`` is a replay (``JobSubmission.replayed``; API: the first
   response again); the same body for a ``pending`` job means the first request is still in
   flight and raises :class:`IdempotencyKeyInFlight` (API: 409 with ``Retry-After``).
2. :meth:`JobStore.activate_job` stores the pinned recipe and moves the job to ``queued``.
   If pinning fails, :meth:`JobStore.abandon_job` deletes the row, freeing the key for a
   corrected retry. A ``pending`` row older than ``pending_timeout`` belongs to a request that
   died (process killed): the next request with that key deletes it and starts afresh, with
   a new job id, so the dead request's late ``activate_job`` finds nothing (JobNotPending).

:meth:`JobStore.create_job` does both steps at once (insert as ``queued``) for callers with
nothing slow in between.

**Claim and redelivery.** Celery runs with ``acks_late`` and ``reject_on_worker_lost``, so a
message can arrive twice. :meth:`JobStore.claim` moves ``queued`` → ``running`` and counts the
attempt; a second message for a job that is running (with a live worker) or finished gets
None and must do nothing. A running job whose heartbeat is older than ``worker_lost_after``
lost its worker (killed, out of memory): claim takes it over as a new attempt. When the
attempts are used up, claim fails the job with a message saying so instead. A redelivery
that arrives before the dead worker's heartbeat has gone stale gets None too; the task asks
:meth:`JobStore.retry_claim_after` and retries the message after that many seconds, so the
job is neither lost nor run twice. :meth:`JobStore.recover_lost_jobs` does the same
housekeeping without a message (at service start for the embedded worker, or periodically).

Worker-side writes (progress, finish) name the worker id from the claim: a worker that lost
its job to a takeover is told (False / None) and must stop, rather than overwrite.

**Retries and lost messages.** A transient failure gives the job back (:meth:`release_for_retry`:
``queued``, phase ``retrying``, the attempt's error kept) and the worker sends it again after
a backoff; the attempt counted at claim caps the retries. A queued job whose message is gone
is found by :meth:`long_queued_jobs` (queued, or last sent, more than ``worker_lost_after``
ago: ``updated_at`` is that time, as nothing else changes a queued row) and sent again by
whoever wins :meth:`mark_sent_again` (see infra.queue.resend_unsent_jobs). A submission whose
message the broker refused is failed with phase ``not-queued`` (:meth:`fail_unqueued`); a
retry with its Idempotency-Key moves that same job back to queued (:meth:`requeue_unqueued`).

**Webhooks.** Every state change also writes the job's webhook events (the outbox rows of
:mod:`infra.db.webhooks`) in the transaction that makes it, so an event exists exactly
when its transition committed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, Engine, Text, and_, cast, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.dml import ReturningUpdate

from infra.db.engine import make_engine
from infra.db.models import PENDING, Job
from infra.db.webhooks import record_job_event
from schemas.jobs import ArtifactRef, JobCreate, JobError, JobKind, JobState

if TYPE_CHECKING:
    from infra.settings import Settings

QUEUED = JobState.QUEUED.value
RUNNING = JobState.RUNNING.value
SUCCEEDED = JobState.SUCCEEDED.value
FAILED = JobState.FAILED.value
CANCELLED = JobState.CANCELLED.value
# The phase of a job answered with an existing artifact instead of running (finish_reused).
REUSED_PHASE = "reused"
# The phase of a job just claimed by a worker, before it reports what it is doing.
STARTING_PHASE = "starting"
# The phase of a queued job whose last attempt failed transiently (release_for_retry).
RETRY_PHASE = "retrying"
# The phase of a job failed because its message could not be queued (fail_unqueued): the
# submission was answered 503, and the same Idempotency-Key may queue it again.
NOT_QUEUED_PHASE = "not-queued"

MAX_PAGE_SIZE = 200
# A page of jobs ends early once its recipes (as stored) pass this many bytes.
MAX_PAGE_RECIPE_BYTES = 4 << 20
MAX_IDEMPOTENCY_KEY_LENGTH = 255


class JobStoreError(Exception):
    """Base class of the job store's own errors."""


class IdempotencyKeyReused(JobStoreError):
    """The Idempotency-Key was used before with a different request body (API: 422)."""

    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(
            f"Idempotency-Key {key!r} was already used for a different request (job {job_id}); "
            "use a new key for a new request"
        )
        self.key = key
        self.job_id = job_id


class IdempotencyKeyInFlight(JobStoreError):
    """The first request with this Idempotency-Key is still being processed (API: 409)."""

    def __init__(self, key: str, retry_after: float) -> None:
        super().__init__(
            f"a request with Idempotency-Key {key!r} is still being processed; "
            f"retry in {retry_after:.0f} s"
        )
        self.key = key
        self.retry_after = retry_after


class JobNotPending(JobStoreError):
    """activate_job on a job that is no longer pending (abandoned, or its key taken over)."""


class InvalidCursor(JobStoreError, ValueError):
    """A list cursor that this store did not hand out."""


@dataclass(frozen=True)
class JobSubmission:
    job: Job
    replayed: bool  # True: the Idempotency-Key matched an earlier, identical request


@dataclass(frozen=True)
class QueuedJob:
    """A job waiting in ``queued`` since ``queued_at`` (when it was last sent to a worker)."""

    id: str
    kind: str
    queued_at: datetime


@dataclass(frozen=True)
class JobPage:
    jobs: list[Job]
    next_cursor: str | None


def canonical_sha256(document: Any) -> str:
    """sha256 of a JSON document with sorted keys and no whitespace: equal data, equal hash."""
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def request_fingerprint(request: JobCreate) -> str:
    """Identifies a submission for Idempotency-Key checks: defaults filled, key order ignored."""
    return canonical_sha256(request.model_dump(mode="json"))


def _utcnow() -> datetime:
    return datetime.now(UTC)


class JobStore:
    """Jobs of all tenants in one database. Thread-safe; one instance per process.

    ``max_attempts`` and ``worker_lost_after`` come from the settings (see from_settings);
    ``pending_timeout`` is how long an unfinished submission holds its Idempotency-Key.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_attempts: int,
        worker_lost_after: timedelta,
        pending_timeout: timedelta = timedelta(minutes=10),
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        self.engine = engine
        self.max_attempts = max_attempts
        self.worker_lost_after = worker_lost_after
        self.pending_timeout = pending_timeout
        self._clock = clock
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def from_settings(cls, settings: Settings, engine: Engine | None = None) -> JobStore:
        """A store configured by :class:`infra.settings.Settings` (schema must be migrated)."""
        return cls(
            engine if engine is not None else make_engine(settings.database_url),
            max_attempts=settings.max_attempts,
            worker_lost_after=timedelta(seconds=settings.worker_lost_after),
        )

    def _now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("the job store's clock must return timezone-aware datetimes")
        return now.astimezone(UTC)

    # ---- submission ----------------------------------------------------------------------

    def begin_job(
        self, tenant_id: int, request: JobCreate, *, idempotency_key: str | None = None
    ) -> JobSubmission:
        """Step 1 of a submission: record the job as pending (or replay an earlier one).

        Raises IdempotencyKeyReused (422) or IdempotencyKeyInFlight (409). A new job comes
        back pending: call activate_job with the pinned recipe, or abandon_job.
        """
        return self._submit(tenant_id, request, idempotency_key, recipe=None)

    def activate_job(self, job_id: str, recipe: Mapping[str, Any]) -> Job:
        """Step 2: store the recipe with its references pinned; the job becomes queued."""
        now = self._now()
        recipe = dict(recipe)
        with self._sessions.begin() as s:
            job = s.scalar(
                self._transition(job_id, Job.state == PENDING).values(
                    state=QUEUED,
                    recipe=recipe,
                    recipe_hash=canonical_sha256(recipe),
                    created_at=now,
                    updated_at=now,
                )
            )
            self._announce(s, now, job)
        if job is None:
            raise JobNotPending(
                f"job {job_id} is not pending: it was abandoned or its key was taken over"
            )
        return job

    def abandon_job(self, job_id: str) -> None:
        """Forget a pending job (its references could not be pinned); frees its key."""
        with self._sessions.begin() as s:
            s.execute(delete(Job).where(Job.id == job_id, Job.state == PENDING))

    def create_job(
        self,
        tenant_id: int,
        request: JobCreate,
        *,
        recipe: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> JobSubmission:
        """Record a queued job in one step. ``recipe``: the pinned recipe (default: as sent)."""
        pinned = dict(recipe) if recipe is not None else dict(request.recipe)
        return self._submit(tenant_id, request, idempotency_key, recipe=pinned)

    def _submit(
        self,
        tenant_id: int,
        request: JobCreate,
        key: str | None,
        *,
        recipe: dict[str, Any] | None,
    ) -> JobSubmission:
        if key is not None and not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH:
            raise ValueError(
                f"an Idempotency-Key has 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} characters, "
                f"got {len(key)}"
            )
        fingerprint = request_fingerprint(request)
        # A few rounds at most: each lost race means another request took the key meanwhile.
        for _ in range(5):
            now = self._now()
            if key is not None:
                with self._sessions() as s:
                    existing = s.scalar(
                        select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key)
                    )
                if existing is not None:
                    if existing.request_hash != fingerprint:
                        raise IdempotencyKeyReused(key, existing.id)
                    if existing.state != PENDING:
                        return JobSubmission(existing, replayed=True)
                    expires = existing.created_at + self.pending_timeout
                    if expires > now:
                        raise IdempotencyKeyInFlight(key, (expires - now).total_seconds())
                    # The request that took the key died before finishing: start afresh.
                    with self._sessions.begin() as s:
                        s.execute(
                            delete(Job).where(
                                Job.id == existing.id,
                                Job.state == PENDING,
                                Job.created_at <= now - self.pending_timeout,
                            )
                        )
            source = recipe if recipe is not None else dict(request.recipe)
            job = Job(
                id=str(uuid.uuid4()),
                tenant_id=tenant_id,
                kind=request.kind.value,
                state=PENDING if recipe is None else QUEUED,
                recipe=source,
                recipe_hash=canonical_sha256(source),
                artifact_name=request.artifact_name,
                callback_url=str(request.callback_url) if request.callback_url else None,
                publish=request.publish.model_dump() if request.publish else None,
                idempotency_key=key,
                request_hash=fingerprint,
                attempts=0,
                max_attempts=self.max_attempts,
                cancel_requested=False,
                tensors_done=0,
                bytes_done=0,
                created_at=now,
                updated_at=now,
            )
            try:
                with self._sessions.begin() as s:
                    s.add(job)
                    if job.state == QUEUED:
                        s.flush()
                        self._announce(s, now, job)
            except IntegrityError:
                if key is None or not self._key_taken(tenant_id, key):
                    raise  # not a lost race for the key (e.g. an unknown tenant)
                continue  # someone inserted this key first: look at their row
            return JobSubmission(job, replayed=False)
        raise IdempotencyKeyInFlight(key or "", self.pending_timeout.total_seconds())

    def fail_unqueued(self, job_id: str, error: JobError) -> Job | None:
        """queued → failed because its message could not be sent (the submission answers
        503), marked with phase ``not-queued``. None: the job was not queued any more (a
        worker got the message after all, or it was cancelled)."""
        now = self._now()
        with self._sessions.begin() as s:
            job = s.scalar(
                self._transition(job_id, Job.state == QUEUED).values(
                    state=FAILED,
                    phase=NOT_QUEUED_PHASE,
                    error=error.model_dump(mode="json"),
                    finished_at=now,
                    updated_at=now,
                )
            )
            return self._announce(s, now, job)

    def requeue_unqueued(self, job_id: str) -> Job | None:
        """failed (not-queued) → queued again, for a retry of its submission with the same
        Idempotency-Key: the same job, never a second one. Exactly one of concurrent callers
        gets the job (then sends it); the others get None and read it as it is."""
        now = self._now()
        with self._sessions.begin() as s:
            job = s.scalar(
                self._transition(
                    job_id,
                    Job.state == FAILED,
                    Job.phase == NOT_QUEUED_PHASE,
                    Job.attempts == 0,
                ).values(state=QUEUED, phase=None, error=None, finished_at=None, updated_at=now)
            )
            return self._announce(s, now, job)

    # ---- worker side ---------------------------------------------------------------------

    def claim(self, job_id: str, worker_id: str) -> Job | None:
        """Start (or take over) a job for ``worker_id``; None means: do nothing.

        Succeeds for a queued job, or a running job whose worker is lost (no heartbeat for
        ``worker_lost_after``), when attempts remain; ``attempts`` goes up by one. A claimable
        job whose cancel was requested becomes cancelled; one whose attempts are used up
        becomes failed, with an error saying so. Returns None in those cases and for a job
        that is running with a live worker, finished, pending or unknown.
        """
        now = self._now()
        claimable = self._claimable(now)
        with self._sessions.begin() as s:
            job = s.scalar(
                self._transition(
                    job_id,
                    claimable,
                    Job.attempts < Job.max_attempts,
                    Job.cancel_requested.is_(False),
                ).values(
                    state=RUNNING,
                    attempts=Job.attempts + 1,
                    worker_id=worker_id,
                    heartbeat_at=now,
                    started_at=func.coalesce(Job.started_at, now),
                    updated_at=now,
                    # what a running job shows until its worker reports more: a new attempt
                    # starts its counters over
                    phase=STARTING_PHASE,
                    tensors_done=0,
                    tensors_total=None,
                    bytes_done=0,
                    bytes_total=None,
                )
            )
            if job is not None:
                return self._announce(s, now, job)
            cancelled = s.scalar(
                self._transition(job_id, claimable, Job.cancel_requested.is_(True)).values(
                    state=CANCELLED, finished_at=now, updated_at=now
                )
            )
            self._announce(s, now, cancelled)
            current = s.get(Job, job_id)
            if current is not None:
                failed = s.scalar(
                    self._transition(job_id, claimable, Job.attempts >= Job.max_attempts).values(
                        state=FAILED,
                        error=self._attempts_exhausted(current.max_attempts),
                        finished_at=now,
                        updated_at=now,
                    )
                )
                self._announce(s, now, failed)
        return None

    def retry_claim_after(self, job_id: str) -> float | None:
        """After claim() gave None: seconds until claiming may succeed, or None if never.

        0 for a queued job; for a running job, the time until its heartbeat is stale (its
        worker may have died just before this message was redelivered). A Celery task
        retries its message after that delay; a finished or unknown job needs nothing.
        """
        now = self._now()
        with self._sessions() as s:
            job = s.get(Job, job_id)
        if job is None or job.state not in (QUEUED, RUNNING):
            return None
        if job.state == QUEUED or job.heartbeat_at is None:
            return 0.0
        return max(0.0, (job.heartbeat_at + self.worker_lost_after - now).total_seconds())

    def heartbeat(self, job_id: str, worker_id: str) -> bool:
        """Record that ``worker_id`` is alive on the job. False: the job is no longer its own."""
        return self.update_progress(job_id, worker_id)

    def update_progress(
        self,
        job_id: str,
        worker_id: str,
        *,
        phase: str | None = None,
        tensors_done: int | None = None,
        tensors_total: int | None = None,
        bytes_done: int | None = None,
        bytes_total: int | None = None,
    ) -> bool:
        """Store progress (fields left None are kept) and a heartbeat.

        False means the job is no longer running for this worker (finished, cancelled, or
        taken over after this worker was presumed lost): stop working on it.
        """
        now = self._now()
        values: dict[str, Any] = {"heartbeat_at": now, "updated_at": now}
        for name, value in (
            ("phase", phase),
            ("tensors_done", tensors_done),
            ("tensors_total", tensors_total),
            ("bytes_done", bytes_done),
            ("bytes_total", bytes_total),
        ):
            if value is not None:
                values[name] = value
        with self._sessions.begin() as s:
            job = s.scalar(
                self._transition(job_id, Job.state == RUNNING, Job.worker_id == worker_id).values(
                    **values
                )
            )
        return job is not None

    def record_publish(self, job_id: str, worker_id: str, publish: Mapping[str, Any]) -> bool:
        """Store the job's ``publish`` document (its options and, once pushed, the Hub
        commit) while it runs for ``worker_id``. False: the job is no longer its own."""
        now = self._now()
        with self._sessions.begin() as s:
            job = s.scalar(
                self._transition(job_id, Job.state == RUNNING, Job.worker_id == worker_id).values(
                    publish=dict(publish), updated_at=now
                )
            )
        return job is not None

    def is_cancel_requested(self, job_id: str) -> bool:
        """Checked by the engine between tensors: True once the job should stop."""
        with self._sessions() as s:
            row = s.execute(
                select(Job.state, Job.cancel_requested).where(Job.id == job_id)
            ).one_or_none()
        return row is not None and (row.cancel_requested or row.state == CANCELLED)

    def finish_succeeded(
        self, job_id: str, artifact: ArtifactRef, *, worker_id: str | None = None
    ) -> Job | None:
        """running → succeeded with the published artifact. None: the job was not running
        (for this worker, when given)."""
        now = self._now()
        with self._sessions.begin() as s:
            job = s.scalar(
                self._transition(job_id, Job.state == RUNNING, *self._owned_by(worker_id)).values(
                    state=SUCCEEDED,
                    artifact_version=artifact.version,
                    artifact_uri=artifact.uri,
                    error=None,
                    finished_at=now,
                    updated_at=now,
                )
            )
            return self._announce(s, now, job)

    def finish_reused(self, job_id: str, artifact: ArtifactRef) -> Job | None:
        """queued → succeeded with an artifact an earlier job built from the same pinned
        recipe and seed; phase ``reused``. None: the job was not queued any more."""
        now = self._now()
        with self._sessions.begin() as s:
            job = s.scalar(
                self._transition(job_id, Job.state == QUEUED).values(
                    state=SUCCEEDED,
                    phase=REUSED_PHASE,
                    artifact_version=artifact.version,
                    artifact_uri=artifact.uri,
                    error=None,
                    started_at=now,
                    finished_at=now,
                    updated_at=now,
                )
            )
            return self._announce(s, now, job)

    def finish_failed(
        self, job_id: str, error: JobError, *, worker_id: str | None = None
    ) -> Job | None:
        """queued or running → failed with a user-facing error. None: already finished."""
        now = self._now()
        with self._sessions.begin() as s:
            job = s.scalar(
                self._transition(
                    job_id, Job.state.in_((QUEUED, RUNNING)), *self._owned_by(worker_id)
                ).values(
                    state=FAILED,
                    error=error.model_dump(mode="json"),
                    finished_at=now,
                    updated_at=now,
                )
            )
            return self._announce(s, now, job)

    def finish_cancelled(self, job_id: str, *, worker_id: str | None = None) -> Job | None:
        """queued or running → cancelled (the worker stopped at a cancel request)."""
        now = self._now()
        with self._sessions.begin() as s:
            job = s.scalar(
                self._transition(
                    job_id, Job.state.in_((QUEUED, RUNNING)), *self._owned_by(worker_id)
                ).values(state=CANCELLED, cancel_requested=True, finished_at=now, updated_at=now)
            )
            return self._announce(s, now, job)

    def release_for_retry(self, job_id: str, worker_id: str, error: JobError) -> Job | None:
        """running → queued after a transient failure of ``worker_id``'s attempt, recording
        the attempt's ``error`` (phase ``retrying``); the caller sends the job again after a
        backoff. A job whose cancel was requested becomes cancelled instead. None: the job
        was no longer running for this worker."""
        now = self._now()
        mine = (Job.state == RUNNING, Job.worker_id == worker_id)
        with self._sessions.begin() as s:
            job = s.scalar(
                self._transition(job_id, *mine, Job.cancel_requested.is_(False)).values(
                    state=QUEUED,
                    phase=RETRY_PHASE,
                    worker_id=None,
                    heartbeat_at=None,
                    error=error.model_dump(mode="json"),
                    updated_at=now,
                )
            )
            if job is None:
                job = s.scalar(
                    self._transition(job_id, *mine, Job.cancel_requested.is_(True)).values(
                        state=CANCELLED, finished_at=now, updated_at=now
                    )
                )
            return self._announce(s, now, job)

    def recover_lost_jobs(self) -> list[str]:
        """Requeue running jobs whose worker is lost; returns their ids (enqueue them again).

        Lost jobs with a cancel request become cancelled, those out of attempts failed.
        """
        now = self._now()
        lost = and_(Job.state == RUNNING, self._worker_lost(now))
        with self._sessions.begin() as s:
            cancelled = s.scalars(
                update(Job)
                .where(lost, Job.cancel_requested.is_(True))
                .values(state=CANCELLED, finished_at=now, updated_at=now)
                .returning(Job)
                .execution_options(synchronize_session=False, populate_existing=True)
            ).all()
            for job in cancelled:
                self._announce(s, now, job)
            for max_attempts in s.scalars(
                select(Job.max_attempts).where(lost, Job.attempts >= Job.max_attempts).distinct()
            ).all():
                failed = s.scalars(
                    update(Job)
                    .where(
                        lost,
                        Job.attempts >= Job.max_attempts,
                        Job.max_attempts == max_attempts,
                    )
                    .values(
                        state=FAILED,
                        error=self._attempts_exhausted(max_attempts),
                        finished_at=now,
                        updated_at=now,
                    )
                    .returning(Job)
                    .execution_options(synchronize_session=False, populate_existing=True)
                ).all()
                for job in failed:
                    self._announce(s, now, job)
            requeued = s.scalars(
                update(Job)
                .where(lost)
                .values(state=QUEUED, worker_id=None, updated_at=now)
                .returning(Job.id)
                .execution_options(synchronize_session=False)
            ).all()
        return sorted(requeued)

    def long_queued_jobs(self, older_than: timedelta | None = None) -> list[QueuedJob]:
        """Jobs queued (or last sent again) more than ``older_than`` ago, oldest first;
        default ``worker_lost_after``. Either they wait behind others or their message was
        lost: the sweeper looks for their message in the broker and sends the missing ones
        again (:meth:`mark_sent_again`)."""
        cutoff = self._now() - (older_than if older_than is not None else self.worker_lost_after)
        with self._sessions() as s:
            rows = s.execute(
                select(Job.id, Job.kind, Job.updated_at)
                .where(Job.state == QUEUED, Job.updated_at < cutoff)
                .order_by(Job.updated_at, Job.id)
            ).all()
        return [QueuedJob(row.id, row.kind, row.updated_at) for row in rows]

    def mark_sent_again(self, job: QueuedJob) -> bool:
        """Take the right to send ``job`` again: True for exactly one caller while the job is
        still queued as :meth:`long_queued_jobs` saw it (its queued time becomes now, so it
        is not sent again before another ``worker_lost_after``)."""
        now = self._now()
        with self._sessions.begin() as s:
            taken = s.scalar(
                update(Job)
                .where(Job.id == job.id, Job.state == QUEUED, Job.updated_at == job.queued_at)
                .values(updated_at=now)
                .returning(Job.id)
                .execution_options(synchronize_session=False)
            )
        return taken is not None

    def kinds(self, job_ids: list[str]) -> dict[str, str]:
        """Job id → kind (merge, edit), for routing jobs sent again to their queue."""
        if not job_ids:
            return {}
        with self._sessions() as s:
            rows = s.execute(select(Job.id, Job.kind).where(Job.id.in_(job_ids))).all()
        return {row.id: row.kind for row in rows}

    def states(self, job_ids: list[str]) -> dict[str, str]:
        """Job id → state, for the ids that name a job (the sweep of a split merge's work
        files: an id missing from the answer names no job)."""
        if not job_ids:
            return {}
        with self._sessions() as s:
            rows = s.execute(select(Job.id, Job.state).where(Job.id.in_(job_ids))).all()
        return {row.id: row.state for row in rows}

    def queued_job_ids(self) -> list[str]:
        """Ids of queued jobs, oldest first (the embedded worker's queue after a restart)."""
        with self._sessions() as s:
            return list(
                s.scalars(
                    select(Job.id).where(Job.state == QUEUED).order_by(Job.created_at, Job.id)
                )
            )

    # ---- API side ------------------------------------------------------------------------

    def get(self, tenant_id: int, job_id: str) -> Job | None:
        """The tenant's job; None for another tenant's job, a pending or unknown id."""
        with self._sessions() as s:
            return s.scalar(
                select(Job).where(
                    Job.id == job_id, Job.tenant_id == tenant_id, Job.state != PENDING
                )
            )

    def request_cancel(self, tenant_id: int, job_id: str) -> Job | None:
        """Cancel: a queued job is cancelled at once, a running one is flagged (the worker
        stops between tensors), a finished one is returned unchanged. None: no such job."""
        now = self._now()
        mine = (Job.tenant_id == tenant_id,)
        with self._sessions.begin() as s:
            job = s.scalar(
                self._transition(job_id, Job.state == QUEUED, *mine).values(
                    state=CANCELLED, cancel_requested=True, finished_at=now, updated_at=now
                )
            )
            self._announce(s, now, job)
            if job is None:
                job = s.scalar(
                    self._transition(job_id, Job.state == RUNNING, *mine).values(
                        cancel_requested=True, updated_at=now
                    )
                )
            if job is None:
                job = s.scalar(select(Job).where(Job.id == job_id, *mine, Job.state != PENDING))
            return job

    def list_jobs(
        self,
        tenant_id: int,
        *,
        state: JobState | None = None,
        kind: JobKind | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> JobPage:
        """The tenant's jobs, newest first, ``limit`` (1…200) at a time, fewer when their
        recipes pass :data:`MAX_PAGE_RECIPE_BYTES` (always at least one).

        ``next_cursor`` is None on the last page. A job created while paging appears on no
        later page (it is newer than the cursor); none is repeated or skipped.
        """
        limit = max(1, min(limit, MAX_PAGE_SIZE))
        conditions: list[ColumnElement[bool]] = [Job.tenant_id == tenant_id, Job.state != PENDING]
        if state is not None:
            conditions.append(Job.state == JobState(state).value)
        if kind is not None:
            conditions.append(Job.kind == JobKind(kind).value)
        if cursor is not None:
            created_at, last_id = decode_cursor(cursor)
            conditions.append(
                or_(
                    Job.created_at < created_at,
                    and_(Job.created_at == created_at, Job.id < last_id),
                )
            )
        order = (Job.created_at.desc(), Job.id.desc())
        # The recipes' stored sizes first: a page ends early once they pass the budget, so a
        # tenant's large recipes never make one answer (or this process) large.
        size = func.coalesce(func.length(cast(Job.recipe, Text)), 0)
        with self._sessions() as s:
            heads = s.execute(
                select(Job.id, size).where(*conditions).order_by(*order).limit(limit + 1)
            ).all()
            ids: list[str] = []
            total = 0
            for job_id, recipe_bytes in heads[:limit]:
                total += int(recipe_bytes)
                if ids and total > MAX_PAGE_RECIPE_BYTES:
                    break
                ids.append(job_id)
            jobs = list(s.scalars(select(Job).where(Job.id.in_(ids)).order_by(*order)))
        if len(ids) == len(heads) or not jobs:
            return JobPage(jobs, None)
        return JobPage(jobs, encode_cursor(jobs[-1].created_at, jobs[-1].id))

    # ---- helpers -------------------------------------------------------------------------

    @staticmethod
    def _announce(s: Session, now: datetime, job: Job | None) -> Job | None:
        """Write the webhook outbox rows for a job that just changed state, in the same
        transaction (see infra.db.webhooks); passes the job through."""
        if job is not None:
            record_job_event(s, job, now)
        return job

    def _key_taken(self, tenant_id: int, key: str) -> bool:
        with self._sessions() as s:
            found = s.scalar(
                select(Job.id).where(Job.tenant_id == tenant_id, Job.idempotency_key == key)
            )
        return found is not None

    def _transition(self, job_id: str, *conditions: ColumnElement[bool]) -> ReturningUpdate[Job]:
        """``UPDATE jobs … WHERE id = :id AND <conditions> RETURNING *`` (the ORM Job)."""
        return (
            update(Job)
            .where(Job.id == job_id, *conditions)
            .returning(Job)
            .execution_options(synchronize_session=False, populate_existing=True)
        )

    def _worker_lost(self, now: datetime) -> ColumnElement[bool]:
        return or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < now - self.worker_lost_after)

    def _claimable(self, now: datetime) -> ColumnElement[bool]:
        return or_(Job.state == QUEUED, and_(Job.state == RUNNING, self._worker_lost(now)))

    @staticmethod
    def _owned_by(worker_id: str | None) -> tuple[ColumnElement[bool], ...]:
        if worker_id is None:
            return ()
        return (Job.worker_id == worker_id, Job.state == RUNNING)

    @staticmethod
    def _attempts_exhausted(max_attempts: int) -> dict[str, Any]:
        message = (
            f"gave up after {max_attempts} attempt{'s' if max_attempts != 1 else ''}: each time, "
            "the worker running the job was lost (killed, out of memory or past the time limit)"
        )
        return JobError(message=message, detail=message).model_dump(mode="json")


def encode_cursor(when: datetime, row_id: str) -> str:
    """An opaque keyset cursor: the (time, id) of the last row of a page, newest first."""
    raw = json.dumps([when.isoformat(), row_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The (time, id) of :func:`encode_cursor`; raises :class:`InvalidCursor`."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        when_text, row_id = json.loads(raw)
        when = datetime.fromisoformat(when_text)
        if when.tzinfo is None or not isinstance(row_id, str):
            raise ValueError
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise InvalidCursor(
            f"invalid cursor {cursor[:40]!r}: pass back a next_cursor from a previous page"
        ) from None
    return when, row_id
