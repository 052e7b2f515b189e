"""Webhook tables and their rules: subscriptions, signing secrets, the outbox, attempts.

**Outbox.** A job's events are rows of ``webhook_messages``, written by
:func:`record_job_event` in the *same transaction* as the job's state change (the job store
calls it from its transitions): the event exists exactly when the transition committed,
even if the process dies a moment later. One row per event and destination (the job's
``callback_url``, and each of the tenant's subscriptions to that event type); its id is the
Standard Webhooks message id (``webhook-id``), and its body is fixed when written, so every
retry sends the same bytes.

**Claiming.** Dispatchers (service.webhooks) take due rows with :meth:`WebhookStore.claim_due`:
``SELECT … FOR UPDATE SKIP LOCKED`` on PostgreSQL, then a guarded ``UPDATE`` that pushes
``next_attempt_at`` a lease ahead and stamps a claim token. Two dispatchers never get the
same row for the same attempt; if one dies mid-attempt, the row is due again when the lease
ends (at-least-once: receivers deduplicate on ``webhook-id``, as Standard Webhooks asks).
Results are written only under the claim's token.

**Secrets** must sign, so they are stored sealed (encrypted with the keys of
:mod:`infra.secrets`), not hashed: a copy of the database alone does not reveal them. A
subscription's secret is shown once, when it is created. While a tenant is disabled its
deliveries are held (they go out once it is enabled again). Deliveries to a job's
``callback_url`` are signed with the tenant's secret (``webhook_secrets``), made on first use
and readable by the tenant (``GET /v1/webhooks/secret``).
"""

from __future__ import annotations

import base64
import secrets
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    Engine,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    delete,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from infra.db.models import Base, Job, JSONDocument, Tenant, UTCDateTime
from infra.secrets import SecretBox
from schemas.webhooks import (
    CALLBACK_EVENTS,
    SECRET_PREFIX,
    DeliveryState,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEvent,
    WebhookEventType,
)

PENDING = DeliveryState.PENDING.value
SUCCEEDED = DeliveryState.SUCCEEDED.value
FAILED = DeliveryState.FAILED.value
DELIVERY_STATES = (PENDING, SUCCEEDED, FAILED)

MAX_ERROR_CHARS = 500
MAX_DELIVERIES_PAGE = 200


def new_secret() -> str:
    """A signing secret, ``whsec_`` + base64 of 32 random bytes (Standard Webhooks: 24–64)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


class WebhookSubscriptionRow(Base):
    __tablename__ = "webhook_subscriptions"
    __table_args__ = (Index("ix_webhook_subscriptions_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(Text)
    events: Mapped[list[str]] = mapped_column(JSONDocument)
    description: Mapped[str | None] = mapped_column(String(500), default=None)
    secret: Mapped[str] = mapped_column(Text)  # sealed (infra.secrets)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class WebhookSecretRow(Base):
    """The tenant's secret for signing deliveries to its jobs' callback URLs."""

    __tablename__ = "webhook_secrets"

    tenant_id: Mapped[int] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    secret: Mapped[str] = mapped_column(Text)  # sealed (infra.secrets)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class WebhookMessage(Base):
    """One event for one destination (the outbox row); ``id`` is the ``webhook-id``."""

    __tablename__ = "webhook_messages"
    __table_args__ = (
        CheckConstraint(f"state IN {DELIVERY_STATES!r}", name="state"),
        # The dispatchers' query: due pending messages, oldest due first.
        Index("ix_webhook_messages_state_next", "state", "next_attempt_at"),
        Index("ix_webhook_messages_job_created", "job_id", "created_at"),
        Index("ix_webhook_messages_subscription_created", "subscription_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    # None: the job's own callback_url (signed with the tenant's secret).
    subscription_id: Mapped[str | None] = mapped_column(
        ForeignKey("webhook_subscriptions.id", ondelete="CASCADE"), default=None
    )
    event_type: Mapped[str] = mapped_column(String(32))
    url: Mapped[str] = mapped_column(Text)
    body: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    claim_token: Mapped[str | None] = mapped_column(String(32), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)


class WebhookAttemptRow(Base):
    __tablename__ = "webhook_attempts"
    __table_args__ = (UniqueConstraint("message_id", "attempt"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(ForeignKey("webhook_messages.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    duration_ms: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)


# ---- the outbox write, inside the job store's transitions ----------------------------------


def record_job_event(session: Session, job: Job, now: datetime) -> int:
    """Write the outbox rows announcing that ``job`` entered its current state; returns how
    many. Call it in the transaction that changed the state (the job as RETURNING gave it)."""
    event = WebhookEventType.for_state(job.state)
    targets: list[tuple[str | None, str]] = []
    if job.callback_url and event in CALLBACK_EVENTS:
        targets.append((None, job.callback_url))
    subscriptions = session.execute(
        select(
            WebhookSubscriptionRow.id, WebhookSubscriptionRow.url, WebhookSubscriptionRow.events
        ).where(WebhookSubscriptionRow.tenant_id == job.tenant_id)
    )
    for row in subscriptions:
        if event.value in row.events:
            targets.append((row.id, row.url))
    if not targets:
        return 0
    body = WebhookEvent(type=event, timestamp=now, data=job.to_view()).model_dump_json()
    for sub_id, url in targets:
        session.add(
            WebhookMessage(
                id=new_message_id(),
                tenant_id=job.tenant_id,
                job_id=job.id,
                subscription_id=sub_id,
                event_type=event.value,
                url=url,
                body=body,
                state=PENDING,
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
        )
    return len(targets)


# ---- the store -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimedMessage:
    """A message taken for one attempt: send it, then call WebhookStore.record_attempt."""

    id: str
    tenant_id: int
    subscription_id: str | None
    url: str
    body: str
    attempt: int  # 1 for the first try
    claim_token: str


@dataclass(frozen=True)
class AttemptOutcome:
    started_at: datetime
    duration_ms: int
    status_code: int | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def _utcnow() -> datetime:
    return datetime.now(UTC)


class WebhookStore:
    """Subscriptions, secrets and deliveries in the job store's database. Thread-safe."""

    def __init__(
        self, engine: Engine, box: SecretBox, *, clock: Callable[[], datetime] = _utcnow
    ) -> None:
        """``box`` seals the signing secrets before they reach the database and opens them
        for the API (shown once) and the dispatcher (signing)."""
        self.engine = engine
        self.box = box
        self._clock = clock
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    # ---- subscriptions and secrets (API side) --------------------------------------------

    def create_subscription(
        self, tenant_id: int, url: str, events: Sequence[str], description: str | None = None
    ) -> WebhookSubscriptionRow:
        """The new subscription; its ``secret`` attribute is the plaintext (to show once),
        the database holds it sealed."""
        secret = new_secret()
        row = WebhookSubscriptionRow(
            id=str(uuid.uuid4()),
            tenant_id=tenant_id,
            url=url,
            events=sorted({WebhookEventType(e).value for e in events}),
            description=description,
            secret=self.box.seal(secret),
            created_at=self._clock(),
        )
        with self._sessions.begin() as s:
            s.add(row)
        row.secret = secret  # detached (expire_on_commit=False): not written back
        return row

    def list_subscriptions(self, tenant_id: int) -> list[WebhookSubscriptionRow]:
        with self._sessions() as s:
            return list(
                s.scalars(
                    select(WebhookSubscriptionRow)
                    .where(WebhookSubscriptionRow.tenant_id == tenant_id)
                    .order_by(WebhookSubscriptionRow.created_at, WebhookSubscriptionRow.id)
                )
            )

    def get_subscription(
        self, tenant_id: int, subscription_id: str
    ) -> WebhookSubscriptionRow | None:
        with self._sessions() as s:
            return s.scalar(
                select(WebhookSubscriptionRow).where(
                    WebhookSubscriptionRow.id == subscription_id,
                    WebhookSubscriptionRow.tenant_id == tenant_id,
                )
            )

    def delete_subscription(self, tenant_id: int, subscription_id: str) -> bool:
        """Delete the subscription with its delivery log (pending deliveries are dropped)."""
        with self._sessions.begin() as s:
            deleted = s.scalar(
                delete(WebhookSubscriptionRow)
                .where(
                    WebhookSubscriptionRow.id == subscription_id,
                    WebhookSubscriptionRow.tenant_id == tenant_id,
                )
                .returning(WebhookSubscriptionRow.id)
            )
        return deleted is not None

    def signing_secret(self, tenant_id: int) -> WebhookSecretRow:
        """The tenant's callback signing secret, created on first use (race-safe). The
        row's ``secret`` is the plaintext; the database holds it sealed."""
        for _ in range(3):
            with self._sessions() as s:
                row = s.get(WebhookSecretRow, tenant_id)
            if row is not None:
                row.secret = self.box.open(row.secret)  # detached: not written back
                return row
            secret = new_secret()
            try:
                with self._sessions.begin() as s:
                    row = WebhookSecretRow(
                        tenant_id=tenant_id, secret=self.box.seal(secret), created_at=self._clock()
                    )
                    s.add(row)
                row.secret = secret
                return row
            except IntegrityError:
                continue  # made concurrently: read it
        raise RuntimeError(f"could not create the webhook secret of tenant {tenant_id}")

    # ---- delivery logs -------------------------------------------------------------------

    def deliveries_of_subscription(
        self, tenant_id: int, subscription_id: str, *, limit: int = 50
    ) -> list[WebhookDelivery]:
        return self._deliveries(
            (
                WebhookMessage.tenant_id == tenant_id,
                WebhookMessage.subscription_id == subscription_id,
            ),
            limit,
        )

    def deliveries_of_job(
        self, tenant_id: int, job_id: str, *, limit: int = 50
    ) -> list[WebhookDelivery]:
        """Every delivery of the job's events: to its callback_url and to subscriptions."""
        return self._deliveries(
            (WebhookMessage.tenant_id == tenant_id, WebhookMessage.job_id == job_id), limit
        )

    def _deliveries(self, where: tuple[Any, ...], limit: int) -> list[WebhookDelivery]:
        limit = max(1, min(limit, MAX_DELIVERIES_PAGE))
        with self._sessions() as s:
            messages = list(
                s.scalars(
                    select(WebhookMessage)
                    .where(*where)
                    .order_by(WebhookMessage.created_at.desc(), WebhookMessage.id.desc())
                    .limit(limit)
                )
            )
            attempts: dict[str, list[WebhookAttempt]] = {m.id: [] for m in messages}
            if messages:
                for a in s.scalars(
                    select(WebhookAttemptRow)
                    .where(WebhookAttemptRow.message_id.in_(list(attempts)))
                    .order_by(WebhookAttemptRow.message_id, WebhookAttemptRow.attempt)
                ):
                    attempts[a.message_id].append(
                        WebhookAttempt(
                            attempt=a.attempt,
                            started_at=a.started_at,
                            duration_ms=a.duration_ms,
                            status_code=a.status_code,
                            error=a.error,
                        )
                    )
        return [
            WebhookDelivery(
                id=m.id,
                event_type=WebhookEventType(m.event_type),
                job_id=m.job_id,
                subscription_id=m.subscription_id,
                url=m.url,
                state=DeliveryState(m.state),
                attempts=attempts[m.id],
                next_attempt_at=m.next_attempt_at if m.state == PENDING else None,
                created_at=m.created_at,
                delivered_at=m.delivered_at,
            )
            for m in messages
        ]

    # ---- dispatcher side -----------------------------------------------------------------

    def claim_due(self, limit: int, lease: timedelta) -> list[ClaimedMessage]:
        """Take up to ``limit`` due messages for one attempt each, for ``lease`` (after which
        a message whose attempt was never recorded is due again)."""
        now = self._clock()
        token = uuid.uuid4().hex
        due = (
            WebhookMessage.state == PENDING,
            WebhookMessage.next_attempt_at <= now,
            # A disabled tenant's deliveries are held until it is enabled again.
            WebhookMessage.tenant_id.not_in(
                select(Tenant.id).where(Tenant.disabled_at.is_not(None)).scalar_subquery()
            ),
        )
        with self._sessions.begin() as s:
            candidates = (
                select(WebhookMessage.id)
                .where(*due)
                .order_by(WebhookMessage.next_attempt_at)
                .limit(limit)
            )
            if s.get_bind().dialect.name == "postgresql":
                # Rows another dispatcher is claiming are skipped, not waited for.
                candidates = candidates.with_for_update(skip_locked=True)
            ids = list(s.scalars(candidates))
            if not ids:
                return []
            # Guarded again: on SQLite (one writer at a time) the select is only a hint.
            rows = s.execute(
                update(WebhookMessage)
                .where(WebhookMessage.id.in_(ids), *due)
                .values(
                    attempts=WebhookMessage.attempts + 1,
                    next_attempt_at=now + lease,
                    claim_token=token,
                )
                .returning(
                    WebhookMessage.id,
                    WebhookMessage.tenant_id,
                    WebhookMessage.subscription_id,
                    WebhookMessage.url,
                    WebhookMessage.body,
                    WebhookMessage.attempts,
                )
                .execution_options(synchronize_session=False)
            ).all()
        return [
            ClaimedMessage(r.id, r.tenant_id, r.subscription_id, r.url, r.body, r.attempts, token)
            for r in rows
        ]

    def secret_for(self, message: ClaimedMessage) -> str | None:
        """The secret that signs ``message``; None if its subscription is gone."""
        if message.subscription_id is None:
            return self.signing_secret(message.tenant_id).secret
        with self._sessions() as s:
            sealed = s.scalar(
                select(WebhookSubscriptionRow.secret).where(
                    WebhookSubscriptionRow.id == message.subscription_id
                )
            )
        return self.box.open(sealed) if sealed is not None else None

    def seal_legacy_secrets(self, *, reseal: bool = False) -> int:
        """Seal secrets stored in plain text by earlier versions (and, with ``reseal``,
        re-seal every secret with the box's first key). Returns how many were rewritten."""
        count = 0
        with self._sessions.begin() as s:
            rows: list[WebhookSubscriptionRow | WebhookSecretRow] = [
                *s.scalars(select(WebhookSubscriptionRow)),
                *s.scalars(select(WebhookSecretRow)),
            ]
            for row in rows:
                if reseal or not self.box.is_sealed(row.secret):
                    row.secret = self.box.reseal(row.secret)
                    count += 1
        return count

    def record_attempt(
        self, message: ClaimedMessage, outcome: AttemptOutcome, retry_in: timedelta | None
    ) -> bool:
        """Log the attempt; the message succeeds (2xx), is due again in ``retry_in``, or fails
        for good (``retry_in`` None). False: the claim was lost (lease over, or deleted)."""
        now = self._clock()
        if outcome.ok:
            values: dict[str, Any] = {
                "state": SUCCEEDED,
                "delivered_at": now,
                "next_attempt_at": None,
            }
        elif retry_in is None:
            values = {"state": FAILED, "next_attempt_at": None}
        else:
            values = {"next_attempt_at": now + retry_in}
        error = outcome.error[:MAX_ERROR_CHARS] if outcome.error else None
        try:
            with self._sessions.begin() as s:
                updated = s.scalar(
                    update(WebhookMessage)
                    .where(
                        WebhookMessage.id == message.id,
                        WebhookMessage.claim_token == message.claim_token,
                        WebhookMessage.state == PENDING,
                    )
                    .values(claim_token=None, **values)
                    .returning(WebhookMessage.id)
                    .execution_options(synchronize_session=False)
                )
                if updated is None:
                    return False
                s.add(
                    WebhookAttemptRow(
                        message_id=message.id,
                        attempt=message.attempt,
                        started_at=outcome.started_at,
                        duration_ms=outcome.duration_ms,
                        status_code=outcome.status_code,
                        error=error,
                    )
                )
        except IntegrityError:  # deleted with its subscription meanwhile
            return False
        return True
