"""gRPC edge of the controller: translates kvfleet.v1.Controller calls to Membership."""

from __future__ import annotations

import logging
from typing import AsyncIterator

import grpc
from prometheus_client import Counter, Gauge

from kvfleet.controller.membership import AuthError, Load, Membership, NodeStatus, NotFound, now_ms
from kvfleet.controller.registry import CacheSummaries, CacheSummaryEntry, ChainHeadEntry, JoinToken, ModelEntry
from kvfleet.v1 import common_pb2 as cpb
from kvfleet.v1 import controller_pb2 as pb
from kvfleet.v1 import controller_pb2_grpc as pbg

log = logging.getLogger(__name__)

JOINS = Counter("kvfleet_controller_joins_total", "Successful node joins", ["kind"])
JOIN_FAILURES = Counter("kvfleet_controller_join_failures_total", "Rejected joins", ["reason"])
HEARTBEATS = Counter("kvfleet_controller_heartbeats_total", "Heartbeats received")
NODES = Gauge("kvfleet_controller_nodes", "Nodes by state", ["state"])

STATE_TO_PB = {
    "ready": cpb.NODE_STATE_READY, "not_ready": cpb.NODE_STATE_NOT_READY, "cordoned": cpb.NODE_STATE_CORDONED,
    "draining": cpb.NODE_STATE_DRAINING, "drained": cpb.NODE_STATE_DRAINED, "offline": cpb.NODE_STATE_UNSPECIFIED,
}
TRACKING_TO_PB = {"exact": cpb.CACHE_TRACKING_EXACT, "approximate": cpb.CACHE_TRACKING_APPROXIMATE}
TRACKING_FROM_PB = {v: k for k, v in TRACKING_TO_PB.items()}


def model_from_pb(m: cpb.ModelInfo) -> ModelEntry:
    return ModelEntry(
        name=m.name, block_size=m.block_size, num_blocks=m.num_blocks, max_model_len=m.max_model_len,
        prefill_tokens_per_s=m.prefill_tokens_per_s, decode_tokens_per_s=m.decode_tokens_per_s,
        tokenizer_digest=m.tokenizer_digest, cache_tracking=TRACKING_FROM_PB.get(m.cache_tracking, "exact"),
        engine=m.engine, max_num_batched_tokens=m.max_num_batched_tokens, max_num_seqs=m.max_num_seqs,
    )


def model_to_pb(m: ModelEntry) -> cpb.ModelInfo:
    return cpb.ModelInfo(
        name=m.name, block_size=m.block_size, num_blocks=m.num_blocks, max_model_len=m.max_model_len,
        prefill_tokens_per_s=m.prefill_tokens_per_s, decode_tokens_per_s=m.decode_tokens_per_s,
        tokenizer_digest=m.tokenizer_digest, cache_tracking=TRACKING_TO_PB[m.cache_tracking], engine=m.engine,
        max_num_batched_tokens=m.max_num_batched_tokens, max_num_seqs=m.max_num_seqs,
    )


def load_from_pb(l: cpb.LoadSignals) -> Load:
    return Load(l.running, l.waiting, l.kv_usage, l.queued_prefill_tokens, l.cached_blocks, l.inflight)


def load_to_pb(l: Load) -> cpb.LoadSignals:
    return cpb.LoadSignals(
        running=l.running, waiting=l.waiting, kv_usage=l.kv_usage,
        queued_prefill_tokens=l.queued_prefill_tokens, cached_blocks=l.cached_blocks, inflight=l.inflight,
    )


def summaries_to_pb(s: CacheSummaries | None) -> list[cpb.CacheSummary]:
    if s is None:
        return []
    return [
        cpb.CacheSummary(model=e.model, cached_blocks=e.cached_blocks,
                         heads=[cpb.ChainHead(block_hash=h.block_hash, depth=h.depth) for h in e.heads])
        for e in s.summaries
    ]


def summaries_from_pb(items, now_ms: int) -> CacheSummaries | None:
    if not items:
        return None
    return CacheSummaries(updated_unix_ms=now_ms, summaries=[
        CacheSummaryEntry(model=s.model, cached_blocks=s.cached_blocks,
                          heads=[ChainHeadEntry(block_hash=h.block_hash, depth=h.depth) for h in s.heads])
        for s in items
    ])


def status_to_pb(s: NodeStatus) -> pb.NodeRecord:
    return pb.NodeRecord(
        node_id=s.entry.node_id, address=s.entry.address, state=STATE_TO_PB[s.state],
        models=[model_to_pb(m) for m in s.entry.models], load=load_to_pb(s.load),
        joined_unix_ms=s.entry.joined_unix_ms, last_heartbeat_unix_ms=s.last_heartbeat_ms,
        summaries=summaries_to_pb(s.summaries), alive=s.alive, hostname=s.entry.hostname,
    )


def token_to_pb(t: JoinToken) -> pb.JoinTokenInfo:
    return pb.JoinTokenInfo(
        id=t.id, description=t.description, created_unix_ms=t.created_unix_ms,
        expires_unix_ms=t.expires_unix_ms, revoked=t.revoked, uses=t.uses,
    )


class ControllerService(pbg.ControllerServicer):
    def __init__(self, membership: Membership, heartbeat_interval_ms: int = 1000) -> None:
        self.m = membership
        self.heartbeat_interval_ms = heartbeat_interval_ms

    async def Join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext) -> pb.JoinResponse:
        try:
            node_id, credential = await self.m.join(
                token=request.token, node_id=request.node_id, credential=request.credential,
                address=request.address, hostname=request.hostname,
                models=[model_from_pb(m) for m in request.models],
            )
        except AuthError as exc:
            JOIN_FAILURES.labels("auth").inc()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        except ValueError as exc:
            JOIN_FAILURES.labels("invalid").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        JOINS.labels("rejoin" if request.node_id else "new").inc()
        return pb.JoinResponse(
            node_id=node_id, credential=credential, lease_ttl_s=self.m.lease_ttl_s,
            heartbeat_interval_ms=self.heartbeat_interval_ms,
        )

    async def Heartbeat(
        self, request_iterator: AsyncIterator[pb.HeartbeatRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.HeartbeatResponse]:
        md = dict(context.invocation_metadata() or ())
        node_id = md.get("x-kvfleet-node-id", "")
        auth = md.get("authorization", "")
        credential = auth.removeprefix("Bearer ").strip()
        try:
            await self.m.authenticate(node_id, credential)
        except AuthError as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        try:
            async for hb in request_iterator:
                HEARTBEATS.inc()
                summaries = summaries_from_pb(hb.summaries, now_ms())
                try:
                    state = await self.m.heartbeat(node_id, hb.ready, load_from_pb(hb.load), summaries)
                except NotFound as exc:
                    await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
                yield pb.HeartbeatResponse(state=STATE_TO_PB[state])
        finally:
            await self.m.leave(node_id)

    async def ListNodes(self, request, context) -> pb.ListNodesResponse:
        statuses = await self.m.statuses()
        counts: dict[str, int] = {}
        for s in statuses:
            counts[s.state] = counts.get(s.state, 0) + 1
        for state in STATE_TO_PB:
            NODES.labels(state).set(counts.get(state, 0))
        return pb.ListNodesResponse(nodes=[status_to_pb(s) for s in statuses])

    async def GetNode(self, request: pb.NodeRef, context) -> pb.NodeRecord:
        try:
            return status_to_pb(await self.m.status(request.node_id))
        except NotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))

    async def _admin(self, request: pb.NodeRef, context, state: str) -> pb.NodeRecord:
        try:
            await self.m.set_admin(request.node_id, state)  # type: ignore[arg-type]
            return status_to_pb(await self.m.status(request.node_id))
        except NotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))

    async def Cordon(self, request, context):
        return await self._admin(request, context, "cordoned")

    async def Uncordon(self, request, context):
        return await self._admin(request, context, "")

    async def Drain(self, request, context):
        return await self._admin(request, context, "draining")

    async def CreateJoinToken(self, request: pb.CreateJoinTokenRequest, context) -> pb.CreateJoinTokenResponse:
        secret, token = await self.m.create_token(request.ttl_s, request.description)
        return pb.CreateJoinTokenResponse(token=secret, info=token_to_pb(token))

    async def ListJoinTokens(self, request, context) -> pb.ListJoinTokensResponse:
        return pb.ListJoinTokensResponse(tokens=[token_to_pb(t) for t in await self.m.list_tokens()])

    async def RevokeJoinToken(self, request: pb.RevokeJoinTokenRequest, context) -> pb.JoinTokenInfo:
        try:
            return token_to_pb(await self.m.revoke_token(request.id))
        except NotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))

    async def ListRouters(self, request, context) -> pb.ListRoutersResponse:
        routers = sorted(await self.m.registry.list_routers(), key=lambda r: r.started_unix_ms)
        return pb.ListRoutersResponse(routers=[
            pb.RouterRecord(router_id=r.router_id, address=r.address, started_unix_ms=r.started_unix_ms,
                            queue_depth=r.queue_depth, inflight=r.inflight)
            for r in routers
        ])
