"""The job store's database: tables, migrations, jobs and API keys (SQLAlchemy 2, Alembic).

At service start::

    settings = get_settings()
    upgrade_database(settings.database_url)       # migrations to head; safe to run concurrently
    engine = make_engine(settings.database_url)
    jobs = JobStore.from_settings(settings, engine)
    keys = ApiKeys(engine)
    bootstrap_api_key(keys, settings)
"""

from infra.db.engine import make_engine, normalize_database_url
from infra.db.jobstore import (
    IdempotencyKeyInFlight,
    IdempotencyKeyReused,
    InvalidCursor,
    JobNotPending,
    JobPage,
    JobStore,
    JobStoreError,
    JobSubmission,
)
from infra.db.keys import ApiKeyInfo, ApiKeys, InvalidApiKey, bootstrap_api_key, parse_api_key
from infra.db.migrate import current_revision, head_revision, upgrade_database
from infra.db.models import ApiKey, Job, Tenant
from infra.db.schedules import ScheduleStore  # noqa: F401  (its tables join the metadata)
from infra.db.webhooks import WebhookStore  # noqa: F401  (its tables join the metadata)

__all__ = [
    "ApiKey",
    "ApiKeyInfo",
    "ApiKeys",
    "IdempotencyKeyInFlight",
    "IdempotencyKeyReused",
    "InvalidApiKey",
    "InvalidCursor",
    "Job",
    "JobNotPending",
    "JobPage",
    "JobStore",
    "JobStoreError",
    "JobSubmission",
    "Tenant",
    "bootstrap_api_key",
    "current_revision",
    "head_revision",
    "make_engine",
    "normalize_database_url",
    "parse_api_key",
    "upgrade_database",
]
