"""A merge split across three Celery workers for real: three ``weightsmith worker``
processes on one queue of a loopback Redis, PostgreSQL as the job store, a local object
store. The artifact equals a single-worker run's, byte for byte; a part whose worker is
killed (SIGKILL) mid-part is redelivered and finishes once, and the job publishes once; a
part whose upload the network refuses (a proxy in front of the S3 server) is retried; with a
single worker, the job's own worker runs every part; the workers sweep leftover work files.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from infra.artifacts import download_artifact, list_versions
from infra.db import ApiKeys, JobStore, make_engine, upgrade_database
from infra.db.parts import PartStore
from infra.queue import RUN_JOB_TASK
from infra.storage import LocalObjectStore
from schemas.jobs import JobCreate, JobKind, JobState
from schemas.recipe import MergeRecipe, parse_recipe
from testbed.postgres import fresh_database
from testbed.s3 import S3Server
from tests.support.celery_workers import (
    REDIS_URL,
    ROOT,
    check_redis,
    closed_port,
    start_worker,
    stop_worker,
)
from tests.support.checkpoints import build_many_tensor_family, slow
from tests.support.faulty_proxy import FaultyProxy
from tests.support.split_outputs import same_output
from workers.merge.engine import run_merge

pytestmark = pytest.mark.slow  # Celery worker processes, Redis, PostgreSQL

LOST_AFTER_S = 3
HEARTBEAT_S = 1
WORKERS = 3


@dataclass
class Workers:
    store: JobStore
    parts: PartStore
    objects: Any  # the artifact store the workers use
    tenant: str
    tenant_id: int
    send: Callable[[str], None]
    processes: list[subprocess.Popen[bytes]]
    logs: list[Path]

    def submit(self, recipe: dict[str, Any], name: str) -> str:
        request = JobCreate(kind=JobKind.MERGE, recipe=recipe, artifact_name=name)
        job_id = self.store.create_job(self.tenant_id, request).job.id
        self.send(job_id)
        return job_id

    def job(self, job_id: str) -> Any:
        job = self.store.get(self.tenant_id, job_id)
        assert job is not None
        return job

    def wait_for(self, job_id: str, done: Callable[[Any], bool], timeout: float = 120) -> Any:
        deadline = time.monotonic() + timeout
        while not done(job := self.job(job_id)):
            for p in self.processes:
                if p.poll() is not None:
                    pytest.fail(f"a worker exited ({p.returncode}):\n{self.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"job {job_id} stuck in {job.state}:\n{self.log_tail()}")
            time.sleep(0.02)
        return job

    def log_tail(self) -> str:
        return "\n".join(log.read_text(errors="replace")[-3000:] for log in self.logs)


@contextmanager
def worker_pool(
    root: Path, count: int, *, object_store_url: str | None = None, objects: Any = None
) -> Iterator[Workers]:
    """``count`` worker processes (one task at a time each) on a queue of their own, a fresh
    PostgreSQL database, the artifact store at ``object_store_url`` (``objects``: the same
    store for the test; default a local one under ``root``)."""
    from celery import Celery

    check_redis()
    queue = f"weightsmith-split-{secrets.token_hex(4)}"
    if object_store_url is None:
        object_store_url = f"file://{root}/artifacts"
        objects = LocalObjectStore(root / "artifacts")
    with fresh_database("weightsmith_split") as pg_url:
        upgrade_database(pg_url)
        engine: Engine = make_engine(pg_url)
        tenant = f"split-{secrets.token_hex(3)}"
        tenant_id = ApiKeys(engine).ensure_tenant(tenant).id
        lost_after = timedelta(seconds=LOST_AFTER_S)
        store = JobStore(engine, max_attempts=3, worker_lost_after=lost_after)
        env = {
            **os.environ,
            "WEIGHTSMITH_DATA_DIR": str(root / "data"),
            "WEIGHTSMITH_BROKER_URL": REDIS_URL,
            "WEIGHTSMITH_DATABASE_URL": pg_url,
            "WEIGHTSMITH_OBJECT_STORE_URL": object_store_url,
            "WEIGHTSMITH_ALLOW_LOCAL_PATHS": "true",
            "WEIGHTSMITH_WORKER_HEARTBEAT_INTERVAL": str(HEARTBEAT_S),
            "WEIGHTSMITH_WORKER_LOST_AFTER": str(LOST_AFTER_S),
            "WEIGHTSMITH_JOB_HARD_TIME_LIMIT": "300",
            "WEIGHTSMITH_VISIBILITY_TIMEOUT": "330",
            "WEIGHTSMITH_MERGE_PARTS_SWEEP_AFTER": "0",
            "WEIGHTSMITH_HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}",
            "PYTHONPATH": str(ROOT),
        }
        logs = [root / f"worker-{i}.log" for i in range(count)]
        processes = [start_worker(queue, f"{queue}-{i}@%h", env, log) for i, log in enumerate(logs)]
        producer = Celery("weightsmith-test-producer", broker=REDIS_URL)

        def send(job_id: str) -> None:
            producer.send_task(RUN_JOB_TASK, args=[job_id], queue=queue)

        try:
            yield Workers(
                store,
                PartStore(engine, worker_lost_after=lost_after),
                objects,
                tenant,
                tenant_id,
                send,
                processes,
                logs,
            )
        finally:
            for p in processes:
                stop_worker(p)
            producer.close()
            engine.dispose()


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    with worker_pool(tmp_path_factory.mktemp("split_merge_workers"), WORKERS) as pool:
        yield pool


def finished(job: Any) -> bool:
    return JobState(job.state).is_terminal


def one_run(job: Any, out: Path) -> Any:
    """The job's recipe, as the job store holds it, merged in one piece here."""
    return run_merge(MergeRecipe.model_validate({**job.recipe, "parallelism": None}), out)


def statistics_recipe(family: dict[str, Path]) -> dict[str, Any]:
    """Global TIES (two statistics passes before the merge) in ~16 shards."""
    return {
        "merge_method": "ties",
        "base_model": str(family["base"]),
        "models": [
            {"model": str(family[k]), "parameters": {"weight": 0.6}} for k in ("ft1", "ft2", "ft3")
        ],
        "parameters": {"density": 0.3, "scope": "global"},
        "seed": 5,
        "output": {"shard_size": 40_000},
    }


@pytest.mark.parametrize("method", ["task_arithmetic", "ties_global"])
def test_a_merge_split_across_three_workers_equals_a_single_worker_run(
    workers: Workers, llama_family: dict[str, Path], tmp_path: Path, method: str
) -> None:
    recipe = statistics_recipe(llama_family)
    if method == "task_arithmetic":
        recipe = {**recipe, "merge_method": "task_arithmetic", "parameters": {}}
    one = workers.submit(recipe, f"one-{method.replace('_', '-')}")
    split = workers.submit({**recipe, "parallelism": 3}, f"three-{method.replace('_', '-')}")

    for job_id in (one, split):
        job = workers.wait_for(job_id, finished)
        assert job.state == JobState.SUCCEEDED, (job.error, workers.log_tail())
    a = download_artifact(
        workers.objects, workers.tenant, f"one-{method.replace('_', '-')}", 1, tmp_path / "a"
    )
    b = download_artifact(
        workers.objects, workers.tenant, f"three-{method.replace('_', '-')}", 1, tmp_path / "b"
    )
    same_output(a, b)
    # the recipe as written (PostgreSQL's JSONB gave the job's its keys in an order of its
    # own: "scope" before "density") makes the same model card here
    written = run_merge(parse_recipe(recipe), tmp_path / "written")
    assert (written.out_dir / "README.md").read_bytes() == (a / "README.md").read_bytes()
    rows = workers.parts.parts(split)
    steps = 3 if method == "ties_global" else 1
    assert [(p.step, p.part) for p in rows] == [(s, i) for s in range(steps) for i in range(3)]
    assert all(p.state == "done" for p in rows)
    # the part messages went to the workers (not only to the job's own worker)
    assert any(not p.worker_id.endswith(":coordinator") for p in rows), workers.log_tail()


def test_a_part_whose_worker_is_killed_mid_part_is_redelivered_and_finishes_once(
    workers: Workers, tmp_path: Path
) -> None:
    # a part runs for seconds whatever the machine's speed
    family = build_many_tensor_family(tmp_path / "many", layers=128)
    recipe = {**slow(family, 60), "parallelism": 3, "output": {"shard_size": 4_000_000}}
    name = "killed-part"
    job_id = workers.submit(recipe, name)

    def victim() -> Any:  # a part mid-way on a worker other than the job's own
        for p in workers.parts.parts(job_id):
            # running: claimed by a worker (its progress is written once a second, so a
            # part caught early still shows 0 tensors)
            running = p.state == "running" and p.worker_id
            if running and not p.worker_id.endswith(":coordinator"):
                return p
        return None

    deadline = time.monotonic() + 120
    while (part := victim()) is None:
        job = workers.job(job_id)
        assert not finished(job), f"no part was caught running: {job.state}, {job.error}"
        assert time.monotonic() < deadline, workers.log_tail()
        time.sleep(0.01)
    pid = int(part.worker_id.split(":")[1])
    assert pid not in {p.pid for p in workers.processes}  # a prefork child running the part
    os.kill(pid, signal.SIGKILL)

    job = workers.wait_for(job_id, finished)
    assert job.state == JobState.SUCCEEDED, (job.error, workers.log_tail())
    assert job.attempts == 1  # the job's own worker was not touched
    rows = {p.part: p for p in workers.parts.parts(job_id)}
    assert rows[part.part].attempts == 2  # the killed attempt, and the one that finished
    assert rows[part.part].worker_id != part.worker_id
    assert all(p.attempts == 1 for i, p in rows.items() if i != part.part)
    assert [v.version for v in list_versions(workers.objects, workers.tenant, name)] == [1]
    claims = [i.key for i in workers.objects.list(f"{workers.tenant}/{name}/versions/")]
    assert claims == [f"{workers.tenant}/{name}/versions/v1.claim"]  # one publish, ever
    assert not list(workers.objects.list("_parts/"))
    # the same message (task id) again, on another worker process: redelivered by Celery
    assert rows[part.part].worker_id.split(":")[2] == part.worker_id.split(":")[2]

    single = one_run(workers.job(job_id), tmp_path / "single")
    out = download_artifact(workers.objects, workers.tenant, name, 1, tmp_path / "published")
    same_output(single.out_dir, out)


def test_cancelling_a_split_merge_stops_the_parts_on_every_worker(
    workers: Workers, tmp_path: Path
) -> None:
    family = build_many_tensor_family(tmp_path / "many", layers=128)
    recipe = {**slow(family, 60), "parallelism": 3, "output": {"shard_size": 4_000_000}}
    name = "cancelled-split"
    job_id = workers.submit(recipe, name)

    def others_running() -> int:  # parts claimed by workers other than the job's own
        return sum(
            1
            for p in workers.parts.parts(job_id)
            if p.state == "running" and not (p.worker_id or "").endswith(":coordinator")
        )

    deadline = time.monotonic() + 120
    while others_running() == 0:
        assert not finished(workers.job(job_id)), "no part was caught running"
        assert time.monotonic() < deadline, workers.log_tail()
        time.sleep(0.01)
    assert workers.store.request_cancel(workers.tenant_id, job_id) is not None

    job = workers.wait_for(job_id, finished)
    assert job.state == JobState.CANCELLED, (job.error, workers.log_tail())
    # the parts stop at their next tensor: none finishes after the cancel
    time.sleep(2 * HEARTBEAT_S + 1)
    rows = workers.parts.parts(job_id)
    assert not all(p.state == "done" for p in rows)
    before = [(p.part, p.state, p.tensors_done) for p in rows]
    time.sleep(2 * HEARTBEAT_S + 1)
    assert [(p.part, p.state, p.tensors_done) for p in workers.parts.parts(job_id)] == before
    assert list_versions(workers.objects, workers.tenant, name) == []


def test_the_workers_sweep_deletes_work_files_that_a_crashed_coordinator_left(
    workers: Workers,
) -> None:
    # a job the store does not know (its coordinator crashed long ago, its record is gone);
    # the workers sweep every LOST_AFTER_S, WEIGHTSMITH_MERGE_PARTS_SWEEP_AFTER=0 here
    unknown = f"_parts/{secrets.token_hex(4)}-0000-4000-8000-000000000000/a1/step0/part1"
    workers.objects.put_bytes(unknown + ".safetensors", b"left over")
    deadline = time.monotonic() + 3 * LOST_AFTER_S + 10
    while list(workers.objects.list("_parts/")):
        assert time.monotonic() < deadline, workers.log_tail()
        time.sleep(0.2)


# ---- a part retried after a transient fault; every part taken over by the coordinator -------

# The first attempt of every part's upload of its shards (``_parts/{job}/a{n}/parts/{part}/
# a1-…``, workers.split_merge): refused by the network, however often the client retries.
FIRST_UPLOAD = re.compile(r"^PUT /\S*/_parts/[^/]+/a\d+/parts/\d+/a1-")


@pytest.fixture(scope="module")
def s3_workers(
    tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server
) -> Iterator[tuple[Workers, FaultyProxy]]:
    """Three workers whose artifact store is the S3 server behind a :class:`FaultyProxy`."""
    prefix = f"split-{secrets.token_hex(4)}"
    proxy = FaultyProxy(s3_server.endpoint, FIRST_UPLOAD).start()
    through_proxy = replace(s3_server, endpoint=proxy.url).url(prefix, create_bucket="true")
    objects = s3_server.store(prefix)  # the same objects, for the test, without the proxy
    root = tmp_path_factory.mktemp("split_merge_s3_workers")
    try:
        with worker_pool(root, WORKERS, object_store_url=through_proxy, objects=objects) as pool:
            yield pool, proxy
    finally:
        proxy.stop()


def test_a_part_whose_upload_fails_transiently_is_retried_and_the_bytes_equal_one_run(
    s3_workers: tuple[Workers, FaultyProxy], llama_family: dict[str, Path], tmp_path: Path
) -> None:
    workers, proxy = s3_workers
    recipe = {**statistics_recipe(llama_family), "parallelism": 3}
    job_id = workers.submit(recipe, "transient")

    job = workers.wait_for(job_id, finished)

    assert job.state == JobState.SUCCEEDED, (job.error, workers.log_tail())
    assert job.attempts == 1  # the job itself was not retried: only its parts
    refused = {int(m.group(1)) for m in map(PART_OF.search, proxy.refused_lines()) if m}
    # the parts other workers ran (not the coordinator's own) had their uploads refused
    assert refused, workers.log_tail()
    rows = workers.parts.parts(job_id)
    merge_step = {p.part: p for p in rows if p.step == 2}
    assert all(p.state == "done" for p in rows)
    for part in refused:
        assert merge_step[part].attempts == 2  # the refused attempt, and its retry
    assert all(p.attempts == 1 for p in rows if p.step < 2 or p.part not in refused)
    assert not list(workers.objects.list("_parts/"))

    single = one_run(job, tmp_path / "single")
    out = download_artifact(workers.objects, workers.tenant, "transient", 1, tmp_path / "out")
    same_output(single.out_dir, out)


PART_OF = re.compile(r"/_parts/[^/]+/a\d+/parts/(\d+)/")


@pytest.fixture(scope="module")
def lone_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    """One worker process running one task at a time: a split job's coordinator, with nobody
    to take its parts' messages."""
    with worker_pool(tmp_path_factory.mktemp("split_merge_lone_worker"), 1) as pool:
        yield pool


def test_parts_nobody_takes_are_run_by_the_coordinator_and_the_bytes_equal_one_run(
    lone_worker: Workers, llama_family: dict[str, Path], tmp_path: Path
) -> None:
    recipe = {**statistics_recipe(llama_family), "parallelism": 3}
    job_id = lone_worker.submit(recipe, "lone")

    job = lone_worker.wait_for(job_id, finished)

    assert job.state == JobState.SUCCEEDED, (job.error, lone_worker.log_tail())
    rows = lone_worker.parts.parts(job_id)
    assert [(p.step, p.part) for p in rows] == [(s, i) for s in range(3) for i in range(3)]
    # every part of every step taken over by the job's own worker, once
    assert {(p.state, p.attempts) for p in rows} == {("done", 1)}
    assert all((p.worker_id or "").endswith(":coordinator") for p in rows)
    assert len({p.worker_id for p in rows}) == 1

    single = one_run(job, tmp_path / "single")
    out = download_artifact(lone_worker.objects, lone_worker.tenant, "lone", 1, tmp_path / "out")
    same_output(single.out_dir, out)
    # the parts' messages, run once the worker is free, find their parts done: no change
    time.sleep(2 * HEARTBEAT_S + 1)
    after = lone_worker.parts.parts(job_id)
    assert [(p.state, p.attempts, p.worker_id) for p in after] == [
        (p.state, p.attempts, p.worker_id) for p in rows
    ]
    versions = list_versions(lone_worker.objects, lone_worker.tenant, "lone")
    assert [v.version for v in versions] == [1]
