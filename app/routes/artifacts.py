"""``/v1/artifacts``: the tenant's published artifacts, their versions, manifests and files.

Only complete versions (manifest written) are ever listed or served. Files stream from the
object store, or redirect (307) to a presigned URL where the store can make one (S3), so
multi-GB shards do not pass through the API.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path
from fastapi.responses import RedirectResponse, StreamingResponse
from pydantic import BaseModel, Field

from app.dependencies import PrincipalDep, ServiceDep
from infra.artifacts import (
    MANIFEST,
    ArtifactError,
    ArtifactNotFound,
    ArtifactVersion,
    list_artifacts,
    list_versions,
    read_manifest,
    resolve_artifact,
)
from infra.lineage import artifact_lineage
from infra.storage import ObjectNotFound, StorageUnavailable
from schemas.jobs import ProblemDetail
from schemas.lineage import Lineage
from schemas.references import _ARTIFACT_NAME
from service.context import Service
from service.errors import Problem, not_found

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"])

_PROBLEM = {"model": ProblemDetail, "content": {"application/problem+json": {}}}
PRESIGNED_URL_TTL_S = 900

NamePath = Annotated[str, Path(description="artifact name", examples=["llama-ties"])]
VersionPath = Annotated[str, Path(description="a version number, or 'latest'", examples=["1"])]


class ArtifactVersionView(BaseModel):
    name: str
    version: int = Field(ge=1)
    reference: str = Field(description="use it as a model in a later recipe")
    published_at: datetime | None = None


class ArtifactList(BaseModel):
    items: list[ArtifactVersionView] = Field(description="the latest version of each artifact")


class ArtifactVersionList(BaseModel):
    name: str
    items: list[ArtifactVersionView] = Field(description="complete versions, oldest first")


def _view(v: ArtifactVersion) -> ArtifactVersionView:
    return ArtifactVersionView(
        name=v.name, version=v.version, reference=v.reference, published_at=v.published_at
    )


def _checked_name(name: str) -> str:
    if not _ARTIFACT_NAME.match(name):
        raise not_found(f"artifact {name!r}")
    return name


def _unavailable(e: StorageUnavailable) -> Problem:
    return Problem(503, f"the object store is unavailable: {e}", headers={"Retry-After": "5"})


def _resolve(service: Service, tenant: str, name: str, version: str) -> ArtifactVersion:
    try:
        return resolve_artifact(service.store, tenant, _checked_name(name), version)
    except StorageUnavailable as e:
        raise _unavailable(e) from e
    except ArtifactNotFound as e:
        raise Problem(404, str(e), title="Not found") from e
    except ArtifactError as e:  # a malformed version, or a tenant name unfit for artifacts
        raise not_found(f"version {version!r} of artifact {name!r}") from e


@router.get("", response_model=ArtifactList, summary="The tenant's artifacts")
def list_all(service: ServiceDep, principal: PrincipalDep) -> ArtifactList:
    try:
        latest = list_artifacts(service.store, principal.tenant)
    except StorageUnavailable as e:
        raise _unavailable(e) from e
    except ArtifactError:
        latest = []  # a tenant whose name cannot own artifacts has none
    return ArtifactList(items=[_view(v) for v in sorted(latest, key=lambda v: v.name)])


@router.get(
    "/{name}/versions",
    response_model=ArtifactVersionList,
    responses={404: _PROBLEM},
    summary="Complete versions of an artifact",
)
def versions(name: NamePath, service: ServiceDep, principal: PrincipalDep) -> ArtifactVersionList:
    try:
        found = list_versions(service.store, principal.tenant, _checked_name(name))
    except StorageUnavailable as e:
        raise _unavailable(e) from e
    except ArtifactError:
        found = []
    if not found:
        raise not_found(f"artifact {name!r}")
    return ArtifactVersionList(name=name, items=[_view(v) for v in found])


@router.get(
    "/{name}/versions/{version}",
    responses={404: _PROBLEM},
    summary="The manifest of a version",
    description=(
        "Files with size and sha256, the recipe, the pinned parents, metrics, and an "
        "`artifact` block (name, version, reference, job id, recipe hash, publication time)."
    ),
)
def manifest(
    name: NamePath, version: VersionPath, service: ServiceDep, principal: PrincipalDep
) -> dict[str, Any]:
    pinned = _resolve(service, principal.tenant, name, version)
    try:
        return read_manifest(service.store, principal.tenant, name, pinned.version)
    except StorageUnavailable as e:
        raise _unavailable(e) from e
    except ArtifactNotFound as e:
        raise Problem(404, str(e), title="Not found") from e


@router.get(
    "/{name}/versions/{version}/lineage",
    response_model=Lineage,
    responses={404: _PROBLEM},
    summary="The graph of a version's parents",
    description=(
        "The version's parents from its manifest, their parents in turn through the "
        "tenant's own earlier artifacts, down to hub commits, `s3://` prefixes and local "
        "paths. Edges point from a child to a parent, with the parent's role."
    ),
)
def lineage(
    name: NamePath, version: VersionPath, service: ServiceDep, principal: PrincipalDep
) -> Lineage:
    pinned = _resolve(service, principal.tenant, name, version)
    try:
        return artifact_lineage(service.store, principal.tenant, name, pinned.version)
    except StorageUnavailable as e:
        raise _unavailable(e) from e
    except ArtifactNotFound as e:
        raise Problem(404, str(e), title="Not found") from e


@router.get(
    "/{name}/versions/{version}/files/{path:path}",
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "the file's bytes"},
        307: {"description": "redirect to a presigned URL of the object store"},
        404: _PROBLEM,
    },
    response_model=None,
    summary="Download one file of a version",
)
def download(
    name: NamePath,
    version: VersionPath,
    path: str,
    service: ServiceDep,
    principal: PrincipalDep,
) -> StreamingResponse | RedirectResponse:
    pinned = _resolve(service, principal.tenant, name, version)
    try:
        doc = read_manifest(service.store, principal.tenant, name, pinned.version)
    except StorageUnavailable as e:
        raise _unavailable(e) from e
    entry = _file_entry(doc, path)
    if entry is None:
        raise not_found(f"file {path!r} in version {pinned.version} of artifact {name!r}")
    key = pinned.prefix + path
    try:
        url = service.store.presigned_url(key, expires_s=PRESIGNED_URL_TTL_S)
    except StorageUnavailable as e:
        raise _unavailable(e) from e
    if url is not None:
        return RedirectResponse(url, status_code=307)
    headers = {"Cache-Control": "private, max-age=31536000, immutable"}
    if path == MANIFEST:
        chunks = iter([service.store.get_bytes(key)])
        media = "application/json"
    else:
        try:
            chunks = service.store.get_stream(key)
        except ObjectNotFound as e:
            raise Problem(
                500, f"file {path!r} is listed in the manifest but missing from the store"
            ) from e
        except StorageUnavailable as e:
            raise _unavailable(e) from e
        headers["Content-Length"] = str(entry["size"])
        headers["ETag"] = f'"{entry["sha256"]}"'
        digest = base64.b64encode(bytes.fromhex(entry["sha256"])).decode()
        headers["Repr-Digest"] = f"sha-256=:{digest}:"
        media = "application/json" if path.endswith(".json") else "application/octet-stream"
    return StreamingResponse(_closing(chunks), media_type=media, headers=headers)


def _file_entry(doc: dict[str, Any], path: str) -> dict[str, Any] | None:
    if path == MANIFEST:
        return {}
    for item in doc.get("files") or []:
        if isinstance(item, dict) and item.get("path") == path:
            return item
    return None


def _closing(chunks: Iterator[bytes]) -> Iterator[bytes]:
    try:
        yield from chunks
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
