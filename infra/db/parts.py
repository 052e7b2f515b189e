"""The parts of a merge split across workers: each a unit of work with the job semantics.

A split merge (workers/merge/parts.py, workers/split_merge.py) runs in *steps*: one per
statistics pass of the method, then the merge itself. Each step has one row per part
(``job_parts``), and a part row lives like a job does::

    queued ──claim_part──▶ running ──finish_part──▶ done
                              │  └────fail_part────▶ failed
                              └─release_part─▶ queued      (a transient failure)

- **Claim and fencing.** :meth:`PartStore.claim_part` is one guarded ``UPDATE``: a queued
  part, or a running one whose heartbeat is older than ``worker_lost_after`` (its worker was
  killed), becomes running for the caller, its attempts counted; only while the job itself
  is running with the same attempt (``job_attempt``) and no cancel was asked. Every later
  write of the part (heartbeat, finish, fail) names the worker id from the claim, so a
  worker that lost its part (taken over after it stalled) learns it and writes nothing.
- **Attempts.** A part whose worker is lost ``max_attempts`` times is failed with an error
  saying so, and the job with it.
- **A new attempt of the job** (its coordinator died) deletes the job's parts first
  (:meth:`start_step` with step 0): whatever the old attempt's parts still do is fenced off.
- **Barrier.** The job's coordinator reads the step's rows (:meth:`parts`): the step is
  done when every part is; a failed part fails the job with the part's error.

Nothing here needs the broker; the rules are tested directly (tests/test_split_merge.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Engine, and_, delete, exists, or_, select, update
from sqlalchemy.orm import sessionmaker
from sqlalchemy.sql.dml import ReturningUpdate

from infra.db.models import Job, JobPart
from schemas.jobs import JobError, JobState

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class PartKey:
    """Which part: of which job's attempt, at which step."""

    job_id: str
    job_attempt: int
    step: int
    part: int

    def args(self) -> list[Any]:
        """The part's queue message arguments."""
        return [self.job_id, self.job_attempt, self.step, self.part]


class PartStore:
    """The ``job_parts`` table. Thread-safe; one per process, like the JobStore."""

    def __init__(
        self,
        engine: Engine,
        *,
        worker_lost_after: timedelta,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.engine = engine
        self.worker_lost_after = worker_lost_after
        self._clock = clock
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    # ---- the job's coordinator ---------------------------------------------------------

    def start_step(
        self,
        job_id: str,
        job_attempt: int,
        step: int,
        specs: Sequence[Mapping[str, Any]],
        max_attempts: int,
    ) -> list[PartKey]:
        """Record the parts of ``step`` (one per spec), queued. Step 0 first deletes every
        part the job has (an earlier attempt's: fenced off from now on)."""
        now = self._clock()
        with self._sessions.begin() as s:
            if step == 0:
                s.execute(delete(JobPart).where(JobPart.job_id == job_id))
            else:
                s.execute(delete(JobPart).where(JobPart.job_id == job_id, JobPart.step == step))
            for i, spec in enumerate(specs):
                s.add(
                    JobPart(
                        job_id=job_id,
                        step=step,
                        part=i,
                        job_attempt=job_attempt,
                        state=QUEUED,
                        spec=dict(spec),
                        attempts=0,
                        max_attempts=max_attempts,
                        tensors_done=0,
                        bytes_done=0,
                        updated_at=now,
                    )
                )
        return [PartKey(job_id, job_attempt, step, i) for i in range(len(specs))]

    def parts(self, job_id: str, step: int | None = None) -> list[JobPart]:
        """The job's parts (of one step), by step and part."""
        query = select(JobPart).where(JobPart.job_id == job_id)
        if step is not None:
            query = query.where(JobPart.step == step)
        with self._sessions() as s:
            return list(s.scalars(query.order_by(JobPart.step, JobPart.part)))

    def part_should_stop(self, key: PartKey) -> bool:
        """Whether a running part should stop at its next tensor: the job was cancelled,
        is no longer running this attempt (it failed, finished, or was taken over), or
        another part of this attempt failed (which fails the job)."""
        with self._sessions() as s:
            row = s.execute(
                select(Job.state, Job.attempts, Job.cancel_requested).where(Job.id == key.job_id)
            ).one_or_none()
            failed = s.scalar(
                select(JobPart.part)
                .where(
                    JobPart.job_id == key.job_id,
                    JobPart.job_attempt == key.job_attempt,
                    JobPart.state == FAILED,
                )
                .limit(1)
            )
        return (
            row is None
            or row.cancel_requested
            or row.state != JobState.RUNNING.value
            or row.attempts != key.job_attempt
            or failed is not None
        )

    def job(self, job_id: str) -> Job | None:
        """The job a part belongs to (its recipe and tenant), read only."""
        with self._sessions() as s:
            return s.get(Job, job_id)

    # ---- a part's worker -----------------------------------------------------------------

    def claim_part(self, key: PartKey, worker_id: str) -> JobPart | None:
        """Start (or take over from a lost worker) the part for ``worker_id``; None: do
        nothing now (see :meth:`retry_part_after`). A claimable part whose attempts are used
        up is failed instead, with an error saying so."""
        now = self._clock()
        job_running = exists().where(
            Job.id == key.job_id,
            Job.state == JobState.RUNNING.value,
            Job.attempts == key.job_attempt,
            Job.cancel_requested.is_(False),
        )
        with self._sessions.begin() as s:
            part = s.scalar(
                self._transition(
                    key, self._claimable(now), JobPart.attempts < JobPart.max_attempts, job_running
                ).values(
                    state=RUNNING,
                    attempts=JobPart.attempts + 1,
                    worker_id=worker_id,
                    heartbeat_at=now,
                    tensors_done=0,
                    bytes_done=0,
                    updated_at=now,
                )
            )
            if part is not None:
                return part
            current = s.get(JobPart, (key.job_id, key.step, key.part))
            if current is not None:
                message = (
                    f"part {key.part + 1} of the merge gave up after {current.max_attempts} "
                    f"attempt{'s' if current.max_attempts != 1 else ''}: each time, the worker "
                    "running it was lost (killed, out of memory or past the time limit)"
                )
                s.execute(
                    self._transition(
                        key, self._claimable(now), JobPart.attempts >= JobPart.max_attempts
                    ).values(
                        state=FAILED,
                        error=JobError(message=message, detail=message).model_dump(mode="json"),
                        updated_at=now,
                    )
                )
        return None

    def retry_part_after(self, key: PartKey) -> float | None:
        """After claim_part gave None: seconds until claiming may succeed, or None if never
        (the part is finished, replaced by a new attempt of the job, or gone)."""
        now = self._clock()
        with self._sessions() as s:
            part = s.get(JobPart, (key.job_id, key.step, key.part))
            job = s.get(Job, key.job_id)
        if part is None or part.job_attempt != key.job_attempt or part.state in (DONE, FAILED):
            return None
        if job is None or job.state != JobState.RUNNING.value or job.attempts != key.job_attempt:
            return None
        if part.state == QUEUED or part.heartbeat_at is None:
            return 0.0
        return max(0.0, (part.heartbeat_at + self.worker_lost_after - now).total_seconds())

    def heartbeat_part(
        self,
        key: PartKey,
        worker_id: str,
        *,
        tensors_done: int | None = None,
        bytes_done: int | None = None,
    ) -> bool:
        """Record that ``worker_id`` is alive on the part (and its progress). False: the
        part is no longer its own (taken over, replaced or gone)."""
        now = self._clock()
        values: dict[str, Any] = {"heartbeat_at": now, "updated_at": now}
        if tensors_done is not None:
            values["tensors_done"] = tensors_done
        if bytes_done is not None:
            values["bytes_done"] = bytes_done
        with self._sessions.begin() as s:
            part = s.scalar(self._transition(key, *self._owned_by(worker_id)).values(**values))
        return part is not None

    def finish_part(
        self,
        key: PartKey,
        worker_id: str,
        result: Mapping[str, Any],
        *,
        tensors_done: int = 0,
        bytes_done: int = 0,
    ) -> bool:
        """running → done with the part's ``result`` and final progress, for its owner only.
        False: not its own any more (its output is discarded)."""
        now = self._clock()
        with self._sessions.begin() as s:
            part = s.scalar(
                self._transition(key, *self._owned_by(worker_id)).values(
                    state=DONE,
                    result=dict(result),
                    error=None,
                    tensors_done=tensors_done,
                    bytes_done=bytes_done,
                    updated_at=now,
                )
            )
        return part is not None

    def fail_part(self, key: PartKey, worker_id: str, error: JobError) -> bool:
        """running → failed with the error that fails the job."""
        now = self._clock()
        with self._sessions.begin() as s:
            part = s.scalar(
                self._transition(key, *self._owned_by(worker_id)).values(
                    state=FAILED, error=error.model_dump(mode="json"), updated_at=now
                )
            )
        return part is not None

    def release_part(self, key: PartKey, worker_id: str) -> bool:
        """running → queued after a transient failure (another attempt may take it)."""
        now = self._clock()
        with self._sessions.begin() as s:
            part = s.scalar(
                self._transition(key, *self._owned_by(worker_id)).values(
                    state=QUEUED, worker_id=None, heartbeat_at=None, updated_at=now
                )
            )
        return part is not None

    # ---- helpers -------------------------------------------------------------------------

    @staticmethod
    def _transition(key: PartKey, *conditions: ColumnElement[bool]) -> ReturningUpdate[JobPart]:
        return (
            update(JobPart)
            .where(
                JobPart.job_id == key.job_id,
                JobPart.step == key.step,
                JobPart.part == key.part,
                JobPart.job_attempt == key.job_attempt,
                *conditions,
            )
            .returning(JobPart)
            .execution_options(synchronize_session=False, populate_existing=True)
        )

    def _claimable(self, now: datetime) -> ColumnElement[bool]:
        stale = or_(
            JobPart.heartbeat_at.is_(None), JobPart.heartbeat_at < now - self.worker_lost_after
        )
        return or_(JobPart.state == QUEUED, and_(JobPart.state == RUNNING, stale))

    @staticmethod
    def _owned_by(worker_id: str) -> tuple[ColumnElement[bool], ...]:
        return (JobPart.worker_id == worker_id, JobPart.state == RUNNING)
