"""The Celery worker for real: Redis as the broker, a ``weightsmith worker`` in a subprocess,
PostgreSQL as the job store and a local object store. Messages are sent by task name, as the
API does; each test run uses its own queue, so other workers on the same Redis never interfere.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from infra.artifacts import MANIFEST, list_versions
from infra.db import ApiKeys, JobStore, make_engine, upgrade_database
from infra.queue import RUN_JOB_TASK
from infra.storage import LocalObjectStore
from schemas.jobs import JobCreate, JobKind, JobState
from testbed.postgres import fresh_database
from tests.support.celery_workers import (
    REDIS_URL,
    ROOT,
    check_redis,
    closed_port,
    start_worker,
    stop_worker,
)
from tests.support.checkpoints import build_many_tensor_family, huge_finetune, linear, slow

pytestmark = pytest.mark.slow  # Celery worker processes, Redis, PostgreSQL

LOST_AFTER_S = 3
HEARTBEAT_S = 1


@dataclass
class WorkerStack:
    queue: str
    store: JobStore
    objects: LocalObjectStore
    tenant: str
    tenant_id: int
    send: Callable[[str], None]
    process: subprocess.Popen[bytes]
    log: Path

    def submit(self, recipe: dict[str, Any], name: str) -> str:
        request = JobCreate(kind=JobKind.MERGE, recipe=recipe, artifact_name=name)
        job_id = self.store.create_job(self.tenant_id, request).job.id
        self.send(job_id)
        return job_id

    def job(self, job_id: str) -> Any:
        job = self.store.get(self.tenant_id, job_id)
        assert job is not None
        return job

    def wait_for(self, job_id: str, done: Callable[[Any], bool], timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if done(job):
                return job
            if self.process.poll() is not None:
                pytest.fail(f"the worker exited ({self.process.returncode}):\n{self.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"job {job_id} stuck in {job.state}:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def worker_db_url() -> Iterator[str]:
    """A PostgreSQL database of this module's own: the worker's lost-job sweeper must not
    see (and requeue) jobs that other test modules left running in the session database."""
    with fresh_database("weightsmith_worker") as url:
        yield url


@pytest.fixture(scope="module")
def stack(worker_db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerStack]:
    from celery import Celery

    check_redis()
    pg_url = worker_db_url
    root = tmp_path_factory.mktemp("celery_worker")
    queue = f"weightsmith-test-{secrets.token_hex(4)}"
    upgrade_database(pg_url)
    engine: Engine = make_engine(pg_url)
    tenant = f"worker-{secrets.token_hex(3)}"
    tenant_id = ApiKeys(engine).ensure_tenant(tenant).id
    store = JobStore(
        engine,
        max_attempts=3,
        worker_lost_after=timedelta(seconds=LOST_AFTER_S),
    )
    env = {
        **os.environ,
        "WEIGHTSMITH_DATA_DIR": str(root / "data"),
        "WEIGHTSMITH_BROKER_URL": REDIS_URL,
        "WEIGHTSMITH_DATABASE_URL": pg_url,
        "WEIGHTSMITH_OBJECT_STORE_URL": f"file://{root}/artifacts",
        "WEIGHTSMITH_ALLOW_LOCAL_PATHS": "true",
        "WEIGHTSMITH_WORKER_HEARTBEAT_INTERVAL": str(HEARTBEAT_S),
        "WEIGHTSMITH_WORKER_LOST_AFTER": str(LOST_AFTER_S),
        "WEIGHTSMITH_JOB_HARD_TIME_LIMIT": "120",
        "WEIGHTSMITH_VISIBILITY_TIMEOUT": "150",
        "WEIGHTSMITH_HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}",  # refuses connections
        "PYTHONPATH": str(ROOT),
    }
    log = root / "worker.log"
    process = start_worker(queue, f"{queue}@%h", env, log)
    producer = Celery("weightsmith-test-producer", broker=REDIS_URL)

    def send(job_id: str) -> None:
        producer.send_task(RUN_JOB_TASK, args=[job_id], queue=queue)

    try:
        yield WorkerStack(
            queue,
            store,
            LocalObjectStore(root / "artifacts"),
            tenant,
            tenant_id,
            send,
            process,
            log,
        )
    finally:
        stop_worker(process)
        producer.close()
        engine.dispose()


def finished(job: Any) -> bool:
    return JobState(job.state).is_terminal


def test_a_submitted_job_runs_on_the_worker_and_publishes(
    stack: WorkerStack, llama_family: dict[str, Path]
) -> None:
    job_id = stack.submit(linear(llama_family["ft1"], llama_family["ft2"]), "celery-soup")

    job = stack.wait_for(job_id, finished)

    assert job.state == JobState.SUCCEEDED, job.error
    assert job.attempts == 1
    assert job.to_view().artifact.uri == "artifact://celery-soup@1"
    assert [v.version for v in list_versions(stack.objects, stack.tenant, "celery-soup")] == [1]


def test_a_redelivered_message_for_a_finished_job_does_nothing(
    stack: WorkerStack, llama_family: dict[str, Path]
) -> None:
    job_id = stack.submit(linear(llama_family["ft1"], llama_family["ft3"]), "celery-twice")
    first = stack.wait_for(job_id, finished)

    stack.send(job_id)
    marker = stack.submit(linear(llama_family["ft2"], llama_family["ft3"]), "celery-marker")
    stack.wait_for(marker, finished)  # one worker process: the duplicate was handled before

    again = stack.job(job_id)
    assert (again.state, again.attempts, again.finished_at) == (
        JobState.SUCCEEDED,
        1,
        first.finished_at,
    )
    assert [v.version for v in list_versions(stack.objects, stack.tenant, "celery-twice")] == [1]


def _complete(objects: LocalObjectStore, tenant: str, name: str, version: int) -> bool:
    """Every file the version's manifest lists is stored with its size."""
    prefix = f"{tenant}/{name}/v{version}/"
    manifest = json.loads(objects.get_bytes(prefix + MANIFEST))
    for entry in manifest["files"]:
        info = objects.stat(prefix + entry["path"])
        if info is None or info.size != entry["size"]:
            return False
    return True


def test_a_worker_killed_mid_job_is_redelivered_and_completes_exactly_once(
    stack: WorkerStack, tmp_path: Path
) -> None:
    family = build_many_tensor_family(tmp_path / "many", layers=32)
    name = "celery-killed"
    job_id = stack.submit(slow(family, 200), name)  # runs for seconds

    running = stack.wait_for(
        job_id, lambda j: j.state == JobState.RUNNING and j.phase == "merge" and j.tensors_done > 0
    )
    child_pid = int(running.worker_id.split(":")[1])
    assert child_pid != stack.process.pid  # the prefork child running the task
    os.kill(child_pid, signal.SIGKILL)

    seen: list[int] = []
    deadline = time.monotonic() + 90
    while not finished(job := stack.job(job_id)):
        versions = list_versions(stack.objects, stack.tenant, name)
        for v in versions:  # a version is listed only once it is complete
            assert _complete(stack.objects, stack.tenant, name, v.version)
        seen = [v.version for v in versions]
        assert time.monotonic() < deadline, stack.log_tail()
        time.sleep(0.02)

    assert job.state == JobState.SUCCEEDED, (job.error, stack.log_tail())
    assert job.attempts == 2
    assert job.worker_id.split(":")[1] != str(child_pid)
    assert seen in ([], [1])
    assert [v.version for v in list_versions(stack.objects, stack.tenant, name)] == [1]
    claims = [i.key for i in stack.objects.list(f"{stack.tenant}/{name}/versions/")]
    assert claims == [f"{stack.tenant}/{name}/versions/v1.claim"]  # one publish, ever


def test_a_lost_job_without_a_message_is_requeued_by_the_sweeper(
    stack: WorkerStack, llama_family: dict[str, Path]
) -> None:
    # As after Celery's hard time limit: the job is running, its worker gone, no message left.
    request = JobCreate(
        kind=JobKind.MERGE,
        recipe=linear(llama_family["ft2"], llama_family["ft3"], seed=5),
        artifact_name="celery-swept",
    )
    job_id = stack.store.create_job(stack.tenant_id, request).job.id
    assert stack.store.claim(job_id, "gone:1:no-message") is not None

    job = stack.wait_for(job_id, finished, timeout=LOST_AFTER_S * 3 + 30)

    assert (job.state, job.attempts) == (JobState.SUCCEEDED, 2), job.error
    assert [v.version for v in list_versions(stack.objects, stack.tenant, "celery-swept")] == [1]


def test_a_queued_job_whose_message_was_lost_is_sent_again_by_the_sweeper(
    stack: WorkerStack, llama_family: dict[str, Path]
) -> None:
    # As when the API died between recording the job and sending it, or Redis restarted
    # without persistence: the job is queued, and no message for it exists anywhere.
    request = JobCreate(
        kind=JobKind.MERGE,
        recipe=linear(llama_family["ft1"], llama_family["ft2"], seed=6),
        artifact_name="celery-unsent",
    )
    job_id = stack.store.create_job(stack.tenant_id, request).job.id

    job = stack.wait_for(job_id, finished, timeout=LOST_AFTER_S * 3 + 30)

    assert (job.state, job.attempts) == (JobState.SUCCEEDED, 1), job.error
    assert [v.version for v in list_versions(stack.objects, stack.tenant, "celery-unsent")] == [1]


def test_a_permanent_failure_fails_at_once_and_a_transient_one_is_retried_promptly(
    stack: WorkerStack, llama_family: dict[str, Path], tmp_path: Path
) -> None:
    huge = huge_finetune(llama_family["ft1"], tmp_path / "huge")  # overflows with weight 5
    overflow = {
        "merge_method": "task_arithmetic",
        "base_model": str(llama_family["base"]),
        "models": [
            {"model": str(huge), "parameters": {"weight": 5.0}},
            {"model": str(llama_family["ft2"])},
        ],
        "parameters": {"normalize": False},
    }
    permanent = stack.submit(overflow, "celery-overflow")
    # The worker's hub endpoint refuses connections (see the stack): transient, retried.
    unreachable = stack.submit(linear("org/model@" + "c" * 40, llama_family["ft1"]), "celery-hub")

    failed = stack.wait_for(permanent, finished)
    assert (failed.state, failed.attempts) == (JobState.FAILED, 1)
    assert "overflowed float32" in failed.error["message"] and failed.error["tensor"]
    # backoffs of 1 s then 2 s (the heartbeat interval, doubled), not a lost worker's timeout
    retried = stack.wait_for(unreachable, finished, timeout=30)
    assert (retried.state, retried.attempts) == (JobState.FAILED, 3)
    assert retried.error["model"] == "org/model@" + "c" * 40
