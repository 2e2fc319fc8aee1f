"""The router's live view of the fleet: registry watch plus one WatchState stream per node.

State flows one way: node agent -> WatchState stream -> (PrefixIndex, NodeConn.load) ->
NodeView -> policy. This module is the adapter that keeps that view current; it makes
no routing decisions.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import grpc
import numpy as np

from kvfleet.controller.registry import AdminEntry, ModelEntry, NodeEntry, Registry
from kvfleet.controller.router.index import FleetIndex
from kvfleet.controller.router.mux import CallMux, NodeMux, NodeStream
from kvfleet.controller.router.nodes import NodeTable, NodeView
from kvfleet.v1 import node_pb2 as npb
from kvfleet.v1 import node_pb2_grpc as npbg

log = logging.getLogger(__name__)

# How long blocks learned from a routed prompt count as held on an exact-tracking node
# without its KV events confirming them (Fleet.learn).
PROVISIONAL_S = 5.0

CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
]


class ApproxCache:
    """What a node probably holds, learned from the prompts this router sent it, for
    engines that publish no KV events. Bounded by the engine's capacity in blocks (LRU)
    and by age (``ttl_s``): an entry nobody re-used for that long has likely been
    evicted by traffic this router did not see. O(1) per block."""

    __slots__ = ("capacity", "ttl_s", "_seen")

    def __init__(self, capacity: int, ttl_s: float = 600.0) -> None:
        self.capacity, self.ttl_s = max(capacity, 1), ttl_s
        self._seen: OrderedDict[int, float] = OrderedDict()  # block hash -> last use (monotonic s)

    def learn(self, hashes: np.ndarray, now: float) -> tuple[np.ndarray, list[int]]:
        """Records a routed prompt's blocks; returns (blocks to store, blocks to drop)."""
        seen = self._seen
        for h in reversed(hashes.tolist()):   # the first blocks last: the LRU drops a prompt's tail first
            seen[h] = now
            seen.move_to_end(h)
        dropped = []
        while seen and (len(seen) > self.capacity or next(iter(seen.values())) < now - self.ttl_s):
            dropped.append(seen.popitem(last=False)[0])
        return hashes, dropped

    def __len__(self) -> int:
        return len(self._seen)


@dataclass(slots=True)
class NodeConn:
    """One node as this router sees it."""

    entry: NodeEntry
    admin: str = ""
    channel: grpc.aio.Channel | None = None
    stub: npbg.NodeAgentStub | None = None
    connected: bool = False        # WatchState stream open and snapshot applied
    ready: bool = False            # node says its engine takes requests
    suspect: bool = False          # missed a first-token deadline; cleared by the next state update
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    decode_step_s: float = 0.0
    queued_prefill_tokens: int = 0
    cached_blocks: int = 0
    last_seq: int = 0
    pending: dict[str, int] = field(default_factory=dict)  # request id -> uncached tokens sent, not yet visible
    pending_tokens: int = 0
    pending_sent: dict[str, float] = field(default_factory=dict)  # request id -> when it was sent (monotonic)
    updated_at: float = 0.0        # monotonic time of the last state update
    approx: dict[str, ApproxCache] = field(default_factory=dict)  # model -> learned cache (no KV events)
    # model -> {block hash: until (monotonic s)}: blocks of prompts this router routed here that the
    # node's KV events have not confirmed yet (see Fleet.learn)
    provisional: dict[str, dict[int, float]] = field(default_factory=dict)
    task: asyncio.Task | None = None
    mux: NodeMux | CallMux | None = None   # this router's requests to the node (see mux.py)
    serve_level: int = 0           # what the node's Serve takes (StateUpdate.serve_level)
    snapshot_at: float = 0.0       # monotonic time of the node's last state snapshot (a new subscription)

    def stream(self, request: npb.NodeGenerateRequest) -> NodeStream:
        """Sends ``request`` on the node's Serve stream, opening one if there is none or
        the last one failed; for a node agent without Serve, as its own Generate call."""
        if self.mux is None or self.mux.closed or (
                isinstance(self.mux, CallMux) and self.serve_level >= 1 and self.snapshot_at > self.mux.created_at):
            # (A node agent restarted since it answered UNIMPLEMENTED, and now with Serve, gets
            # one stream again; the calls already running go on.)
            if isinstance(self.mux, NodeMux) and self.mux.unimplemented:
                log.warning("router: node %s has no Serve (an older node agent): one call per request",
                            self.entry.node_id)
                self.mux = CallMux(self.stub, self.entry.node_id)
            else:
                self.mux = NodeMux(self.stub, self.entry.node_id, batches=self.serve_level >= 1)
        return self.mux.start(request)

    def set_serve_level(self, level: int) -> None:
        """What the node agent's Serve takes (StateUpdate.serve_level); at 1 and over,
        ``stream`` sends over Serve (never one call per request), batched."""
        self.serve_level = level
        if isinstance(self.mux, NodeMux):
            self.mux.batches = level >= 1

    @property
    def routable(self) -> bool:
        return self.connected and self.ready and not self.suspect and self.admin == ""

    @property
    def models(self) -> dict[str, ModelEntry]:
        return {m.name: m for m in self.entry.models}

    def state_name(self) -> str:
        if self.admin:
            return self.admin
        if not self.connected:
            return "unreachable"
        if self.suspect:
            return "suspect"
        return "ready" if self.ready else "not_ready"


class Fleet:
    """Keeps ``nodes`` and ``index`` current. Call ``run()`` as a task."""

    def __init__(self, registry: Registry | None, index: FleetIndex | None = None) -> None:
        self.registry = registry
        self.index = index or FleetIndex()
        self.nodes: dict[str, NodeConn] = {}
        self.synced = asyncio.Event()   # registry snapshot applied
        self.changed = asyncio.Event()  # any node became routable (wakes waiters)
        self._admin_cache: dict[str, AdminEntry] = {}
        self._tables: dict[str, NodeTable] = {}  # model -> its nodes' columns (see columns())

    # -- registry ------------------------------------------------------------------------------
    async def run(self) -> None:
        assert self.registry is not None
        while True:
            try:
                events, _, watch = await self.registry.snapshot_and_watch(("nodes", "admin"))
                admin: dict[str, AdminEntry] = {}
                seen: set[str] = set()
                for ev in events:
                    if ev.kind == "node":
                        seen.add(ev.node_id)
                        self._upsert(ev.value)  # type: ignore[arg-type]
                    elif ev.kind == "admin":
                        admin[ev.node_id] = ev.value  # type: ignore[assignment]
                for node_id in list(self.nodes):
                    if node_id not in seen:
                        self._remove(node_id)
                for node_id, entry in admin.items():
                    self._set_admin(node_id, entry.state)
                self._admin_cache = dict(admin)
                self.synced.set()
                async for ev in watch:
                    if ev.kind == "node":
                        if ev.value is None:
                            self._remove(ev.node_id)
                        else:
                            self._upsert(ev.value)  # type: ignore[arg-type]
                            self._set_admin(ev.node_id, self._admin_cache.get(ev.node_id, AdminEntry()).state)
                    elif ev.kind == "admin":
                        entry = ev.value or AdminEntry()
                        self._admin_cache[ev.node_id] = entry  # type: ignore[assignment]
                        self._set_admin(ev.node_id, entry.state)  # type: ignore[union-attr]
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd hiccup: re-list and re-watch
                log.warning("registry watch failed (%s); re-listing in 1 s", exc)
                await asyncio.sleep(1.0)

    def _set_admin(self, node_id: str, state: str) -> None:
        conn = self.nodes.get(node_id)
        if conn is not None:
            conn.admin = state
            self._sync(conn)

    def _upsert(self, entry: NodeEntry) -> None:
        conn = self.nodes.get(entry.node_id)
        if conn is not None and conn.entry.address == entry.address and conn.entry.models == entry.models:
            conn.entry = entry
            self._sync(conn)
            return
        if conn is not None:
            self._remove(entry.node_id)
        conn = NodeConn(entry=entry)
        conn.channel = grpc.aio.insecure_channel(entry.address, options=CHANNEL_OPTIONS)
        conn.stub = npbg.NodeAgentStub(conn.channel)
        self.nodes[entry.node_id] = conn
        for m in entry.models:
            self.index.get_or_create(m.name, m.block_size).add_node(entry.node_id)
        self._sync(conn)
        conn.task = asyncio.create_task(self._watch_node(conn), name=f"watch-{entry.node_id}")
        log.info("router: node %s at %s", entry.node_id, entry.address)

    def _remove(self, node_id: str) -> None:
        conn = self.nodes.pop(node_id, None)
        if conn is None:
            return
        if conn.task is not None:
            conn.task.cancel()
        if conn.mux is not None:
            asyncio.create_task(conn.mux.close())
        if conn.channel is not None:
            asyncio.create_task(conn.channel.close())
        self.index.remove_node(node_id)
        for m in conn.entry.models:
            if (table := self._tables.get(m.name)) is not None:
                table.remove(node_id)
        log.info("router: node %s left", node_id)

    # -- per-node state stream -------------------------------------------------------------------
    async def _watch_node(self, conn: NodeConn) -> None:
        backoff = 0.1
        while True:
            try:
                stream = conn.stub.WatchState(npb.WatchStateRequest())  # type: ignore[union-attr]
                async for update in stream:
                    self.apply_update(conn, update)
                    backoff = 0.1
                raise ConnectionError("state stream ended")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if conn.connected:
                    log.warning("router: lost state stream of %s: %s", conn.entry.node_id, exc)
                self._disconnect(conn)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 2.0)

    def _disconnect(self, conn: NodeConn) -> None:
        """The node's cache can no longer be tracked: take it out of routing and the index."""
        conn.connected = False
        conn.set_serve_level(0)   # until the next snapshot says what this node agent takes
        conn.approx.clear()
        conn.provisional.clear()
        for m in conn.entry.models:
            idx = self.index.get(m.name, m.block_size)
            slot = idx.slot_of(conn.entry.node_id) if idx is not None else None
            if slot is not None:
                idx.clear(slot)
        self._sync(conn)

    def apply_update(self, conn: NodeConn, update: npb.StateUpdate) -> None:
        node_id = conn.entry.node_id
        if update.snapshot:
            for m in conn.entry.models:
                idx = self.index.get(m.name, m.block_size)
                if idx is not None and (slot := idx.slot_of(node_id)) is not None:
                    idx.clear(slot)
            conn.provisional.clear()
            conn.snapshot_at = time.monotonic()
        elif update.seq != conn.last_seq + 1:
            log.warning("router: state seq gap on %s (%d -> %d); resubscribing", node_id, conn.last_seq, update.seq)
            raise ConnectionError("sequence gap")
        conn.last_seq = update.seq
        conn.set_serve_level(update.serve_level)
        for name in update.cleared_models:
            self._blocks(conn, name, lambda idx, slot, _: idx.clear(slot), None)
            conn.provisional.pop(name, None)
        for mb in update.removed:
            self._blocks(conn, mb.model, lambda idx, slot, h: idx.remove(slot, h), mb.block_hashes)
        for mb in update.stored:
            if prov := conn.provisional.get(mb.model):
                # Blocks learned provisionally are in the index already: their event only
                # confirms them (no second store).
                fresh = [h for h in mb.block_hashes if prov.pop(h, None) is None]
                if fresh:
                    self._blocks(conn, mb.model, lambda idx, slot, h: idx.store(slot, h), fresh)
                continue
            self._blocks(conn, mb.model, lambda idx, slot, h: idx.store(slot, h), mb.block_hashes)
        if conn.provisional:
            self._settle_provisional(conn, update)
        for rid in update.accepted_request_ids:
            conn.pending_tokens -= conn.pending.pop(rid, 0)
        load = update.load
        conn.running, conn.waiting, conn.kv_usage = load.running, load.waiting, load.kv_usage
        conn.decode_step_s = load.decode_step_s
        conn.updated_at = time.monotonic()
        for rid in update.accepted_request_ids:
            conn.pending_sent.pop(rid, None)
        conn.queued_prefill_tokens, conn.cached_blocks = load.queued_prefill_tokens, load.cached_blocks
        was_routable = conn.routable
        conn.ready, conn.connected, conn.suspect = update.ready, True, False
        self._sync(conn)
        if conn.routable and not was_routable:
            self.changed.set()

    def _settle_provisional(self, conn: NodeConn, update: npb.StateUpdate) -> None:
        """Blocks the node's events now name as gone (removed) are no longer provisional
        (stored ones were confirmed as they were applied); those past their time
        unconfirmed leave the index."""
        for mb in update.removed:
            if (prov := conn.provisional.get(mb.model)) is not None:
                for h in mb.block_hashes:
                    prov.pop(h, None)
        now = time.monotonic()
        for model, prov in list(conn.provisional.items()):
            expired = []
            for h, until in prov.items():   # in the order learned: the oldest first
                if until > now:
                    break
                expired.append(h)
            for h in expired:
                del prov[h]
            if not prov:
                del conn.provisional[model]
            entry = conn.models.get(model)
            if expired and entry is not None:
                idx = self.index.get(model, entry.block_size)
                slot = idx.slot_of(conn.entry.node_id) if idx is not None else None
                if slot is not None:
                    idx.remove(slot, np.array(expired, dtype=np.uint64))

    def _blocks(self, conn: NodeConn, model: str, op, block_hashes) -> None:
        entry = conn.models.get(model)
        if entry is None:
            return
        idx = self.index.get(model, entry.block_size)
        slot = idx.slot_of(conn.entry.node_id) if idx is not None else None
        if slot is None:
            return
        hashes = (np.fromiter(block_hashes, dtype=np.uint64, count=len(block_hashes))
                  if block_hashes is not None else None)
        op(idx, slot, hashes)

    # -- what the router's decisions read ----------------------------------------------------------
    def add_pending(self, node_id: str, request_id: str, tokens: int) -> None:
        conn = self.nodes.get(node_id)
        if conn is not None:
            conn.pending_tokens += tokens - conn.pending.get(request_id, 0)
            conn.pending[request_id] = tokens
            conn.pending_sent.setdefault(request_id, time.monotonic())
            self._sync(conn)

    def drop_pending(self, node_id: str, request_id: str) -> None:
        conn = self.nodes.get(node_id)
        if conn is not None and request_id in conn.pending:
            conn.pending_tokens -= conn.pending.pop(request_id)
            conn.pending_sent.pop(request_id, None)
            self._sync(conn)

    def learn(self, node_id: str, model: str, hashes: np.ndarray) -> None:
        """The node has prefilled a prompt this router sent it (its first token came), so
        it holds the prompt's full blocks now.

        Approximate tracking (an engine without KV events): it probably holds them, for
        a while (``ApproxCache``). Exact tracking: its KV events will say so, but only
        with its next state update (tens of ms, more on a busy node); a request with the
        same prefix that comes meanwhile would find no node holding it. So the blocks
        count as held now, provisionally: the node's events confirm them, or they leave
        the index after ``PROVISIONAL_S`` (an engine that did not keep them)."""
        conn = self.nodes.get(node_id)
        entry = conn.models.get(model) if conn else None
        if conn is None or entry is None or len(hashes) == 0:
            return
        idx = self.index.get(model, entry.block_size)
        slot = idx.slot_of(node_id) if idx is not None else None
        if slot is None:
            return
        if entry.cache_tracking != "approximate":
            # Only blocks it does not hold already: those it holds stay whatever happens here
            # (one provisional block it held would be dropped when its time is up).
            new = hashes[~idx.holds(slot, hashes)]
            if len(new):
                prov = conn.provisional.setdefault(model, {})
                until = time.monotonic() + PROVISIONAL_S
                for h in new.tolist():
                    prov.pop(h, None)
                    prov[h] = until
                idx.store(slot, new)
            return
        cache = conn.approx.setdefault(model, ApproxCache(entry.num_blocks))
        stored, dropped = cache.learn(hashes, time.monotonic())
        if dropped:
            idx.remove(slot, np.array(dropped, dtype=np.uint64))
        idx.store(slot, stored)

    def mark_suspect(self, node_id: str) -> None:
        conn = self.nodes.get(node_id)
        if conn is not None:
            conn.suspect = True
            self._sync(conn)

    def serving(self, model: str) -> list[NodeConn]:
        return [c for c in self.nodes.values() if model in c.models]

    def views(self, model: str) -> list[NodeView]:
        """Frozen views of every node serving ``model`` (O(n) objects: for tools and
        tests; the router's decisions read :meth:`columns`)."""
        return [self._view(c, c.models[model]) for c in self.serving(model)]

    def columns(self, model: str) -> NodeTable:
        """The nodes serving ``model`` as a :class:`NodeTable`, kept current as their state
        changes (each change rewrites one row, O(1)), so a decision reads columns
        instead of building a view per node. The fleet's own table: do not modify."""
        table = self._tables.get(model)
        if table is None:
            table = self._tables[model] = NodeTable()
        return table

    def _view(self, c: NodeConn, m: ModelEntry) -> NodeView:
        idx = self.index.get(m.name, m.block_size)
        slot = idx.slot_of(c.entry.node_id) if idx is not None else None
        return NodeView(
            node_id=c.entry.node_id, address=c.entry.address, routable=c.routable,
            block_size=m.block_size, num_blocks=m.num_blocks,
            prefill_tokens_per_s=m.prefill_tokens_per_s, decode_tokens_per_s=m.decode_tokens_per_s,
            running=c.running, waiting=c.waiting + len(c.pending), kv_usage=c.kv_usage,
            queued_prefill_tokens=c.queued_prefill_tokens + max(c.pending_tokens, 0),
            cached_blocks=c.cached_blocks, slot=-1 if slot is None else slot,
            decode_step_s=c.decode_step_s, max_num_batched_tokens=m.max_num_batched_tokens, max_num_seqs=m.max_num_seqs,
            work_since_s=_work_since(c),
        )

    def _sync(self, conn: NodeConn) -> None:
        """Rewrites ``conn``'s row in the tables of the models it serves (O(1) each); every
        change to what a view shows calls this."""
        if self.nodes.get(conn.entry.node_id) is not conn:
            return   # a replaced or removed connection's late update
        for m in conn.entry.models:
            self.columns(m.name).upsert(self._view(conn, m))

    async def close(self) -> None:
        for node_id in list(self.nodes):
            self._remove(node_id)


def _work_since(c: NodeConn) -> float:
    """Since when ``c`` has had the prefill the router counts for it: its last state update
    if that reported queued prefill, else the first request sent since that it does not
    show yet; inf if neither (see ``policy.queued_now``)."""
    if c.queued_prefill_tokens > 0:
        return c.updated_at
    return min(c.pending_sent.values(), default=float("inf"))
