"""A merge or edit job run on a worker in process: SQLite job store, local artifacts, local paths
allowed; the job's record and its published artifact downloaded (every sha256 checked)."""

from __future__ import annotations

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
