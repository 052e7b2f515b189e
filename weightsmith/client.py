"""A typed Python client for the weightsmith REST API.

::

    from weightsmith.client import Client, job_artifact_reference

    with Client() as ws:  # WEIGHTSMITH_URL and WEIGHTSMITH_TOKEN, or Client(url, token)
        job = ws.submit_job("merge", recipe, "llama-ties")
        job = ws.wait(job.id, on_progress=lambda j: print(j.state, j.progress.phase))
        ws.download(job_artifact_reference(job), "./llama-ties")

Safe to retry: every submission carries an ``Idempotency-Key`` (a new one per call unless
given), so resending it after a lost connection or a 502/503/504 replays the first answer
instead of starting a second job. Reads and cancels are retried the same way, with
exponential backoff (or the server's ``Retry-After``).

Downloads stream each file to disk and check its size and sha256 against the version's
manifest. Files land in a hidden staging folder next to the target, which is renamed into
place only when every file matches, so a failed pull leaves nothing behind. A file served
by a redirect to a presigned object-store URL is fetched without the API key: the URL
carries its own signature, and the key must never reach another host.

Uploads (:meth:`Client.upload`) bring a local folder in as an artifact version: the files
are hashed, declared, sent in chunks (resent from the service's offset after a failure) and
published once the service has checked every sha256.

Errors are :class:`ClientError` values carrying the server's ``application/problem+json``
body (status, title, detail, and ``errors`` with a JSON Pointer per field).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from schemas.jobs import JobKind, JobList, JobState, JobView, PublishOptions
from schemas.references import ReferenceError_, ReferenceKind, parse_reference
from schemas.tenants import TenantView
from schemas.uploads import UploadFileView, UploadView, upload_path_problem

URL_ENV = "WEIGHTSMITH_URL"
TOKEN_ENV = "WEIGHTSMITH_TOKEN"
MANIFEST = "manifest.json"
LATEST = "latest"

RETRY_STATUSES = frozenset({502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
MAX_RETRY_AFTER_S = 30.0
CHUNK = 1 << 20
UPLOAD_CHUNK = 64 << 20  # bytes per PUT unless the service allows fewer
COMPLETE_POLL_S = 2.0
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

_Model = TypeVar("_Model", bound=BaseModel)


# -- errors --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldProblem:
    """One entry of a problem's ``errors`` list: what is wrong and where (a JSON Pointer)."""

    detail: str
    pointer: str | None = None


class ClientError(Exception):
    """A request the service refused, or one that could not be made.

    ``status`` is the HTTP status (None when no answer came back); ``title``, ``detail``
    and ``errors`` come from the problem+json body; ``problem`` is that whole body.
    ``str()`` is one line: ``422 Invalid request: /artifact_name: …``.
    """

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        title: str | None = None,
        errors: list[FieldProblem] | None = None,
        problem: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.errors = list(errors or [])
        self.problem: dict[str, Any] = dict(problem or {})

    def __str__(self) -> str:
        head = " ".join(str(p) for p in (self.status, self.title) if p)
        text = f"{head}: {self.detail}" if head else self.detail
        # Pointers the detail does not already name (it lists at most three).
        extra = [
            f"{e.pointer}: {e.detail}"
            for e in self.errors
            if e.pointer and e.pointer not in self.detail
        ]
        if extra:
            text += "; " + "; ".join(extra)
        return " ".join(text.split())

    @classmethod
    def from_response(cls, response: httpx.Response) -> ClientError:
        """The error a 4xx/5xx response stands for (its problem+json, or its text)."""
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            text = " ".join(response.text.split())[:200]
            reason = response.reason_phrase or "error"
            return cls(
                text or f"{response.request.method} {response.request.url} answered {reason}",
                status=response.status_code,
                title=reason,
            )
        errors = [
            FieldProblem(detail=str(e.get("detail", "")), pointer=e.get("pointer"))
            for e in body.get("errors") or []
            if isinstance(e, dict)
        ]
        return cls(
            str(body.get("detail") or body.get("title") or response.reason_phrase),
            status=response.status_code,
            title=str(body["title"]) if body.get("title") else response.reason_phrase,
            errors=errors,
            problem=body,
        )


class ConfigurationError(ClientError):
    """No service URL or API key, or an unusable one."""


class ServiceUnreachable(ClientError):
    """No answer from the service (connection refused, DNS, timeout), after the retries."""


class DownloadError(ClientError):
    """An artifact could not be downloaded; nothing was left at the target."""


class IntegrityError(DownloadError):
    """A downloaded file's size or sha256 differs from its manifest entry (``file`` names it)."""

    def __init__(self, detail: str, *, file: str) -> None:
        super().__init__(detail, title="Integrity check failed")
        self.file = file


class LocalFilesError(ClientError):
    """The local files cannot be uploaded as they are (missing, a pickle, a bad name)."""


class UploadError(ClientError):
    """An upload failed; ``upload_id`` (when one was created) resumes it until it expires."""

    def __init__(self, detail: str, *, upload_id: str | None, status: int | None = None) -> None:
        super().__init__(detail, status=status, title="Upload failed")
        self.upload_id = upload_id

    def __str__(self) -> str:  # the detail already quotes the service's status and title
        return " ".join(self.detail.split())


class WaitTimeout(ClientError, TimeoutError):
    """:meth:`Client.wait` gave up; ``job`` is the last state seen (the job goes on)."""

    def __init__(self, detail: str, *, job: JobView) -> None:
        super().__init__(detail)
        self.job = job


# -- values --------------------------------------------------------------------------------


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
class ManifestFile:
    path: str
    size: int
    sha256: str


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
        raise ClientError(str(e), title="Invalid artifact reference") from None
    if ref.kind is not ReferenceKind.ARTIFACT:  # pragma: no cover - guarded by the prefix
        raise ClientError(f"{text!r} is not an artifact reference")
    return ArtifactRef(ref.location, ref.revision)


def job_artifact_reference(job: JobView) -> str | None:
    """``artifact://name@version`` of a succeeded job's published artifact."""
    if job.artifact is None:
        return None
    return f"artifact://{job.artifact.name}@{job.artifact.version}"


# -- the client ----------------------------------------------------------------------------


@dataclass
class _Attempts:
    """Backoff between attempts: the server's Retry-After, else exponential with jitter."""

    retries: int
    backoff_s: float
    n: int = field(default=0)

    def left(self) -> bool:
        return self.n < self.retries

    def pause(self, response: httpx.Response | None = None) -> None:
        delay = self.backoff_s * (2**self.n) * (1 + random.random() / 4)
        after = response.headers.get("retry-after") if response is not None else None
        if after is not None and after.strip().isdigit():
            delay = min(float(after), MAX_RETRY_AFTER_S)
        self.n += 1
        time.sleep(delay)


class Client:
    """The weightsmith API at ``url`` with API key ``token``.

    Both default to the ``WEIGHTSMITH_URL`` and ``WEIGHTSMITH_TOKEN`` environment
    variables. ``retries`` is how often a request is resent after a connection error or a
    502/503/504 (``backoff_s`` doubles each time). Use it as a context manager, or
    :meth:`close` it.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        url = url or os.environ.get(URL_ENV)
        token = token or os.environ.get(TOKEN_ENV)
        if not url:
            raise ConfigurationError(
                f"no service URL: pass --url or set {URL_ENV} (e.g. http://127.0.0.1:8000)"
            )
        if not url.startswith(("http://", "https://")):
            raise ConfigurationError(f"service URL {url!r} is not an http:// or https:// URL")
        if not token:
            raise ConfigurationError(
                f"no API key: pass --token or set {TOKEN_ENV} (a key 'wsk_…' from "
                "'weightsmith keys create --tenant NAME' or the server's bootstrap key)"
            )
        from weightsmith import __version__

        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0))
        agent = {"User-Agent": f"weightsmith-client/{__version__}"}
        self._api = httpx.Client(
            base_url=self.url,
            headers={**agent, "Authorization": f"Bearer {token}"},
            timeout=timeout,
            transport=transport,
            follow_redirects=False,
        )
        # For redirects away from the API (presigned URLs): no Authorization header, ever.
        self._elsewhere = httpx.Client(
            headers=agent, timeout=timeout, transport=transport, follow_redirects=False
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._api.close()
        self._elsewhere.close()

    # -- jobs -----------------------------------------------------------------------------

    def submit_job(
        self,
        kind: JobKind | str,
        recipe: Mapping[str, Any],
        artifact_name: str,
        *,
        idempotency_key: str | None = None,
        callback_url: str | None = None,
        publish: PublishOptions | Mapping[str, Any] | None = None,
    ) -> JobView:
        """Submit a merge or edit job; the service validates the recipe and pins its models.

        A 422 names each bad field by JSON Pointer (``/recipe/models/0/model``). Resent on
        connection errors with the same ``Idempotency-Key`` (new unless given), so at most
        one job is created.
        """
        body: dict[str, Any] = {
            "kind": str(kind),
            "recipe": dict(recipe),
            "artifact_name": artifact_name,
        }
        if callback_url is not None:
            body["callback_url"] = callback_url
        if publish is not None:
            body["publish"] = (
                publish.model_dump(mode="json", exclude_defaults=True)
                if isinstance(publish, PublishOptions)
                else dict(publish)
            )
        key = idempotency_key or str(uuid.uuid4())
        response = self._request(
            "POST", "/v1/jobs", json_body=body, headers={"Idempotency-Key": key}, in_flight=True
        )
        return _parse(JobView, response)

    def get_job(self, job_id: str) -> JobView:
        return _parse(JobView, self._request("GET", f"/v1/jobs/{_segment(job_id)}"))

    def list_jobs(
        self,
        *,
        state: JobState | str | None = None,
        kind: JobKind | str | None = None,
        limit: int | None = None,
        page_size: int = 50,
    ) -> Iterator[JobView]:
        """Jobs newest first, following the pages' cursors; at most ``limit`` if given."""
        params: dict[str, Any] = {"limit": page_size if limit is None else min(page_size, limit)}
        if state is not None:
            params["state"] = str(state)
        if kind is not None:
            params["kind"] = str(kind)
        seen = 0
        while True:
            page = _parse(JobList, self._request("GET", "/v1/jobs", params=params))
            for job in page.items:
                if limit is not None and seen >= limit:
                    return
                seen += 1
                yield job
            if page.next_cursor is None or (limit is not None and seen >= limit):
                return
            params["cursor"] = page.next_cursor

    def cancel_job(self, job_id: str) -> JobView:
        """Cancel a job: a queued one at once, a running one at its next tensor (then
        ``cancel_requested`` is true until it ends); a finished job comes back unchanged."""
        return _parse(JobView, self._request("POST", f"/v1/jobs/{_segment(job_id)}/cancel"))

    def wait(
        self,
        job_id: str,
        *,
        on_progress: Callable[[JobView], None] | None = None,
        timeout_s: float | None = None,
        interval_s: float = 1.0,
    ) -> JobView:
        """Poll a job until it succeeds, fails or is cancelled, and return it.

        ``on_progress`` gets the job each time its state or progress changed. Raises
        :class:`WaitTimeout` after ``timeout_s`` (the job itself goes on).
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last: tuple[Any, ...] | None = None
        while True:
            job = self.get_job(job_id)
            now = (job.state, job.cancel_requested, job.progress)
            if on_progress is not None and now != last:
                on_progress(job)
            last = now
            if job.state.is_terminal:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(
                    f"job {job_id} is still {job.state} after {timeout_s:g} s", job=job
                )
            pause = interval_s
            if deadline is not None:
                pause = max(0.0, min(pause, deadline - time.monotonic()))
            time.sleep(pause)

    # -- the tenant's account -------------------------------------------------------------

    def get_tenant(self) -> TenantView:
        """The tenant's grants (s3:// locations, Hub push namespaces) and Hub token status."""
        return _parse(TenantView, self._request("GET", "/v1/tenant"))

    def set_hub_token(self, token: str) -> None:
        """Store the tenant's own Hugging Face token (encrypted, never returned): its jobs'
        Hub pulls and pushes use it from then on."""
        self._request("PUT", "/v1/tenant/hub-token", json_body={"token": token})

    def clear_hub_token(self) -> None:
        """Forget the tenant's Hugging Face token."""
        self._request("DELETE", "/v1/tenant/hub-token")

    # -- artifacts ------------------------------------------------------------------------

    def list_artifacts(self) -> list[ArtifactVersionInfo]:
        """The latest version of each of the tenant's artifacts, by name."""
        return _items(self._request("GET", "/v1/artifacts"))

    def list_versions(self, name: str) -> list[ArtifactVersionInfo]:
        """The complete versions of artifact ``name``, oldest first."""
        return _items(self._request("GET", f"/v1/artifacts/{_segment(name)}/versions"))

    def get_manifest(self, name: str, version: int | str = LATEST) -> dict[str, Any]:
        """A version's manifest: files with size and sha256, recipe, parents, and an
        ``artifact`` block with the pinned version number."""
        path = f"/v1/artifacts/{_segment(name)}/versions/{_segment(str(version))}"
        doc = _json(self._request("GET", path))
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
            raise DownloadError(f"download target {str(target)!r} exists and is not empty")
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
                path = f"/v1/artifacts/{_segment(ref.name)}/versions/{pinned}/files/" + quote(
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

    # -- uploads --------------------------------------------------------------------------

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
        return _parse(UploadView, self._request("POST", "/v1/uploads", json_body=body))

    def get_upload(self, upload_id: str) -> UploadView:
        return _parse(UploadView, self._request("GET", f"/v1/uploads/{_segment(upload_id)}"))

    def abort_upload(self, upload_id: str) -> None:
        """Delete an unfinished upload and what it staged."""
        self._request("DELETE", f"/v1/uploads/{_segment(upload_id)}")

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
        url = f"/v1/uploads/{_segment(upload_id)}/files/" + quote(f.path, safe="/")
        offset = f.offset
        attempts = _Attempts(self.retries, self.backoff_s)
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
            offset = report.moved(f, offset, int(_json(response)["offset"]), index)
            attempts = _Attempts(self.retries, self.backoff_s)

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
        path = f"/v1/uploads/{_segment(upload_id)}/complete"
        attempts = _Attempts(self.retries, self.backoff_s)
        timeout = httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 10.0), read=None)
        while True:
            try:
                response = self._api.post(path, timeout=timeout)
            except httpx.TransportError as e:
                if not attempts.left():
                    raise self._unreachable("POST", path, e) from e
                attempts.pause()
                continue
            if response.status_code == 409 and not _json_or_none(response, "incomplete"):
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
            return _parse(UploadView, response)

    def _await_completion(self, upload_id: str) -> UploadView:
        while True:
            view = self.get_upload(upload_id)
            if view.state != "completing":
                return view
            time.sleep(COMPLETE_POLL_S)

    # -- transport ------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        in_flight: bool = False,
    ) -> httpx.Response:
        """One API call, resent after a connection error or 502/503/504 (and, with
        ``in_flight``, after a 409 for an Idempotency-Key still being processed)."""
        attempts = _Attempts(self.retries, self.backoff_s)
        while True:
            try:
                response = self._api.request(
                    method, path, json=json_body, params=params, headers=headers
                )
            except httpx.TransportError as e:
                if attempts.left():
                    attempts.pause()
                    continue
                raise self._unreachable(method, path, e) from e
            retry = response.status_code in RETRY_STATUSES or (
                in_flight and response.status_code == 409
            )
            if retry and attempts.left():
                attempts.pause(response)
                continue
            if response.status_code >= 400:
                raise ClientError.from_response(response)
            return response

    def _unreachable(self, method: str, path: str, e: httpx.TransportError) -> ClientError:
        what = str(e) or type(e).__name__
        if isinstance(e, httpx.ConnectError | httpx.ConnectTimeout):
            return ServiceUnreachable(
                f"cannot reach the weightsmith service at {self.url} ({what}); check "
                f"--url / {URL_ENV} and that the service is running",
                title="Service unreachable",
            )
        return ServiceUnreachable(
            f"{method} {self.url}{path} failed after {self.retries + 1} attempts: {what}",
            title="Service unreachable",
        )

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
        attempts = _Attempts(self.retries, self.backoff_s)
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
            http = self._api if _same_origin(url, self._api.base_url) else self._elsewhere
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


def _json_or_none(response: httpx.Response, key: str) -> Any:
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get(key) if isinstance(body, dict) else None


def _problem_offset(response: httpx.Response) -> int | None:
    value = _json_or_none(response, "offset")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


def _segment(value: str) -> str:
    """One URL path segment (ids, names and versions never contain '/')."""
    return quote(value, safe="")


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as e:
        raise ClientError(
            f"{response.request.method} {response.request.url} answered "
            f"{response.status_code} with a body that is not JSON; is the URL a weightsmith "
            "service?",
            status=response.status_code,
        ) from e


def _parse(model: type[_Model], response: httpx.Response) -> _Model:
    try:
        return model.model_validate(_json(response))
    except ValidationError as e:
        raise ClientError(
            f"{response.request.method} {response.request.url}: unexpected answer "
            f"({e.error_count()} problems, first: {e.errors()[0]['msg']}); is the client "
            "older than the service?",
            status=response.status_code,
        ) from None


def _items(response: httpx.Response) -> list[ArtifactVersionInfo]:
    doc = _json(response)
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
    """The manifest's files, checked: a server must not make us write outside the target."""
    raw = manifest.get("files")
    if not isinstance(raw, list) or not raw:
        raise DownloadError(f"{label}: the manifest lists no files")
    files: list[ManifestFile] = []
    for item in raw:
        try:
            entry = ManifestFile(str(item["path"]), int(item["size"]), str(item["sha256"]))
        except (KeyError, TypeError, ValueError) as e:
            raise DownloadError(f"{label}: bad manifest entry {item!r}: {e}") from None
        parts = entry.path.split("/")
        unsafe = (
            entry.path.startswith("/")
            or "\\" in entry.path
            or any(p in ("", ".", "..") for p in parts)
            or entry.path == MANIFEST
        )
        if unsafe or entry.size < 0 or not _SHA256.match(entry.sha256):
            raise DownloadError(f"{label}: unsafe or malformed manifest entry {item!r}")
        files.append(entry)
    return files
