"""How the API hands a job to a worker: the job id, and nothing else, on a queue.

The job store is the source of truth (recipe, state, progress); a queue message only says
"look at job X". Two implementations behind one protocol:

- :class:`CeleryQueue` — production: sends the Celery task ``weightsmith.run_job`` by name
  (so the API never imports ``workers``, nor torch through it), routed to the ``gpu`` queue
  for the job kinds that need one and to ``default`` otherwise.
- :class:`InProcessQueue` — the embedded default: hands job ids to a callable, which the
  in-process worker registers (``weightsmith serve``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from typing import Any, Protocol, runtime_checkable

RUN_JOB_TASK = "weightsmith.run_job"
DEFAULT_QUEUE = "default"
GPU_QUEUE = "gpu"


class QueueUnavailable(Exception):
    """The broker could not be reached or refused the message; the message says which."""


@runtime_checkable
class JobQueue(Protocol):
    """Where submitted jobs go. ``kind`` (the job kind) may choose the worker pool."""

    def enqueue(self, job_id: str, *, kind: str | None = None) -> None:
        """Ask a worker to run ``job_id``; raises :class:`QueueUnavailable` on failure."""

    def ping(self) -> None:
        """Return if jobs can be enqueued now, else raise :class:`QueueUnavailable` (readyz)."""


class CeleryQueue:
    """Sends ``weightsmith.run_job(job_id)`` through a Celery broker (Redis in production).

    ``gpu_kinds``: job kinds (``"merge"``, ``"edit"``) routed to the ``gpu`` queue, where the
    GPU workers listen (``-Q gpu -c 1``); the others go to ``default``. A broker that does
    not answer within ``connect_timeout_s`` makes :meth:`enqueue` and :meth:`ping` fail.
    """

    def __init__(
        self,
        broker_url: str,
        *,
        gpu_kinds: Collection[str] = (),
        visibility_timeout: int | None = None,
        connect_timeout_s: float = 3.0,
    ) -> None:
        from celery import Celery

        self.broker_url = broker_url
        self.gpu_kinds = frozenset(gpu_kinds)
        self._celery = Celery("weightsmith-api", broker=broker_url)
        # Fail fast instead of retrying for minutes when the broker is down: the API answers
        # 503 and the client retries (with its Idempotency-Key).
        self._celery.conf.broker_connection_timeout = connect_timeout_s
        transport: dict[str, Any] = {
            "max_retries": 1,
            "socket_connect_timeout": connect_timeout_s,
            "socket_timeout": connect_timeout_s,
        }
        if visibility_timeout is not None:  # as the workers set it (see infra.settings)
            transport["visibility_timeout"] = visibility_timeout
        self._celery.conf.broker_transport_options = transport
        self._connect_timeout_s = connect_timeout_s

    def queue_for(self, kind: str | None) -> str:
        return GPU_QUEUE if kind is not None and kind in self.gpu_kinds else DEFAULT_QUEUE

    def enqueue(self, job_id: str, *, kind: str | None = None) -> None:
        queue = self.queue_for(kind)
        try:
            self._celery.send_task(
                RUN_JOB_TASK,
                args=[job_id],
                queue=queue,
                retry=True,
                retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.5},
            )
        except Exception as e:  # kombu raises OperationalError, redis its ConnectionError
            raise QueueUnavailable(
                f"could not send job {job_id} to queue {queue!r} of the broker "
                f"({_redact(self.broker_url)}): {type(e).__name__}: {e}"
            ) from e

    def ping(self) -> None:
        try:
            with self._celery.connection_for_write() as conn:
                conn.ensure_connection(
                    max_retries=1,
                    interval_start=0,
                    interval_step=0.2,
                    timeout=self._connect_timeout_s,
                )
        except Exception as e:
            raise QueueUnavailable(
                f"broker {_redact(self.broker_url)} is unreachable: {type(e).__name__}: {e}"
            ) from e

    def close(self) -> None:
        self._celery.close()


class InProcessQueue:
    """Hands job ids to ``callback`` (the embedded worker), in the caller's thread.

    Until a callback is registered, ids are kept and delivered on :meth:`register`, so the
    API can accept jobs while the worker is still starting. The callback should only put
    the id on its own queue and return: the API waits for it.
    """

    def __init__(self, callback: Callable[[str], Any] | None = None) -> None:
        self._lock = threading.Lock()
        self._callback = callback
        self._waiting: list[str] = []

    def register(self, callback: Callable[[str], Any]) -> None:
        with self._lock:
            self._callback = callback
            waiting, self._waiting = self._waiting, []
        for job_id in waiting:
            callback(job_id)

    def enqueue(self, job_id: str, *, kind: str | None = None) -> None:
        with self._lock:
            callback = self._callback
            if callback is None:
                self._waiting.append(job_id)
                return
        try:
            callback(job_id)
        except Exception as e:
            raise QueueUnavailable(
                f"the embedded worker refused job {job_id}: {type(e).__name__}: {e}"
            ) from e

    def ping(self) -> None:
        return None


def _redact(url: str) -> str:
    from infra.settings import redact_url

    return redact_url(url)
