"""`kvfleet tenants ...`: tenants, their API keys and quotas (the controller's Tenants API)."""

from __future__ import annotations

from datetime import datetime, timezone

import grpc
import typer
from rich.table import Table

from kvfleet.cli.common import ControllerOpt, JsonOpt, console, err_console, print_json, run_rpc
from kvfleet.controller.tenancy import TIER_VALUES, InvalidArgument, check_tenant_name
from kvfleet.v1 import tenancy_pb2 as pb
from kvfleet.v1 import tenancy_pb2_grpc as pbg

tenants_app = typer.Typer(help="Create, list and delete tenants; set their quotas; manage their API keys.", no_args_is_help=True)
keys_app = typer.Typer(help="Create, list and revoke a tenant's API keys.", no_args_is_help=True)
tenants_app.add_typer(keys_app, name="keys")

TIER_BY_VALUE = {v: k for k, v in TIER_VALUES.items()}


async def _call(controller: str, method: str, req):
    async with grpc.aio.insecure_channel(controller) as ch:
        return await getattr(pbg.TenantsStub(ch), method)(req, timeout=10.0)


def _name(name: str, param: str = "NAME") -> str:
    try:
        return check_tenant_name(name)
    except InvalidArgument as exc:
        raise typer.BadParameter(str(exc), param_hint=param) from None


def _ts(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ") if ms else ""


def tenant_dict(t: pb.TenantInfo) -> dict:
    """The stable JSON shape of a tenant."""
    return {
        "name": t.name, "description": t.description, "created_unix_ms": t.created_unix_ms, "active_keys": t.active_keys,
        "quotas": {TIER_BY_VALUE.get(q.tier, str(q.tier)): {"requests_per_min": q.limits.requests_per_min,
                                                             "tokens_per_min": q.limits.tokens_per_min,
                                                             "concurrent": q.limits.concurrent}
                   for q in t.quotas},
    }


def key_dict(k: pb.KeyInfo) -> dict:
    """The stable JSON shape of a key: never its secret."""
    return {"key_id": k.key_id, "tenant": k.tenant, "description": k.description, "created_unix_ms": k.created_unix_ms,
            "revoked": k.revoked, "revoked_unix_ms": k.revoked_unix_ms, "internal": k.internal}


def _quota_text(quotas: dict) -> str:
    parts = []
    for tier, q in quotas.items():
        limits = [f"{q['requests_per_min']} req/min" if q["requests_per_min"] else "",
                  f"{q['tokens_per_min']} tok/min" if q["tokens_per_min"] else "",
                  f"{q['concurrent']} concurrent" if q["concurrent"] else ""]
        parts.append(f"{tier}: " + ", ".join(x for x in limits if x))
    return "; ".join(parts) or "unlimited"


@tenants_app.command("create")
def tenants_create(
    name: str = typer.Argument(..., help="tenant name: 1-63 of a-z, 0-9, '-', '_'"),
    description: str = typer.Option("", "--description", "-d", help="free text"),
    controller: str = ControllerOpt, json_out: bool = JsonOpt,
) -> None:
    """Create a tenant (unlimited until `tenants quota` sets limits)."""
    t = run_rpc(lambda: _call(controller, "CreateTenant", pb.CreateTenantRequest(name=_name(name), description=description)), controller)
    if json_out:
        print_json(tenant_dict(t))
    else:
        console.print(f"created tenant {t.name}", highlight=False)


@tenants_app.command("list")
def tenants_list(controller: str = ControllerOpt, json_out: bool = JsonOpt) -> None:
    """Every tenant with its quotas and number of active keys."""
    resp = run_rpc(lambda: _call(controller, "ListTenants", pb.ListTenantsRequest()), controller)
    items = [tenant_dict(t) for t in resp.tenants]
    if json_out:
        print_json(items)
        return
    table = Table(title=f"{len(items)} tenant(s)")
    for col in ("tenant", "description", "created", "active keys", "quotas per tier"):
        table.add_column(col)
    for i in items:
        table.add_row(i["name"], i["description"], _ts(i["created_unix_ms"]), str(i["active_keys"]), _quota_text(i["quotas"]))
    console.print(table)


@tenants_app.command("delete")
def tenants_delete(name: str = typer.Argument(..., help="tenant name"), controller: str = ControllerOpt, json_out: bool = JsonOpt) -> None:
    """Delete a tenant and revoke all its keys (routers refuse them within the watch latency)."""
    r = run_rpc(lambda: _call(controller, "DeleteTenant", pb.DeleteTenantRequest(name=_name(name))), controller)
    if json_out:
        print_json({"name": r.name, "revoked_keys": r.revoked_keys})
    else:
        console.print(f"deleted tenant {r.name}; revoked {r.revoked_keys} key(s)", highlight=False)


@tenants_app.command("quota")
def tenants_quota(
    name: str = typer.Argument(..., help="tenant name"),
    tier: str = typer.Option("default", "--tier", help="priority, default, flex or batch"),
    rpm: int = typer.Option(None, "--rpm", min=0, help="requests per minute (0: unlimited; omitted: unchanged)"),
    tpm: int = typer.Option(None, "--tpm", min=0, help="prompt + completion tokens per minute (0: unlimited; omitted: unchanged)"),
    concurrency: int = typer.Option(None, "--concurrency", min=0, help="requests running at once (0: unlimited; omitted: unchanged)"),
    controller: str = ControllerOpt, json_out: bool = JsonOpt,
) -> None:
    """Set a tenant's limits for one tier. Every router enforces its share (docs/tenancy.md)."""
    if tier not in TIER_VALUES:
        raise typer.BadParameter(f"unknown tier {tier!r}; choose from {', '.join(TIER_VALUES)}", param_hint="--tier")
    if rpm is None and tpm is None and concurrency is None:
        raise typer.BadParameter("give at least one limit to set", param_hint="--rpm/--tpm/--concurrency")
    req = pb.SetQuotaRequest(tenant=_name(name), tier=TIER_VALUES[tier])
    for field, value in (("requests_per_min", rpm), ("tokens_per_min", tpm), ("concurrent", concurrency)):
        if value is not None:
            setattr(req, field, value)
    t = run_rpc(lambda: _call(controller, "SetQuota", req), controller)
    d = tenant_dict(t)
    if json_out:
        print_json(d)
    else:
        console.print(f"{t.name}: {_quota_text(d['quotas'])}", highlight=False)


@keys_app.command("create")
def keys_create(
    name: str = typer.Argument(..., help="tenant the key authenticates as"),
    description: str = typer.Option("", "--description", "-d", help="free text"),
    controller: str = ControllerOpt, json_out: bool = JsonOpt,
) -> None:
    """Create an API key. It is printed once: only its hash is stored."""
    r = run_rpc(lambda: _call(controller, "CreateKey", pb.CreateKeyRequest(tenant=_name(name), description=description)), controller)
    if json_out:
        print_json({"key": r.key, **key_dict(r.info)})
    else:
        console.print(r.key, highlight=False, soft_wrap=True)
    err_console.print(f"[yellow]warning:[/yellow] store this key now; it is shown only once (key id {r.info.key_id}, "
                      f"tenant {r.info.tenant}). Send it as 'authorization: Bearer <key>' "
                      "(kvfleet generate --api-key or KVFLEET_API_KEY).", highlight=False)


@keys_app.command("list")
def keys_list(
    tenant: str = typer.Option("", "--tenant", help="only this tenant's keys"),
    controller: str = ControllerOpt, json_out: bool = JsonOpt,
) -> None:
    """API keys by id (the keys themselves are never shown again)."""
    if tenant:
        _name(tenant, "--tenant")
    resp = run_rpc(lambda: _call(controller, "ListKeys", pb.ListKeysRequest(tenant=tenant)), controller)
    items = [key_dict(k) for k in resp.keys]
    if json_out:
        print_json(items)
        return
    table = Table(title=f"{len(items)} API key(s)")
    for col in ("key id", "tenant", "description", "created", "status"):
        table.add_column(col)
    for i in items:
        status = f"revoked {_ts(i['revoked_unix_ms'])}" if i["revoked"] else "active"
        table.add_row(i["key_id"], i["tenant"] + (" (internal)" if i["internal"] else ""), i["description"],
                      _ts(i["created_unix_ms"]), status)
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="key id from `tenants keys list`"),
                controller: str = ControllerOpt, json_out: bool = JsonOpt) -> None:
    """Revoke an API key; routers refuse it within the watch latency (milliseconds)."""
    k = run_rpc(lambda: _call(controller, "RevokeKey", pb.RevokeKeyRequest(key_id=key_id)), controller)
    if json_out:
        print_json(key_dict(k))
    else:
        console.print(f"revoked {k.key_id} (tenant {k.tenant})", highlight=False)
