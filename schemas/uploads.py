"""Uploads: a tenant brings its own checkpoint, adapter or corpus in as an artifact version.

- ``UploadCreate`` — the body of ``POST /v1/uploads``: the artifact name and every file the
  client will send, with its size and sha256. The rules that need no settings are checked
  here (names, path forms, digests, pickle files); the caps (file count, sizes) depend on
  the service's settings and are checked by ``service.uploads``.
- ``UploadView`` — an upload as the API returns it: its state, each file's received offset,
  the limits a client must respect, when it expires and, once published, the artifact.

The path rules are the object store's (``infra.storage.base.check_key``), restated here so
that the client can refuse a bad folder before hashing it: relative, ``/``-separated, no
empty, ``.`` or ``..`` segment, no backslash or control character.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas.jobs import ArtifactRef
from schemas.references import _ARTIFACT_NAME

MANIFEST = "manifest.json"
# weightsmith reads safetensors only; these suffixes are Python pickles (code on load).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_PATH_BYTES = 512
MAX_DESCRIPTION_CHARS = 2000
UPLOAD_ID = re.compile(r"^up_[0-9a-f]{32}$")
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

UploadState = Literal["open", "completing", "published"]


def upload_path_problem(path: str) -> str | None:
    """Why ``path`` cannot be a file of an upload, or None when it can."""
    if not path:
        return "a file path must not be empty"
    if path.startswith("/"):
        return f"{path!r} is absolute: give the path relative to the artifact's folder"
    if _BAD_CHARS.search(path):
        return f"{path!r} contains a backslash or a control character: separate folders with '/'"
    if path.endswith("/"):
        return f"{path!r} ends with '/': name a file, not a folder"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return f"{path!r} has an empty, '.' or '..' segment"
    if len(path.encode()) > MAX_PATH_BYTES:
        return f"{path[:40]!r}... is longer than {MAX_PATH_BYTES} bytes (UTF-8)"
    if path == MANIFEST:
        return f"{MANIFEST!r} is written by weightsmith when the version is published"
    if path.lower().endswith(PICKLE_SUFFIXES):
        return (
            f"{path!r} is a pickle checkpoint ({', '.join(PICKLE_SUFFIXES)}), which can run code "
            "when loaded; weightsmith reads safetensors: convert it (e.g. with "
            "transformers' save_pretrained(safe_serialization=True)) and upload the "
            ".safetensors files"
        )
    return None


class UploadFile(BaseModel):
    """One file the client declares: where it goes in the version, its size and sha256."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        description="relative path in the version, '/'-separated", examples=["model.safetensors"]
    )
    size: int = Field(ge=0, description="bytes")
    sha256: str = Field(description="hex sha256 of the whole file, checked on completion")

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        problem = upload_path_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("sha256")
    @classmethod
    def _sha256(cls, value: str) -> str:
        v = value.strip().lower()
        if not _SHA256.match(v):
            raise ValueError(f"{value[:80]!r} is not a hex sha256 (64 hex characters)")
        return v


class UploadCreate(BaseModel):
    """The body of ``POST /v1/uploads``."""

    model_config = ConfigDict(extra="forbid")

    artifact_name: str = Field(
        description="the artifact the upload becomes the next version of",
        examples=["my-llama"],
    )
    files: list[UploadFile] = Field(min_length=1, description="every file, each path once")
    description: str | None = Field(
        default=None,
        max_length=MAX_DESCRIPTION_CHARS,
        description="free text kept in the version's manifest",
    )

    @field_validator("artifact_name")
    @classmethod
    def _artifact_name(cls, value: str) -> str:
        if not _ARTIFACT_NAME.match(value):
            raise ValueError(
                f"{value[:120]!r} is not a valid artifact name: 1-100 lowercase letters, "
                "digits, '.', '_' and '-', starting with a letter or digit"
            )
        return value


class UploadFileView(BaseModel):
    """One declared file and how much of it the service holds."""

    path: str
    size: int
    sha256: str
    offset: int = Field(description="bytes received so far: the next chunk starts here")
    complete: bool


class UploadLimits(BaseModel):
    """What the service accepts; a client sizes its chunks by ``max_chunk_bytes``."""

    max_files: int
    max_file_bytes: int
    max_total_bytes: int
    max_chunk_bytes: int
    expires_after_s: int = Field(description="an upload expires this long after its last write")


class UploadView(BaseModel):
    """An upload as the API returns it."""

    id: str
    artifact_name: str
    description: str | None = None
    state: UploadState = Field(
        description="open: receiving chunks; completing: being verified and published; "
        "published: the artifact version exists"
    )
    files: list[UploadFileView]
    bytes_total: int
    bytes_received: int
    created_at: datetime
    expires_at: datetime
    limits: UploadLimits
    artifact: ArtifactRef | None = Field(
        default=None, description="the published version (state 'published')"
    )
