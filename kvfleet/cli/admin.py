"""`kvfleet nodes ...` and `kvfleet tokens ...`: the admin API, as tables or JSON."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone

import grpc
import typer
from rich.table import Table

from kvfleet.cli.common import ControllerOpt, JsonOpt, console, fail, print_json, run_rpc, to_dict
from kvfleet.v1 import common_pb2 as cpb
from kvfleet.v1 import controller_pb2 as pb
from kvfleet.v1 import controller_pb2_grpc as pbg

nodes_app = typer.Typer(help="List, inspect, cordon, uncordon and drain nodes.", no_args_is_help=True)
tokens_app = typer.Typer(help="Create, list and revoke join tokens.", no_args_is_help=True)

STATE = {
    cpb.NODE_STATE_READY: "ready", cpb.NODE_STATE_NOT_READY: "not_ready", cpb.NODE_STATE_CORDONED: "cordoned",
    cpb.NODE_STATE_DRAINING: "draining", cpb.NODE_STATE_DRAINED: "drained", cpb.NODE_STATE_UNSPECIFIED: "offline",
}
TRACKING = {cpb.CACHE_TRACKING_EXACT: "exact", cpb.CACHE_TRACKING_APPROXIMATE: "approximate"}


def node_dict(n: pb.NodeRecord) -> dict:
    """The stable JSON shape of a node (documented in README)."""
    return {
        "node_id": n.node_id,
        "address": n.address,
        "hostname": n.hostname,
        "state": STATE[n.state],
        "alive": n.alive,
        "models": [
            {"name": m.name, "engine": m.engine, "block_size": m.block_size, "capacity_blocks": m.num_blocks,
             "max_model_len": m.max_model_len, "prefill_tokens_per_s": m.prefill_tokens_per_s,
             "decode_tokens_per_s": m.decode_tokens_per_s, "cache_tracking": TRACKING.get(m.cache_tracking, "exact")}
            for m in n.models
        ],
        "capacity_blocks": sum(m.num_blocks for m in n.models),
        "cached_blocks": n.load.cached_blocks,
        "load": {"running": n.load.running, "waiting": n.load.waiting, "kv_usage": round(n.load.kv_usage, 4),
                 "queued_prefill_tokens": n.load.queued_prefill_tokens, "inflight": n.load.inflight},
        "last_heartbeat_unix_ms": n.last_heartbeat_unix_ms,
    }


def _stub(ch: grpc.aio.Channel) -> pbg.ControllerStub:
    return pbg.ControllerStub(ch)


async def _call(controller: str, method: str, req):
    async with grpc.aio.insecure_channel(controller) as ch:
        return await getattr(_stub(ch), method)(req, timeout=10.0)


@nodes_app.command("list")
def nodes_list(controller: str = ControllerOpt, json_out: bool = JsonOpt) -> None:
    """Every node holding a lease: state, models, capacity, cache and load."""
    resp = run_rpc(lambda: _call(controller, "ListNodes", pb.ListNodesRequest()), controller)
    routers = run_rpc(lambda: _call(controller, "ListRouters", pb.ListRoutersRequest()), controller).routers
    nodes = [node_dict(n) for n in resp.nodes]
    if json_out:
        print_json(nodes)
        return
    t = Table(title=f"{len(nodes)} node(s)")
    for col in ("node", "address", "state", "models", "tracking", "capacity", "cached", "running", "waiting", "kv use", "queued tok"):
        t.add_column(col)
    for n in nodes:
        t.add_row(n["node_id"], n["address"], n["state"], ",".join(m["name"] for m in n["models"]),
                  ",".join(sorted({m["cache_tracking"] for m in n["models"]})),
                  str(n["capacity_blocks"]), str(n["cached_blocks"]), str(n["load"]["running"]),
                  str(n["load"]["waiting"]), f"{n['load']['kv_usage']:.0%}", str(n["load"]["queued_prefill_tokens"]))
    console.print(t)
    console.print(routers_table(routers))


TIERS = ("priority", "default", "flex", "batch")


def routers_table(routers) -> Table:
    """The live routers' admission queues: waiting / in flight, per tier."""
    t = Table(title=f"{len(routers)} router(s): queued / in flight per tier")
    for col in ("router", "address", *TIERS):
        t.add_column(col)
    for r in routers:
        t.add_row(r.router_id, r.address, *(f"{r.queue_depth.get(k, 0)} / {r.inflight.get(k, 0)}" for k in TIERS))
    return t


@nodes_app.command("routers")
def nodes_routers(controller: str = ControllerOpt, json_out: bool = JsonOpt) -> None:
    """The live routers and the queue depth of each tier in their admission queues."""
    routers = run_rpc(lambda: _call(controller, "ListRouters", pb.ListRoutersRequest()), controller).routers
    if json_out:
        print_json([to_dict(r) for r in routers])
        return
    console.print(routers_table(routers))


async def _node_blocks(address: str) -> dict[str, list[str]]:
    """The node's cached canonical block hashes, per model, from its state stream's snapshot."""
    from kvfleet.v1 import node_pb2 as npb
    from kvfleet.v1 import node_pb2_grpc as npbg

    async with grpc.aio.insecure_channel(address) as ch:
        call = npbg.NodeAgentStub(ch).WatchState(npb.WatchStateRequest(), timeout=10.0)
        snap = await call.read()
        call.cancel()
    return {mb.model: [f"{h:016x}" for h in mb.block_hashes] for mb in snap.stored}


@nodes_app.command("show")
def nodes_show(
    node_id: str = typer.Argument(..., help="node id"), controller: str = ControllerOpt, json_out: bool = JsonOpt,
    blocks: bool = typer.Option(False, "--blocks", help="also list every cached block (canonical hash), asked of the node itself"),
) -> None:
    """One node, with the summary of its cached prefixes (chain heads and depths)."""
    n = run_rpc(lambda: _call(controller, "GetNode", pb.NodeRef(node_id=node_id)), controller)
    d = node_dict(n)
    if blocks:
        if not n.address:
            fail(f"{node_id} is offline: its blocks cannot be listed")
        d["blocks"] = run_rpc(lambda: _node_blocks(n.address), n.address)
    d["cache_summaries"] = [
        {"model": s.model, "cached_blocks": s.cached_blocks,
         "heads": [{"block_hash": f"{h.block_hash:016x}", "depth_blocks": h.depth} for h in s.heads]}
        for s in n.summaries
    ]
    if json_out:
        print_json(d)
        return
    console.print(f"[bold]{d['node_id']}[/bold] {d['address']} state={d['state']} cached={d['cached_blocks']}/{d['capacity_blocks']} blocks")
    for m in d["models"]:
        console.print(f"  model {m['name']} ({m['engine']}, block {m['block_size']}, {m['cache_tracking']} tracking)")
    for s in d["cache_summaries"]:
        t = Table(title=f"{s['model']}: {s['cached_blocks']} cached blocks, deepest chains")
        t.add_column("chain head")
        t.add_column("depth (blocks)")
        for h in s["heads"]:
            t.add_row(h["block_hash"], str(h["depth_blocks"]))
        console.print(t)
    for model, hashes in d.get("blocks", {}).items():
        console.print(f"{model}: {len(hashes)} cached blocks")
        for i in range(0, len(hashes), 4):
            console.print("  " + "  ".join(hashes[i : i + 4]), highlight=False)


def _admin(method: str, node_id: str, controller: str, json_out: bool) -> pb.NodeRecord:
    n = run_rpc(lambda: _call(controller, method, pb.NodeRef(node_id=node_id)), controller)
    if json_out:
        print_json(node_dict(n))
    else:
        console.print(f"{n.node_id}: {STATE[n.state]}")
    return n


@nodes_app.command("cordon")
def nodes_cordon(node_id: str, controller: str = ControllerOpt, json_out: bool = JsonOpt) -> None:
    """Stop sending new work to a node; in-flight work continues."""
    _admin("Cordon", node_id, controller, json_out)


@nodes_app.command("uncordon")
def nodes_uncordon(node_id: str, controller: str = ControllerOpt, json_out: bool = JsonOpt) -> None:
    """Return a cordoned, draining or drained node to service."""
    _admin("Uncordon", node_id, controller, json_out)


@nodes_app.command("drain")
def nodes_drain(
    node_id: str, controller: str = ControllerOpt, json_out: bool = JsonOpt,
    wait: bool = typer.Option(False, "--wait", help="wait until the node reports drained"),
    timeout: float = typer.Option(300.0, "--timeout", min=0.0, help="seconds to wait with --wait"),
) -> None:
    """No new work; wait for in-flight work to finish; then the node is drained."""
    if not wait:
        _admin("Drain", node_id, controller, json_out)
        return
    n = run_rpc(lambda: _call(controller, "Drain", pb.NodeRef(node_id=node_id)), controller)
    deadline = time.monotonic() + timeout
    while n.state != cpb.NODE_STATE_DRAINED:
        if time.monotonic() > deadline:
            fail(f"{node_id} still {STATE[n.state]} after {timeout:.0f} s (--timeout)")
        time.sleep(0.5)
        n = run_rpc(lambda: _call(controller, "GetNode", pb.NodeRef(node_id=node_id)), controller)
    if json_out:
        print_json(node_dict(n))
    else:
        console.print(f"{n.node_id}: drained")


def _ts(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ") if ms else "never"


def token_dict(t: pb.JoinTokenInfo) -> dict:
    expired = bool(t.expires_unix_ms) and t.expires_unix_ms < time.time() * 1000
    return {"id": t.id, "description": t.description, "created_unix_ms": t.created_unix_ms,
            "expires_unix_ms": t.expires_unix_ms, "revoked": t.revoked, "expired": expired, "uses": t.uses}


@tokens_app.command("create")
def tokens_create(
    ttl: str = typer.Option("24h", "--ttl", help="lifetime: e.g. 30m, 24h, 7d; 0 for none"),
    description: str = typer.Option("", "--description", "-d", help="free text"),
    controller: str = ControllerOpt, json_out: bool = JsonOpt,
) -> None:
    """Create a join token. The token is printed once; only its hash is stored."""
    seconds = parse_duration(ttl, "--ttl")
    resp = run_rpc(lambda: _call(controller, "CreateJoinToken", pb.CreateJoinTokenRequest(ttl_s=seconds, description=description)), controller)
    if json_out:
        print_json({"token": resp.token, **token_dict(resp.info)})
    else:
        console.print(resp.token, highlight=False)
        console.print(f"[dim]id {resp.info.id}, expires {_ts(resp.info.expires_unix_ms)}[/dim]", highlight=False)


@tokens_app.command("list")
def tokens_list(controller: str = ControllerOpt, json_out: bool = JsonOpt) -> None:
    """Join tokens (ids only; tokens themselves are never shown again)."""
    resp = run_rpc(lambda: _call(controller, "ListJoinTokens", pb.ListJoinTokensRequest()), controller)
    items = [token_dict(t) for t in resp.tokens]
    if json_out:
        print_json(items)
        return
    t = Table(title=f"{len(items)} join token(s)")
    for col in ("id", "description", "created", "expires", "status", "uses"):
        t.add_column(col)
    for i in items:
        status = "revoked" if i["revoked"] else "expired" if i["expired"] else "valid"
        t.add_row(i["id"], i["description"], _ts(i["created_unix_ms"]), _ts(i["expires_unix_ms"]), status, str(i["uses"]))
    console.print(t)


@tokens_app.command("revoke")
def tokens_revoke(token_id: str = typer.Argument(..., help="token id from `tokens list`"), controller: str = ControllerOpt, json_out: bool = JsonOpt) -> None:
    """Revoke a join token; nodes that already joined keep their credentials."""
    info = run_rpc(lambda: _call(controller, "RevokeJoinToken", pb.RevokeJoinTokenRequest(id=token_id)), controller)
    if json_out:
        print_json(token_dict(info))
    else:
        console.print(f"revoked {info.id}")


def parse_duration(value: str, flag: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    v = value.strip().lower()
    try:
        if v and v[-1] in units:
            n = float(v[:-1]) * units[v[-1]]
        else:
            n = float(v)
    except ValueError:
        raise typer.BadParameter(f"expected a duration like 90s, 30m, 24h or 7d, got {value!r}", param_hint=flag) from None
    if n < 0:
        raise typer.BadParameter("must not be negative", param_hint=flag)
    return int(n)
