"""Helpers for the API tests: a harness around the real app (TestClient, its service, the
job ids its queue was handed, a tenant with a key) and a valid merge job body.

The merge body names ``s3://models/{base,math,code}``: :func:`models_bucket` puts those
folders (and a few more the tests name) in the test S3 server, and a harness made with it
grants each new tenant ``s3://models/`` (tenants read only the s3:// locations granted to
them)."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from infra.artifacts import MANIFEST, ArtifactVersion, publish_artifact
from infra.settings import Settings
from service.context import Service

MERGE_RECIPE: dict[str, Any] = {
    "merge_method": "ties",
    "base_model": "s3://models/base",
    "models": [
        {"model": "s3://models/math", "parameters": {"weight": 1.0, "density": 0.5}},
        {"model": "s3://models/code", "parameters": {"weight": 0.5, "density": 0.5}},
    ],
    "seed": 7,
}


def merge_job(recipe: dict[str, Any] | None = None, name: str = "soup") -> dict[str, Any]:
    return {"kind": "merge", "recipe": recipe or MERGE_RECIPE, "artifact_name": name}


MODELS_BUCKET = "models"


MODEL_FOLDERS = ("base", "math", "code", "a", *(f"m{i}" for i in range(64)))
_seeded: set[str] = set()  # endpoints whose models bucket is filled (once per process)


def models_bucket(s3_server: Any) -> Any:
    """``s3_server`` with bucket ``models`` holding the folders the API tests name (each a
    placeholder weights file: the API only checks that they exist). Idempotent."""
    from infra.storage.s3 import S3ObjectStore

    if s3_server.endpoint in _seeded:
        return s3_server
    store = S3ObjectStore(
        MODELS_BUCKET,
        endpoint_url=s3_server.endpoint,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        region=s3_server.region,
        create_bucket=True,
    )
    present = {info.key for info in store.list("")}
    for folder in MODEL_FOLDERS:
        if f"{folder}/model.safetensors" not in present:
            store.put_bytes(f"{folder}/model.safetensors", b"placeholder")
    _seeded.add(s3_server.endpoint)
    return s3_server


def grant_models(
    service: Service, tenant: str, s3_server: Any, location: str = "s3://models/"
) -> None:
    """Let ``tenant`` read ``location`` on the test S3 server with its credentials."""
    service.tenants.grant_s3(
        tenant,
        location,
        credentials="keys",
        endpoint=s3_server.endpoint,
        region=s3_server.region,
        access_key_id=s3_server.access_key,
        secret_access_key=s3_server.secret_key,
    )


@dataclass
class ApiHarness:
    client: TestClient
    settings: Settings
    enqueued: list[str]
    tmp: Path
    headers: dict[str, str] = field(default_factory=dict)  # the default tenant's key
    tenant: str = ""
    models: Any = None  # the S3 server of models_bucket: new tenants may read s3://models/

    @property
    def service(self) -> Service:
        service: Service = self.client.app.state.service  # type: ignore[attr-defined]
        return service

    def new_tenant(self, *, grant: bool = True) -> tuple[str, dict[str, str]]:
        """A fresh tenant and the Authorization header of a new key for it; granted
        ``s3://models/`` when the harness has the models bucket (and ``grant``)."""
        name = f"t-{uuid.uuid4().hex[:10]}"
        key = self.service.keys.create_key(name)
        if self.models is not None and grant:
            grant_models(self.service, name, self.models)
        return name, {"Authorization": f"Bearer {key}"}

    def submit(self, body: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return self.client.post("/v1/jobs", json=body or merge_job(), headers=headers, **kwargs)

    def publish(
        self, name: str, files: dict[str, bytes], *, tenant: str | None = None
    ) -> ArtifactVersion:
        """Publish ``files`` (plus a manifest listing them) as the next version of ``name``."""
        folder = self.tmp / f"out-{uuid.uuid4().hex[:8]}"
        return publish_files(self.service.store, tenant or self.tenant, name, files, folder)


def publish_files(
    store: Any, tenant: str, name: str, files: dict[str, bytes], folder: Path
) -> ArtifactVersion:
    """Publish ``files`` as the next version of ``tenant``'s artifact ``name``, with a
    manifest listing them (written in ``folder`` first, as a job would)."""
    folder.mkdir(parents=True)
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    manifest = {
        "format": "weightsmith.manifest/1",
        "kind": "merge",
        "seed": 1,
        "recipe": MERGE_RECIPE,
        "parents": [{"role": "base", "reference": "org/base", "pinned": "org/base@" + "a" * 40}],
        "files": [
            {"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for rel, data in sorted(files.items())
        ],
    }
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return publish_artifact(store, tenant, name, folder, job_id=str(uuid.uuid4()))
