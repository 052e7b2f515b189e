"""``/v1/uploads``: a tenant sends its own checkpoint, adapter or corpus in resumable chunks,
and it becomes the next version of one of its artifacts (``artifact://NAME@N``).

1. ``POST /v1/uploads`` declares the files (path, size, sha256); 201 with the upload id and
   the limits.
2. ``PUT /v1/uploads/{id}/files/{path}`` appends one chunk at ``Content-Range: bytes
   START-END/TOTAL`` (or ``Upload-Offset: START``). A chunk that does not start at the stored
   offset is 409 with the offset expected; ``HEAD`` (or ``GET``) on the same path answers
   it, so a client resumes after an interruption.
3. ``POST /v1/uploads/{id}/complete`` verifies every file's size and sha256 and publishes
   the version; retrying it returns the same version.

``GET`` shows an upload, ``DELETE`` aborts it. The rules live in ``service.uploads``; this
module maps HTTP onto them. The chunk route streams its body to a temporary file, counting,
and stops reading past ``WEIGHTSMITH_MAX_UPLOAD_CHUNK_BYTES``: a chunk is never held in
memory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, BackgroundTasks, Request, Response, status
from fastapi import Path as PathParam
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from app.dependencies import PrincipalDep, ServiceDep
from app.limits import CheckedBodyRoute
from infra.artifacts import ArtifactError
from infra.storage import StorageError, StorageUnavailable
from schemas.jobs import ArtifactRef, ProblemDetail, ProblemItem
from schemas.uploads import UploadCreate, UploadFileView, UploadLimits, UploadView
from service.context import Service
from service.errors import Problem
from service.uploads import (
    SWEEP_EVERY_S,
    ChecksumMismatch,
    ChunkRejected,
    ChunkTarget,
    InvalidDeclaration,
    TooManyUploads,
    Upload,
    UploadCaps,
    UploadConflict,
    UploadError,
    UploadNotFound,
    UploadRefused,
    abort_upload,
    commit_chunk,
    complete_upload,
    create_upload,
    inspect_upload,
    prepare_chunk,
    sweep_expired_uploads,
)

log = logging.getLogger("weightsmith.api")

router = APIRouter(prefix="/v1/uploads", tags=["uploads"], route_class=CheckedBodyRoute)

_PROBLEM = {"model": ProblemDetail, "content": {"application/problem+json": {}}}
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d{1,18})-(\d{1,18})/(\d{1,18}|\*)\s*$")
_OFFSET = re.compile(r"^\s*(\d{1,18})\s*$")
_WRITE_BLOCK = 1 << 20  # received bytes are written (and hashed) a MiB at a time
#: the route whose bodies may exceed the general request-body limit (for app/limits.py)
CHUNK_ROUTE = re.compile(r"^/v1/uploads/[^/]+/files/.+$")

IdPath = Annotated[str, PathParam(description="the upload id (up_…)")]
FilePath = Annotated[str, PathParam(description="a declared file's path")]
_R = TypeVar("_R")


def _caps(service: Service) -> UploadCaps:
    return UploadCaps.from_settings(service.settings)


def _problem(e: Exception) -> Problem:
    """The HTTP answer for an error of service.uploads or the object store."""
    if isinstance(e, UploadNotFound):
        return Problem(404, str(e), title="Not found")
    if isinstance(e, UploadRefused):
        return Problem(403, str(e), title="Uploads not allowed")
    if isinstance(e, InvalidDeclaration):
        items = [ProblemItem(detail=m, pointer=p) for p, m in e.problems]
        return Problem(422, str(e), title="Invalid request", errors=items)
    if isinstance(e, TooManyUploads):
        return Problem(429, str(e), title="Too many open uploads", open_uploads=e.open_ids)
    if isinstance(e, UploadConflict):
        extra: dict[str, Any] = {}
        headers: dict[str, str] = {}
        if e.offset is not None:
            extra["offset"] = e.offset
            headers["Upload-Offset"] = str(e.offset)
        if e.incomplete:
            extra["incomplete"] = e.incomplete
        return Problem(409, str(e), title="Conflict", headers=headers, **extra)
    if isinstance(e, ChunkRejected):
        if e.too_large:
            return Problem(413, str(e), title="Chunk too large")
        return Problem(400, str(e), title="Invalid chunk")
    if isinstance(e, ChecksumMismatch):
        items = [
            ProblemItem(
                detail=f"declared {m.declared_sha256}, received {m.received_sha256} "
                f"({m.received_size} of {m.declared_size} bytes)",
                pointer=f"/files/{m.index}/sha256",
            )
            for m in e.mismatches
        ]
        mismatches = [
            {
                "path": m.path,
                "declared_sha256": m.declared_sha256,
                "received_sha256": m.received_sha256,
                "declared_size": m.declared_size,
                "received_size": m.received_size,
            }
            for m in e.mismatches
        ]
        return Problem(422, str(e), title="Checksum mismatch", errors=items, mismatches=mismatches)
    if isinstance(e, StorageUnavailable):
        return Problem(503, f"the object store is unavailable: {e}", headers={"Retry-After": "5"})
    if isinstance(e, StorageError | ArtifactError):
        log.warning("upload request failed: %s", e)
        return Problem(503, f"the object store failed: {e}; retry", headers={"Retry-After": "5"})
    if isinstance(e, OSError):  # the API's temporary directory: full or unwritable
        log.error("upload request failed on the local disk: %s", e)
        return Problem(
            503,
            f"the service could not write its temporary files ({e.strerror or e}); retry later",
            headers={"Retry-After": "30"},
        )
    if isinstance(e, UploadError):  # its record is unreadable
        log.warning("upload request failed: %s", e)
        return Problem(503, f"{e}; abort it (DELETE) and start a new upload")
    raise e


async def _call(fn: Callable[..., _R], *args: Any, **kwargs: Any) -> _R:
    """Run an service.uploads function in the thread pool, its errors as problems."""
    try:
        return await run_in_threadpool(fn, *args, **kwargs)
    except (UploadError, StorageError, ArtifactError, OSError) as e:
        raise _problem(e) from e


def _view(up: Upload, caps: UploadCaps) -> UploadView:
    files = [
        UploadFileView(
            path=f.path, size=f.size, sha256=f.sha256, offset=off, complete=off >= f.size
        )
        for f, off in zip(up.session.files, up.offsets, strict=True)
    ]
    artifact = None
    if up.published is not None:
        v = up.published
        artifact = ArtifactRef(name=v.name, version=v.version, uri=v.reference)
    return UploadView(
        id=up.session.id,
        artifact_name=up.session.artifact_name,
        description=up.session.description,
        state=up.state,
        files=files,
        bytes_total=sum(f.size for f in up.session.files),
        bytes_received=sum(up.offsets),
        created_at=up.session.created_at,
        expires_at=up.expires_at,
        limits=UploadLimits(
            max_files=caps.max_files,
            max_file_bytes=caps.max_file_bytes,
            max_total_bytes=caps.max_total_bytes,
            max_chunk_bytes=caps.max_chunk_bytes,
            expires_after_s=caps.expiry_s,
        ),
        artifact=artifact,
    )


def _sweep(service: Service) -> None:
    try:
        swept = sweep_expired_uploads(service.store, service.settings.upload_expiry)
    except StorageError:
        log.warning("sweeping expired uploads failed", exc_info=True)
        return
    if swept:
        log.info("swept %d expired uploads", len(swept))


def _schedule_sweep(request: Request, background: BackgroundTasks, service: Service) -> None:
    """At most every SWEEP_EVERY_S per app, after the response: expired uploads go."""
    state = request.app.state
    if time.monotonic() - getattr(state, "uploads_swept_at", -SWEEP_EVERY_S) >= SWEEP_EVERY_S:
        state.uploads_swept_at = time.monotonic()
        background.add_task(_sweep, service)  # sync: runs in the thread pool


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=UploadView,
    responses={403: _PROBLEM, 422: _PROBLEM, 429: _PROBLEM, 503: _PROBLEM},
    summary="Start an upload of the tenant's own files",
    description=(
        "Declare every file (`path`, `size`, `sha256`) of what becomes the next version of "
        "`artifact_name`. Paths are relative and '/'-separated; pickle files (`.bin`, `.pt`, "
        "`.pth`, `.pkl`, `.pickle`, `.ckpt`) are refused: weightsmith reads safetensors. "
        "The answer carries the upload id, each file's offset (0) and the limits."
    ),
)
def create(
    body: UploadCreate,
    request: Request,
    response: Response,
    background: BackgroundTasks,
    service: ServiceDep,
    principal: PrincipalDep,
) -> UploadView:
    caps = _caps(service)
    try:
        up = create_upload(service.store, principal.tenant, body, caps)
    except (UploadError, StorageError, ArtifactError, OSError) as e:
        raise _problem(e) from e
    _schedule_sweep(request, background, service)
    response.headers["Location"] = f"/v1/uploads/{up.session.id}"
    return _view(up, caps)


@router.get(
    "/{upload_id}",
    response_model=UploadView,
    responses={404: _PROBLEM},
    summary="An upload: state, each file's offset, expiry, the published version",
)
def get_upload(upload_id: IdPath, service: ServiceDep, principal: PrincipalDep) -> UploadView:
    caps = _caps(service)
    try:
        return _view(inspect_upload(service.store, principal.tenant, upload_id, caps), caps)
    except (UploadError, StorageError, ArtifactError, OSError) as e:
        raise _problem(e) from e


@router.delete(
    "/{upload_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={404: _PROBLEM, 409: _PROBLEM},
    summary="Abort an upload: its staged bytes are deleted (a published version stays)",
)
def delete_upload(upload_id: IdPath, service: ServiceDep, principal: PrincipalDep) -> Response:
    try:
        abort_upload(service.store, principal.tenant, upload_id, _caps(service))
    except (UploadError, StorageError, ArtifactError, OSError) as e:
        raise _problem(e) from e
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{upload_id}/files/{path:path}",
    response_model=UploadFileView,
    responses={404: _PROBLEM},
    operation_id="get_upload_file_offset",
    summary="How much of one file is stored (also as the Upload-Offset header)",
)
@router.head(
    "/{upload_id}/files/{path:path}",
    response_model=UploadFileView,
    responses={404: _PROBLEM},
    operation_id="head_upload_file_offset",
    summary="How much of one file is stored, as the Upload-Offset header (resume from it)",
)
def file_offset(
    upload_id: IdPath,
    path: FilePath,
    response: Response,
    service: ServiceDep,
    principal: PrincipalDep,
) -> UploadFileView:
    try:
        up = inspect_upload(service.store, principal.tenant, upload_id, _caps(service))
    except (UploadError, StorageError, ArtifactError, OSError) as e:
        raise _problem(e) from e
    index = up.session.index_of(path)
    if index is None:
        raise Problem(404, f"upload {upload_id!r} has no file {path!r}", title="Not found")
    f, offset = up.session.files[index], up.offsets[index]
    response.headers["Upload-Offset"] = str(offset)
    response.headers["Upload-Length"] = str(f.size)
    response.headers["Cache-Control"] = "no-store"
    return UploadFileView(
        path=f.path, size=f.size, sha256=f.sha256, offset=offset, complete=offset >= f.size
    )


@router.put(
    "/{upload_id}/files/{path:path}",
    response_model=UploadFileView,
    responses={400: _PROBLEM, 404: _PROBLEM, 409: _PROBLEM, 413: _PROBLEM, 503: _PROBLEM},
    summary="Append one chunk to a file",
    description=(
        "The body is the chunk's bytes. Say where it goes with `Content-Range: bytes "
        "START-END/TOTAL` (END inclusive, TOTAL the file's declared size) or `Upload-Offset: "
        "START`. START must be the file's stored offset, else 409 with the expected "
        "`offset` (also in the `Upload-Offset` header). A chunk is stored whole or not at "
        "all; it may have at most `limits.max_chunk_bytes`."
    ),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string"}}},
        }
    },
)
async def put_chunk(
    upload_id: IdPath,
    path: FilePath,
    request: Request,
    response: Response,
    service: ServiceDep,
    principal: PrincipalDep,
) -> UploadFileView:
    caps = _caps(service)
    start, length, total = _chunk_headers(request, caps)
    target = await _call(
        prepare_chunk,
        service.store,
        principal.tenant,
        upload_id,
        path,
        start=start,
        length=length,
        total=total,
        caps=caps,
    )
    body, size, digest = await _receive(request, target)
    try:
        offset = await _call(commit_chunk, service.store, target, body, size=size, sha256=digest)
    finally:
        body.unlink(missing_ok=True)
    f = target.file
    response.headers["Upload-Offset"] = str(offset)
    return UploadFileView(
        path=f.path, size=f.size, sha256=f.sha256, offset=offset, complete=offset >= f.size
    )


def _chunk_headers(request: Request, caps: UploadCaps) -> tuple[int, int | None, int | None]:
    """(start, exact length or None, declared total or None) from the chunk's headers."""
    raw_range = request.headers.get("content-range")
    raw_offset = request.headers.get("upload-offset")
    start: int | None = None
    length: int | None = None
    total: int | None = None
    if raw_range is not None:
        m = _CONTENT_RANGE.match(raw_range)
        if m is None or int(m.group(2)) < int(m.group(1)):
            raise Problem(
                400,
                f"Content-Range {raw_range[:80]!r} is not 'bytes START-END/TOTAL' with "
                "START <= END (END inclusive)",
                title="Invalid chunk",
            )
        start, end = int(m.group(1)), int(m.group(2))
        length = end - start + 1
        total = None if m.group(3) == "*" else int(m.group(3))
    if raw_offset is not None:
        m = _OFFSET.match(raw_offset)
        if m is None:
            raise Problem(
                400,
                f"Upload-Offset {raw_offset[:80]!r} is not a byte offset",
                title="Invalid chunk",
            )
        if start is not None and int(m.group(1)) != start:
            raise Problem(
                400, "Upload-Offset and Content-Range disagree on the start", title="Invalid chunk"
            )
        start = int(m.group(1))
    if start is None:
        raise Problem(
            400,
            "say where the chunk goes: 'Content-Range: bytes START-END/TOTAL' or "
            "'Upload-Offset: START' (START = the file's stored offset, see HEAD)",
            title="Invalid chunk",
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit():
        n = int(declared)
        if n > caps.max_chunk_bytes:
            raise Problem(
                413,
                f"the chunk has {n} bytes; a chunk may have at most {caps.max_chunk_bytes}",
                title="Chunk too large",
            )
        if length is not None and n != length:
            raise Problem(
                400,
                f"Content-Length {n} differs from the {length} bytes Content-Range announces",
                title="Invalid chunk",
            )
    if length is not None and length > caps.max_chunk_bytes:
        raise Problem(
            413,
            f"the chunk has {length} bytes; a chunk may have at most {caps.max_chunk_bytes}",
            title="Chunk too large",
        )
    return start, length, total


async def _receive(request: Request, target: ChunkTarget) -> tuple[Path, int, str]:
    """Stream the body to a temporary file: (its path, size, sha256). Stops reading as soon
    as the body is longer than allowed; a short or empty body stores nothing."""
    limit = target.length if target.length is not None else target.max_length
    try:
        fd, name = tempfile.mkstemp(prefix="weightsmith-chunk-")
    except OSError as e:
        raise _problem(e) from e
    path = Path(name)
    digest = hashlib.sha256()
    size = 0
    pending: list[bytes] = []
    pending_size = 0

    def flush(out: Any, blocks: list[bytes]) -> None:
        for block in blocks:
            digest.update(block)
            out.write(block)

    try:
        with os.fdopen(fd, "wb") as out:
            async for piece in request.stream():
                size += len(piece)
                if size > limit:
                    raise _too_long(target, limit)
                pending.append(piece)
                pending_size += len(piece)
                if pending_size >= _WRITE_BLOCK:
                    await run_in_threadpool(flush, out, pending)
                    pending, pending_size = [], 0
            await run_in_threadpool(flush, out, pending)
    except OSError as e:
        path.unlink(missing_ok=True)
        raise _problem(e) from e
    except ClientDisconnect as e:
        path.unlink(missing_ok=True)
        raise Problem(
            400,
            f"the connection closed after {size} bytes of the chunk; nothing was stored: send "
            f"it again from byte {target.start}",
            title="Incomplete chunk",
        ) from e
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if size == 0 or (target.length is not None and size != target.length):
        path.unlink(missing_ok=True)
        wanted = f"{target.length}" if target.length is not None else "at least 1"
        raise Problem(
            400,
            f"the chunk's body has {size} bytes, {wanted} were announced; nothing was stored: "
            f"send it again from byte {target.start}",
            title="Incomplete chunk",
            offset=target.start,
        )
    return path, size, digest.hexdigest()


def _too_long(target: ChunkTarget, limit: int) -> Problem:
    if target.length is not None:
        return Problem(
            400,
            f"the chunk's body is longer than the {target.length} bytes Content-Range announces",
            title="Invalid chunk",
        )
    left = target.file.size - target.start
    if limit < left:
        return Problem(
            413,
            f"the chunk is longer than {limit} bytes, the most a chunk may have",
            title="Chunk too large",
        )
    return Problem(
        400,
        f"the chunk is longer than the {left} bytes left of file {target.file.path!r} "
        f"({target.file.size} declared)",
        title="Invalid chunk",
    )


@router.post(
    "/{upload_id}/complete",
    response_model=UploadView,
    responses={404: _PROBLEM, 409: _PROBLEM, 422: _PROBLEM, 503: _PROBLEM},
    summary="Verify every file and publish the upload as the next artifact version",
    description=(
        "Checks that every file is complete (else 409 listing the `incomplete` ones), "
        "verifies each file's size and sha256 against the declaration (a mismatch is 422 "
        "naming the file and both digests; nothing is published and that file's bytes are "
        "discarded, to be sent again) and publishes the version with a manifest (kind "
        "`upload`). Retrying returns the same version; while another completion runs, 409."
    ),
)
def complete(upload_id: IdPath, service: ServiceDep, principal: PrincipalDep) -> UploadView:
    caps = _caps(service)
    try:
        up = complete_upload(service.store, principal.tenant, upload_id, caps)
    except (UploadError, StorageError, ArtifactError, OSError) as e:
        raise _problem(e) from e
    log.info("upload %s published as %s", upload_id, up.published and up.published.reference)
    return _view(up, caps)
