"""Node membership: joins, credentials, leases, heartbeats, admin state, join tokens.

The controller's domain logic, with etcd behind ``Registry`` and no gRPC types. Live
load lives in memory (heartbeats arrive every second; writing each to etcd would cost
~1.7 ms of disk sync per node per second). etcd holds what must outlive a process:
identities, admin state, tokens, and the leased node records routers watch.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field

from kvfleet.hashing import MAX_BLOCK_SIZE
from kvfleet.controller.registry import (
    AdminEntry,
    AdminState,
    CacheSummaries,
    Identity,
    JoinToken,
    ModelEntry,
    NodeEntry,
    Registry,
    sha256_hex,
)

log = logging.getLogger(__name__)


def now_ms() -> int:
    return int(time.time() * 1000)


class AuthError(Exception):
    """A wrong, expired or revoked join token or credential (gRPC UNAUTHENTICATED)."""


class NotFound(Exception):
    """An unknown node or token (gRPC NOT_FOUND)."""


@dataclass(slots=True)
class Load:
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    queued_prefill_tokens: int = 0
    cached_blocks: int = 0
    inflight: int = 0

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting or self.inflight)


@dataclass(slots=True)
class LiveNode:
    """What the controller knows of a node that holds a lease."""

    entry: NodeEntry
    lease_id: int
    ready: bool = False
    load: Load = field(default_factory=Load)
    last_heartbeat_ms: int = 0
    summaries: CacheSummaries | None = None
    summary_written_at: float = 0.0      # monotonic seconds
    summary_pending: CacheSummaries | None = None


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """A node as ``nodes list`` shows it."""

    entry: NodeEntry
    state: str              # ready, not_ready, cordoned, draining, drained, offline
    alive: bool
    load: Load
    last_heartbeat_ms: int
    summaries: CacheSummaries | None


class Membership:
    """Owns node leases and admin state. One per controller process."""

    def __init__(
        self, registry: Registry, lease_ttl_s: int = 5, summary_interval_s: float = 10.0, heartbeat_interval_ms: int = 1000
    ) -> None:
        self.registry = registry
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.lease_ttl_s = lease_ttl_s
        self.summary_interval_s = summary_interval_s
        self.live: dict[str, LiveNode] = {}
        self.admin: dict[str, AdminEntry] = {}
        self._lock = asyncio.Lock()
        self._admin_locks: dict[str, asyncio.Lock] = {}

    async def load_state(self) -> None:
        self.admin = await self.registry.list_admin()

    # -- join tokens ----------------------------------------------------------------------------
    async def create_token(self, ttl_s: int, description: str) -> tuple[str, JoinToken]:
        secret = "kvf_" + secrets.token_urlsafe(24)
        digest = sha256_hex(secret)
        created = now_ms()
        token = JoinToken(
            id=digest[:12], token_sha256=digest, description=description, created_unix_ms=created,
            expires_unix_ms=created + ttl_s * 1000 if ttl_s else 0,
        )
        await self.registry.put_token(token)
        return secret, token

    async def list_tokens(self) -> list[JoinToken]:
        return sorted(await self.registry.list_tokens(), key=lambda t: t.created_unix_ms)

    async def revoke_token(self, token_id: str) -> JoinToken:
        token = await self.registry.get_token(token_id)
        if token is None:
            raise NotFound(f"no join token with id {token_id!r}")
        token.revoked = True
        await self.registry.put_token(token)
        return token

    async def _check_token(self, secret: str) -> JoinToken:
        digest = sha256_hex(secret)
        token = await self.registry.get_token(digest[:12])
        if token is None or not secrets.compare_digest(token.token_sha256, digest):
            raise AuthError("join token is not valid")
        if token.revoked:
            raise AuthError(f"join token {token.id} was revoked")
        if token.expires_unix_ms and now_ms() > token.expires_unix_ms:
            raise AuthError(f"join token {token.id} expired")
        return token

    # -- join and heartbeat ------------------------------------------------------------------
    async def join(
        self, *, token: str, node_id: str, credential: str, address: str, hostname: str, models: list[ModelEntry]
    ) -> tuple[str, str]:
        """Returns ``(node_id, credential)``. The credential is new on a first join and
        empty on a rejoin (the node keeps the one it has)."""
        if not address:
            raise ValueError("address is required")
        if not models:
            raise ValueError("a node must serve at least one model")
        for m in models:
            if not 1 <= m.block_size <= MAX_BLOCK_SIZE:
                raise ValueError(
                    f"model {m.name!r}: block size {m.block_size} cannot be indexed by the router "
                    f"(supported: 1..{MAX_BLOCK_SIZE} tokens per block)"
                )
        new_credential = ""
        if node_id and credential:
            await self.authenticate(node_id, credential)
        elif token:
            tok = await self._check_token(token)
            node_id = "node-" + secrets.token_hex(4)
            new_credential = "kvn_" + secrets.token_urlsafe(32)
            await self.registry.put_identity(
                Identity(node_id=node_id, credential_sha256=sha256_hex(new_credential), created_unix_ms=now_ms())
            )
            tok.uses += 1
            await self.registry.put_token(tok)
        else:
            raise AuthError("a join token, or a node id with its credential, is required")

        entry = NodeEntry(node_id=node_id, address=address, hostname=hostname, models=models, joined_unix_ms=now_ms())
        async with self._lock:
            # Put the record on the new lease first, then revoke the old one: the key
            # moves between leases without ever being deleted, so routers never see a
            # rejoining node leave (which would cut its in-flight streams).
            old = self.live.get(node_id)
            lease = await self.registry.grant_lease(self.lease_ttl_s)
            await self.registry.put_node(entry, lease)
            self.live[node_id] = LiveNode(entry=entry, lease_id=lease, last_heartbeat_ms=now_ms())
            if old is not None and old.lease_id != lease:
                await self.registry.revoke_lease(old.lease_id)
        log.info("node %s joined from %s serving %s", node_id, address, [m.name for m in models])
        return node_id, new_credential

    async def authenticate(self, node_id: str, credential: str) -> None:
        ident = await self.registry.get_identity(node_id)
        if ident is None or not secrets.compare_digest(ident.credential_sha256, sha256_hex(credential)):
            raise AuthError(f"credential for node {node_id!r} is not valid")

    async def heartbeat(self, node_id: str, ready: bool, load: Load, summaries: CacheSummaries | None) -> str:
        """Refreshes the lease; returns the node's state. Raises NotFound if the node
        must join again (its lease expired and another process may own it now)."""
        node = self.live.get(node_id)
        if node is None:
            raise NotFound(f"node {node_id} is not joined")
        try:
            alive = await self.registry.refresh_lease(node.lease_id)
        except Exception as exc:  # etcd slow or unreachable: a missed keep-alive, not the node's fault
            log.warning("lease keep-alive for %s failed: %s", node_id, exc)
            alive = True
        if not alive:
            # Lease expired (e.g. etcd or controller stall): re-establish the record,
            # unless a concurrent join already replaced this node's lease.
            async with self._lock:
                if self.live.get(node_id) is node:
                    node.lease_id = await self.registry.grant_lease(self.lease_ttl_s)
                    await self.registry.put_node(node.entry, node.lease_id)
                    node.summary_written_at = 0.0
        now = now_ms()
        gap_ms = now - node.last_heartbeat_ms
        if gap_ms > self.lease_ttl_s * 500:
            # Half the lease gone between two heartbeats: the node (or this controller) was
            # starved of CPU or blocked. Logged so that a lost lease can be explained.
            log.warning("heartbeat of %s came %.1f s after the previous one (lease %d s)",
                        node_id, gap_ms / 1000, self.lease_ttl_s)
        node.ready, node.load, node.last_heartbeat_ms = ready, load, now
        if summaries is not None and (node.summaries is None or summaries.summaries != node.summaries.summaries):
            node.summary_pending = summaries
        await self._maybe_write_summary(node)
        await self._advance_drain(node_id)
        return self.state_of(node_id)

    async def _maybe_write_summary(self, node: LiveNode) -> None:
        """Writes the cache summary only when it changed, at most once per interval."""
        pending = node.summary_pending
        if pending is None or time.monotonic() - node.summary_written_at < self.summary_interval_s:
            return
        await self.registry.put_summary(node.entry.node_id, pending, node.lease_id)
        node.summaries, node.summary_pending = pending, None
        node.summary_written_at = time.monotonic()

    async def leave(self, node_id: str) -> None:
        """A node's heartbeat stream ended: let the lease run out (it may reconnect)."""
        log.info("heartbeat stream of %s closed", node_id)

    # -- admin ----------------------------------------------------------------------------------
    async def set_admin(self, node_id: str, state: AdminState) -> None:
        if node_id not in self.live and await self.registry.get_identity(node_id) is None:
            raise NotFound(f"no node {node_id!r}")
        async with self._admin_lock(node_id):
            await self._write_admin(node_id, state)
        if state == "draining":
            await self._advance_drain(node_id)

    def _admin_lock(self, node_id: str) -> asyncio.Lock:
        # Admin changes of one node are serialised: the automatic draining -> drained
        # step must not overwrite an operator's cordon/uncordon issued meanwhile.
        return self._admin_locks.setdefault(node_id, asyncio.Lock())

    async def _write_admin(self, node_id: str, state: AdminState) -> None:
        entry = AdminEntry(state=state, updated_unix_ms=now_ms())
        await self.registry.put_admin(node_id, entry)
        self.admin[node_id] = entry

    async def _advance_drain(self, node_id: str) -> None:
        """draining -> drained once the node reports nothing in flight, in a heartbeat
        sent a full heartbeat interval after the drain began (so that it counts every
        request routers sent before they saw the drain)."""
        if self.admin.get(node_id, AdminEntry()).state != "draining":
            return
        async with self._admin_lock(node_id):
            admin = self.admin.get(node_id, AdminEntry())  # re-read: an operator may have acted
            if admin.state != "draining":
                return
            node = self.live.get(node_id)
            fresh = node is not None and node.last_heartbeat_ms >= admin.updated_unix_ms + self.heartbeat_interval_ms
            if node is None or (fresh and not node.load.busy):
                await self._write_admin(node_id, "drained")
                log.info("node %s drained", node_id)

    def state_of(self, node_id: str) -> str:
        admin = self.admin.get(node_id, AdminEntry()).state
        if admin:
            return admin
        node = self.live.get(node_id)
        if node is None:
            return "offline"
        return "ready" if node.ready else "not_ready"

    async def statuses(self) -> list[NodeStatus]:
        """Every node with a live lease, plus nodes known only by identity (offline)."""
        entries = {e.node_id: e for e in await self.registry.list_nodes()}
        out = []
        for node_id, entry in sorted(entries.items()):
            live = self.live.get(node_id)
            out.append(NodeStatus(
                entry=entry, state=self.state_of(node_id), alive=True,
                load=live.load if live else Load(), last_heartbeat_ms=live.last_heartbeat_ms if live else 0,
                summaries=(live.summary_pending or live.summaries) if live else None,
            ))
        return out

    async def status(self, node_id: str) -> NodeStatus:
        entry = await self.registry.get_node(node_id)
        live = self.live.get(node_id)
        if entry is None:
            if await self.registry.get_identity(node_id) is None:
                raise NotFound(f"no node {node_id!r}")
            return NodeStatus(
                entry=NodeEntry(node_id=node_id, address="", models=[], joined_unix_ms=0),
                state="offline", alive=False, load=Load(), last_heartbeat_ms=0,
                summaries=await self.registry.get_summary(node_id),
            )
        summaries = (live.summary_pending or live.summaries) if live else None
        return NodeStatus(
            entry=entry, state=self.state_of(node_id), alive=True,
            load=live.load if live else Load(), last_heartbeat_ms=live.last_heartbeat_ms if live else 0,
            summaries=summaries or await self.registry.get_summary(node_id),
        )

    async def expire_silent(self) -> None:
        """Forgets nodes whose heartbeats stopped for longer than the lease TTL (etcd
        has already deleted their records)."""
        cutoff = now_ms() - self.lease_ttl_s * 1000
        for node_id, node in list(self.live.items()):
            if node.last_heartbeat_ms < cutoff:
                self.live.pop(node_id, None)
                log.info("node %s lease expired (no heartbeat for %d s)", node_id, self.lease_ttl_s)
                await self._advance_drain(node_id)
