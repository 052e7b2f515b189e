"""The tenant's own view of its account: what it may name as inputs and push targets.

Secrets are write-only: a Hub token is sent with ``PUT /v1/tenant/hub-token`` and never
returned (``GET /v1/tenant`` says whether one is set, and whose token the tenant's Hub
requests use).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

MAX_HUB_TOKEN_LENGTH = 1024


def check_hub_token(token: str) -> str:
    """A Hub token as a tenant may store it: printable ASCII, no whitespace, bounded."""
    if not 1 <= len(token) <= MAX_HUB_TOKEN_LENGTH:
        raise ValueError(f"a Hub token has 1 to {MAX_HUB_TOKEN_LENGTH} characters")
    if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise ValueError("a Hub token is printable ASCII without spaces (e.g. hf_…)")
    return token


class HubTokenSet(BaseModel):
    """Body of ``PUT /v1/tenant/hub-token``."""

    model_config = ConfigDict(extra="forbid")

    token: SecretStr = Field(
        description="a Hugging Face access token (read access pulls private or gated repos; "
        "write access to a granted namespace pushes); stored encrypted, never returned",
        examples=["hf_…"],
    )

    @field_validator("token")
    @classmethod
    def _token(cls, v: SecretStr) -> SecretStr:
        check_hub_token(v.get_secret_value())
        return v


class HubTokenStatus(BaseModel):
    configured: bool = Field(description="the tenant stored a token of its own")
    set_at: datetime | None = None
    used: Literal["tenant", "operator"] | None = Field(
        default=None,
        description="whose token the tenant's Hub pulls and pushes use: its own, the "
        "service's (where the operator granted it), or none (public repositories only)",
    )


class S3GrantView(BaseModel):
    location: str = Field(description="s3://bucket/prefix/ the tenant may read under")
    endpoint: str | None = Field(default=None, description="the S3 server (None: AWS)")


class TenantView(BaseModel):
    """``GET /v1/tenant``."""

    name: str
    hub_token: HubTokenStatus
    hub_push_namespaces: list[str] = Field(
        description="Hub users/organisations the tenant's jobs may push to (publish.hub_repo)"
    )
    s3_grants: list[S3GrantView] = Field(description="s3:// locations the tenant may read")
    local_paths: bool = Field(
        description="whether the operator lets recipes name absolute paths on its disk"
    )


# ---- grants and the tenant as the boundary sees it (rules in service.tenancy) ----------------

CredentialsMode = Literal["keys", "anonymous", "store"]
CREDENTIAL_MODES: tuple[CredentialsMode, ...] = ("keys", "anonymous", "store")

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$")


class GrantError(ValueError):
    """A grant the operator asked for that cannot be made; the message says why."""


def normalize_prefix(prefix: str) -> str:
    """A grant prefix as stored: "" for the whole bucket, else segments ending in "/"."""
    p = prefix.strip("/")
    if not p:
        return ""
    if any(seg in ("", ".", "..") for seg in p.split("/")) or "\\" in p:
        raise GrantError(f"prefix {prefix!r}: no empty, '.' or '..' segments, no backslashes")
    return p + "/"


def parse_s3_location(raw: str) -> tuple[str, str]:
    """``s3://bucket/key/prefix`` → (bucket, key) with the key checked segment by segment."""
    if not raw.startswith("s3://"):
        raise GrantError(f"{raw!r} is not an s3:// location (s3://BUCKET/PREFIX/)")
    bucket, _, key = raw[len("s3://") :].partition("/")
    if not _BUCKET.match(bucket):
        raise GrantError(f"{raw!r}: {bucket!r} is not an S3 bucket name")
    return bucket, key


def normalize_endpoint(endpoint: str | None) -> str | None:
    """``scheme://host:port`` in lower case with the port made explicit; None for AWS."""
    if endpoint is None or not endpoint.strip():
        return None
    parts = urlsplit(endpoint.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise GrantError(f"endpoint {endpoint!r} must be 'http(s)://host[:port]'")
    if parts.username or parts.password or parts.query or parts.path.strip("/"):
        raise GrantError(
            f"endpoint {endpoint!r}: give only scheme, host and port (credentials go in "
            "--access-key-id and the secret)"
        )
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{parts.hostname.lower()}:{port}"


@dataclass(frozen=True)
class S3GrantInfo:
    """One S3 grant with its credentials opened (``secret_access_key`` never shown)."""

    id: str
    bucket: str
    prefix: str
    endpoint: str | None
    region: str | None
    credentials: CredentialsMode
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def covers(self, bucket: str, key: str) -> bool:
        """True when ``s3://bucket/key`` lies under this grant (whole path segments only)."""
        if bucket != self.bucket or any(seg in (".", "..") for seg in key.split("/")):
            return False  # a server that normalises paths could resolve '..' elsewhere
        if not self.prefix:
            return True
        return key == self.prefix.rstrip("/") or key.startswith(self.prefix)


@dataclass(frozen=True)
class TenantAccess:
    """A tenant as the boundary sees it: its grants and the Hub token its jobs use."""

    tenant_id: int
    name: str
    disabled: bool
    # The token for the tenant's Hub requests: its own, else the operator's where granted,
    # else None (anonymous: never an implicit token from the environment).
    hub_token: str | None = field(default=None, repr=False)
    hub_token_source: Literal["tenant", "operator"] | None = None
    push_namespaces: frozenset[str] = frozenset()
    s3_grants: tuple[S3GrantInfo, ...] = ()

    def s3_grant_for(self, bucket: str, key: str) -> S3GrantInfo | None:
        """The most specific grant covering ``s3://bucket/key``, or None."""
        covering = [g for g in self.s3_grants if g.covers(bucket, key)]
        return max(covering, key=lambda g: len(g.prefix), default=None)

    def may_push_to(self, repo: str) -> bool:
        return repo.split("/", 1)[0] in self.push_namespaces


def check_namespace(namespace: str) -> str:
    if not _NAMESPACE.match(namespace):
        raise GrantError(
            f"{namespace!r} is not a Hub namespace (a user or organisation name: letters, "
            "digits, '.', '_' or '-', at most 96 characters)"
        )
    return namespace
