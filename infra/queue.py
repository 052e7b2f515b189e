"""How the API hands a job to a worker: the job id, and nothing else, on a queue.

The job store is the source of truth (recipe, state, progress); a queue message only says
"look at job X". Two implementations behind one protocol:

- :class:`CeleryQueue` — production: sends the Celery task ``weightsmith.run_job`` by name
  (so the API never imports ``workers``, nor torch through it), routed to the ``gpu`` queue
  for the job kinds that need one and to ``default`` otherwise.
- :class:`InProcessQueue` — the embedded default: hands job ids to a callable, which the
  in-process worker registers (``weightsmith serve``).

**Lost messages.** A queued job whose message never arrived or was lost (the API died between
recording and sending, a broker restarted without persistence, a task that crashed before
claiming and was acknowledged) would wait forever. The workers' sweeper calls
:func:`resend_unsent_jobs` every ``worker_lost_after`` seconds: it takes the jobs queued for
longer than that (``JobStore.long_queued_jobs``), asks the broker which of them still have a
message (:func:`broker_job_ids`: waiting in a queue, or delivered and not acknowledged —
running, or held for a retry countdown) and sends the others again, each by exactly one
sweeper (``JobStore.mark_sent_again``, a guarded UPDATE). So a job merely waiting behind
others gets no duplicate; a duplicate that does slip through (a message between the broker's
queue and its unacked set at the instant of the look) is harmless, since claiming a job is
exactly-once. Where the broker cannot be inspected (not Redis), each long-queued job is sent
again once per ``worker_lost_after``, and its duplicates find it claimed.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from infra.db.jobstore import JobStore

log = logging.getLogger("weightsmith.queue")

RUN_JOB_TASK = "weightsmith.run_job"
# one part of a merge split across workers (workers.split_merge), sent by the job's worker
RUN_PART_TASK = "weightsmith.run_merge_part"
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


# ---- lost messages ------------------------------------------------------------------------

# kombu's Redis transport: a queue is a list (one per priority step, the name plus this
# separator and the step for steps above 0), and a delivered message waits in the hash
# "unacked" until it is acknowledged (Celery acknowledges late: after the task returns).
_PRIORITY_SEPARATOR = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)
_UNACKED_KEY = "unacked"
_SCAN_CHUNK = 1000


def broker_job_ids(broker_url: str, queues: Iterable[str]) -> set[str]:
    """Ids of the jobs with a ``weightsmith.run_job`` message in the Redis broker: waiting in
    one of ``queues`` or delivered and not yet acknowledged. Raises QueueUnavailable."""
    from infra.liveness import redis_client

    found: set[str] = set()
    client = redis_client(broker_url)
    try:
        for queue in queues:
            for key in (queue, *(f"{queue}{_PRIORITY_SEPARATOR}{p}" for p in _PRIORITY_STEPS)):
                start = 0
                while chunk := client.lrange(key, start, start + _SCAN_CHUNK - 1):
                    found.update(_job_ids(chunk, unacked=False))
                    start += len(chunk)
        for _, values in _hscan_chunks(client, _UNACKED_KEY):
            found.update(_job_ids(values, unacked=True))
    except Exception as e:
        raise QueueUnavailable(
            f"cannot read the queues of broker {_redact(broker_url)}: {type(e).__name__}: {e}"
        ) from e
    finally:
        client.close()
    return found


def _hscan_chunks(client: Any, key: str) -> Iterator[tuple[int, list[bytes]]]:
    cursor = 0
    while True:
        cursor, items = client.hscan(key, cursor, count=_SCAN_CHUNK)
        yield cursor, list(items.values())
        if cursor == 0:
            return


def _job_ids(raw_messages: Iterable[bytes], *, unacked: bool) -> Iterator[str]:
    for raw in raw_messages:
        try:
            message = json.loads(raw)
            if unacked:  # [message, exchange, routing key]
                message = message[0]
            job_id = _run_job_argument(message)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            continue  # not a message of ours, or not one we can read: not a job's
        if job_id is not None:
            yield job_id


def _run_job_argument(message: dict[str, Any]) -> str | None:
    """The job id of a Celery ``weightsmith.run_job`` message (protocol 2 or 1), else None."""
    headers = message.get("headers") or {}
    body: Any = message["body"]
    if message.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    body = json.loads(body)
    if headers.get("task") == RUN_JOB_TASK and isinstance(body, list):  # [args, kwargs, embed]
        args = body[0]
    elif isinstance(body, dict) and body.get("task") == RUN_JOB_TASK:  # protocol 1
        args = body.get("args")
    else:
        return None
    return str(args[0]) if isinstance(args, list) and args else None


def resend_unsent_jobs(
    store: JobStore,
    send: Callable[[str, str], None],
    *,
    present: Callable[[], set[str] | None],
) -> list[str]:
    """Send again the jobs queued for longer than ``worker_lost_after`` whose message is gone.

    ``present()`` gives the ids that still have a message (the broker's, see
    :func:`broker_job_ids`; the embedded worker's own queue), or None when that cannot be
    known (then every such job is sent again). ``send(job_id, kind)`` sends one. Returns the
    ids sent; each job is sent by one caller only (``JobStore.mark_sent_again``).
    """
    candidates = store.long_queued_jobs()
    if not candidates:
        return []
    waiting = present()
    sent: list[str] = []
    for job in candidates:
        if waiting is not None and job.id in waiting:
            continue  # waiting behind other jobs, or being retried: not lost
        if store.mark_sent_again(job):
            send(job.id, job.kind)
            sent.append(job.id)
    return sent


def _redact(url: str) -> str:
    from infra.settings import redact_url

    return redact_url(url)
