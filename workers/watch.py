"""One running attempt's watch: heartbeats, throttled progress and the stop signal (a
cancel request, the job taken over by another worker, or its time limit)."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from infra.db import JobStore
    from workers.edit.covariance import CovarianceProgress
    from workers.merge.engine import Progress

log = logging.getLogger("weightsmith.runner")

PROGRESS_INTERVAL_S = 1.0  # progress rows written at most this often (phase changes at once)
CANCEL_POLL_INTERVAL_S = 0.25  # the cancel flag is read from the store at most this often


class Beating:
    """A daemon thread that runs ``_beat`` (a loop that waits on ``_stopped``) from
    :meth:`start` until :meth:`stop`: the heartbeat of a job's attempt or of a part."""

    def _beating(self, name: str) -> None:
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _beat(self) -> None:
        raise NotImplementedError


class JobWatch(Beating):
    """Heartbeats, throttled progress and the stop signal of one running attempt."""

    def __init__(
        self,
        store: JobStore,
        job_id: str,
        worker_id: str,
        heartbeat_interval: float,
        *,
        time_limit_s: float,
    ) -> None:
        self.store = store
        self.job_id = job_id
        self.worker_id = worker_id
        self.heartbeat_interval = heartbeat_interval
        self.lost = False
        self.timed_out = False
        self.started = (
            time.perf_counter()
        )  # the attempt's start: the manifest's timings count from it
        self._deadline = time.monotonic() + time_limit_s
        self._cancel = False
        self._last_progress = 0.0
        self._last_phase: str | None = None
        self._last_cancel_check = 0.0
        self._beating(f"heartbeat-{job_id}")

    def _beat(self) -> None:
        while not self._stopped.wait(self.heartbeat_interval):
            try:
                if not self.store.heartbeat(self.job_id, self.worker_id):
                    self.lost = True
                    return
            except Exception:  # a database hiccup: the next beat tries again
                log.warning("job %s: heartbeat failed", self.job_id, exc_info=True)

    def _write(self, **values: Any) -> None:
        if not self.store.update_progress(self.job_id, self.worker_id, **values):
            self.lost = True

    def report_phase(self, phase: str) -> None:
        self._last_phase = phase
        self._last_progress = time.monotonic()
        self._write(phase=phase)

    def report_inputs(self, fetched: int, total: int, nbytes: int) -> None:
        """``fetched`` of the job's ``total`` inputs are on local disk, ``nbytes`` in all
        (phase ``download``; written at once: inputs are few and slow)."""
        self._last_phase = "download"
        self._last_progress = time.monotonic()
        self._write(phase="download", tensors_done=0, bytes_done=nbytes, bytes_total=None)
        log.info("inputs: %d/%d fetched, %d bytes", fetched, total, nbytes)

    def report(self, p: Progress) -> None:
        now = time.monotonic()
        if p.phase == self._last_phase and now - self._last_progress < PROGRESS_INTERVAL_S:
            return
        self._last_phase = p.phase
        self._last_progress = now
        self._write(
            phase=p.phase,
            tensors_done=p.tensors_done,
            tensors_total=p.tensors_total,
            bytes_done=p.bytes_done,
            bytes_total=p.bytes_total,
        )

    def report_covariance(self, p: CovarianceProgress) -> None:
        """An edit's covariance phase, as ``phase`` "covariance:{step} {done}/{total}
        tokens" (step: sampling or statistics; throttled like :meth:`report`, a change of
        step written at once). The token counts ride in the phase text: the progress row's
        counters are tensors and bytes."""
        now = time.monotonic()
        step = f"covariance:{p.step}"
        if (
            self._last_phase is not None
            and self._last_phase.startswith(step + " ")
            and now - self._last_progress < PROGRESS_INTERVAL_S
        ):
            return
        phase = f"{step} {p.tokens_done}/{p.tokens_total} tokens"
        self._last_phase = phase
        self._last_progress = now
        self._write(phase=phase)

    def should_stop(self) -> bool:
        """The engine's cancel check: a cancel request, or the job is no longer ours."""
        if self.lost or self._cancel or self.timed_out:
            return True
        now = time.monotonic()
        if now > self._deadline:
            self.timed_out = True
            return True
        if now - self._last_cancel_check >= CANCEL_POLL_INTERVAL_S:
            self._last_cancel_check = now
            self._cancel = self.store.is_cancel_requested(self.job_id)
        return self.lost or self._cancel

    def check(self) -> None:
        """Between input downloads: stop at once when cancelled or taken over."""
        from workers.errors import CancelledError

        if self.should_stop():
            raise CancelledError("the job was cancelled")
