"""gRPC edge of tenancy: translates kvfleet.v1.Tenants calls to ``TenantStore``.

Like the rest of the Controller API it is not authenticated itself: it is an operator's
interface, to be reachable only from the operators' network (docs/tenancy.md).
"""

from __future__ import annotations

import grpc

from kvfleet.controller.tenancy import (
    TIER_NAMES,
    AlreadyExists,
    ApiKey,
    InvalidArgument,
    NotFound,
    Tenant,
    TenantStore,
    check_tenant_name,
    tier_name,
)
from kvfleet.v1 import tenancy_pb2 as pb
from kvfleet.v1 import tenancy_pb2_grpc as pbg

_CODES = {
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    NotFound: grpc.StatusCode.NOT_FOUND,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
}


def tenant_to_pb(t: Tenant, active_keys: int = 0) -> pb.TenantInfo:
    tiers = {v: k for k, v in TIER_NAMES.items()}
    return pb.TenantInfo(
        name=t.name, description=t.description, created_unix_ms=t.created_unix_ms, active_keys=active_keys,
        quotas=[pb.TierQuota(tier=tiers[name], limits=pb.Quota(requests_per_min=q.requests_per_min,
                                                                tokens_per_min=q.tokens_per_min, concurrent=q.concurrent))
                for name, q in sorted(t.quotas.items(), key=lambda kv: tiers.get(kv[0], 99)) if name in tiers],
    )


def key_to_pb(k: ApiKey) -> pb.KeyInfo:
    return pb.KeyInfo(key_id=k.key_id, tenant=k.tenant, description=k.description, created_unix_ms=k.created_unix_ms,
                      revoked=k.revoked, revoked_unix_ms=k.revoked_unix_ms, internal=k.internal)


class TenantsService(pbg.TenantsServicer):
    def __init__(self, store: TenantStore) -> None:
        self.store = store

    @staticmethod
    async def _fail(context, exc: Exception):
        await context.abort(_CODES[type(exc)], str(exc))

    async def _active_keys(self, tenant: str | None = None) -> dict[str, int]:
        counts: dict[str, int] = {}
        for k in await self.store.list_keys(tenant or ""):
            if not k.revoked:
                counts[k.tenant] = counts.get(k.tenant, 0) + 1
        return counts

    async def CreateTenant(self, request: pb.CreateTenantRequest, context) -> pb.TenantInfo:
        try:
            return tenant_to_pb(await self.store.create_tenant(request.name, request.description))
        except (AlreadyExists, InvalidArgument) as exc:
            await self._fail(context, exc)

    async def ListTenants(self, request, context) -> pb.ListTenantsResponse:
        counts = await self._active_keys()
        return pb.ListTenantsResponse(tenants=[tenant_to_pb(t, counts.get(t.name, 0)) for t in await self.store.list_tenants()])

    async def DeleteTenant(self, request: pb.DeleteTenantRequest, context) -> pb.DeleteTenantResponse:
        try:
            check_tenant_name(request.name)
            revoked = await self.store.delete_tenant(request.name)
        except (NotFound, InvalidArgument) as exc:
            await self._fail(context, exc)
        return pb.DeleteTenantResponse(name=request.name, revoked_keys=revoked)

    async def SetQuota(self, request: pb.SetQuotaRequest, context) -> pb.TenantInfo:
        def opt(field: str) -> int | None:
            return getattr(request, field) if request.HasField(field) else None

        if request.tier and request.tier not in TIER_NAMES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown tier value {request.tier}")
        try:
            t = await self.store.set_quota(request.tenant, tier_name(request.tier), opt("requests_per_min"),
                                           opt("tokens_per_min"), opt("concurrent"))
        except (NotFound, InvalidArgument) as exc:
            await self._fail(context, exc)
        return tenant_to_pb(t, (await self._active_keys(t.name)).get(t.name, 0))

    async def CreateKey(self, request: pb.CreateKeyRequest, context) -> pb.CreateKeyResponse:
        try:
            # The service tenant's keys are made by the controller itself (ensure_service_key).
            check_tenant_name(request.tenant)
            plaintext, record = await self.store.create_key(request.tenant, request.description)
        except (NotFound, InvalidArgument) as exc:
            await self._fail(context, exc)
        return pb.CreateKeyResponse(key=plaintext, info=key_to_pb(record))

    async def ListKeys(self, request: pb.ListKeysRequest, context) -> pb.ListKeysResponse:
        return pb.ListKeysResponse(keys=[key_to_pb(k) for k in await self.store.list_keys(request.tenant)])

    async def RevokeKey(self, request: pb.RevokeKeyRequest, context) -> pb.KeyInfo:
        try:
            return key_to_pb(await self.store.revoke_key(request.key_id))
        except NotFound as exc:
            await self._fail(context, exc)
