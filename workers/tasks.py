"""The Celery task: a thin adapter from a queue message (a job id) to workers.runner.run_job;
the sweeper that requeues jobs whose worker was lost without a message to redeliver, sends
again queued jobs whose message is gone from the broker and deletes the work files a split
merge left behind; and
webhook delivery (a dispatcher thread in each worker's main process, and the task
``weightsmith.deliver_webhooks`` for a round on demand).

The job store, object store and settings are built once per worker process, on its first
task, so the prefork parent opens no database connection and imports no torch.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery.signals import worker_ready, worker_shutdown

from infra.queue import RUN_PART_TASK
from service.webhooks import DELIVER_WEBHOOKS_TASK
from workers.celery_app import DEFAULT_QUEUE, GPU_QUEUE, RUN_JOB_TASK, app

if TYPE_CHECKING:
    from infra.db import JobStore
    from infra.db.parts import PartKey
    from infra.settings import Settings
    from infra.storage import ObjectStore
    from service.webhooks import DispatcherLoop, WebhookDispatcher

log = logging.getLogger("weightsmith.tasks")

RETRY_MARGIN_S = 0.5  # retry a little after the other worker's heartbeat is stale


@dataclass(frozen=True)
class _WorkerContext:
    pid: int
    settings: Settings
    store: JobStore
    object_store: ObjectStore


@functools.cache
def _context_for(pid: int) -> _WorkerContext:
    from infra.db import JobStore, make_engine
    from infra.settings import get_settings
    from infra.storage import open_store

    settings = get_settings()
    store = JobStore.from_settings(settings, make_engine(settings.database_url))
    return _WorkerContext(pid, settings, store, open_store(settings.object_store_url))


def _context() -> _WorkerContext:
    # Keyed by pid: a forked child must not reuse its parent's database connections.
    return _context_for(os.getpid())


@app.task(name=RUN_JOB_TASK, bind=True, max_retries=None, ignore_result=True)
def run_job(self: Any, job_id: str) -> None:
    """Run one job (see workers.runner). Retried, not failed, while another worker holds it,
    after a transient failure, and while the job store cannot be reached (nothing could be
    recorded: the message itself is the job's only memory then)."""
    from workers.errors import is_transient
    from workers.runner import RetryLater
    from workers.runner import run_job as run

    ctx = _context()
    queue = (self.request.delivery_info or {}).get("routing_key")
    # the gpu queue's jobs compute where WEIGHTSMITH_WORKER_DEVICE says (default auto)
    device = ctx.settings.worker_device if queue == GPU_QUEUE else "cpu"
    worker_id = f"{socket.gethostname()}:{os.getpid()}:{self.request.id}"

    def send_part(key: PartKey) -> None:  # a split merge's parts go to this job's queue
        app.send_task(RUN_PART_TASK, args=key.args(), queue=queue)

    try:
        run(
            str(job_id),
            store=ctx.store,
            settings=ctx.settings,
            object_store=ctx.object_store,
            worker_id=worker_id,
            device=device,
            send_part=send_part,
        )
    except RetryLater as e:
        log.info("%s", e)
        raise self.retry(countdown=e.delay_s + RETRY_MARGIN_S) from None
    except Exception as e:
        if not is_transient(e):  # a bug outside the job's run: Celery logs it
            raise
        delay = float(ctx.settings.worker_heartbeat_interval)
        log.warning("job %s: %s: %s; message retried in %.0f s", job_id, type(e).__name__, e, delay)
        raise self.retry(countdown=delay) from None


@app.task(name=RUN_PART_TASK, bind=True, max_retries=None, ignore_result=True)
def run_merge_part(self: Any, job_id: str, job_attempt: int, step: int, part: int) -> None:
    """Run one part of a merge split across workers (see workers.split_merge). Retried while
    another worker holds the part, after a transient failure, and while the job store
    cannot be reached."""
    from infra.db.parts import PartKey
    from workers.errors import is_transient
    from workers.split_merge import PartRetryLater, run_part

    ctx = _context()
    queue = (self.request.delivery_info or {}).get("routing_key")
    device = ctx.settings.worker_device if queue == GPU_QUEUE else "cpu"
    worker_id = f"{socket.gethostname()}:{os.getpid()}:{self.request.id}"
    key = PartKey(str(job_id), int(job_attempt), int(step), int(part))
    try:
        run_part(
            key,
            store=ctx.store,
            settings=ctx.settings,
            object_store=ctx.object_store,
            worker_id=worker_id,
            device=device,
        )
    except PartRetryLater as e:
        log.info("%s", e)
        raise self.retry(countdown=e.delay_s + RETRY_MARGIN_S) from None
    except Exception as e:
        if not is_transient(e):
            raise
        delay = float(ctx.settings.worker_heartbeat_interval)
        log.warning("job %s part %s: %s; message retried in %.0f s", job_id, part, e, delay)
        raise self.retry(countdown=delay) from None


@functools.cache
def _dispatcher_for(pid: int) -> WebhookDispatcher:
    from service.webhooks import WebhookDispatcher

    ctx = _context_for(pid)
    return WebhookDispatcher.from_settings(ctx.settings, ctx.store.engine)


@app.task(name=DELIVER_WEBHOOKS_TASK, ignore_result=True)
def deliver_webhooks() -> int:
    """Deliver the webhook messages due now; returns the attempts made. Each worker's main
    process does this every WEIGHTSMITH_WEBHOOK_POLL_INTERVAL anyway (see below)."""
    return _dispatcher_for(os.getpid()).deliver_all_due()


# ---- lost-job sweeper ---------------------------------------------------------------------
#
# A redelivered message takes over a job whose worker died. Some cases leave no message:
# Celery's hard time limit (the task is recorded as failed and its message acked), a broker
# that lost its messages, a message that never reached the broker. Each worker's main process
# therefore sweeps every ``worker_lost_after`` seconds: it requeues running jobs whose
# heartbeat went stale, and sends again the queued jobs whose message is gone from the broker
# (infra.queue.resend_unsent_jobs). Several workers sweeping at once is safe: each job is
# taken by one of them (a guarded UPDATE), and a duplicate message finds it claimed. The same
# round deletes the work files (``_parts/{job}/``) of split merges that ended or are unknown
# and were not written for WEIGHTSMITH_MERGE_PARTS_SWEEP_AFTER (workers.split_merge).


def sweep_queue(queues: list[str], gpu_kinds: frozenset[str], kind: str) -> str:
    """Where the sweeper sends a job of ``kind``: the queue the API would (gpu for the GPU
    kinds, default otherwise), unless this worker consumes neither of those (a deployment
    with queues of its own, e.g. the tests'): then its own first queue."""
    if not {DEFAULT_QUEUE, GPU_QUEUE} & set(queues) and queues:
        return queues[0]
    return GPU_QUEUE if kind in gpu_kinds else DEFAULT_QUEUE


class _LostJobSweeper:
    def __init__(self, queues: list[str]) -> None:
        from infra.settings import get_settings

        self.queues = queues
        self.settings = get_settings()
        self.interval_s = float(self.settings.worker_lost_after)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lost-job-sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _send(self, job_id: str, kind: str) -> None:
        queue = sweep_queue(self.queues, self.settings.gpu_kinds, kind)
        app.send_task(RUN_JOB_TASK, args=[job_id], queue=queue)

    def _present(self) -> set[str] | None:
        from infra.liveness import is_redis_url
        from infra.queue import broker_job_ids

        url = self.settings.broker_url
        if url is None or not is_redis_url(url):
            return None  # cannot tell: every long-queued job is sent again
        return broker_job_ids(url, sorted({DEFAULT_QUEUE, GPU_QUEUE, *self.queues}))

    def sweep(self, store: JobStore, object_store: ObjectStore | None = None) -> None:
        from infra.queue import resend_unsent_jobs
        from workers.split_merge import sweep_part_leftovers

        recovered = store.recover_lost_jobs()
        kinds = store.kinds(recovered)
        for job_id in recovered:
            log.warning("job %s: its worker was lost; requeued", job_id)
            self._send(job_id, kinds.get(job_id, ""))
        for job_id in resend_unsent_jobs(store, self._send, present=self._present):
            log.warning("job %s: queued without a message in the broker; sent again", job_id)
        if object_store is not None:  # split merges' work files whose job ended or is gone
            after = self.settings.merge_parts_sweep_after
            sweep_part_leftovers(store, object_store, older_than_s=after)

    def _run(self) -> None:
        from sqlalchemy.pool import NullPool

        from infra.db import JobStore, make_engine
        from infra.storage import open_store

        # NullPool: no connection stays open in the parent, which forks new pool processes.
        engine = make_engine(self.settings.database_url, poolclass=NullPool)
        store = JobStore.from_settings(self.settings, engine)
        object_store: ObjectStore | None = None
        while not self._stopped.wait(self.interval_s):
            try:
                if object_store is None:
                    object_store = open_store(self.settings.object_store_url)
                self.sweep(store, object_store)
            except Exception:
                log.exception("lost-job sweep failed; trying again later")
        engine.dispose()


_sweeper: _LostJobSweeper | None = None
# Webhooks go out from the main process, so deliveries never wait behind a long job.
_webhooks: DispatcherLoop | None = None


@worker_ready.connect
def _start_sweeper(sender: Any = None, **_: Any) -> None:
    global _sweeper, _webhooks
    queues = [str(q) for q in (app.amqp.queues.consume_from or app.amqp.queues)]
    _sweeper = _LostJobSweeper(queues or [DEFAULT_QUEUE])
    _sweeper.start()

    from sqlalchemy.pool import NullPool

    from infra.db import make_engine
    from infra.settings import get_settings
    from service.webhooks import DispatcherLoop

    settings = get_settings()
    # NullPool: no connection stays open in the parent, which forks new pool processes.
    engine = make_engine(settings.database_url, poolclass=NullPool)
    _webhooks = DispatcherLoop.from_settings(settings, engine)
    _webhooks.start()


@worker_shutdown.connect
def _stop_sweeper(sender: Any = None, **_: Any) -> None:
    if _sweeper is not None:
        _sweeper.stop()
    if _webhooks is not None:
        _webhooks.stop(timeout=5)
