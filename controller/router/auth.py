"""Who is calling: API keys to tenants (the router's side of tenancy).

The router asks ``authenticate`` once per request, before anything else; it reads memory
only (``TenancyView``), never etcd.

* Auth off (``OpenAuth``, ``kvfleet up``'s local mode): the request's ``tenant`` field, or
  metadata ``x-kvfleet-tenant``, names the tenant.
* Auth on (``KeyAuth``, the default elsewhere): metadata ``authorization: Bearer <key>``
  is required and the key decides the tenant; the request's tenant field and
  ``x-kvfleet-tenant`` are ignored. Only the controller's internal key (the Batch API
  runner) may name the tenant, in ``x-kvfleet-tenant``.

A key created or revoked in etcd takes effect here within the watch latency: milliseconds
while etcd is reachable; while it is not, the router keeps the last state it saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from prometheus_client import Counter

from kvfleet.controller.router.errors import RequestError
from kvfleet.controller.tenancy import TenancyView, check_tenant_name, key_matches, parse_key

AUTH_FAILURES = Counter("kvfleet_router_auth_failures_total", "Requests refused as UNAUTHENTICATED, by reason", ["reason"])


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    key_id: str = ""        # public id of the API key; "" with auth off
    internal: bool = False  # the controller's batch runner: may send tier batch and name the tenant


DEFAULT_TENANT = "default"
TENANT_HEADER = "x-kvfleet-tenant"


class OpenAuth:
    """Auth off: the request's tenant field (or metadata ``x-kvfleet-tenant``) decides."""

    enabled = False

    def authenticate(self, metadata: dict[str, str], request_tenant: str) -> Principal:
        tenant = request_tenant or metadata.get(TENANT_HEADER, "") or DEFAULT_TENANT
        return Principal(tenant, "", "x-kvfleet-batch-item" in metadata)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


class KeyAuth:
    """Auth on: the bearer key must be known, unrevoked and of an existing tenant.

    ``view`` has ``keys`` (key_id -> ApiKey) and ``tenants`` (name -> Tenant), kept current
    by a watch (``TenancyView``). Cost per request: one regex match, one sha256 of 43 bytes
    and two dict lookups (a few microseconds)."""

    enabled = True

    def __init__(self, view) -> None:
        self.view = view

    async def start(self) -> None:
        await self.view.start()

    async def close(self) -> None:
        await self.view.close()

    def authenticate(self, metadata: dict[str, str], request_tenant: str) -> Principal:  # noqa: ARG002 - ignored with auth on
        header = metadata.get("authorization", "")
        if not header:
            raise _refuse("missing", "an API key is required: send metadata 'authorization: Bearer <key>' "
                                     "(keys come from `kvfleet tenants keys create`)")
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _refuse("malformed", "malformed authorization metadata: expected 'Bearer <key>'")
        parsed = parse_key(token)
        if parsed is None:
            # Never echo what was sent: it may be a secret pasted in the wrong place.
            raise _refuse("malformed", "malformed API key: expected kvf_<key id>_<secret> as `kvfleet tenants keys create` prints it")
        key_id, secret = parsed
        record = self.view.keys.get(key_id)
        if record is None:
            raise _refuse("unknown", f"unknown API key {key_id}")
        if not key_matches(record, secret):
            raise _refuse("bad_secret", f"API key {key_id}: wrong secret")
        if record.revoked:
            raise _refuse("revoked", f"API key {key_id} was revoked")
        if record.internal:
            tenant = metadata.get(TENANT_HEADER, "") or record.tenant
            try:
                check_tenant_name(tenant, allow_reserved=True)
            except ValueError as exc:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{TENANT_HEADER}: {exc}") from None
            return Principal(tenant, key_id, True)
        if record.tenant not in self.view.tenants:
            raise _refuse("no_tenant", f"API key {key_id} belongs to tenant {record.tenant!r}, which was deleted")
        return Principal(record.tenant, key_id, False)


def _refuse(reason: str, message: str) -> RequestError:
    AUTH_FAILURES.labels(reason).inc()
    return RequestError(grpc.StatusCode.UNAUTHENTICATED, message)


def build_auth(cfg, registry):
    """``KeyAuth`` when ``cfg.auth`` (the default), else ``OpenAuth``. Call ``start()``
    before serving (it loads the keys) and ``close()`` at shutdown."""
    if not getattr(cfg, "auth", False):
        return OpenAuth()
    return KeyAuth(TenancyView.of(registry))
