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

URL_ENV = "WEIGHTSMITH_URL"
TOKEN_ENV = "WEIGHTSMITH_TOKEN"
MANIFEST = "manifest.json"
LATEST = "latest"

RETRY_STATUSES = frozenset({502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
MAX_RETRY_AFTER_S = 30.0
CHUNK = 1 << 20
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
