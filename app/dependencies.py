"""What the routes need, injected with ``Depends``: the :class:`service.context.Service`
made by :func:`app.main.create_app` at start-up (``request.app.state.service``) and the
calling tenant (:class:`service.context.Principal`), authenticated by
:class:`app.limits.RequestLimits` before any body is read.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from service.context import Principal, Service
from service.errors import Problem


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
        raise Problem(
            401,
            "this route needs an API key: send 'Authorization: Bearer wsk_…'",
            headers=challenge,
        )
    tenant = await run_in_threadpool(service.keys.authenticate, token)
    if tenant is None:
        challenge["WWW-Authenticate"] += ', error="invalid_token"'
        raise Problem(401, "the API key is malformed, unknown or revoked", headers=challenge)
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
