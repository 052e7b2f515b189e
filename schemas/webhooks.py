"""Webhooks (Standard Webhooks): event types, subscriptions, deliveries and the event body.

- ``WebhookEventType`` — what can happen to a job: ``job.queued``, ``job.running``,
  ``job.succeeded``, ``job.failed``, ``job.cancelled``.
- ``WebhookEvent`` — the JSON body of every delivery: ``{"type", "timestamp", "data"}`` with
  the job as ``GET /v1/jobs/{id}`` shows it in ``data``.
- ``WebhookSubscriptionCreate`` — the body of ``POST /v1/webhooks``; the answer
  (``WebhookSubscriptionCreated``) carries the signing secret, shown that one time only.
- ``WebhookDelivery`` — one message to one URL with its attempts, as the delivery logs show it.

Nothing here does I/O; the URL safety check (no private addresses) is in service.webhooks.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas.jobs import HttpUrl, JobState, JobView
from schemas.limits import MAX_WEBHOOK_EVENTS

SECRET_PREFIX = "whsec_"


class WebhookEventType(StrEnum):
    JOB_QUEUED = "job.queued"
    JOB_RUNNING = "job.running"
    JOB_SUCCEEDED = "job.succeeded"
    JOB_FAILED = "job.failed"
    JOB_CANCELLED = "job.cancelled"

    @classmethod
    def for_state(cls, state: JobState | str) -> WebhookEventType:
        """The event announcing that a job entered ``state``."""
        return cls(f"job.{JobState(state).value}")


# What a job's own ``callback_url`` receives: the job starting and its final state (the
# submitter already knows it is queued: that is the answer to its POST).
CALLBACK_EVENTS = frozenset(
    {
        WebhookEventType.JOB_RUNNING,
        WebhookEventType.JOB_SUCCEEDED,
        WebhookEventType.JOB_FAILED,
        WebhookEventType.JOB_CANCELLED,
    }
)


class WebhookEvent(BaseModel):
    """The body of a delivery (Standard Webhooks payload structure)."""

    type: WebhookEventType
    timestamp: datetime = Field(description="when the job entered the state (UTC)")
    data: JobView


class WebhookSubscriptionCreate(BaseModel):
    """Body of ``POST /v1/webhooks``."""

    model_config = ConfigDict(extra="forbid")

    url: HttpUrl = Field(
        description="where events are POSTed (http or https, a public address)",
        examples=["https://hooks.example.com/weightsmith"],
    )
    events: list[WebhookEventType] = Field(
        min_length=1,
        max_length=MAX_WEBHOOK_EVENTS,
        description="the event types this subscription receives",
        examples=[["job.succeeded", "job.failed"]],
    )
    description: str | None = Field(default=None, max_length=500)

    @field_validator("events")
    @classmethod
    def _unique(cls, events: list[WebhookEventType]) -> list[WebhookEventType]:
        return sorted(set(events))


class WebhookSubscription(BaseModel):
    """A subscription as listed: never its secret."""

    id: str
    url: str
    events: list[WebhookEventType]
    description: str | None = None
    created_at: datetime


class WebhookSubscriptionCreated(WebhookSubscription):
    """The answer to ``POST /v1/webhooks``: the only time the signing secret is shown."""

    secret: str = Field(
        description="signing secret, whsec_<base64>; shown once, store it now",
        examples=["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
    )


class WebhookSubscriptionList(BaseModel):
    items: list[WebhookSubscription]


class WebhookSigningSecret(BaseModel):
    """The tenant's secret that signs deliveries to jobs' ``callback_url``."""

    secret: str = Field(description="whsec_<base64>")
    created_at: datetime


class DeliveryState(StrEnum):
    PENDING = "pending"  # waiting for its next attempt (or being attempted now)
    SUCCEEDED = "succeeded"  # a 2xx answer
    FAILED = "failed"  # every attempt failed; no more retries


class WebhookAttempt(BaseModel):
    """One HTTP request of a delivery."""

    attempt: int = Field(ge=1)
    started_at: datetime
    duration_ms: int = Field(ge=0)
    status_code: int | None = Field(default=None, description="None: no HTTP answer")
    error: str | None = Field(default=None, description="why the attempt failed (truncated)")


class WebhookDelivery(BaseModel):
    """One event sent to one URL, with every attempt so far."""

    id: str = Field(description="the message id, sent as the webhook-id header")
    event_type: WebhookEventType
    job_id: str
    subscription_id: str | None = Field(
        default=None, description="None: the job's own callback_url"
    )
    url: str
    state: DeliveryState
    attempts: list[WebhookAttempt]
    next_attempt_at: datetime | None = Field(
        default=None, description="when the next attempt is due (pending deliveries only)"
    )
    created_at: datetime
    delivered_at: datetime | None = None


class WebhookDeliveryList(BaseModel):
    """Deliveries, newest first."""

    items: list[WebhookDelivery]
