"""The tenant's own account: what it may name, and its Hugging Face token."""

from __future__ import annotations

from schemas.tenants import TenantView
from weightsmith.client.transport import Transport, parse_answer


class AccountApi(Transport):
    """``/v1/tenant``."""

    def get_tenant(self) -> TenantView:
        """The tenant's grants (s3:// locations, Hub push namespaces) and Hub token status."""
        return parse_answer(TenantView, self._request("GET", "/v1/tenant"))

    def set_hub_token(self, token: str) -> None:
        """Store the tenant's own Hugging Face token (encrypted, never returned): its jobs'
        Hub pulls and pushes use it from then on."""
        self._request("PUT", "/v1/tenant/hub-token", json_body={"token": token})

    def clear_hub_token(self) -> None:
        """Forget the tenant's Hugging Face token."""
        self._request("DELETE", "/v1/tenant/hub-token")
