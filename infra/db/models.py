"""Tables of the job store: tenants, their API keys and grants, and jobs.

The schema is created and changed only by the Alembic migrations in ``migrations/versions``
(a test checks that these models and the migrations agree). Timestamps are stored in UTC and
always come back timezone-aware, on SQLite too.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from schemas.jobs import (
    ArtifactRef,
    JobError,
    JobKind,
    JobProgress,
    JobState,
    JobView,
    PublishView,
)

# Stable constraint names: Alembic's batch mode (SQLite) recreates tables and must find them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# A job being submitted: its Idempotency-Key is taken but its references are not pinned yet.
# Never shown by the API (schemas.jobs.JobState has no such state).
PENDING = "pending"
DB_JOB_STATES = (PENDING, *(s.value for s in JobState))

JSONDocument = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite keeps no offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the job store; use datetime.now(UTC)")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Tenant(Base):
    """A tenant: owns API keys, jobs, artifacts, schedules, webhooks and its Hub token.

    Secrets are stored sealed (infra.secrets): ``hub_token`` is ``enc:v1:…``, never plain.
    """

    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # Disabled: its keys stop working, its schedules stop firing, its webhooks are held.
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    hub_token: Mapped[str | None] = mapped_column(Text, default=None)
    hub_token_set_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    # The operator granted this tenant the service's own Hub token (WEIGHTSMITH_HF_TOKEN).
    use_operator_hub_token: Mapped[bool] = mapped_column(Boolean, default=False)


class S3Grant(Base):
    """An ``s3://bucket/prefix/`` location the operator lets a tenant read, with the
    credentials to read it: ``keys`` (an access key and its sealed secret), ``anonymous``
    (a public bucket) or ``store`` (the artifact store's own credentials, for another bucket
    on the same server; never the artifact bucket itself)."""

    __tablename__ = "s3_grants"
    __table_args__ = (
        CheckConstraint("credentials IN ('keys', 'anonymous', 'store')", name="credentials"),
        Index("ix_s3_grants_tenant_bucket", "tenant_id", "bucket"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    bucket: Mapped[str] = mapped_column(String(63))
    prefix: Mapped[str] = mapped_column(String(1024))  # "" (whole bucket) or ending in "/"
    endpoint: Mapped[str | None] = mapped_column(Text, default=None)  # None: AWS
    region: Mapped[str | None] = mapped_column(String(64), default=None)
    credentials: Mapped[str] = mapped_column(String(16))
    access_key_id: Mapped[str | None] = mapped_column(String(256), default=None)
    secret_access_key: Mapped[str | None] = mapped_column(Text, default=None)  # sealed
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class HubPushGrant(Base):
    """A Hugging Face Hub namespace (user or organisation) a tenant may push artifacts to."""

    __tablename__ = "hub_push_grants"

    tenant_id: Mapped[int] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    namespace: Mapped[str] = mapped_column(String(96), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ApiKey(Base):
    """An API key, ``wsk_<prefix>_<secret>``: the prefix is public, only the secret's sha256
    is stored (and looked up: see infra.db.keys)."""

    __tablename__ = "api_keys"
    __table_args__ = (Index("ix_api_keys_secret_sha256", "secret_sha256", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(f"state IN {DB_JOB_STATES!r}", name="state"),
        CheckConstraint(f"kind IN {tuple(k.value for k in JobKind)!r}", name="kind"),
        UniqueConstraint("tenant_id", "idempotency_key"),
        # Listing newest first per tenant, optionally by state; kind is filtered on the fly.
        Index("ix_jobs_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_jobs_tenant_state_created", "tenant_id", "state", "created_at", "id"),
        # Finding jobs whose worker was lost (running, heartbeat old).
        Index("ix_jobs_state_heartbeat", "state", "heartbeat_at"),
        # The runs of a schedule, newest first.
        Index("ix_jobs_schedule_created", "schedule_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    recipe: Mapped[dict[str, Any]] = mapped_column(JSONDocument)
    recipe_hash: Mapped[str] = mapped_column(String(64))
    artifact_name: Mapped[str] = mapped_column(String(100))
    callback_url: Mapped[str | None] = mapped_column(Text, default=None)
    # schemas.jobs.PublishView as a dict: the PublishOptions of the request (where else to push
    # the artifact) and, once pushed, "hub_commit"; or None.
    publish: Mapped[dict[str, Any] | None] = mapped_column(JSONDocument, default=None)
    schedule_id: Mapped[str | None] = mapped_column(String(36), default=None)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), default=None)
    request_hash: Mapped[str] = mapped_column(String(64))

    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker_id: Mapped[str | None] = mapped_column(String(255), default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)

    phase: Mapped[str | None] = mapped_column(String(64), default=None)
    tensors_done: Mapped[int] = mapped_column(Integer, default=0)
    tensors_total: Mapped[int | None] = mapped_column(Integer, default=None)
    bytes_done: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_total: Mapped[int | None] = mapped_column(BigInteger, default=None)

    error: Mapped[dict[str, Any] | None] = mapped_column(JSONDocument, default=None)
    artifact_version: Mapped[int | None] = mapped_column(Integer, default=None)
    artifact_uri: Mapped[str | None] = mapped_column(Text, default=None)

    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

    def to_view(self) -> JobView:
        """The API's view of this job. Not for a pending job (it has no public state)."""
        artifact = None
        if self.artifact_version is not None and self.artifact_uri is not None:
            artifact = ArtifactRef(
                name=self.artifact_name, version=self.artifact_version, uri=self.artifact_uri
            )
        return JobView(
            id=self.id,
            kind=JobKind(self.kind),
            state=JobState(self.state),
            artifact_name=self.artifact_name,
            recipe=self.recipe,
            progress=JobProgress(
                phase=self.phase,
                tensors_done=self.tensors_done,
                tensors_total=self.tensors_total,
                bytes_done=self.bytes_done,
                bytes_total=self.bytes_total,
            ),
            created_at=self.created_at,
            started_at=self.started_at,
            finished_at=self.finished_at,
            attempts=self.attempts,
            max_attempts=self.max_attempts,
            cancel_requested=self.cancel_requested,
            error=JobError.model_validate(self.error) if self.error is not None else None,
            artifact=artifact,
            callback_url=self.callback_url,
            publish=PublishView.model_validate(self.publish) if self.publish else None,
            schedule_id=self.schedule_id,
        )


class JobPart(Base):
    """One part of a merge split across workers, for one step (a statistics pass or the
    merge of its tensor range): a unit of work with its own claim, fencing token
    (``worker_id``), heartbeat, attempts and outcome (infra.db.parts). ``job_attempt``
    fences a whole attempt of the job: a new attempt of the job replaces its parts."""

    __tablename__ = "job_parts"
    __table_args__ = (
        CheckConstraint("state IN ('queued', 'running', 'done', 'failed')", name="state"),
    )

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    part: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_attempt: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    # what the part does: its shard range, the seed, where its results go (JSON)
    spec: Mapped[dict[str, Any]] = mapped_column(JSONDocument)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    worker_id: Mapped[str | None] = mapped_column(String(255), default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    tensors_done: Mapped[int] = mapped_column(Integer, default=0)
    bytes_done: Mapped[int] = mapped_column(BigInteger, default=0)
    # a finished part's output: its files with (size, sha256, object key), notes, partials
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONDocument, default=None)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONDocument, default=None)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
