"""Tenants as the operator manages them: disable/enable, Hub tokens, S3 and Hub push grants.

The rules of what a grant allows live in :mod:`service.tenancy`; this module stores them.
Secrets (a tenant's Hub token, a grant's secret access key) are sealed with the
:class:`infra.secrets.SecretBox` given to the store and opened only in :meth:`access`, for
the process that acts for the tenant.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal, cast

from sqlalchemy import Engine, delete, select, update
from sqlalchemy.orm import sessionmaker

from infra.db.models import HubPushGrant, S3Grant, Tenant
from schemas.tenants import (
    CREDENTIAL_MODES,
    CredentialsMode,
    GrantError,
    S3GrantInfo,
    TenantAccess,
    check_hub_token,
    check_namespace,
    normalize_endpoint,
    normalize_prefix,
    parse_s3_location,
)

if TYPE_CHECKING:
    from infra.secrets import SecretBox


class UnknownTenant(LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no tenant named {name!r} ('weightsmith tenants list' shows them)")


@dataclass(frozen=True)
class TenantSummary:
    """What the operator's listing shows of a tenant (no secrets)."""

    id: int
    name: str
    created_at: datetime
    disabled_at: datetime | None
    hub_token_set_at: datetime | None
    use_operator_hub_token: bool


def _utcnow() -> datetime:
    return datetime.now(UTC)


class TenantStore:
    """Tenants, their Hub tokens and grants, in the job store's database. Thread-safe."""

    def __init__(
        self, engine: Engine, box: SecretBox, *, clock: Callable[[], datetime] = _utcnow
    ) -> None:
        self.engine = engine
        self.box = box
        self._clock = clock
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    # ---- lookups ---------------------------------------------------------------------------

    def _tenant_id(self, name: str) -> int:
        with self._sessions() as s:
            tenant_id = s.scalar(select(Tenant.id).where(Tenant.name == name))
        if tenant_id is None:
            raise UnknownTenant(name)
        return int(tenant_id)

    def list(self) -> list[TenantSummary]:
        with self._sessions() as s:
            rows = s.scalars(select(Tenant).order_by(Tenant.name)).all()
        return [
            TenantSummary(
                t.id,
                t.name,
                t.created_at,
                t.disabled_at,
                t.hub_token_set_at,
                bool(t.use_operator_hub_token),
            )
            for t in rows
        ]

    def access(self, tenant_id: int, *, operator_hub_token: str | None) -> TenantAccess:
        """The tenant as the boundary sees it, secrets opened (see service.tenancy)."""
        with self._sessions() as s:
            tenant = s.get(Tenant, tenant_id)
            if tenant is None:
                raise LookupError(f"tenant {tenant_id} does not exist")
            grants = s.scalars(
                select(S3Grant).where(S3Grant.tenant_id == tenant_id).order_by(S3Grant.created_at)
            ).all()
            namespaces = s.scalars(
                select(HubPushGrant.namespace).where(HubPushGrant.tenant_id == tenant_id)
            ).all()
        token: str | None = None
        source: Literal["tenant", "operator"] | None = None
        if tenant.hub_token is not None:
            token, source = self.box.open(tenant.hub_token), "tenant"
        elif tenant.use_operator_hub_token and operator_hub_token:
            token, source = operator_hub_token, "operator"
        return TenantAccess(
            tenant_id=tenant.id,
            name=tenant.name,
            disabled=tenant.disabled_at is not None,
            hub_token=token,
            hub_token_source=source,
            push_namespaces=frozenset(namespaces),
            s3_grants=tuple(self._grant_info(g) for g in grants),
        )

    def _grant_info(self, g: S3Grant) -> S3GrantInfo:
        return S3GrantInfo(
            id=g.id,
            bucket=g.bucket,
            prefix=g.prefix,
            endpoint=g.endpoint,
            region=g.region,
            credentials=cast(CredentialsMode, g.credentials),
            access_key_id=g.access_key_id,
            secret_access_key=(
                self.box.open(g.secret_access_key) if g.secret_access_key is not None else None
            ),
        )

    # ---- the tenant's own settings (API) -----------------------------------------------------

    def set_hub_token(self, tenant_id: int, token: str | None) -> datetime | None:
        """Store (sealed) or clear the tenant's Hub token; returns when it was set."""
        now = self._clock() if token is not None else None
        sealed = self.box.seal(check_hub_token(token)) if token is not None else None
        with self._sessions.begin() as s:
            s.execute(
                update(Tenant)
                .where(Tenant.id == tenant_id)
                .values(hub_token=sealed, hub_token_set_at=now)
            )
        return now

    def hub_token_set_at(self, tenant_id: int) -> datetime | None:
        with self._sessions() as s:
            value = s.scalar(select(Tenant.hub_token_set_at).where(Tenant.id == tenant_id))
        return value

    # ---- operator --------------------------------------------------------------------------

    def set_disabled(self, name: str, disabled: bool) -> bool:
        """Disable or enable a tenant; False when it already was."""
        tenant_id = self._tenant_id(name)
        current = Tenant.disabled_at.is_(None) if disabled else Tenant.disabled_at.is_not(None)
        with self._sessions.begin() as s:
            changed = s.scalar(
                update(Tenant)
                .where(Tenant.id == tenant_id, current)
                .values(disabled_at=self._clock() if disabled else None)
                .returning(Tenant.id)
            )
        return changed is not None

    def set_operator_hub_token(self, name: str, allowed: bool) -> None:
        tenant_id = self._tenant_id(name)
        with self._sessions.begin() as s:
            s.execute(
                update(Tenant).where(Tenant.id == tenant_id).values(use_operator_hub_token=allowed)
            )

    def grant_hub_push(self, name: str, namespace: str) -> bool:
        """Let the tenant push to ``namespace``; False if it already may."""
        tenant_id = self._tenant_id(name)
        check_namespace(namespace)
        with self._sessions.begin() as s:
            if s.get(HubPushGrant, (tenant_id, namespace)) is not None:
                return False
            s.add(HubPushGrant(tenant_id=tenant_id, namespace=namespace, created_at=self._clock()))
        return True

    def revoke_hub_push(self, name: str, namespace: str) -> bool:
        tenant_id = self._tenant_id(name)
        with self._sessions.begin() as s:
            gone = s.scalar(
                delete(HubPushGrant)
                .where(HubPushGrant.tenant_id == tenant_id, HubPushGrant.namespace == namespace)
                .returning(HubPushGrant.namespace)
            )
        return gone is not None

    def grant_s3(
        self,
        name: str,
        location: str,
        *,
        credentials: CredentialsMode,
        endpoint: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        artifact_bucket: str | None = None,
    ) -> S3GrantInfo:
        """Let the tenant read ``s3://bucket/prefix/`` with these credentials.

        ``artifact_bucket`` is the artifact store's bucket name: a grant of a bucket of that
        name is refused, on any server (one server answers to several spellings of its
        endpoint). A grant for the same location and endpoint is replaced.
        """
        tenant_id = self._tenant_id(name)
        bucket, key = parse_s3_location(location.strip())
        prefix = normalize_prefix(key)
        ep = normalize_endpoint(endpoint)
        if credentials not in CREDENTIAL_MODES:
            raise GrantError(f"credentials must be one of {', '.join(CREDENTIAL_MODES)}")
        if credentials == "keys" and not (access_key_id and secret_access_key):
            raise GrantError("credentials 'keys' need an access key id and its secret key")
        if credentials != "keys" and (access_key_id or secret_access_key):
            raise GrantError(f"credentials {credentials!r} take no access key")
        if bucket == artifact_bucket:
            raise GrantError(
                f"s3://{bucket}/ is the artifact store's bucket (every tenant's artifacts and "
                "the shared cache): it cannot be granted; tenants reach their own artifacts "
                "with artifact:// references"
            )
        if region is not None and not (0 < len(region) <= 64):
            raise GrantError("a region has 1 to 64 characters")
        row = S3Grant(
            id=str(uuid.uuid4()),
            tenant_id=tenant_id,
            bucket=bucket,
            prefix=prefix,
            endpoint=ep,
            region=region,
            credentials=credentials,
            access_key_id=access_key_id,
            secret_access_key=self.box.seal(secret_access_key) if secret_access_key else None,
            created_at=self._clock(),
        )
        with self._sessions.begin() as s:
            same = (
                S3Grant.tenant_id == tenant_id,
                S3Grant.bucket == bucket,
                S3Grant.prefix == prefix,
                S3Grant.endpoint.is_(None) if ep is None else S3Grant.endpoint == ep,
            )
            s.execute(delete(S3Grant).where(*same))
            s.add(row)
        return self._grant_info(row)

    def revoke_s3(self, name: str, location: str) -> int:
        """Remove the tenant's grants of exactly this location; returns how many."""
        tenant_id = self._tenant_id(name)
        bucket, key = parse_s3_location(location.strip())
        prefix = normalize_prefix(key)
        with self._sessions.begin() as s:
            gone = s.scalars(
                delete(S3Grant)
                .where(
                    S3Grant.tenant_id == tenant_id,
                    S3Grant.bucket == bucket,
                    S3Grant.prefix == prefix,
                )
                .returning(S3Grant.id)
            ).all()
        return len(gone)

    def reseal_secrets(self) -> int:
        """Seal every stored tenant secret with the box's first key (legacy plaintext too);
        returns how many values were rewritten."""
        count = 0
        with self._sessions.begin() as s:
            for tenant in s.scalars(select(Tenant).where(Tenant.hub_token.is_not(None))):
                assert tenant.hub_token is not None
                tenant.hub_token = self.box.reseal(tenant.hub_token)
                count += 1
            for grant in s.scalars(select(S3Grant).where(S3Grant.secret_access_key.is_not(None))):
                assert grant.secret_access_key is not None
                grant.secret_access_key = self.box.reseal(grant.secret_access_key)
                count += 1
        return count
