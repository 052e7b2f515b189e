"""The in-process worker of the embedded default (``weightsmith serve``, no broker).

Jobs run one at a time in a background thread, through the same :func:`workers.runner.run_job`
as on Celery. The API hands it job ids (``InProcessQueue(worker.submit)``); nothing is lost
when the process stops, because the job store is the queue's memory: at start the worker
requeues jobs whose worker was lost and picks up every queued job (and deletes the work
files split merges left behind: workers.split_merge.sweep_part_leftovers), and while it
runs it does that housekeeping again now and then, which also picks up a queued job that is in none
of its hands (its id was dropped, e.g. when the database failed as the job was claimed)
once it has waited ``worker_lost_after``. A transient failure outside the job's own run (the
database unreachable when claiming) is retried after the heartbeat interval.

Webhooks go out from a dispatcher thread (service.webhooks.DispatcherLoop) started and stopped
with the worker, and woken after each job, so its final event leaves at once.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from infra.db import JobStore
    from infra.settings import Settings
    from infra.storage import ObjectStore
    from service.webhooks import DispatcherLoop

log = logging.getLogger("weightsmith.embedded")

_STOP = object()


class EmbeddedWorker:
    """One worker thread consuming job ids. ``submit`` only enqueues and returns."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: JobStore,
        object_store: ObjectStore,
        work_root: Path | None = None,
        device: str = "cpu",
        webhooks: DispatcherLoop | None = None,
    ) -> None:
        self.settings = settings
        self.webhooks = webhooks
        self.store = store
        self.object_store = object_store
        self.work_root = work_root
        self.device = device
        self._ids: queue.Queue[object] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._timers: set[threading.Timer] = set()
        self._lock = threading.Lock()
        # Ids in the queue, in a retry timer or running: the jobs not lost (see _housekeeping).
        self._held: dict[str, int] = {}
        # Housekeeping as often as a lost worker can be detected, at most every minute.
        self.housekeeping_s = float(min(60, settings.worker_lost_after))

    @classmethod
    def from_settings(cls, settings: Settings) -> EmbeddedWorker:
        from infra.db import JobStore, make_engine
        from infra.storage import open_store
        from service.webhooks import DispatcherLoop

        engine = make_engine(settings.database_url)
        return cls(
            settings,
            store=JobStore.from_settings(settings, engine),
            object_store=open_store(settings.object_store_url),
            work_root=settings.data_dir / "work",
            device=settings.worker_device,
            webhooks=DispatcherLoop.from_settings(settings, engine),
        )

    def submit(self, job_id: str) -> None:
        """Queue a job (the API's InProcessQueue callback)."""
        if self._stopping.is_set():
            raise RuntimeError("the embedded worker is stopping")
        self._put(job_id)

    def _put(self, job_id: str) -> None:
        self._hold(job_id)
        self._ids.put(job_id)

    def _hold(self, job_id: str) -> None:
        with self._lock:
            self._held[job_id] = self._held.get(job_id, 0) + 1

    def _release(self, job_id: str) -> None:
        with self._lock:
            left = self._held.get(job_id, 0) - 1
            if left > 0:
                self._held[job_id] = left
            else:
                self._held.pop(job_id, None)

    def _holding(self) -> set[str]:
        with self._lock:
            return set(self._held)

    def start(self) -> None:
        """Pick up the jobs left by a previous run, then start consuming."""
        if self._thread is not None:
            return
        if self.work_root is not None:
            self.work_root.mkdir(parents=True, exist_ok=True)
        self._housekeeping(first=True)
        if self.webhooks is not None:
            self.webhooks.start()
        self._thread = threading.Thread(
            target=self._consume, name="weightsmith-worker", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the current job (which is not interrupted); queued ids stay queued in
        the job store for the next start."""
        self._stopping.set()
        with self._lock:
            for timer in self._timers:
                timer.cancel()
            self._timers.clear()
        self._ids.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)
        if self.webhooks is not None:
            self.webhooks.stop(timeout)

    def _housekeeping(self, *, first: bool = False) -> None:
        from infra.queue import resend_unsent_jobs
        from workers.split_merge import sweep_part_leftovers

        recovered = self.store.recover_lost_jobs()
        if recovered:
            log.warning("requeued %d job(s) whose worker was lost", len(recovered))
        try:  # split merges' work files whose job ended or is gone (workers.split_merge)
            after = self.settings.merge_parts_sweep_after
            sweep_part_leftovers(self.store, self.object_store, older_than_s=after)
        except Exception:
            log.warning("sweeping split merges' work files failed", exc_info=True)
        if first:
            for job_id in self.store.queued_job_ids():
                self._put(job_id)
            return
        for job_id in recovered:
            self._put(job_id)
        for job_id in resend_unsent_jobs(
            self.store, lambda job_id, _kind: self._put(job_id), present=self._holding
        ):
            log.warning("job %s: queued but in none of this worker's hands; picked up", job_id)

    def _later(self, delay_s: float, job_id: str) -> None:
        def fire() -> None:
            with self._lock:
                self._timers.discard(timer)
            if self._stopping.is_set():
                self._release(job_id)
                return
            self._ids.put(job_id)  # still held: the hold moves from the timer to the queue

        timer = threading.Timer(delay_s, fire)
        timer.daemon = True
        self._hold(job_id)
        with self._lock:
            self._timers.add(timer)
        timer.start()

    def _consume(self) -> None:
        from workers.errors import is_transient
        from workers.runner import RetryLater, run_job

        while True:
            try:
                item = self._ids.get(timeout=self.housekeeping_s)
            except queue.Empty:
                self._safely(self._housekeeping)
                continue
            if item is _STOP:
                return
            job_id = str(item)
            worker_id = f"embedded:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
            try:
                run_job(
                    job_id,
                    store=self.store,
                    settings=self.settings,
                    object_store=self.object_store,
                    worker_id=worker_id,
                    device=self.device,
                    work_root=self.work_root,
                )
            except RetryLater as e:
                log.info("%s", e)
                self._later(e.delay_s + 0.5, job_id)
            except Exception as e:  # the thread must survive anything one job does
                if is_transient(e):  # e.g. the database was unreachable: nothing recorded
                    delay = float(self.settings.worker_heartbeat_interval)
                    log.warning(
                        "job %s: %s: %s; again in %.0f s", job_id, type(e).__name__, e, delay
                    )
                    self._later(delay, job_id)
                else:
                    log.exception("job %s: the embedded worker failed to run it", job_id)
            finally:
                self._release(job_id)
            if self.webhooks is not None:
                self.webhooks.wake()  # the job's events are in the outbox: send them now

    @staticmethod
    def _safely(fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception:
            log.exception("embedded worker housekeeping failed")
