"""Queued jobs whose broker message is gone are sent again, and only those (infra.queue).

Real Redis (database 11, a queue of each test's own) with messages sent by Celery exactly as
the API sends them and taken by a kombu consumer as a worker takes them; the job store is
SQLite with a clock the test moves.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from infra.db import ApiKeys, JobStore, make_engine, upgrade_database
from infra.queue import (
    DEFAULT_QUEUE,
    GPU_QUEUE,
    RUN_JOB_TASK,
    QueueUnavailable,
    broker_job_ids,
    resend_unsent_jobs,
)
from schemas.jobs import JobCreate, JobKind
from workers.tasks import sweep_queue

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0").rsplit("/", 1)[0] + "/11"
LOST_AFTER = timedelta(seconds=60)
T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def queue() -> Iterator[str]:
    """A queue name of this test's own in Redis database 11; its keys are removed after."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as e:
        pytest.fail(f"Redis is not reachable at {REDIS_URL} ({e})", pytrace=False)
    name = f"weightsmith-lost-{secrets.token_hex(4)}"
    yield name
    for key in client.scan_iter(match=f"*{name}*"):
        client.delete(key)
    client.close()


@pytest.fixture
def producer() -> Iterator[Any]:
    from celery import Celery

    app = Celery("weightsmith-test-producer", broker=REDIS_URL)
    yield app
    app.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[JobStore]:
    url = f"sqlite:///{tmp_path}/jobs.db"
    upgrade_database(url)
    engine = make_engine(url)
    yield JobStore(engine, max_attempts=3, worker_lost_after=LOST_AFTER, clock=clock)
    engine.dispose()


def new_job(store: JobStore) -> str:
    tenant = ApiKeys(store.engine).ensure_tenant("acme").id
    request = JobCreate(
        kind=JobKind.MERGE,
        recipe={"merge_method": "linear", "models": [{"model": "org/a"}, {"model": "org/b"}]},
        artifact_name="soup",
    )
    return store.create_job(tenant, request).job.id


def take_without_ack(queue: str, conn: Any) -> Any:
    """Take the next message as a worker does (delivered, not yet acknowledged)."""
    simple = conn.SimpleQueue(queue)
    return simple.get(timeout=5)


def test_the_broker_is_asked_for_waiting_and_unacknowledged_messages(
    queue: str, producer: Any
) -> None:
    from kombu import Connection

    producer.send_task(RUN_JOB_TASK, args=["job-a"], queue=queue)
    producer.send_task(RUN_JOB_TASK, args=["job-b"], queue=queue)
    producer.send_task("weightsmith.deliver_webhooks", queue=queue)  # another task: not a job
    assert broker_job_ids(REDIS_URL, [queue]) == {"job-a", "job-b"}

    with Connection(REDIS_URL) as conn:
        taken = take_without_ack(queue, conn)  # kombu pushes left, pops right: job-a
        assert taken.payload[0] == ["job-a"]
        assert broker_job_ids(REDIS_URL, [queue]) == {"job-a", "job-b"}  # running, say
        taken.ack()
        assert broker_job_ids(REDIS_URL, [queue]) == {"job-b"}


def test_only_jobs_whose_message_is_gone_are_sent_again_once_per_period(
    queue: str, producer: Any, store: JobStore, clock: Clock
) -> None:
    from kombu import Connection

    waiting, held, lost = new_job(store), new_job(store), new_job(store)
    producer.send_task(RUN_JOB_TASK, args=[held], queue=queue)
    producer.send_task(RUN_JOB_TASK, args=[waiting], queue=queue)
    clock.now += timedelta(seconds=30)
    recent = new_job(store)  # its message is on its way: too young to be called lost
    clock.now += timedelta(seconds=31)
    sent: list[tuple[str, str]] = []

    def sweep() -> list[str]:
        return resend_unsent_jobs(
            store,
            lambda job_id, kind: sent.append((job_id, kind)),
            present=lambda: broker_job_ids(REDIS_URL, [queue]),
        )

    with Connection(REDIS_URL) as conn:
        held_message = take_without_ack(queue, conn)  # held by a worker (e.g. a retry countdown)
        assert held_message.payload[0] == [held]

        assert sweep() == [lost]
        assert sent == [(lost, "merge")]
        assert sweep() == []  # sent again just now: not again before another period

        held_message.ack()  # its task ended without claiming the job (it crashed)
        clock.now += LOST_AFTER + timedelta(seconds=1)
        assert sorted(sweep()) == sorted([held, lost, recent])
    assert waiting not in {job_id for job_id, _ in sent}  # waited behind the others throughout


def test_without_a_broker_to_ask_each_long_queued_job_is_sent_again_once_per_period(
    store: JobStore, clock: Clock
) -> None:
    job = new_job(store)
    clock.now += LOST_AFTER + timedelta(seconds=1)
    sent: list[str] = []

    def sweep() -> list[str]:
        return resend_unsent_jobs(store, lambda j, _k: sent.append(j), present=lambda: None)

    assert (sweep(), sweep()) == ([job], [])
    clock.now += LOST_AFTER + timedelta(seconds=1)
    assert sweep() == [job]
    assert sent == [job, job]


def test_concurrent_sweepers_send_a_lost_job_once(store: JobStore, clock: Clock) -> None:
    from concurrent.futures import ThreadPoolExecutor

    jobs = [new_job(store) for _ in range(5)]
    clock.now += LOST_AFTER + timedelta(seconds=1)
    sent: list[str] = []

    def sweep(_: int) -> list[str]:
        return resend_unsent_jobs(store, lambda j, _k: sent.append(j), present=set)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(sweep, range(4)))
    assert sorted(sent) == sorted(jobs)


def test_an_unreachable_broker_is_reported_not_taken_for_an_empty_one() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(QueueUnavailable, match="cannot read the queues"):
        broker_job_ids(f"redis://127.0.0.1:{port}/0", [DEFAULT_QUEUE])


def test_the_sweeper_routes_a_job_as_the_api_does_unless_its_worker_has_its_own_queues() -> None:
    gpu_kinds = frozenset({"edit"})
    assert sweep_queue([DEFAULT_QUEUE], gpu_kinds, "edit") == GPU_QUEUE
    assert sweep_queue([GPU_QUEUE], gpu_kinds, "merge") == DEFAULT_QUEUE
    assert sweep_queue(["light", DEFAULT_QUEUE], gpu_kinds, "merge") == DEFAULT_QUEUE
    assert sweep_queue(["team-a"], gpu_kinds, "edit") == "team-a"
