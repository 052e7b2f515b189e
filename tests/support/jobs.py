"""A merge or edit job run on a worker in process: SQLite job store, local artifacts, local paths
allowed; the job's record and its published artifact downloaded (every sha256 checked)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TENANT = "acme"


def run_local_job(
    tmp_path: Path,
    recipe: dict[str, Any],
    name: str,
    *,
    kind: str = "merge",
    device: str = "cpu",
) -> tuple[Any, Path | None]:
    """Run a ``kind`` job with ``recipe`` through ``workers.runner.run_job`` on ``device`` (as
    the worker's WEIGHTSMITH_WORKER_DEVICE would give it); returns the job record and the
    downloaded version 1 of ``name`` (None unless the job succeeded)."""
    from infra.artifacts import download_artifact
    from infra.db import ApiKeys, JobStore, make_engine, upgrade_database
    from infra.settings import Settings
    from infra.storage import LocalObjectStore
    from schemas.jobs import JobCreate, JobKind, JobState
    from workers.runner import run_job

    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path}/data/jobs.db",
        object_store_url=f"file://{tmp_path}/artifacts",
        allow_local_paths=True,
    )
    upgrade_database(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        store = JobStore.from_settings(settings, engine)
        tenant = ApiKeys(engine).ensure_tenant(TENANT).id
        objects = LocalObjectStore(tmp_path / "artifacts")
        request = JobCreate(kind=JobKind(kind), recipe=recipe, artifact_name=name)
        job = store.create_job(tenant, request).job
        (tmp_path / "work").mkdir(exist_ok=True)
        run_job(
            job.id,
            store=store,
            settings=settings,
            object_store=objects,
            worker_id="w1",
            device=device,
            work_root=tmp_path / "work",
        )
        done = store.get(tenant, job.id)
        if done is None or done.state != JobState.SUCCEEDED:
            return done, None
        return done, download_artifact(objects, TENANT, name, 1, tmp_path / "downloaded")
    finally:
        engine.dispose()


@dataclass
class InProcessJobs:
    """A job store (SQLite), its parts, local artifacts and a work folder, with jobs run by
    ``workers.runner.run_job`` in this process, for tests of the worker's job semantics."""

    settings: Any
    store: Any
    parts: Any
    objects: Any
    tenant_id: int
    work_root: Path

    def submit(self, recipe: dict[str, Any], name: str = "soup") -> str:
        from schemas.jobs import JobCreate, JobKind

        request = JobCreate(kind=JobKind.MERGE, recipe=recipe, artifact_name=name)
        return str(self.store.create_job(self.tenant_id, request).job.id)

    def run(self, job_id: str, worker_id: str = "w1") -> Any:
        """Run the job as worker ``worker_id``; its record afterwards."""
        from workers.runner import run_job

        run_job(
            job_id,
            store=self.store,
            settings=self.settings,
            object_store=self.objects,
            worker_id=worker_id,
            work_root=self.work_root,
        )
        return self.job(job_id)

    def job(self, job_id: str) -> Any:
        job = self.store.get(self.tenant_id, job_id)
        assert job is not None
        return job


def in_process_jobs(tmp_path: Path) -> Iterator[InProcessJobs]:
    """For a fixture: :class:`InProcessJobs` under ``tmp_path`` (heartbeat every second,
    a worker lost after 3 s), tenant :data:`TENANT`."""
    from datetime import timedelta

    from infra.db import ApiKeys, JobStore, make_engine, upgrade_database
    from infra.db.parts import PartStore
    from infra.settings import Settings
    from infra.storage import LocalObjectStore

    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path}/data/jobs.db",
        object_store_url=f"file://{tmp_path}/artifacts",
        allow_local_paths=True,
        worker_heartbeat_interval=1,
        worker_lost_after=3,
    )
    upgrade_database(settings.database_url)
    engine = make_engine(settings.database_url)
    tenant_id = ApiKeys(engine).ensure_tenant(TENANT).id
    work_root = tmp_path / "work"
    work_root.mkdir()
    yield InProcessJobs(
        settings,
        JobStore.from_settings(settings, engine),
        PartStore(engine, worker_lost_after=timedelta(seconds=3)),
        LocalObjectStore(tmp_path / "artifacts"),
        tenant_id,
        work_root,
    )
    engine.dispose()
