"""The light worker's task ``weightsmith.fire_schedule``: a thin adapter from a beat message
(schedule id, scheduled time) to :func:`infra.schedules.fire_schedule`, which submits the
job through the API's submission path (``service.scheduling``; torch-free, like this module).

Run a worker on the light queue for it: ``weightsmith worker --queues light``.
"""

from __future__ import annotations

import functools
import logging
import os
from datetime import datetime
from typing import TYPE_CHECKING, Any

from infra.schedules import FIRE_SCHEDULE_TASK
from workers.celery_app import app

if TYPE_CHECKING:
    from service.scheduling import Scheduling

log = logging.getLogger("weightsmith.tasks")


@functools.cache
def _scheduling_for(pid: int) -> Scheduling:
    from infra.db.schedules import ScheduleStore
    from infra.settings import get_settings
    from service.scheduling import Scheduling, ServiceSubmitter, service_for_firing

    service = service_for_firing(get_settings())
    return Scheduling(ScheduleStore(service.engine), None, ServiceSubmitter(service))


@app.task(name=FIRE_SCHEDULE_TASK, ignore_result=True)
def fire_schedule(schedule_id: str, scheduled_for: str | None = None) -> dict[str, Any]:
    """Fire one schedule; a duplicate message for the same scheduled time does nothing."""
    when = datetime.fromisoformat(scheduled_for) if scheduled_for else None
    # Keyed by pid: a forked child must not reuse its parent's database connections.
    result = _scheduling_for(os.getpid()).fire(str(schedule_id), when)
    run = result.run
    summary = {
        "schedule_id": schedule_id,
        "run_id": run.id if run is not None else None,
        "outcome": run.outcome if run is not None else None,
        "job_id": run.job_id if run is not None else None,
        "duplicate": result.duplicate,
    }
    log.info("schedule fired: %s", summary)
    return summary
