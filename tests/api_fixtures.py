"""Helpers for the API tests: a harness around the real app (TestClient, its service, the
job ids its queue was handed, a tenant with a key) and a valid merge job body."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from app.service import Service
from infra.artifacts import MANIFEST, ArtifactVersion, publish_artifact
from infra.settings import Settings

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


@dataclass
class ApiHarness:
    client: TestClient
    settings: Settings
    enqueued: list[str]
    tmp: Path
    headers: dict[str, str] = field(default_factory=dict)  # the default tenant's key
    tenant: str = ""

    @property
    def service(self) -> Service:
        service: Service = self.client.app.state.service  # type: ignore[attr-defined]
        return service

    def new_tenant(self) -> tuple[str, dict[str, str]]:
        """A fresh tenant and the Authorization header of a new key for it."""
        name = f"t-{uuid.uuid4().hex[:10]}"
        key = self.service.keys.create_key(name)
        return name, {"Authorization": f"Bearer {key}"}

    def submit(self, body: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return self.client.post("/v1/jobs", json=body or merge_job(), headers=headers, **kwargs)

    def publish(
        self, name: str, files: dict[str, bytes], *, tenant: str | None = None
    ) -> ArtifactVersion:
        """Publish ``files`` (plus a manifest listing them) as the next version of ``name``."""
        folder = self.tmp / f"out-{uuid.uuid4().hex[:8]}"
        folder.mkdir()
        for rel, data in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)
        manifest = {
            "format": "weightsmith.manifest/1",
            "kind": "merge",
            "seed": 1,
            "recipe": MERGE_RECIPE,
            "parents": [
                {"role": "base", "reference": "org/base", "pinned": "org/base@" + "a" * 40}
            ],
            "files": [
                {"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                for rel, data in sorted(files.items())
            ],
        }
        (folder / MANIFEST).write_text(json.dumps(manifest))
        return publish_artifact(
            self.service.store,
            tenant or self.tenant,
            name,
            folder,
            job_id=str(uuid.uuid4()),
        )
