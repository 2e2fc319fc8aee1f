"""Who is calling: API keys to tenants (the router's side of tenancy).

The router asks ``authenticate`` once per request, before anything else. With auth off
(``kvfleet up``'s local mode) the request's ``tenant`` field names the tenant.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    key_id: str = ""        # public id of the API key; "" with auth off
    internal: bool = False  # the controller's batch runner: may send tier batch and name the tenant


DEFAULT_TENANT = "default"


class OpenAuth:
    """Auth off: the request's tenant field (or metadata ``x-kvfleet-tenant``) decides."""

    enabled = False

    def authenticate(self, metadata: dict[str, str], request_tenant: str) -> Principal:
        tenant = request_tenant or metadata.get("x-kvfleet-tenant", "") or DEFAULT_TENANT
        return Principal(tenant, "", "x-kvfleet-batch-item" in metadata)


def build_auth(cfg, registry):  # noqa: ARG001 - filled in by the tenancy work
    return OpenAuth()
