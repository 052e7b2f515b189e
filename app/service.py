"""What the routes need, built once per app and injected with ``Depends``.

:class:`Service` holds the settings, the job store, the API keys, the object store and the
queue. It is created by :func:`app.main.create_app` at startup (after migrating the
database) and reached from a request through ``request.app.state.service``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from app.problems import ApiProblem
from infra.db import ApiKeys, JobStore, bootstrap_api_key, make_engine, upgrade_database
from infra.db.engine import normalize_database_url
from infra.db.tenants import TenantStore
from infra.db.webhooks import WebhookStore
from infra.queue import CeleryQueue, InProcessQueue, JobQueue
from infra.secrets import SecretBox, private_directory
from infra.settings import Settings
from infra.storage import ObjectStore, open_store
from infra.tenancy import TenantAccess

log = logging.getLogger("weightsmith.api")


@dataclass
class Service:
    settings: Settings
    engine: Engine
    jobs: JobStore
    keys: ApiKeys
    store: ObjectStore
    queue: JobQueue
    box: SecretBox
    tenants: TenantStore
    webhooks: WebhookStore

    @classmethod
    def start(cls, settings: Settings, queue: JobQueue | None = None) -> Service:
        """Connect everything, bring the database schema to head, make sure a key exists,
        and seal any secret stored before secrets were encrypted."""
        private_directory(settings.data_dir)
        engine = _engine(settings)
        upgrade_database(engine)
        service = cls.connect(settings, engine, queue)
        bootstrap_api_key(service.keys, settings)
        service.webhooks.seal_legacy_secrets()
        return service

    @classmethod
    def connect(cls, settings: Settings, engine: Engine, queue: JobQueue | None = None) -> Service:
        """The service's parts on a migrated database (no migration, no bootstrap key)."""
        box = SecretBox.from_settings(settings)
        return cls(
            settings=settings,
            engine=engine,
            jobs=JobStore.from_settings(settings, engine),
            keys=ApiKeys(engine, cache_seconds=settings.auth_cache_seconds),
            store=open_store(settings.object_store_url),
            queue=queue if queue is not None else default_queue(settings),
            box=box,
            tenants=TenantStore(engine, box),
            webhooks=WebhookStore(engine, box),
        )

    def access(self, tenant_id: int) -> TenantAccess:
        """What the tenant may name, and the Hub token its requests use (infra.tenancy)."""
        token = self.settings.hf_token
        return self.tenants.access(
            tenant_id, operator_hub_token=token.get_secret_value() if token else None
        )

    def close(self) -> None:
        self.engine.dispose()


def _engine(settings: Settings) -> Engine:
    if normalize_database_url(settings.database_url).get_backend_name() == "sqlite":
        return make_engine(settings.database_url)
    # Route handlers run in a thread pool (40 threads): let most of them hold a connection.
    return make_engine(settings.database_url, pool_size=10, max_overflow=30)


def default_queue(settings: Settings) -> JobQueue:
    """Celery when a broker is configured; otherwise an in-process queue that the embedded
    worker registers with (jobs wait in it until then)."""
    if settings.broker_url is not None:
        return CeleryQueue(
            settings.broker_url,
            gpu_kinds=settings.gpu_kinds,
            visibility_timeout=settings.visibility_timeout,
        )
    return InProcessQueue()


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant that owns the bearer API key."""

    tenant_id: int
    tenant: str


async def get_service(request: Request) -> Service:  # async: no thread-pool hop
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="an API key, `wsk_<prefix>_<secret>` (`weightsmith keys create --tenant NAME`)",
)


PRINCIPAL_SCOPE_KEY = "weightsmith.principal"
"""Where :class:`app.limits.RequestLimits` leaves the caller it authenticated (ASGI scope)."""


def bearer_token(authorization: str | None) -> str | None:
    """The credentials of an ``Authorization: Bearer …`` header value, else None."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


async def authenticate(service: Service, authorization: str | None) -> Principal:
    """The tenant owning the bearer key, or the 401 problem to answer (the key lookup is
    a database call: it runs in the thread pool)."""
    challenge = {"WWW-Authenticate": 'Bearer realm="weightsmith"'}
    token = bearer_token(authorization)
    if token is None:
        raise ApiProblem(
            401,
            "this route needs an API key: send 'Authorization: Bearer wsk_…'",
            headers=challenge,
        )
    tenant = await run_in_threadpool(service.keys.authenticate, token)
    if tenant is None:
        challenge["WWW-Authenticate"] += ', error="invalid_token"'
        raise ApiProblem(401, "the API key is malformed, unknown or revoked", headers=challenge)
    return Principal(tenant_id=tenant.id, tenant=tenant.name)


async def current_principal(
    request: Request,
    service: ServiceDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller, as authenticated by the request middleware before the body was read.
    (``credentials`` documents the scheme in OpenAPI; it is read again only for a route the
    middleware does not cover, which then authenticates here.)"""
    found = request.scope.get(PRINCIPAL_SCOPE_KEY)
    if isinstance(found, Principal):
        return found
    header = f"Bearer {credentials.credentials}" if credentials is not None else None
    return await authenticate(service, header)


PrincipalDep = Annotated[Principal, Depends(current_principal)]
