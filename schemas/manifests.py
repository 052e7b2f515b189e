"""The manifest: the one JSON document that describes an output directory, and once published
an artifact version, completely.

Every writer (a merge: workers/publish/output.py; an edit: workers/edit/checkpoint.py; an
upload: service/uploads.py) builds a :class:`Manifest`; the artifact store
(infra/artifacts.py) checks it before publishing and adds the :class:`ArtifactRecord`; the
client (weightsmith/client/artifacts.py) verifies a download against its files. What each
kind adds (a merge's method and timings, an edit's metrics and factors, an upload's
description) rides along as extra members.

The manifest is written last, so a folder or a version with a manifest is complete (the
writing and reading are infra.artifacts': this module does no I/O).
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "weightsmith.manifest/1"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def check_manifest_path(path: str) -> str:
    """A file's path as a manifest lists it: relative, '/'-separated, no empty, '.' or '..'
    segment, no backslash or control character, not the manifest itself."""
    if (
        not path
        or path.startswith("/")
        or "\\" in path
        or any(ord(c) < 32 for c in path)
        or any(seg in ("", ".", "..") for seg in path.split("/"))
    ):
        raise ValueError(f"{path!r} is not a relative path of '/'-separated names")
    if path == MANIFEST:
        raise ValueError(f"{MANIFEST} does not list itself")
    return path


class ManifestFile(BaseModel):
    """One file of the output: its path, size and sha256 (lower-case hex)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    size: int = Field(ge=0)
    sha256: str

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return check_manifest_path(value)

    @field_validator("sha256", mode="before")
    @classmethod
    def _hex(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.lower()
            if not _SHA256.match(value):
                raise ValueError(f"{value[:80]!r} is not a sha256 (64 hex characters)")
        return value


class ManifestParent(BaseModel):
    """An input the output was made from, as written in the recipe and as pinned."""

    model_config = ConfigDict(extra="allow")

    role: str
    reference: str
    pinned: str
    revision: str | None = None


class ArtifactRecord(BaseModel):
    """The published version a manifest describes (added by the artifact store)."""

    model_config = ConfigDict(extra="allow")

    tenant: str
    name: str
    version: int = Field(ge=1)
    reference: str
    job_id: str
    recipe_hash: str
    published_at: str


class Manifest(BaseModel):
    """An output directory's manifest. Members not declared here are kept as they are."""

    model_config = ConfigDict(extra="allow")

    format: str = MANIFEST_FORMAT
    kind: str = Field(default="merge", description="merge, edit or upload")
    files: list[ManifestFile] = Field(min_length=1)
    parents: list[ManifestParent] = Field(default_factory=list)
    recipe: dict[str, Any] | None = None
    seed: int | None = None
    artifact: ArtifactRecord | None = None

    @model_validator(mode="after")
    def _unique_paths(self) -> Manifest:
        seen: set[str] = set()
        for f in self.files:
            if f.path in seen:
                raise ValueError(f"files: {f.path!r} is listed twice")
            seen.add(f.path)
        return self

    def document(self) -> dict[str, Any]:
        """The manifest as JSON data: its format, then the members that were given, in order."""
        data = self.model_dump(mode="json", exclude_unset=True)
        return {"format": self.format, **data}

    def to_json(self) -> str:
        """Strict JSON (no NaN or infinity: the API serves the manifest as is)."""
        return json.dumps(self.document(), indent=2, allow_nan=False) + "\n"
