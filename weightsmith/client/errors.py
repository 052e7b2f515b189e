"""What the client raises: :class:`ClientError` and its kinds, each carrying the service's
``application/problem+json`` body when there was an answer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from schemas.jobs import JobView

# Answers that say the request was wrong (bad body, unknown id, conflict, too large, wrong
# media type, invalid field). 401/403 are not among them: a key problem, not the input's.
BAD_INPUT_STATUSES = frozenset({400, 404, 409, 413, 415, 422})


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

    @property
    def bad_input(self) -> bool:
        """Whether the request itself was wrong (a 4xx other than 401/403, or a
        :class:`UsageError`): the caller must change it, not retry it. The CLI exits 2 for
        these and 1 for the rest (unreachable, a rejected key, a server error)."""
        return self.status in BAD_INPUT_STATUSES

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


class UsageError(ClientError):
    """The call cannot work as given — no service URL or key, a malformed artifact
    reference, a download target in use, local files the service would refuse — so nothing
    was asked of the service. Fix the input; retrying the same call fails the same way."""

    @property
    def bad_input(self) -> bool:
        return True


class ConfigurationError(UsageError):
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


class DownloadTargetError(DownloadError, UsageError):
    """The download target exists and is not an empty folder; nothing was downloaded."""


class LocalFilesError(UsageError):
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
