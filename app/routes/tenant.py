"""``/v1/tenant``: the calling tenant's account: its grants and its own Hub token."""

from __future__ import annotations

from fastapi import APIRouter, Response, status
from starlette.concurrency import run_in_threadpool

from app.dependencies import PrincipalDep, ServiceDep
from app.limits import CheckedBodyRoute
from schemas.jobs import ProblemDetail
from schemas.tenants import HubTokenSet, HubTokenStatus, S3GrantView, TenantView

router = APIRouter(prefix="/v1/tenant", tags=["tenant"], route_class=CheckedBodyRoute)

_PROBLEM = {"model": ProblemDetail, "content": {"application/problem+json": {}}}


@router.get("", response_model=TenantView, summary="The tenant's grants and Hub token status")
def get_tenant(service: ServiceDep, principal: PrincipalDep) -> TenantView:
    access = service.access(principal.tenant_id)
    return TenantView(
        name=access.name,
        hub_token=HubTokenStatus(
            configured=access.hub_token_source == "tenant",
            set_at=service.tenants.hub_token_set_at(principal.tenant_id),
            used=access.hub_token_source,
        ),
        hub_push_namespaces=sorted(access.push_namespaces),
        s3_grants=[S3GrantView(location=g.location, endpoint=g.endpoint) for g in access.s3_grants],
        local_paths=service.settings.allow_local_paths,
    )


@router.put(
    "/hub-token",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={422: _PROBLEM},
    summary="Store the tenant's Hugging Face token",
    description=(
        "The token is stored encrypted and never returned. From then on the tenant's Hub "
        "pulls (pinning at submission and downloads on the workers) and pushes use it "
        "instead of the service's token."
    ),
)
async def set_hub_token(
    body: HubTokenSet, service: ServiceDep, principal: PrincipalDep
) -> Response:
    token = body.token.get_secret_value()
    await run_in_threadpool(service.tenants.set_hub_token, principal.tenant_id, token)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.delete(
    "/hub-token",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Forget the tenant's Hugging Face token",
)
def clear_hub_token(service: ServiceDep, principal: PrincipalDep) -> Response:
    service.tenants.set_hub_token(principal.tenant_id, None)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
