"""``/v1/webhooks``: subscriptions to job events, the callback signing secret, delivery logs;
and ``/v1/jobs/{id}/deliveries``, the deliveries of one job's events (rules in
infra.db.webhooks; sending in service.webhooks)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response, status

from app.dependencies import PrincipalDep, ServiceDep
from app.limits import CheckedBodyRoute, checked_id
from infra.db.webhooks import MAX_DELIVERIES_PAGE, WebhookStore, WebhookSubscriptionRow
from schemas.jobs import ProblemDetail
from schemas.webhooks import (
    WebhookDeliveryList,
    WebhookEventType,
    WebhookSigningSecret,
    WebhookSubscription,
    WebhookSubscriptionCreate,
    WebhookSubscriptionCreated,
    WebhookSubscriptionList,
)
from service.errors import not_found
from service.webhooks import refuse_unsafe_url

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"], route_class=CheckedBodyRoute)
job_deliveries_router = APIRouter(prefix="/v1/jobs", tags=["webhooks"])

_PROBLEM = {"model": ProblemDetail, "content": {"application/problem+json": {}}}
_Limit = Annotated[int, Query(ge=1, le=MAX_DELIVERIES_PAGE)]


def webhook_store(service: ServiceDep) -> WebhookStore:
    return service.webhooks


WebhookStoreDep = Annotated[WebhookStore, Depends(webhook_store)]


def _view(row: WebhookSubscriptionRow) -> WebhookSubscription:
    return WebhookSubscription(
        id=row.id,
        url=row.url,
        events=[WebhookEventType(e) for e in row.events],
        description=row.description,
        created_at=row.created_at,
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=WebhookSubscriptionCreated,
    responses={422: _PROBLEM},
    summary="Subscribe a URL to job events",
    description=(
        "Events of the tenant's jobs of the chosen types are POSTed to `url`, signed as "
        "Standard Webhooks describes. The answer carries the signing secret (`whsec_…`): it "
        "is shown only here. URLs that resolve to non-public addresses are refused (422)."
    ),
)
def create_subscription(
    body: WebhookSubscriptionCreate,
    response: Response,
    service: ServiceDep,
    principal: PrincipalDep,
    hooks: WebhookStoreDep,
) -> WebhookSubscriptionCreated:
    url = str(body.url)
    refuse_unsafe_url(service.settings, url, "/url")
    row = hooks.create_subscription(principal.tenant_id, url, body.events, body.description)
    response.headers["Location"] = f"/v1/webhooks/{row.id}"
    return WebhookSubscriptionCreated(**_view(row).model_dump(), secret=row.secret)


@router.get("", response_model=WebhookSubscriptionList, summary="List subscriptions")
def list_subscriptions(principal: PrincipalDep, hooks: WebhookStoreDep) -> WebhookSubscriptionList:
    return WebhookSubscriptionList(
        items=[_view(row) for row in hooks.list_subscriptions(principal.tenant_id)]
    )


@router.get(
    "/secret",
    response_model=WebhookSigningSecret,
    summary="The secret signing deliveries to jobs' callback_url",
    description=(
        "Deliveries to a job's own `callback_url` are signed with this per-tenant secret "
        "(made on first use). Subscriptions have secrets of their own."
    ),
)
def signing_secret(principal: PrincipalDep, hooks: WebhookStoreDep) -> WebhookSigningSecret:
    row = hooks.signing_secret(principal.tenant_id)
    return WebhookSigningSecret(secret=row.secret, created_at=row.created_at)


@router.get(
    "/{subscription_id}",
    response_model=WebhookSubscription,
    responses={404: _PROBLEM},
    summary="One subscription",
)
def get_subscription(
    subscription_id: str, principal: PrincipalDep, hooks: WebhookStoreDep
) -> WebhookSubscription:
    row = hooks.get_subscription(
        principal.tenant_id, checked_id(subscription_id, "webhook subscription")
    )
    if row is None:
        raise not_found(f"webhook subscription {subscription_id!r}")
    return _view(row)


@router.delete(
    "/{subscription_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={404: _PROBLEM},
    summary="Delete a subscription (and its delivery log)",
)
def delete_subscription(
    subscription_id: str, principal: PrincipalDep, hooks: WebhookStoreDep
) -> Response:
    if not hooks.delete_subscription(
        principal.tenant_id, checked_id(subscription_id, "webhook subscription")
    ):
        raise not_found(f"webhook subscription {subscription_id!r}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{subscription_id}/deliveries",
    response_model=WebhookDeliveryList,
    responses={404: _PROBLEM},
    summary="Deliveries to a subscription, newest first, with every attempt",
)
def subscription_deliveries(
    subscription_id: str,
    principal: PrincipalDep,
    hooks: WebhookStoreDep,
    limit: _Limit = 50,
) -> WebhookDeliveryList:
    checked_id(subscription_id, "webhook subscription")
    if hooks.get_subscription(principal.tenant_id, subscription_id) is None:
        raise not_found(f"webhook subscription {subscription_id!r}")
    items = hooks.deliveries_of_subscription(principal.tenant_id, subscription_id, limit=limit)
    return WebhookDeliveryList(items=items)


@job_deliveries_router.get(
    "/{job_id}/deliveries",
    response_model=WebhookDeliveryList,
    responses={404: _PROBLEM},
    summary="Deliveries of a job's events (its callback_url and subscriptions), newest first",
)
def job_deliveries(
    job_id: str,
    service: ServiceDep,
    principal: PrincipalDep,
    hooks: WebhookStoreDep,
    limit: _Limit = 50,
) -> WebhookDeliveryList:
    if service.jobs.get(principal.tenant_id, checked_id(job_id, "job")) is None:
        raise not_found(f"job {job_id!r}")
    return WebhookDeliveryList(
        items=hooks.deliveries_of_job(principal.tenant_id, job_id, limit=limit)
    )
