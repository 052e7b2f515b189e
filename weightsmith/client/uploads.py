"""Uploads: bring a local folder (or one file) in as the next version of an artifact.

The files are hashed, declared (``POST /v1/uploads``), sent in chunks (resent from the
service's offset after a failure) and published once the service has checked every sha256.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from schemas.uploads import UploadFileView, UploadView, upload_path_problem
from weightsmith.client.artifacts import ArtifactVersionInfo
from weightsmith.client.errors import ClientError, LocalFilesError, UploadError
from weightsmith.client.transport import (
    CHUNK,
    RETRY_STATUSES,
    Attempts,
    Transport,
    decode_json,
    parse_answer,
    path_segment,
)

UPLOAD_CHUNK = 64 << 20  # bytes per PUT unless the service allows fewer
COMPLETE_POLL_S = 2.0


@dataclass(frozen=True)
class UploadProgress:
    """Passed to an upload's ``on_progress``: ``phase`` is "hashing", "uploading",
    "completing" (the service verifies and publishes) or "published"."""

    phase: str
    file: str | None
    bytes_done: int
    bytes_total: int
    files_done: int
    files_total: int
    upload_id: str | None = None


class UploadsApi(Transport):
    """``/v1/uploads``."""

    def create_upload(
        self,
        artifact_name: str,
        files: list[dict[str, Any]],
        *,
        description: str | None = None,
    ) -> UploadView:
        """Declare an upload: ``files`` are ``{"path", "size", "sha256"}``."""
        body: dict[str, Any] = {"artifact_name": artifact_name, "files": files}
        if description is not None:
            body["description"] = description
        return parse_answer(UploadView, self._request("POST", "/v1/uploads", json_body=body))

    def get_upload(self, upload_id: str) -> UploadView:
        return parse_answer(
            UploadView, self._request("GET", f"/v1/uploads/{path_segment(upload_id)}")
        )

    def abort_upload(self, upload_id: str) -> None:
        """Delete an unfinished upload and what it staged."""
        self._request("DELETE", f"/v1/uploads/{path_segment(upload_id)}")

    def upload(
        self,
        source: str | os.PathLike[str],
        artifact_name: str,
        *,
        description: str | None = None,
        on_progress: Callable[[UploadProgress], None] | None = None,
        upload_id: str | None = None,
        chunk_bytes: int | None = None,
    ) -> ArtifactVersionInfo:
        """Upload a folder (every file below it, hidden ones left out) or one file as the next
        version of ``artifact_name``; return that version (``artifact://NAME@N``).

        Every file is hashed first; the service checks each sha256 before it publishes.
        Chunks that fail to arrive are resent from the offset the service holds; with
        ``upload_id`` an earlier, interrupted upload of the same files goes on where it
        stopped. Pickle files are refused before anything is sent: weightsmith reads
        safetensors."""
        local = local_upload_files(Path(source))
        total = sum(p.stat().st_size for _, p in local)
        report = _UploadReport(on_progress, total, len(local))
        declared = [_declare(rel, path, report) for rel, path in local]
        if upload_id is None:
            view = self.create_upload(artifact_name, declared, description=description)
        else:
            view = self._resumable(upload_id, artifact_name, declared)
        report.upload_id = view.id
        chunk = max(1, min(chunk_bytes or UPLOAD_CHUNK, view.limits.max_chunk_bytes))
        paths = dict(local)
        try:
            if view.state != "published":
                report.start("uploading", sum(f.offset for f in view.files))
                for i, f in enumerate(view.files):
                    self._send_file(view.id, f, paths[f.path], chunk, report, i)
                report.start("completing", total)
                view = self._complete(view.id)
        except ClientError as e:
            if isinstance(e, UploadError):
                raise
            raise UploadError(
                f"{e} (upload {view.id}, resumable until {view.expires_at:%Y-%m-%d %H:%M} UTC)",
                upload_id=view.id,
                status=e.status,
            ) from e
        if view.artifact is None:  # pragma: no cover - a published view names its artifact
            raise UploadError(f"upload {view.id} published no artifact", upload_id=view.id)
        report.start("published", total)
        a = view.artifact
        return ArtifactVersionInfo(name=a.name, version=a.version, reference=a.uri)

    def _resumable(
        self, upload_id: str, artifact_name: str, declared: list[dict[str, Any]]
    ) -> UploadView:
        """The upload ``upload_id``, checked to be of these very files."""
        view = self.get_upload(upload_id)
        theirs = [(f.path, f.size, f.sha256) for f in view.files]
        ours = [(d["path"], d["size"], d["sha256"]) for d in declared]
        if view.artifact_name != artifact_name or sorted(theirs) != sorted(ours):
            raise LocalFilesError(
                f"upload {upload_id} is of other files or another artifact "
                f"({view.artifact_name!r}, {len(theirs)} files): the local files changed since "
                "it began; start a new upload"
            )
        return view

    def _send_file(
        self,
        upload_id: str,
        f: UploadFileView,
        local: Path,
        chunk: int,
        report: _UploadReport,
        index: int,
    ) -> None:
        """PUT the rest of one file chunk by chunk, from the service's offset: after a lost
        connection or a 409 the service's offset says where to go on."""
        url = f"/v1/uploads/{path_segment(upload_id)}/files/" + quote(f.path, safe="/")
        offset = f.offset
        attempts = Attempts(self.retries, self.backoff_s)
        while offset < f.size:
            n = min(chunk, f.size - offset)
            headers = {
                "Content-Range": f"bytes {offset}-{offset + n - 1}/{f.size}",
                "Content-Length": str(n),
                "Content-Type": "application/octet-stream",
            }
            try:
                response = self._api.put(
                    url, content=_file_slice(local, offset, n), headers=headers
                )
            except httpx.TransportError as e:
                if not attempts.left():
                    raise self._unreachable("PUT", url, e) from e
                attempts.pause()
                offset = report.moved(f, offset, self._stored_offset(url, offset), index)
                continue
            if response.status_code == 409 and isinstance(_problem_offset(response), int):
                # the chunk may have landed although its answer was lost: go on from there
                moved = _problem_offset(response) != offset
                if not moved and not attempts.left():
                    raise ClientError.from_response(response)
                if not moved:
                    attempts.pause(response)
                offset = report.moved(f, offset, int(_problem_offset(response) or 0), index)
                continue
            if response.status_code in RETRY_STATUSES and attempts.left():
                attempts.pause(response)
                offset = report.moved(f, offset, self._stored_offset(url, offset), index)
                continue
            if response.status_code >= 400:
                raise ClientError.from_response(response)
            offset = report.moved(f, offset, int(decode_json(response)["offset"]), index)
            attempts = Attempts(self.retries, self.backoff_s)

    def _stored_offset(self, url: str, fallback: int) -> int:
        try:
            response = self._api.head(url)
        except httpx.TransportError:
            return fallback  # the next PUT tells (409 with the offset) if it was wrong
        value = response.headers.get("upload-offset")
        return int(value) if response.status_code == 200 and value and value.isdigit() else fallback

    def _complete(self, upload_id: str) -> UploadView:
        """Ask the service to verify and publish; no read timeout (it hashes every byte).
        If the answer is lost, or another request is completing it, wait for the outcome."""
        path = f"/v1/uploads/{path_segment(upload_id)}/complete"
        attempts = Attempts(self.retries, self.backoff_s)
        timeout = httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 10.0), read=None)
        while True:
            try:
                response = self._api.post(path, timeout=timeout)
            except httpx.TransportError as e:
                if not attempts.left():
                    raise self._unreachable("POST", path, e) from e
                attempts.pause()
                continue
            if response.status_code == 409 and not _json_field(response, "incomplete"):
                view = self._await_completion(upload_id)
                if view.state == "published":
                    return view
                if not attempts.left():
                    raise ClientError.from_response(response)
                attempts.pause(response)
                continue
            if response.status_code in RETRY_STATUSES and attempts.left():
                attempts.pause(response)
                continue
            if response.status_code >= 400:
                raise ClientError.from_response(response)
            return parse_answer(UploadView, response)

    def _await_completion(self, upload_id: str) -> UploadView:
        while True:
            view = self.get_upload(upload_id)
            if view.state != "completing":
                return view
            time.sleep(COMPLETE_POLL_S)


def local_upload_files(source: Path) -> list[tuple[str, Path]]:
    """(path in the version, local file) for a file, or every file below a folder in path
    order; hidden files and folders (``.git``, ``.cache``) are left out. Raises
    :class:`LocalFilesError` naming each file the service would refuse."""
    if source.is_file():
        found = [(source.name, source)]
    elif source.is_dir():
        found = [
            (p.relative_to(source).as_posix(), p)
            for p in sorted(source.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(source).parts)
        ]
    else:
        raise LocalFilesError(f"{str(source)!r} is neither a file nor a folder")
    if not found:
        raise LocalFilesError(f"{str(source)!r} has no files to upload (hidden ones are left out)")
    problems = [f"{rel}: {why}" for rel, _ in found if (why := upload_path_problem(rel))]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise LocalFilesError(
            f"{str(source)!r} cannot be uploaded: " + "; ".join(problems[:3]) + more
        )
    return found


class _UploadReport:
    """Turns hashing and sending into UploadProgress values for the caller's callback."""

    def __init__(
        self, callback: Callable[[UploadProgress], None] | None, total: int, count: int
    ) -> None:
        self.callback = callback
        self.total = total
        self.count = count
        self.phase = "hashing"
        self.done = 0
        self.files_done = 0
        self.upload_id: str | None = None

    def start(self, phase: str, done: int) -> None:
        self.phase, self.done, self.files_done = phase, done, 0
        self._emit(None)

    def hashed(self, path: str, n: int, file_done: bool) -> None:
        self.done += n
        self.files_done += int(file_done)
        self._emit(path)

    def moved(self, f: UploadFileView, old: int, new: int, index: int) -> int:
        """The service holds ``new`` bytes of ``f`` (was ``old``): count the difference."""
        self.done += new - old
        self.files_done = index + int(new >= f.size)
        self._emit(f.path)
        return new

    def _emit(self, path: str | None) -> None:
        if self.callback is not None:
            self.callback(
                UploadProgress(
                    self.phase,
                    path,
                    self.done,
                    self.total,
                    self.files_done,
                    self.count,
                    self.upload_id,
                )
            )


def _declare(rel: str, path: Path, report: _UploadReport) -> dict[str, Any]:
    """The declaration of one file: its size and sha256, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    try:
        with path.open("rb") as f:
            while block := f.read(CHUNK):
                digest.update(block)
                size += len(block)
                report.hashed(rel, len(block), False)
    except OSError as e:
        raise LocalFilesError(f"cannot read {str(path)!r}: {e.strerror or e}") from e
    report.hashed(rel, 0, True)
    return {"path": rel, "size": size, "sha256": digest.hexdigest()}


def _file_slice(path: Path, offset: int, length: int) -> Iterator[bytes]:
    """``length`` bytes of ``path`` from ``offset``, a MiB at a time (the chunk's body)."""
    with path.open("rb") as f:
        f.seek(offset)
        left = length
        while left > 0:
            block = f.read(min(CHUNK, left))
            if not block:
                raise LocalFilesError(f"{str(path)!r} became shorter while it was being uploaded")
            left -= len(block)
            yield block


def _json_field(response: httpx.Response, key: str) -> Any:
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get(key) if isinstance(body, dict) else None


def _problem_offset(response: httpx.Response) -> int | None:
    value = _json_field(response, "offset")
    return value if isinstance(value, int) and not isinstance(value, bool) else None
