"""The service's parts, built once per process: settings, the job store, API keys, tenants,
the object store, the queue and the secret box. The API makes one at start-up
(:meth:`Service.start`: migrations, bootstrap key); workers and the schedule ticker connect
to an already migrated database (:meth:`Service.connect`)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine

from infra.db import ApiKeys, JobStore, bootstrap_api_key, make_engine, upgrade_database
from infra.db.engine import normalize_database_url
from infra.db.tenants import TenantStore
from infra.db.webhooks import WebhookStore
from infra.queue import CeleryQueue, InProcessQueue, JobQueue
from infra.secrets import SecretBox, private_directory
from infra.settings import Settings
from infra.storage import ObjectStore, open_store
from schemas.tenants import TenantAccess


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
        """What the tenant may name, and the Hub token its requests use (service.tenancy)."""
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
