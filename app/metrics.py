"""Observability of the API: what ``GET /metrics`` reports, and each request's log context.

The API and the workers are separate processes, so job figures are not counted in any
process: :class:`JobStoreCollector` reads them from the job store when Prometheus scrapes,
with **one** aggregate query (``GROUP BY kind, state``; the database does the arithmetic,
a few dozen rows come back, whatever the number of jobs). Every API replica therefore
reports the same numbers. Worker liveness comes from the workers' keys in the broker's Redis
(:mod:`infra.liveness`) and from running jobs' heartbeats; the broker's queue lengths from
Redis too. A source that cannot be read is reported by ``weightsmith_metrics_source_up``
(0) instead of failing the scrape.

Metrics (``kind``: merge, edit; ``state``: the API's job states):

- ``weightsmith_jobs{kind,state}`` — jobs in each state now.
- ``weightsmith_job_run_seconds{kind,state}`` — histogram of finished jobs' run time (first
  start to end, retries included), by final state; jobs cancelled before starting are left
  out.
- ``weightsmith_processed_bytes_total{kind}`` — tensor bytes written by succeeded jobs.
- ``weightsmith_queue_depth`` — queued jobs; ``weightsmith_oldest_queued_job_age_seconds``.
- ``weightsmith_broker_queue_messages{queue}`` — messages waiting in Redis (Redis broker).
- ``weightsmith_running_jobs_stale`` — running jobs without a heartbeat for
  ``WEIGHTSMITH_WORKER_LOST_AFTER`` (their worker is lost); and
  ``weightsmith_running_job_heartbeat_age_max_seconds``.
- ``weightsmith_workers_alive``, ``weightsmith_worker_heartbeat_age_seconds{worker}`` (Redis
  broker).
- ``weightsmith_http_requests_total{method,route,status}``,
  ``weightsmith_http_request_duration_seconds{method,route}`` — this process's requests.
- ``weightsmith_build_info{version}``, ``weightsmith_metrics_scrape_duration_seconds``, and
  the ``process_*`` / ``python_*`` metrics of this process.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from sqlalchemy import Engine, Float, case, cast, func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import weightsmith
from app.dependencies import PrincipalDep
from infra.db.models import PENDING, Job
from infra.liveness import is_redis_url, read_worker_beats, redis_client
from infra.logging import LogContext, current_log_context, log_context
from infra.queue import DEFAULT_QUEUE, GPU_QUEUE
from schemas.jobs import JobKind, JobState

if TYPE_CHECKING:
    from service.context import Service

log = logging.getLogger("weightsmith.metrics")

# Merges and edits take seconds (tiny models) to hours (70B): roughly ×2–3 per bucket.
RUN_SECONDS_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 21600)
HTTP_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
TERMINAL_STATES = tuple(s.value for s in JobState if s.is_terminal)
# kombu's Redis transport keeps a queue's messages in a list named after it, plus one list
# per non-zero priority step ("<queue>\x06\x16<priority>").
_KOMBU_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


# ---- the job store ---------------------------------------------------------------------------


@dataclass
class JobGroup:
    """Aggregates of the jobs of one kind in one state."""

    count: int = 0
    bytes_done: int = 0
    run_count: int = 0  # jobs with both a start and an end
    run_seconds_sum: float = 0.0
    run_buckets: list[int] = field(default_factory=lambda: [0] * len(RUN_SECONDS_BUCKETS))
    oldest_created_at: datetime | None = None
    oldest_heartbeat_at: datetime | None = None
    stale: int = 0  # running jobs whose heartbeat is older than worker_lost_after


def _run_seconds(engine: Engine) -> Any:
    """SQL: seconds from a job's start to its end (NULL when either is missing)."""
    if engine.dialect.name == "postgresql":
        return func.extract("epoch", Job.finished_at - Job.started_at)
    # SQLite keeps timestamps as text; julianday has ~50 µs resolution at today's dates, so
    # a 15 s run can come out as 15.00000x and miss the le="15" bucket: round to the ms.
    return func.round(
        (func.julianday(Job.finished_at) - func.julianday(Job.started_at)) * 86400.0, 3
    )


def read_job_groups(
    engine: Engine, *, now: datetime, worker_lost_after: timedelta
) -> dict[tuple[str, str], JobGroup]:
    """(kind, state) → aggregates, in one query over the jobs table (pending jobs excluded)."""
    run = case(
        (Job.state.in_(TERMINAL_STATES) & Job.started_at.is_not(None), _run_seconds(engine)),
        else_=None,
    )
    ones = [func.sum(case((run <= bound, 1), else_=0)) for bound in RUN_SECONDS_BUCKETS]
    stale = case(
        ((Job.state == JobState.RUNNING.value) & (Job.heartbeat_at < now - worker_lost_after), 1),
        else_=0,
    )
    query = (
        select(
            Job.kind,
            Job.state,
            func.count(),
            func.coalesce(func.sum(Job.bytes_done), 0),
            func.count(run),
            func.coalesce(func.sum(cast(run, Float)), 0.0),
            func.min(Job.created_at),
            func.min(Job.heartbeat_at),
            func.sum(stale),
            *ones,
        )
        .where(Job.state != PENDING)
        .group_by(Job.kind, Job.state)
    )
    groups: dict[tuple[str, str], JobGroup] = {}
    with engine.connect() as conn:
        for row in conn.execute(query):
            kind, state, count, nbytes, runs, run_sum, created, heartbeat, n_stale = row[:9]
            groups[(kind, state)] = JobGroup(
                count=int(count),
                bytes_done=int(nbytes or 0),
                run_count=int(runs),
                run_seconds_sum=float(run_sum or 0.0),
                run_buckets=[int(n or 0) for n in row[9:]],
                oldest_created_at=created,
                oldest_heartbeat_at=heartbeat,
                stale=int(n_stale or 0),
            )
    return groups


def _age(now: datetime, then: datetime | None) -> float:
    return max(0.0, (now - then).total_seconds()) if then is not None else 0.0


class JobStoreCollector:
    """Everything ``/metrics`` derives at scrape time: job store, broker, worker keys.

    ``service`` is looked up on each scrape (it exists once the app has started).
    """

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self._redis: Any = None
        self._redis_url: str | None = None

    def describe(self) -> list[Metric]:
        return []  # collected on demand only (never at registration)

    def collect(self) -> Iterator[Metric]:
        service: Service | None = getattr(self.app.state, "service", None)
        if service is None:
            return
        start = time.perf_counter()
        up = GaugeMetricFamily(
            "weightsmith_metrics_source_up",
            "Whether /metrics could read this source on this scrape (1) or not (0)",
            labels=["source"],
        )
        now = datetime.now(UTC)
        try:
            groups = read_job_groups(
                service.engine,
                now=now,
                worker_lost_after=timedelta(seconds=service.settings.worker_lost_after),
            )
        except Exception as e:
            log.warning("metrics: cannot read the job store: %s", e)
            up.add_metric(["job_store"], 0)
        else:
            up.add_metric(["job_store"], 1)
            yield from job_metrics(groups, now)
        broker_url = service.settings.broker_url
        if is_redis_url(broker_url):
            assert broker_url is not None
            try:
                yield from self._redis_metrics(broker_url)
            except Exception as e:
                log.warning("metrics: cannot read the broker's Redis: %s", e)
                up.add_metric(["broker"], 0)
            else:
                up.add_metric(["broker"], 1)
        yield up
        took = GaugeMetricFamily(
            "weightsmith_metrics_scrape_duration_seconds",
            "Time this scrape spent reading the job store and the broker",
        )
        took.add_metric([], time.perf_counter() - start)
        yield took

    def _client(self, url: str) -> Any:
        if self._redis is None or self._redis_url != url:
            self._redis, self._redis_url = redis_client(url), url
        return self._redis

    def _redis_metrics(self, url: str) -> Iterator[Metric]:
        client = self._client(url)
        queues = (DEFAULT_QUEUE, GPU_QUEUE)
        pipe = client.pipeline(transaction=False)
        for queue in queues:
            for suffix in _KOMBU_PRIORITY_SUFFIXES:
                pipe.llen(queue + suffix)
        lengths = pipe.execute()
        waiting = GaugeMetricFamily(
            "weightsmith_broker_queue_messages",
            "Messages waiting in the broker's queue (not yet taken by a worker)",
            labels=["queue"],
        )
        n = len(_KOMBU_PRIORITY_SUFFIXES)
        for i, queue in enumerate(queues):
            waiting.add_metric([queue], sum(int(x) for x in lengths[i * n : (i + 1) * n]))
        yield waiting

        beats = read_worker_beats(client)
        now = time.time()
        alive = GaugeMetricFamily(
            "weightsmith_workers_alive",
            "Celery workers whose heartbeat key in Redis has not expired",
        )
        alive.add_metric([], len(beats))
        yield alive
        age = GaugeMetricFamily(
            "weightsmith_worker_heartbeat_age_seconds",
            "Seconds since each live worker's last heartbeat",
            labels=["worker"],
        )
        for beat in beats:
            age.add_metric([beat.name], max(0.0, now - beat.at))
        yield age


def job_metrics(groups: dict[tuple[str, str], JobGroup], now: datetime) -> Iterator[Metric]:
    """The metric families of the job store's aggregates (every kind × state, zeros too)."""
    kinds = [k.value for k in JobKind]
    states = [s.value for s in JobState]
    empty = JobGroup()

    jobs = GaugeMetricFamily(
        "weightsmith_jobs", "Jobs in each state, from the job store", labels=["kind", "state"]
    )
    for kind in kinds:
        for state in states:
            jobs.add_metric([kind, state], groups.get((kind, state), empty).count)
    yield jobs

    run = HistogramMetricFamily(
        "weightsmith_job_run_seconds",
        "Finished jobs' run time, first start to end (retries included), by final state",
        labels=["kind", "state"],
    )
    for kind in kinds:
        for state in TERMINAL_STATES:
            g = groups.get((kind, state), empty)
            buckets = [
                (_bound(b), float(n))
                for b, n in zip(RUN_SECONDS_BUCKETS, g.run_buckets, strict=True)
            ]
            buckets.append(("+Inf", float(g.run_count)))
            run.add_metric([kind, state], buckets, g.run_seconds_sum)
    yield run

    processed = CounterMetricFamily(
        "weightsmith_processed_bytes",
        "Tensor bytes processed by succeeded jobs",
        labels=["kind"],
    )
    for kind in kinds:
        processed.add_metric([kind], groups.get((kind, JobState.SUCCEEDED.value), empty).bytes_done)
    yield processed

    queued = [g for (_, state), g in groups.items() if state == JobState.QUEUED.value]
    depth = GaugeMetricFamily("weightsmith_queue_depth", "Jobs queued, waiting for a worker")
    depth.add_metric([], sum(g.count for g in queued))
    yield depth
    oldest = GaugeMetricFamily(
        "weightsmith_oldest_queued_job_age_seconds",
        "Age of the oldest queued job (0 when none)",
    )
    created = [g.oldest_created_at for g in queued if g.oldest_created_at is not None]
    oldest.add_metric([], _age(now, min(created)) if created else 0.0)
    yield oldest

    running = [g for (_, state), g in groups.items() if state == JobState.RUNNING.value]
    stale = GaugeMetricFamily(
        "weightsmith_running_jobs_stale",
        "Running jobs with no heartbeat for WEIGHTSMITH_WORKER_LOST_AFTER (worker lost)",
    )
    stale.add_metric([], sum(g.stale for g in running))
    yield stale
    beat = GaugeMetricFamily(
        "weightsmith_running_job_heartbeat_age_max_seconds",
        "Seconds since the stalest running job's last heartbeat (0 when none runs)",
    )
    beats = [g.oldest_heartbeat_at for g in running if g.oldest_heartbeat_at is not None]
    beat.add_metric([], _age(now, min(beats)) if beats else 0.0)
    yield beat


def _bound(b: float) -> str:
    return str(float(b))


# ---- per-request: HTTP metrics and the log context -------------------------------------------

_JOB_PATH = re.compile(r"^/v1/jobs/(?P<id>[^/]{1,64})(?:/|$)")


class RequestObservability:
    """ASGI middleware: counts and times requests by route template, and gives each request
    a log context holding the job id it names (path, or ``Location`` of a new job) and,
    once authenticated, the tenant (see :func:`log_tenant`)."""

    def __init__(self, app: ASGIApp, *, requests: Counter, latency: Histogram) -> None:
        self.app = app
        self.requests = requests
        self.latency = latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        match = _JOB_PATH.match(scope.get("path", ""))
        start = time.perf_counter()
        status = 500
        with log_context(job_id=match.group("id") if match else None) as ctx:

            async def send_observed(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                    _job_from_location(ctx, message)
                await send(message)

            try:
                await self.app(scope, receive, send_observed)
            finally:
                route = getattr(scope.get("route"), "path", None) or "<unmatched>"
                method = scope.get("method", "")
                self.requests.labels(method, route, str(status)).inc()
                self.latency.labels(method, route).observe(time.perf_counter() - start)


def _job_from_location(ctx: LogContext, message: Message) -> None:
    if ctx.job_id is not None:
        return
    for name, value in message.get("headers", ()):
        if name.lower() == b"location":
            found = _JOB_PATH.match(value.decode("latin-1"))
            if found:
                ctx.job_id = found.group("id")


async def _bind_tenant(principal: PrincipalDep) -> None:
    # async: runs in the request's own context (a sync dependency gets a copy of it).
    ctx = current_log_context()
    if ctx is not None:
        ctx.tenant = principal.tenant


log_tenant = Depends(_bind_tenant)
"""Router dependency: the authenticated tenant goes into the request's log context. It
reuses the route's own authentication (FastAPI resolves a dependency once per request)."""


def install_metrics(app: FastAPI) -> CollectorRegistry:
    """``GET /metrics`` and the request middleware, with a registry of this app's own."""
    from app.routes import metrics as metrics_routes

    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(JobStoreCollector(app))
    build = GaugeMetricFamily("weightsmith_build_info", "weightsmith's version", labels=["version"])
    build.add_metric([weightsmith.__version__], 1)
    registry.register(_Constant([build]))
    requests = Counter(
        "weightsmith_http_requests",
        "HTTP requests answered by this API process",
        ["method", "route", "status"],
        registry=registry,
    )
    latency = Histogram(
        "weightsmith_http_request_duration_seconds",
        "Time to answer an HTTP request (this API process), by route template",
        ["method", "route"],
        buckets=HTTP_SECONDS_BUCKETS,
        registry=registry,
    )
    app.state.metrics_registry = registry
    app.add_middleware(RequestObservability, requests=requests, latency=latency)
    app.include_router(metrics_routes.router)
    return registry


class _Constant:
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self.metrics
