"""The embedded worker (no broker): jobs handed over through the API's InProcessQueue run in a
background thread; jobs left over by a previous process are picked up at start."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from infra.artifacts import list_versions
from infra.db import ApiKeys, JobStore, make_engine, upgrade_database
from infra.queue import InProcessQueue
from infra.settings import Settings
from infra.storage import open_store
from schemas.jobs import JobCreate, JobKind, JobState
from tests.support.checkpoints import linear
from workers.embedded import EmbeddedWorker

TENANT = "acme"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path,
        allow_local_paths=True,
        worker_heartbeat_interval=1,
        worker_lost_after=2,
    )


@pytest.fixture
def store(settings: Settings) -> Iterator[JobStore]:
    upgrade_database(settings.database_url)
    engine = make_engine(settings.database_url)
    yield JobStore.from_settings(settings, engine)
    engine.dispose()


def submit(store: JobStore, recipe: dict[str, Any], name: str = "soup") -> str:
    tenant_id = ApiKeys(store.engine).ensure_tenant(TENANT).id
    request = JobCreate(kind=JobKind.MERGE, recipe=recipe, artifact_name=name)
    return store.create_job(tenant_id, request).job.id


def wait_finished(store: JobStore, job_id: str, timeout: float = 30) -> Any:
    tenant_id = ApiKeys(store.engine).ensure_tenant(TENANT).id
    deadline = time.monotonic() + timeout
    while True:
        job = store.get(tenant_id, job_id)
        assert job is not None
        if JobState(job.state).is_terminal:
            return job
        assert time.monotonic() < deadline, f"job {job_id} stuck in {job.state}"
        time.sleep(0.05)


@pytest.fixture
def worker(settings: Settings) -> Iterator[EmbeddedWorker]:
    w = EmbeddedWorker.from_settings(settings)
    yield w
    w.stop(timeout=30)


def test_a_job_handed_to_the_in_process_queue_runs_and_publishes(
    settings: Settings, store: JobStore, worker: EmbeddedWorker, llama_family: dict[str, Path]
) -> None:
    queue = InProcessQueue(worker.submit)
    worker.start()
    job_id = submit(store, linear(llama_family["ft1"], llama_family["ft2"]))
    queue.enqueue(job_id, kind="merge")

    job = wait_finished(store, job_id)

    assert job.state == JobState.SUCCEEDED, job.error
    objects = open_store(settings.object_store_url)
    assert [v.version for v in list_versions(objects, TENANT, "soup")] == [1]


def test_jobs_left_queued_by_a_previous_process_run_at_start(
    store: JobStore, worker: EmbeddedWorker, llama_family: dict[str, Path]
) -> None:
    job_id = submit(store, linear(llama_family["ft1"], llama_family["ft3"]))

    worker.start()

    assert wait_finished(store, job_id).state == JobState.SUCCEEDED


def test_a_job_whose_process_died_while_running_is_taken_over(
    settings: Settings, store: JobStore, worker: EmbeddedWorker, llama_family: dict[str, Path]
) -> None:
    job_id = submit(store, linear(llama_family["ft2"], llama_family["ft3"]))
    assert store.claim(job_id, "embedded:a-process-that-died") is not None

    worker.start()  # its heartbeat is still fresh: the job is retried once it is stale
    job = wait_finished(store, job_id, timeout=settings.worker_lost_after + 30)

    assert (job.state, job.attempts) == (JobState.SUCCEEDED, 2)
    assert job.worker_id != "embedded:a-process-that-died"


def test_a_queued_job_no_one_handed_over_is_picked_up_by_housekeeping(
    settings: Settings, store: JobStore, worker: EmbeddedWorker, llama_family: dict[str, Path]
) -> None:
    worker.start()  # nothing queued yet
    job_id = submit(store, linear(llama_family["ft1"], llama_family["ft3"]))  # never submitted

    job = wait_finished(store, job_id, timeout=settings.worker_lost_after * 3 + 30)

    assert (job.state, job.attempts) == (JobState.SUCCEEDED, 1), job.error


def test_a_database_error_when_claiming_is_retried_not_dropped(
    settings: Settings,
    store: JobStore,
    worker: EmbeddedWorker,
    llama_family: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sqlalchemy.exc import OperationalError

    real_claim = worker.store.claim
    failures = {"left": 1}

    def claim(job_id: str, worker_id: str) -> Any:
        if failures["left"]:
            failures["left"] -= 1
            raise OperationalError("UPDATE jobs", {}, ConnectionError("database restarting"))
        return real_claim(job_id, worker_id)

    monkeypatch.setattr(worker.store, "claim", claim)
    queue = InProcessQueue(worker.submit)
    worker.start()
    job_id = submit(store, linear(llama_family["ft2"], llama_family["ft1"]))
    queue.enqueue(job_id, kind="merge")

    job = wait_finished(store, job_id, timeout=settings.worker_heartbeat_interval + 30)

    assert failures["left"] == 0
    assert (job.state, job.attempts) == (JobState.SUCCEEDED, 1), job.error
