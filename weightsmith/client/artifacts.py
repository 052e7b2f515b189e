"""Artifacts: list versions, read a manifest, and download a version verified file by file.

Downloads stream each file to disk and check its size and sha256 against the version's
manifest. Files land in a hidden staging folder next to the target, which is renamed into
place only when every file matches, so a failed pull leaves nothing behind. A file served
by a redirect to a presigned object-store URL is fetched without the API key: the URL
carries its own signature, and the key must never reach another host.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from schemas.manifests import MANIFEST, Manifest, ManifestFile
from schemas.references import ReferenceError_, ReferenceKind, parse_reference
from weightsmith.client.errors import (
    ClientError,
    DownloadError,
    DownloadTargetError,
    IntegrityError,
    UsageError,
)
from weightsmith.client.transport import (
    CHUNK,
    RETRY_STATUSES,
    Attempts,
    Transport,
    decode_json,
    path_segment,
    same_origin,
)

LATEST = "latest"
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ArtifactVersionInfo(BaseModel):
    """One published version, as ``GET /v1/artifacts[/{name}/versions]`` lists it."""

    name: str
    version: int
    reference: str
    published_at: datetime | None = None


@dataclass(frozen=True)
class DownloadProgress:
    """Passed to a download's ``on_progress`` after each chunk."""

    file: str
    bytes_done: int
    bytes_total: int
    files_done: int
    files_total: int


@dataclass(frozen=True)
class _FileReport:
    """Turns one file's byte count into a DownloadProgress for the caller's callback."""

    callback: Callable[[DownloadProgress], None] | None
    file: str
    before: int
    total: int
    index: int
    count: int

    def __call__(self, n: int) -> None:
        if self.callback is not None:
            self.callback(
                DownloadProgress(self.file, self.before + n, self.total, self.index, self.count)
            )


@dataclass(frozen=True)
class ArtifactRef:
    """``artifact://name@version``; ``version`` is None or "latest" for the newest."""

    name: str
    version: str | None = None

    def __str__(self) -> str:
        return f"artifact://{self.name}" + (f"@{self.version}" if self.version else "")


def parse_artifact_ref(text: str) -> ArtifactRef:
    """``artifact://name@version``, ``artifact://name``, ``name@version`` or ``name``."""
    raw = text if text.startswith("artifact://") else f"artifact://{text}"
    try:
        ref = parse_reference(raw)
    except ReferenceError_ as e:
        raise UsageError(str(e), title="Invalid artifact reference") from None
    if ref.kind is not ReferenceKind.ARTIFACT:  # pragma: no cover - guarded by the prefix
        raise ClientError(f"{text!r} is not an artifact reference")
    return ArtifactRef(ref.location, ref.revision)


class ArtifactsApi(Transport):
    """``/v1/artifacts``."""

    def list_artifacts(self) -> list[ArtifactVersionInfo]:
        """The latest version of each of the tenant's artifacts, by name."""
        return _items(self._request("GET", "/v1/artifacts"))

    def list_versions(self, name: str) -> list[ArtifactVersionInfo]:
        """The complete versions of artifact ``name``, oldest first."""
        return _items(self._request("GET", f"/v1/artifacts/{path_segment(name)}/versions"))

    def get_manifest(self, name: str, version: int | str = LATEST) -> dict[str, Any]:
        """A version's manifest: files with size and sha256, recipe, parents, and an
        ``artifact`` block with the pinned version number."""
        path = f"/v1/artifacts/{path_segment(name)}/versions/{path_segment(str(version))}"
        doc = decode_json(self._request("GET", path))
        if not isinstance(doc, dict):
            raise ClientError(f"GET {path}: the manifest is not a JSON object")
        return doc

    def download(
        self,
        artifact: str,
        dest: str | os.PathLike[str],
        *,
        version: int | str | None = None,
        on_progress: Callable[[DownloadProgress], None] | None = None,
    ) -> Path:
        """Download a version into ``dest`` (absent or empty), verifying every file.

        ``artifact`` is ``artifact://name@version`` (or ``name``, ``name@version``); an
        explicit ``version`` wins, none or "latest" means the newest. The manifest is saved
        as ``dest/manifest.json``. On any failure ``dest`` is left as it was.
        """
        ref = parse_artifact_ref(artifact)
        wanted = str(version) if version is not None else (ref.version or LATEST)
        target = Path(dest)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise DownloadTargetError(f"download target {str(target)!r} exists and is not empty")
        manifest = self.get_manifest(ref.name, wanted)
        pinned = _pinned_version(manifest, wanted, ref.name)
        label = f"artifact://{ref.name}@{pinned}"
        files = _manifest_files(manifest, label)
        total = sum(f.size for f in files)
        staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        try:
            done = 0
            for i, entry in enumerate(files):
                path = f"/v1/artifacts/{path_segment(ref.name)}/versions/{pinned}/files/" + quote(
                    entry.path, safe="/"
                )
                report = _FileReport(on_progress, entry.path, done, total, i, len(files))
                self._download_file(path, staging / entry.path, entry, label, report)
                done += entry.size
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            if target.exists():
                target.rmdir()
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    def _download_file(
        self,
        path: str,
        target: Path,
        entry: ManifestFile,
        label: str,
        report: Callable[[int], None],
    ) -> None:
        """Stream one file to ``target``, checking size and sha256; resent from the start
        after a connection error or 502/503/504."""
        target.parent.mkdir(parents=True, exist_ok=True)
        attempts = Attempts(self.retries, self.backoff_s)
        while True:
            try:
                retry_after = self._fetch_file(path, target, entry, label, report)
            except httpx.TransportError as e:
                if attempts.left():
                    attempts.pause()
                    continue
                raise DownloadError(
                    f"{label}: downloading {entry.path!r} failed after {self.retries + 1} "
                    f"attempts: {str(e) or type(e).__name__}",
                ) from e
            if retry_after is None:
                return
            if not attempts.left():
                raise ClientError.from_response(retry_after)
            attempts.pause(retry_after)

    def _fetch_file(
        self,
        path: str,
        target: Path,
        entry: ManifestFile,
        label: str,
        report: Callable[[int], None],
    ) -> httpx.Response | None:
        """One try; returns a retryable response (502/503/504), else None when done."""
        url = self._api.base_url.join(path.lstrip("/"))
        for _ in range(MAX_REDIRECTS + 1):
            # The API key goes only to the API's own origin.
            http = self._api if same_origin(url, self._api.base_url) else self._elsewhere
            with http.stream("GET", url) as response:
                if response.status_code in REDIRECT_STATUSES and "location" in response.headers:
                    url = response.url.join(response.headers["location"])
                    continue
                if response.status_code >= 400:
                    response.read()
                    if response.status_code in RETRY_STATUSES:
                        return response
                    raise ClientError.from_response(response)
                _stream_verified(response, target, entry, label, report)
                return None
        raise DownloadError(f"{label}: {entry.path!r}: more than {MAX_REDIRECTS} redirects")


def _stream_verified(
    response: httpx.Response,
    target: Path,
    entry: ManifestFile,
    label: str,
    report: Callable[[int], None],
) -> None:
    digest = hashlib.sha256()
    size = 0
    with target.open("wb") as out:
        for chunk in response.iter_bytes(CHUNK):
            size += len(chunk)
            if size > entry.size:  # stop early: do not fill the disk with a wrong file
                raise IntegrityError(
                    f"{label}: file {entry.path!r} is larger than the {entry.size} bytes its "
                    "manifest records; the stored artifact is corrupt, nothing was kept",
                    file=entry.path,
                )
            digest.update(chunk)
            out.write(chunk)
            report(size)
    if size != entry.size:
        raise IntegrityError(
            f"{label}: file {entry.path!r} has {size} bytes, its manifest records "
            f"{entry.size}; the stored artifact is corrupt, nothing was kept",
            file=entry.path,
        )
    actual = digest.hexdigest()
    if actual != entry.sha256:
        raise IntegrityError(
            f"{label}: file {entry.path!r} has sha256 {actual}, its manifest records "
            f"{entry.sha256}; the stored artifact is corrupt, nothing was kept",
            file=entry.path,
        )


def _items(response: httpx.Response) -> list[ArtifactVersionInfo]:
    doc = decode_json(response)
    items = doc.get("items") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise ClientError(f"{response.request.url}: the answer has no 'items' list")
    try:
        return [ArtifactVersionInfo.model_validate(item) for item in items]
    except ValidationError as e:
        raise ClientError(f"{response.request.url}: unexpected artifact entry: {e}") from None


def _pinned_version(manifest: Mapping[str, Any], wanted: str, name: str) -> int:
    block = manifest.get("artifact")
    number = block.get("version") if isinstance(block, dict) else None
    if isinstance(number, int) and number > 0:
        return number
    if wanted.isdigit():
        return int(wanted)
    raise DownloadError(f"the manifest of artifact {name!r} ({wanted}) names no version")


def _manifest_files(manifest: Mapping[str, Any], label: str) -> list[ManifestFile]:
    """The manifest's files, checked (schemas.manifests): a server must not make us write
    outside the target."""
    raw = manifest.get("files")
    if not isinstance(raw, list) or not raw:
        raise DownloadError(f"{label}: the manifest lists no files")
    try:  # only the files: what a download needs, whatever else this server records
        return Manifest.model_validate({"files": raw}).files
    except ValidationError as e:
        where = ".".join(str(p) for p in e.errors()[0]["loc"])
        raise DownloadError(
            f"{label}: unsafe or malformed manifest entry at {where}: {e.errors()[0]['msg']}"
        ) from None
