"""The tenant's own view of its account: what it may name as inputs and push targets.

Secrets are write-only: a Hub token is sent with ``PUT /v1/tenant/hub-token`` and never
returned (``GET /v1/tenant`` says whether one is set, and whose token the tenant's Hub
requests use).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

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
