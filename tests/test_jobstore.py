"""The job store: submission with Idempotency-Key, claim and redelivery, progress, cancel,
tenant isolation, paging, API keys — on SQLite and on a real PostgreSQL alike."""

from __future__ import annotations

import json
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from pydantic import ValidationError
from sqlalchemy import Engine, inspect, select, text

from infra.db import (
    ApiKeys,
    IdempotencyKeyInFlight,
    IdempotencyKeyReused,
    InvalidCursor,
    Job,
    JobNotPending,
    JobStore,
    bootstrap_api_key,
    current_revision,
    head_revision,
    make_engine,
    parse_api_key,
    upgrade_database,
)
from infra.db.jobstore import MAX_PAGE_RECIPE_BYTES
from infra.db.models import Base
from infra.settings import Settings
from schemas.jobs import (
    ArtifactRef,
    JobCreate,
    JobError,
    JobKind,
    JobList,
    JobState,
    JobView,
    ProblemDetail,
)
from testbed.postgres import fresh_database

LOST_AFTER = timedelta(seconds=60)
PENDING_TIMEOUT = timedelta(seconds=30)
T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
EDIT_RECIPE = {
    "edit_method": "rome",
    "model": "org/base",
    "requests": [{"prompt": "The capital of Japan is", "subject": "Japan", "target_new": " Kyoto"}],
}


class Clock:
    """The store's notion of now, moved by the test."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs: float) -> None:
        self.now += timedelta(**kwargs)


def merge_request(name: str = "soup", weight: float = 0.5, **extra: Any) -> JobCreate:
    return JobCreate(
        kind=JobKind.MERGE,
        recipe={
            "merge_method": "linear",
            "models": [
                {"model": "org/a", "parameters": {"weight": weight}},
                {"model": "org/b", "parameters": {"weight": 1 - weight}},
            ],
        },
        artifact_name=name,
        **extra,
    )


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def store(engine: Engine, clock: Clock) -> JobStore:
    return JobStore(
        engine,
        max_attempts=3,
        worker_lost_after=LOST_AFTER,
        pending_timeout=PENDING_TIMEOUT,
        clock=clock,
    )


@pytest.fixture
def keys(engine: Engine, clock: Clock) -> ApiKeys:
    return ApiKeys(engine, clock=clock)


@pytest.fixture
def tenant(keys: ApiKeys) -> int:
    return keys.ensure_tenant("acme").id


@pytest.fixture
def other_tenant(keys: ApiKeys) -> int:
    return keys.ensure_tenant("globex").id


def queued_job(store: JobStore, tenant: int, **kwargs: Any) -> Job:
    return store.create_job(tenant, merge_request(**kwargs)).job


def running_job(store: JobStore, tenant: int, worker: str = "w1") -> Job:
    job = queued_job(store, tenant)
    claimed = store.claim(job.id, worker)
    assert claimed is not None
    return claimed


def in_threads(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run fn(0..n-1) in n threads released together; results (or exceptions) in order."""
    barrier = threading.Barrier(n)

    def run(i: int) -> Any:
        barrier.wait()
        try:
            return fn(i)
        except Exception as e:
            return e

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


# ---- migrations -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def test_migrations_build_the_schema_from_scratch_matching_the_models(
    backend: str, tmp_path: Path
) -> None:
    def check(url: str) -> None:
        assert current_revision(url) is None
        upgrade_database(url)
        assert current_revision(url) == head_revision()
        upgrade_database(url)  # at head: nothing to do
        engine = make_engine(url)
        try:
            assert {"tenants", "api_keys", "jobs"} <= set(inspect(engine).get_table_names())
            with engine.connect() as conn:
                diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            assert diff == [], f"models and migrations disagree: {diff}"
        finally:
            engine.dispose()

    if backend == "sqlite":
        check(f"sqlite:///{tmp_path}/new/dir/fresh.db")
    else:
        with fresh_database("weightsmith_migrate") as url:
            check(url)


def test_concurrent_upgrades_at_start_leave_one_schema(pg_url: str) -> None:
    with fresh_database("weightsmith_migrate") as url:
        results = in_threads(4, lambda _: upgrade_database(url))
        assert results == [None] * 4
        assert current_revision(url) == head_revision()


# ---- submission and Idempotency-Key ---------------------------------------------------------


def test_a_new_job_is_queued_with_its_request_and_limits(store: JobStore, tenant: int) -> None:
    sub = store.create_job(
        tenant, merge_request(callback_url="https://example.test/hook"), idempotency_key="k1"
    )
    assert not sub.replayed
    view = sub.job.to_view()
    assert view.state is JobState.QUEUED
    assert view.kind is JobKind.MERGE
    assert (view.attempts, view.max_attempts, view.cancel_requested) == (0, 3, False)
    assert view.created_at == T0 and view.started_at is None
    assert view.callback_url == "https://example.test/hook"
    assert store.get(tenant, view.id) is not None


def test_same_key_and_same_body_replays_the_first_job(store: JobStore, tenant: int) -> None:
    first = store.create_job(tenant, merge_request(), idempotency_key="k1")
    # Same content, keys in another order and defaults spelt out: still the same request.
    again = JobCreate.model_validate(
        {
            "artifact_name": "soup",
            "callback_url": None,
            "recipe": dict(reversed(list(merge_request().recipe.items()))),
            "kind": "merge",
        }
    )
    second = store.create_job(tenant, again, idempotency_key="k1")
    assert second.replayed
    assert second.job.id == first.job.id
    assert len(store.list_jobs(tenant).jobs) == 1


def test_same_key_with_a_different_body_is_refused(store: JobStore, tenant: int) -> None:
    first = store.create_job(tenant, merge_request(weight=0.5), idempotency_key="k1")
    with pytest.raises(IdempotencyKeyReused) as err:
        store.create_job(tenant, merge_request(weight=0.7), idempotency_key="k1")
    assert err.value.job_id == first.job.id
    assert "different request" in str(err.value)


def test_idempotency_keys_belong_to_their_tenant(
    store: JobStore, tenant: int, other_tenant: int
) -> None:
    a = store.create_job(tenant, merge_request(), idempotency_key="k1")
    b = store.create_job(other_tenant, merge_request(weight=0.9), idempotency_key="k1")
    assert not b.replayed and b.job.id != a.job.id


def test_without_a_key_every_request_makes_a_job(store: JobStore, tenant: int) -> None:
    ids = {store.create_job(tenant, merge_request()).job.id for _ in range(3)}
    assert len(ids) == 3


def test_a_request_still_in_flight_is_reported_as_such(store: JobStore, tenant: int) -> None:
    pending = store.begin_job(tenant, merge_request(), idempotency_key="k1")
    assert not pending.replayed
    # Until activated the job is nobody's business: not listed, not found.
    assert store.get(tenant, pending.job.id) is None
    assert store.list_jobs(tenant).jobs == []
    with pytest.raises(IdempotencyKeyInFlight) as err:
        store.begin_job(tenant, merge_request(), idempotency_key="k1")
    assert 0 < err.value.retry_after <= PENDING_TIMEOUT.total_seconds()
    with pytest.raises(IdempotencyKeyReused):  # a different body is still a 422
        store.begin_job(tenant, merge_request(weight=0.1), idempotency_key="k1")

    pinned = {**merge_request().recipe, "models": [{"model": "org/a@" + "a" * 40}]}
    job = store.activate_job(pending.job.id, pinned)
    assert job.state == "queued" and job.recipe == pinned
    replay = store.begin_job(tenant, merge_request(), idempotency_key="k1")
    assert replay.replayed and replay.job.id == job.id
    assert replay.job.to_view().recipe == pinned


def test_an_abandoned_submission_frees_its_key(store: JobStore, tenant: int) -> None:
    pending = store.begin_job(tenant, merge_request(), idempotency_key="k1")
    store.abandon_job(pending.job.id)
    again = store.begin_job(tenant, merge_request(weight=0.2), idempotency_key="k1")
    assert not again.replayed and again.job.id != pending.job.id


def test_a_submission_whose_request_died_is_taken_over_after_the_timeout(
    store: JobStore, tenant: int, clock: Clock
) -> None:
    dead = store.begin_job(tenant, merge_request(), idempotency_key="k1")
    clock.advance(seconds=PENDING_TIMEOUT.total_seconds() + 1)
    fresh = store.begin_job(tenant, merge_request(), idempotency_key="k1")
    assert not fresh.replayed and fresh.job.id != dead.job.id
    with pytest.raises(JobNotPending):  # the dead request's late activation finds nothing
        store.activate_job(dead.job.id, merge_request().recipe)
    assert store.activate_job(fresh.job.id, merge_request().recipe).state == "queued"


def test_concurrent_requests_with_one_key_make_one_job(store: JobStore, tenant: int) -> None:
    results = in_threads(
        8, lambda _: store.create_job(tenant, merge_request(), idempotency_key="k1")
    )
    assert not any(isinstance(r, Exception) for r in results), results
    assert len({r.job.id for r in results}) == 1
    assert sum(not r.replayed for r in results) == 1


def test_unknown_tenant_is_an_integrity_error_not_a_key_conflict(store: JobStore) -> None:
    with pytest.raises(Exception, match=r"(?i)foreign key"):
        store.create_job(999, merge_request(), idempotency_key="k1")


# ---- claim and redelivery -------------------------------------------------------------------


def test_claim_starts_a_queued_job_once(store: JobStore, tenant: int, clock: Clock) -> None:
    job = queued_job(store, tenant)
    clock.advance(seconds=5)
    claimed = store.claim(job.id, "w1")
    assert claimed is not None
    assert (claimed.state, claimed.attempts, claimed.worker_id) == ("running", 1, "w1")
    assert claimed.started_at == clock.now
    # The same message delivered again, to this or another worker, does nothing.
    assert store.claim(job.id, "w1") is None
    assert store.claim(job.id, "w2") is None
    after = store.get(tenant, job.id)
    assert after is not None and (after.attempts, after.worker_id) == (1, "w1")


def test_a_claimed_job_says_it_is_starting_and_a_new_attempt_starts_its_counters_over(
    store: JobStore, tenant: int, clock: Clock
) -> None:
    job = queued_job(store, tenant)
    claimed = store.claim(job.id, "w1")
    assert claimed is not None and claimed.to_view().progress.phase == "starting"
    store.update_progress(job.id, "w1", phase="merge", tensors_done=7, tensors_total=9)
    clock.advance(seconds=LOST_AFTER.total_seconds() + 1)  # w1 is lost: w2 takes it over
    again = store.claim(job.id, "w2")
    assert again is not None and again.attempts == 2
    progress = again.to_view().progress
    assert (progress.phase, progress.tensors_done, progress.tensors_total) == ("starting", 0, None)


def test_claim_is_exactly_once_under_concurrency(store: JobStore, tenant: int) -> None:
    for _ in range(3):
        job = queued_job(store, tenant)

        def claim(i: int, job_id: str = job.id) -> Job | None:
            return store.claim(job_id, f"w{i}")

        results = in_threads(8, claim)
        winners = [r for r in results if isinstance(r, Job)]
        assert len(winners) == 1, results
        assert all(r is None for r in results if not isinstance(r, Job)), results
        final = store.get(tenant, job.id)
        assert final is not None
        assert (final.attempts, final.worker_id) == (1, winners[0].worker_id)


@pytest.mark.parametrize("outcome", ["succeeded", "failed", "cancelled"])
def test_redelivery_of_a_finished_job_does_nothing(
    store: JobStore, tenant: int, clock: Clock, outcome: str
) -> None:
    job = running_job(store, tenant)
    if outcome == "succeeded":
        store.finish_succeeded(job.id, ArtifactRef(name="soup", version=1, uri="file:///a/1/"))
    elif outcome == "failed":
        store.finish_failed(job.id, JobError(message="bad tensor"))
    else:
        store.finish_cancelled(job.id)
    before = store.get(tenant, job.id)
    clock.advance(hours=5)  # long after any heartbeat: still nothing to take over
    assert store.claim(job.id, "w2") is None
    assert store.retry_claim_after(job.id) is None
    after = store.get(tenant, job.id)
    assert before is not None and after is not None
    assert after.to_view() == before.to_view()
    assert after.state == outcome


def test_a_job_whose_worker_was_lost_is_taken_over_after_its_heartbeat_goes_stale(
    store: JobStore, tenant: int, clock: Clock
) -> None:
    job = running_job(store, tenant, "w1")
    # Redelivered right after the worker died: its heartbeat is still fresh.
    clock.advance(seconds=20)
    assert store.claim(job.id, "w2") is None
    assert store.retry_claim_after(job.id) == pytest.approx(40)
    clock.advance(seconds=41)
    assert store.retry_claim_after(job.id) == 0
    taken = store.claim(job.id, "w2")
    assert taken is not None and (taken.attempts, taken.worker_id) == (2, "w2")
    assert taken.started_at == T0  # first start kept
    # The presumed-dead worker, if it wakes up, learns that the job is no longer its own.
    assert store.update_progress(job.id, "w1", tensors_done=3) is False
    artifact = ArtifactRef(name="soup", version=1, uri="file:///a/1/")
    assert store.finish_succeeded(job.id, artifact, worker_id="w1") is None
    assert store.finish_succeeded(job.id, artifact, worker_id="w2") is not None


def test_heartbeats_keep_a_running_job_from_being_taken_over(
    store: JobStore, tenant: int, clock: Clock
) -> None:
    job = running_job(store, tenant, "w1")
    for _ in range(5):
        clock.advance(seconds=50)
        assert store.heartbeat(job.id, "w1")
        assert store.claim(job.id, "w2") is None
    assert store.retry_claim_after(job.id) == pytest.approx(60)


def test_a_job_out_of_attempts_fails_saying_so(store: JobStore, tenant: int, clock: Clock) -> None:
    job = queued_job(store, tenant)
    for attempt in range(1, 4):
        claimed = store.claim(job.id, f"w{attempt}")
        assert claimed is not None and claimed.attempts == attempt
        clock.advance(seconds=LOST_AFTER.total_seconds() + 1)  # the worker dies each time
    assert store.claim(job.id, "w4") is None
    failed = store.get(tenant, job.id)
    assert failed is not None
    view = failed.to_view()
    assert view.state is JobState.FAILED and view.attempts == 3
    assert view.error is not None and "gave up after 3 attempts" in view.error.message
    assert view.finished_at == clock.now
    assert store.claim(job.id, "w5") is None


def test_a_lost_job_with_a_cancel_request_is_cancelled_not_restarted(
    store: JobStore, tenant: int, clock: Clock
) -> None:
    job = running_job(store, tenant)
    store.request_cancel(tenant, job.id)
    clock.advance(seconds=LOST_AFTER.total_seconds() + 1)
    assert store.claim(job.id, "w2") is None
    after = store.get(tenant, job.id)
    assert after is not None and after.state == "cancelled" and after.attempts == 1


def test_recover_lost_jobs_requeues_fails_or_cancels_them(
    store: JobStore, tenant: int, clock: Clock
) -> None:
    alive = running_job(store, tenant, "alive")
    lost = running_job(store, tenant, "dead")
    cancelled = running_job(store, tenant, "dead")
    store.request_cancel(tenant, cancelled.id)
    exhausted = queued_job(store, tenant)
    for i in range(3):
        assert store.claim(exhausted.id, f"d{i}") is not None
        if i < 2:
            clock.advance(seconds=LOST_AFTER.total_seconds() + 1)
            store.heartbeat(alive.id, "alive")
    waiting = queued_job(store, tenant)
    clock.advance(seconds=LOST_AFTER.total_seconds() + 1)
    store.heartbeat(alive.id, "alive")

    assert store.recover_lost_jobs() == [lost.id]
    states = {j: store.get(tenant, j) for j in (alive.id, lost.id, cancelled.id, exhausted.id)}
    assert {j: s.state for j, s in states.items() if s} == {
        alive.id: "running",
        lost.id: "queued",
        cancelled.id: "cancelled",
        exhausted.id: "failed",
    }
    assert store.queued_job_ids() == [lost.id, waiting.id]  # oldest first
    again = store.claim(lost.id, "w9")
    assert again is not None and again.attempts == 2


def test_a_transient_failure_gives_the_job_back_to_the_queue_with_its_error(
    store: JobStore, tenant: int, clock: Clock
) -> None:
    job = running_job(store, tenant, "w1")
    error = JobError(message="the hub could not be reached", model="org/a")
    assert store.release_for_retry(job.id, "not-the-owner", error) is None

    clock.advance(seconds=1)
    released = store.release_for_retry(job.id, "w1", error)

    assert released is not None
    assert (released.state, released.phase, released.worker_id) == ("queued", "retrying", None)
    assert (released.attempts, released.heartbeat_at) == (1, None)
    assert released.error == error.model_dump(mode="json")
    assert released.updated_at == T0 + timedelta(seconds=1)
    assert store.update_progress(job.id, "w1") is False  # the old attempt is fenced off
    again = store.claim(job.id, "w2")
    assert again is not None and (again.attempts, again.worker_id) == (2, "w2")


def test_a_transient_failure_of_a_job_asked_to_cancel_ends_it_cancelled(
    store: JobStore, tenant: int
) -> None:
    job = running_job(store, tenant, "w1")
    store.request_cancel(tenant, job.id)
    released = store.release_for_retry(job.id, "w1", JobError(message="network down"))
    assert released is not None and released.state == "cancelled"
    assert store.claim(job.id, "w2") is None


def test_a_job_that_could_not_be_queued_is_queued_again_once(store: JobStore, tenant: int) -> None:
    job = queued_job(store, tenant)
    failed = store.fail_unqueued(job.id, JobError(message="the job could not be queued"))
    assert failed is not None and (failed.state, failed.phase) == ("failed", "not-queued")
    assert store.claim(job.id, "w1") is None  # a late message for it does nothing

    winners = [r for r in in_threads(4, lambda _: store.requeue_unqueued(job.id)) if r]

    assert len(winners) == 1
    again = winners[0]
    assert isinstance(again, Job) and again.id == job.id
    assert (again.state, again.phase, again.error) == ("queued", None, None)
    assert again.finished_at is None
    assert store.requeue_unqueued(job.id) is None  # queued now: nothing to do


def test_only_a_job_failed_for_want_of_a_queue_can_be_queued_again(
    store: JobStore, tenant: int
) -> None:
    ran = running_job(store, tenant)
    store.finish_failed(ran.id, JobError(message="shape mismatch"), worker_id="w1")
    assert store.requeue_unqueued(ran.id) is None
    claimed = running_job(store, tenant)  # no longer queued: fail_unqueued leaves it alone
    assert store.fail_unqueued(claimed.id, JobError(message="x")) is None
    assert store.get(tenant, claimed.id).state == "running"  # type: ignore[union-attr]


def test_jobs_queued_too_long_are_offered_to_the_sweeper_once_per_period(
    store: JobStore, tenant: int, clock: Clock
) -> None:
    old = queued_job(store, tenant)
    clock.advance(seconds=30)
    recent = queued_job(store, tenant)
    started = running_job(store, tenant)
    clock.advance(seconds=LOST_AFTER.total_seconds() - 29)  # old: 61 s, recent: 31 s

    candidates = store.long_queued_jobs()

    assert [(j.id, j.kind) for j in candidates] == [(old.id, "merge")]
    assert started.id not in {j.id for j in candidates}
    assert [store.mark_sent_again(candidates[0]) for _ in range(2)] == [True, False]
    assert store.long_queued_jobs() == []  # sent again just now
    assert recent.id not in {j.id for j in store.long_queued_jobs(timedelta(seconds=31))}
    clock.advance(seconds=LOST_AFTER.total_seconds() + 1)
    assert {j.id for j in store.long_queued_jobs()} == {old.id, recent.id}


def test_a_job_claimed_meanwhile_is_not_sent_again(
    store: JobStore, tenant: int, clock: Clock
) -> None:
    job = queued_job(store, tenant)
    clock.advance(seconds=LOST_AFTER.total_seconds() + 1)
    [seen] = store.long_queued_jobs()
    assert store.claim(job.id, "w1") is not None
    assert store.mark_sent_again(seen) is False
    assert store.kinds([job.id, "no-such-job"]) == {job.id: "merge"}


# ---- progress, cancel, finish ---------------------------------------------------------------


def test_progress_is_stored_field_by_field(store: JobStore, tenant: int, clock: Clock) -> None:
    job = running_job(store, tenant)
    assert store.update_progress(
        job.id, "w1", phase="merging", tensors_total=10, bytes_total=4_000_000_000
    )
    clock.advance(seconds=1)
    assert store.update_progress(job.id, "w1", tensors_done=4, bytes_done=3_000_000_000)
    view = store.get(tenant, job.id)
    assert view is not None
    progress = view.to_view().progress
    assert progress.model_dump() == {
        "phase": "merging",
        "tensors_done": 4,
        "tensors_total": 10,
        "bytes_done": 3_000_000_000,
        "bytes_total": 4_000_000_000,
    }
    assert view.heartbeat_at == clock.now
    assert store.update_progress(job.id, "someone-else", tensors_done=5) is False


def test_cancelling_a_queued_job_cancels_it_at_once(store: JobStore, tenant: int) -> None:
    job = queued_job(store, tenant)
    cancelled = store.request_cancel(tenant, job.id)
    assert cancelled is not None and cancelled.state == "cancelled"
    assert cancelled.finished_at is not None
    assert store.is_cancel_requested(job.id)
    assert store.claim(job.id, "w1") is None  # its message, delivered later, does nothing


def test_cancelling_a_running_job_asks_the_worker_to_stop(store: JobStore, tenant: int) -> None:
    job = running_job(store, tenant)
    assert not store.is_cancel_requested(job.id)
    flagged = store.request_cancel(tenant, job.id)
    assert flagged is not None and flagged.state == "running" and flagged.cancel_requested
    assert store.is_cancel_requested(job.id)
    assert store.update_progress(job.id, "w1", tensors_done=1)  # still its job until it stops
    done = store.finish_cancelled(job.id, worker_id="w1")
    assert done is not None and done.state == "cancelled"


def test_cancelling_a_finished_job_changes_nothing(store: JobStore, tenant: int) -> None:
    job = running_job(store, tenant)
    store.finish_succeeded(job.id, ArtifactRef(name="soup", version=2, uri="s3://b/soup/2/"))
    same = store.request_cancel(tenant, job.id)
    assert same is not None and same.state == "succeeded" and not same.cancel_requested
    assert not store.is_cancel_requested(job.id)


def test_success_records_the_artifact(store: JobStore, tenant: int, clock: Clock) -> None:
    job = running_job(store, tenant)
    clock.advance(minutes=3)
    done = store.finish_succeeded(
        job.id, ArtifactRef(name="soup", version=2, uri="s3://b/soup/2/"), worker_id="w1"
    )
    assert done is not None
    view = done.to_view()
    assert view.state is JobState.SUCCEEDED and view.finished_at == clock.now
    assert view.artifact == ArtifactRef(name="soup", version=2, uri="s3://b/soup/2/")
    assert view.error is None
    assert store.finish_failed(job.id, JobError(message="late")) is None


def test_failure_records_what_was_wrong_and_where(store: JobStore, tenant: int) -> None:
    job = running_job(store, tenant)
    error = JobError(
        message="shape (128, 64) differs from (128, 48) in 'org/base'",
        model="org/a",
        tensor="model.layers.0.mlp.up_proj.weight",
        detail="model 'org/a', tensor 'model.layers.0.mlp.up_proj.weight': shape …",
    )
    failed = store.finish_failed(job.id, error, worker_id="w1")
    assert failed is not None and failed.to_view().error == error
    assert failed.to_view().artifact is None


# ---- tenants and listing --------------------------------------------------------------------


def test_a_tenant_cannot_see_or_cancel_another_tenants_jobs(
    store: JobStore, tenant: int, other_tenant: int
) -> None:
    job = queued_job(store, tenant)
    assert store.get(other_tenant, job.id) is None
    assert store.list_jobs(other_tenant).jobs == []
    assert store.request_cancel(other_tenant, job.id) is None
    unchanged = store.get(tenant, job.id)
    assert unchanged is not None and unchanged.state == "queued"
    assert [j.id for j in store.list_jobs(tenant).jobs] == [job.id]


def test_paging_returns_every_job_once_newest_first(
    store: JobStore, tenant: int, other_tenant: int, clock: Clock
) -> None:
    made = []
    for i in range(23):
        if i % 3 == 0:  # several jobs share a timestamp: the id breaks ties
            clock.advance(seconds=1)
        made.append(queued_job(store, tenant))
        queued_job(store, other_tenant)
    seen: list[Job] = []
    cursor = None
    pages = 0
    while True:
        page = store.list_jobs(tenant, cursor=cursor, limit=5)
        pages += 1
        seen.extend(page.jobs)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert pages == 5
    ids = [j.id for j in seen]
    assert sorted(ids) == sorted(j.id for j in made) and len(set(ids)) == len(ids)
    order = [(j.created_at, j.id) for j in seen]
    assert order == sorted(order, reverse=True)
    # The page converts to the API's list type as is.
    listing = JobList(items=[j.to_view() for j in seen[:5]], next_cursor=cursor)
    assert JobList.model_validate_json(listing.model_dump_json()) == listing


def test_a_page_of_large_recipes_ends_early_within_its_byte_budget(
    store: JobStore, tenant: int, clock: Clock
) -> None:
    # Recipes of ~200 KiB each (under the per-recipe cap): 20 of them fill the 4 MiB budget.
    made = []
    for i in range(30):
        clock.advance(seconds=1)
        pinned = {"merge_method": "linear", "note": f"{i:03d}" + "n" * 200 * 1024}
        made.append(store.create_job(tenant, merge_request(), recipe=pinned).job)
    each = len(json.dumps(made[0].recipe, separators=(",", ":")))
    per_page = MAX_PAGE_RECIPE_BYTES // each  # what fits, stored text being about this size
    pages, seen, cursor = [], [], None
    while True:
        page = store.list_jobs(tenant, cursor=cursor, limit=200)
        pages.append(len(page.jobs))
        seen.extend(page.jobs)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert abs(pages[0] - per_page) <= 1 and sum(pages) == 30
    assert [j.id for j in seen] == [j.id for j in reversed(made)]


def test_listing_filters_by_state_and_kind(store: JobStore, tenant: int, clock: Clock) -> None:
    running = running_job(store, tenant)
    queued = [queued_job(store, tenant) for _ in range(4)]
    clock.advance(seconds=1)
    edit = store.create_job(
        tenant,
        JobCreate(kind=JobKind.EDIT, recipe=EDIT_RECIPE, artifact_name="edited"),
    ).job
    by_state = store.list_jobs(tenant, state=JobState.QUEUED, limit=2)
    assert len(by_state.jobs) == 2 and by_state.next_cursor is not None
    rest = store.list_jobs(tenant, state=JobState.QUEUED, cursor=by_state.next_cursor)
    assert {j.id for j in by_state.jobs + rest.jobs} == {edit.id, *(j.id for j in queued)}
    assert [j.id for j in store.list_jobs(tenant, state=JobState.RUNNING).jobs] == [running.id]
    assert [j.id for j in store.list_jobs(tenant, kind=JobKind.EDIT).jobs] == [edit.id]
    assert store.list_jobs(tenant, kind=JobKind.EDIT, state=JobState.RUNNING).jobs == []


@pytest.mark.parametrize("cursor", ["", "not-a-cursor", "WyJ4Il0", "eyJhIjogMX0"])
def test_a_forged_cursor_is_refused(store: JobStore, tenant: int, cursor: str) -> None:
    with pytest.raises(InvalidCursor, match="next_cursor"):
        store.list_jobs(tenant, cursor=cursor)


# ---- API keys -------------------------------------------------------------------------------


def test_a_key_authenticates_its_tenant(keys: ApiKeys) -> None:
    plaintext = keys.create_key("acme")
    prefix, secret = parse_api_key(plaintext)
    assert plaintext == f"wsk_{prefix}_{secret}" and len(secret) == 64
    tenant = keys.authenticate(plaintext)
    assert tenant is not None and tenant.name == "acme"
    other = keys.authenticate(keys.create_key("globex"))
    assert other is not None and other.name == "globex" and other.id != tenant.id


@pytest.mark.parametrize(
    "mangle",
    [
        lambda k: k[:-1] + ("0" if k[-1] != "0" else "1"),  # wrong secret
        lambda k: "wsk_0000000000_" + k.split("_")[2],  # unknown prefix
        lambda k: k.upper(),
        lambda k: k[:-2],
        lambda k: "",
        lambda k: "Bearer " + k,
    ],
)
def test_a_wrong_or_malformed_key_is_refused(keys: ApiKeys, mangle: Callable[[str], str]) -> None:
    assert keys.authenticate(mangle(keys.create_key("acme"))) is None


def test_a_revoked_key_no_longer_authenticates(keys: ApiKeys, clock: Clock) -> None:
    kept, revoked = keys.create_key("acme"), keys.create_key("acme")
    prefix = parse_api_key(revoked)[0]
    assert keys.revoke_key(prefix)
    assert not keys.revoke_key(prefix)  # already revoked
    assert not keys.revoke_key("ffffffffff")
    assert keys.authenticate(revoked) is None
    assert keys.authenticate(kept) is not None
    listed = {k.prefix: k for k in keys.list_keys("acme")}
    assert listed[prefix].revoked_at == clock.now
    assert listed[parse_api_key(kept)[0]].revoked_at is None
    assert not keys.register_key("acme", revoked)  # a revoked key is never brought back
    assert keys.authenticate(revoked) is None


def test_the_key_cache_checks_secrets_and_honours_revocation(engine: Engine, clock: Clock) -> None:
    cached = ApiKeys(engine, clock=clock, cache_seconds=0.3)
    other_process = ApiKeys(engine, clock=clock)
    key = other_process.create_key("acme")
    tenant = cached.authenticate(key)
    assert tenant is not None and tenant.name == "acme"
    # Remembered, but the secret is still checked on every call.
    assert cached.authenticate(key[:-1] + ("0" if key[-1] != "0" else "1")) is None
    assert cached.authenticate(key) is not None
    # Revoked elsewhere: still accepted from memory until the entry is 0.3 s old, then not.
    assert other_process.revoke_key(parse_api_key(key)[0])
    deadline = time.monotonic() + 5
    while cached.authenticate(key) is not None:
        assert time.monotonic() < deadline, "a revoked key kept working past the cache time"
        time.sleep(0.05)
    # Revoked through the caching object itself: refused at once.
    second = cached.create_key("acme")
    assert cached.authenticate(second) is not None
    assert cached.revoke_key(parse_api_key(second)[0])
    assert cached.authenticate(second) is None


def test_keys_are_stored_hashed(keys: ApiKeys, engine: Engine, database_url: str) -> None:
    plaintexts = [keys.create_key("acme") for _ in range(3)]
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT * FROM api_keys")).all()
    dump = repr(rows)
    assert len(rows) == 3
    for plaintext in plaintexts:
        prefix, secret = parse_api_key(plaintext)
        assert prefix in dump  # the public part is there for lookup …
        assert secret not in dump  # … the secret is not, in any column
    if database_url.startswith("sqlite:///"):  # nor anywhere in the database's files
        engine.dispose()
        db = Path(database_url.removeprefix("sqlite:///"))
        raw = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
        assert all(parse_api_key(p)[1].encode() not in raw for p in plaintexts)
        assert parse_api_key(plaintexts[0])[0].encode() in raw


def test_the_bootstrap_key_file_is_written_once(keys: ApiKeys, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, bootstrap_tenant="ops")
    assert settings.bootstrap_key_file == tmp_path / "bootstrap-api-key"
    prefix = bootstrap_api_key(keys, settings)
    assert prefix is not None
    written = settings.bootstrap_key_file.read_text().strip()
    assert stat.S_IMODE(settings.bootstrap_key_file.stat().st_mode) == 0o600
    assert parse_api_key(written)[0] == prefix
    tenant = keys.authenticate(written)
    assert tenant is not None and tenant.name == "ops"
    assert bootstrap_api_key(keys, settings) is None  # a key exists: nothing more
    assert settings.bootstrap_key_file.read_text().strip() == written


def test_concurrent_first_starts_make_one_key(keys: ApiKeys) -> None:
    made = in_threads(6, lambda _: keys.create_first_key("ops"))
    assert len([m for m in made if isinstance(m, str)]) == 1, made
    assert len(keys.list_keys()) == 1


def test_a_configured_bootstrap_key_is_registered(keys: ApiKeys, tmp_path: Path) -> None:
    given = "wsk_0123456789_" + "ab" * 32
    settings = Settings(data_dir=tmp_path, bootstrap_api_key=given)
    assert bootstrap_api_key(keys, settings) == "0123456789"
    assert bootstrap_api_key(keys, settings) is None
    tenant = keys.authenticate(given)
    assert tenant is not None and tenant.name == "default"
    assert not settings.bootstrap_key_file or not settings.bootstrap_key_file.exists()
    keys.revoke_key("0123456789")
    assert bootstrap_api_key(keys, settings) is None
    assert keys.authenticate(given) is None


def test_no_bootstrap_key_when_turned_off(keys: ApiKeys, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, bootstrap_key_file="")
    assert bootstrap_api_key(keys, settings) is None
    assert keys.list_keys() == []


# ---- the job schemas (no database) ----------------------------------------------------------


def test_job_create_validates_a_merge_recipe_where_it_is_wrong() -> None:
    with pytest.raises(ValidationError) as err:
        JobCreate.model_validate(
            {
                "kind": "merge",
                "recipe": {"merge_method": "linear", "models": [{"model": "not a ref"}]},
                "artifact_name": "Soup!",
                "callback_url": "ftp://example.test/",
            }
        )
    problem = ProblemDetail.from_validation_error(err.value, instance="/v1/jobs")
    pointers = {e.pointer for e in problem.errors}
    assert pointers == {"/recipe/models/0/model", "/artifact_name", "/callback_url"}
    assert problem.status == 422 and problem.instance == "/v1/jobs"
    assert "invalid model reference 'not a ref'" in (problem.detail or "")


def test_job_create_refuses_unknown_fields_and_versioned_names() -> None:
    base = merge_request().model_dump(mode="json")
    with pytest.raises(ValidationError, match="extra"):
        JobCreate.model_validate({**base, "priority": 1})
    with pytest.raises(ValidationError, match="service assigns versions"):
        JobCreate.model_validate({**base, "artifact_name": "soup@3"})


def test_problem_detail_from_fastapi_style_errors() -> None:
    problem = ProblemDetail.from_errors(
        [{"loc": ("body", "recipe", "models", 0), "msg": "Field required"}], loc_root="body"
    )
    assert problem.errors[0].pointer == "/recipe/models/0"
    assert problem.model_dump(exclude_none=True)["type"] == "about:blank"


def test_job_view_round_trips_through_json(store: JobStore, tenant: int) -> None:
    job = running_job(store, tenant)
    view = job.to_view()
    assert JobView.model_validate_json(view.model_dump_json()) == view
    assert view.started_at is not None and view.started_at.tzinfo is not None


def test_only_pending_is_hidden_from_the_api(engine: Engine, store: JobStore, tenant: int) -> None:
    store.begin_job(tenant, merge_request(), idempotency_key="k")
    with engine.connect() as conn:
        states = conn.execute(select(Job.state)).scalars().all()
    assert states == ["pending"]
    assert {s.value for s in JobState}.isdisjoint(states)
