"""Jobs: submit a merge or edit, read, list, cancel, and wait for one to end."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from schemas.jobs import JobKind, JobList, JobState, JobView, PublishOptions
from weightsmith.client.errors import WaitTimeout
from weightsmith.client.transport import Transport, parse_answer, path_segment


def job_artifact_reference(job: JobView) -> str | None:
    """``artifact://name@version`` of a succeeded job's published artifact."""
    if job.artifact is None:
        return None
    return f"artifact://{job.artifact.name}@{job.artifact.version}"


class JobsApi(Transport):
    """``/v1/jobs``."""

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
        return parse_answer(JobView, response)

    def get_job(self, job_id: str) -> JobView:
        return parse_answer(JobView, self._request("GET", f"/v1/jobs/{path_segment(job_id)}"))

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
            page = parse_answer(JobList, self._request("GET", "/v1/jobs", params=params))
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
        return parse_answer(
            JobView, self._request("POST", f"/v1/jobs/{path_segment(job_id)}/cancel")
        )

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
