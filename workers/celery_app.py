"""The Celery application of the workers (``celery -A workers.celery_app worker``).

Configured for long, memory-heavy jobs (see shared/specs/service.md):

- ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged only when
  its task returns, and a worker process killed mid-job (out of memory, SIGKILL) puts it
  back on the queue. The job store's claim makes the redelivery safe: a finished or running
  job is never run again, and the attempts are capped (``WEIGHTSMITH_MAX_ATTEMPTS``).
- ``worker_prefetch_multiplier=1``: a worker process reserves one job at a time, so a job
  never waits behind a long one while another worker is idle.
- ``visibility_timeout`` (broker and result backend alike) is longer than the hard time
  limit, or Redis would hand a still-running job to a second worker.
- Queues: ``default``, and ``gpu`` for GPU workers (``weightsmith worker --queues gpu``),
  which also replace their process after every job to free GPU memory. The parent process
  never imports torch: the merge engine is imported inside the task, in the child.

The message carries only the job id; everything else is in the job store.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import setup_logging, worker_ready, worker_shutdown
from kombu import Queue

from infra.queue import DEFAULT_QUEUE, GPU_QUEUE, RUN_JOB_TASK
from infra.schedules import FIRE_SCHEDULE_TASK, LIGHT_QUEUE, redbeat_config
from infra.settings import Settings, get_settings

__all__ = ["DEFAULT_QUEUE", "GPU_QUEUE", "RUN_JOB_TASK", "app", "celery_config", "create_app"]


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings derived from weightsmith's (one source of truth: infra.settings)."""
    transport = {"visibility_timeout": settings.visibility_timeout}
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": transport,
        "result_backend_transport_options": dict(transport),
        "broker_connection_retry_on_startup": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": settings.job_hard_time_limit,
        # The job store holds states and progress; Celery's own results would be a copy.
        "task_ignore_result": True,
        "task_track_started": False,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": DEFAULT_QUEUE,
        "task_queues": (Queue(DEFAULT_QUEUE), Queue(GPU_QUEUE), Queue(LIGHT_QUEUE)),
        "worker_hijack_root_logger": False,
        # A job keeps running through a broker blip; if its ack is lost, the redelivered
        # message finds it finished in the job store and does nothing.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # Schedules: beat (celery-redbeat, entries in the broker's Redis) sends fires to the
        # light queue (weightsmith worker --queues light), never behind a long job.
        "task_routes": {FIRE_SCHEDULE_TASK: {"queue": LIGHT_QUEUE}},
        "beat_scheduler": "infra.schedules:ScheduleBeat",
        **redbeat_config(settings.broker_url),
    }


def create_app(settings: Settings | None = None) -> Celery:
    """The workers' Celery app for ``settings`` (default: the environment's)."""
    settings = settings if settings is not None else get_settings()
    celery = Celery("weightsmith", include=["workers.tasks", "workers.schedule_tasks"])
    celery.conf.update(celery_config(settings))
    return celery


app = create_app()


# ---- logging and liveness (infra.logging, infra.liveness) ----------------------------------


@setup_logging.connect
def _configure_logging(**_: Any) -> None:
    # Connected, so Celery leaves the root logger alone: WEIGHTSMITH_LOG_FORMAT/_LEVEL rule.
    from infra.logging import configure_logging

    configure_logging(get_settings())


_beacon: Any = None


@worker_ready.connect
def _start_beacon(sender: Any = None, **_: Any) -> None:
    """Announce this worker in the broker's Redis until it stops (weightsmith_workers_alive)."""
    global _beacon
    from infra.liveness import WorkerBeacon, is_redis_url

    settings = get_settings()
    if not is_redis_url(settings.broker_url) or sender is None:
        return
    assert settings.broker_url is not None
    queues = sorted(str(q) for q in (app.amqp.queues.consume_from or app.amqp.queues))
    _beacon = WorkerBeacon(
        settings.broker_url,
        str(getattr(sender, "hostname", "worker")),
        queues=queues,
        interval_s=settings.worker_heartbeat_interval,
        ttl_s=settings.worker_lost_after,
    )
    _beacon.start()


@worker_shutdown.connect
def _stop_beacon(sender: Any = None, **_: Any) -> None:
    if _beacon is not None:
        _beacon.stop()
