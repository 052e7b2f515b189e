"""The weightsmith REST service (FastAPI). Torch-free: it never imports ``workers``.

Run it with ``uvicorn --factory app.main:create_app`` (settings from the environment), or
through ``weightsmith serve``, which passes an in-process queue its embedded worker
listens on. OpenAPI: ``/docs`` (Swagger UI), ``/redoc`` and ``/openapi.json``; the docs'
scripts and styles are served from the package, so they work offline.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool

import weightsmith
from app.console import install_console
from app.limits import RequestLimits
from app.metrics import install_metrics, log_tenant
from app.problems import install_problem_handlers
from app.routes import artifacts, health, jobs, schedules, tenant, uploads, webhooks
from infra.logging import configure_logging
from infra.queue import JobQueue
from infra.settings import Settings, get_settings
from service.context import Service

DOCS_ASSETS_URL = "/docs-assets"  # Swagger UI and ReDoc files, served by the app itself


def create_app(settings: Settings | None = None, *, queue: JobQueue | None = None) -> FastAPI:
    """The API. At startup it migrates the database to head and makes sure an API key
    exists (see :func:`infra.db.bootstrap_api_key`); ``queue`` defaults to Celery when a
    broker is configured, else an in-process queue (``app.state.service.queue``)."""
    resolved = settings if settings is not None else get_settings()
    if settings is None:  # a process of its own (uvicorn --factory): log as configured
        configure_logging(resolved)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = await run_in_threadpool(Service.start, resolved, queue)
        app.state.service = service
        try:
            yield
        finally:
            await run_in_threadpool(service.close)

    # /docs (Swagger UI) and /redoc load their scripts and styles from the app (files of the
    # fastapi-offline package), not from a CDN: an offline deployment shows its docs too.
    app = FastAPIOffline(
        title="weightsmith",
        version=weightsmith.__version__,
        summary="Merge and patch LLM checkpoints; publish immutable, versioned artifacts.",
        lifespan=lifespan,
        static_url=DOCS_ASSETS_URL,
    )
    install_problem_handlers(app)
    app.include_router(health.router)
    app.include_router(jobs.router, dependencies=[log_tenant])
    app.include_router(artifacts.router, dependencies=[log_tenant])
    app.include_router(webhooks.router, dependencies=[log_tenant])
    app.include_router(schedules.router, dependencies=[log_tenant])
    app.include_router(webhooks.job_deliveries_router, dependencies=[log_tenant])
    app.include_router(tenant.router, dependencies=[log_tenant])
    app.include_router(uploads.router, dependencies=[log_tenant])
    install_console(app)  # /ui: the read-only web console (static files calling /v1)
    # Body limit and authentication before routing and parsing; added before the metrics
    # middleware, which thus wraps it and counts its 401 and 413 answers too.
    app.add_middleware(RequestLimits, settings=resolved)
    install_metrics(app)  # GET /metrics, request metrics and log context
    return app
