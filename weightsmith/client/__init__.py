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

Downloads (:meth:`Client.download`) check every file's size and sha256 against the
version's manifest and leave nothing behind on failure. Uploads (:meth:`Client.upload`)
bring a local folder in as an artifact version.

Errors are :class:`ClientError` values carrying the server's ``application/problem+json``
body (status, title, detail, and ``errors`` with a JSON Pointer per field).

One module per role: ``transport`` (connection, retries), ``jobs``, ``account`` (the
tenant's grants and Hub token), ``artifacts`` (listing, downloads), ``uploads``, ``errors``.
"""

# `time` is named here so that tests can pause the retries through weightsmith.client.time.
import time as time

from weightsmith.client.account import AccountApi
from weightsmith.client.artifacts import (
    LATEST,
    MANIFEST,
    MAX_REDIRECTS,
    REDIRECT_STATUSES,
    ArtifactRef,
    ArtifactsApi,
    ArtifactVersionInfo,
    DownloadProgress,
    ManifestFile,
    parse_artifact_ref,
)
from weightsmith.client.errors import (
    ClientError,
    ConfigurationError,
    DownloadError,
    DownloadTargetError,
    FieldProblem,
    IntegrityError,
    LocalFilesError,
    ServiceUnreachable,
    UploadError,
    UsageError,
    WaitTimeout,
)
from weightsmith.client.jobs import JobsApi, job_artifact_reference
from weightsmith.client.transport import (
    CHUNK,
    MAX_RETRY_AFTER_S,
    RETRY_STATUSES,
    TOKEN_ENV,
    URL_ENV,
)
from weightsmith.client.uploads import (
    COMPLETE_POLL_S,
    UPLOAD_CHUNK,
    UploadProgress,
    UploadsApi,
    local_upload_files,
)


class Client(JobsApi, AccountApi, ArtifactsApi, UploadsApi):
    """The weightsmith API at ``url`` with API key ``token``.

    Both default to the ``WEIGHTSMITH_URL`` and ``WEIGHTSMITH_TOKEN`` environment
    variables. ``retries`` is how often a request is resent after a connection error or a
    502/503/504 (``backoff_s`` doubles each time). Use it as a context manager, or
    :meth:`close` it.
    """


__all__ = [
    "CHUNK",
    "COMPLETE_POLL_S",
    "LATEST",
    "MANIFEST",
    "MAX_REDIRECTS",
    "MAX_RETRY_AFTER_S",
    "REDIRECT_STATUSES",
    "RETRY_STATUSES",
    "TOKEN_ENV",
    "UPLOAD_CHUNK",
    "URL_ENV",
    "ArtifactRef",
    "ArtifactVersionInfo",
    "Client",
    "ClientError",
    "ConfigurationError",
    "DownloadError",
    "DownloadProgress",
    "DownloadTargetError",
    "FieldProblem",
    "IntegrityError",
    "LocalFilesError",
    "ManifestFile",
    "ServiceUnreachable",
    "UploadError",
    "UploadProgress",
    "UsageError",
    "WaitTimeout",
    "job_artifact_reference",
    "local_upload_files",
    "parse_artifact_ref",
]
