"""The node registry in etcd: the only module that knows etcd keys.

Layout under a configurable prefix ``P`` (default ``/kvfleet``)::

    P/nodes/<id>      NodeEntry JSON, attached to the node's lease: gone when heartbeats stop
    P/summary/<id>    CacheSummaries JSON, attached to the same lease (bounded, rate-limited)
    P/identity/<id>   Identity JSON: hash of the node's credential (persistent)
    P/admin/<id>      AdminEntry JSON: cordoned / draining / drained (persistent)
    P/tokens/<id>     JoinToken JSON: hash of a join token, expiry, revoked (persistent)
    P/routers/<id>    RouterEntry JSON, attached to the router's own lease: the live routers

Only the controller writes; routers read and watch ``P/nodes/`` and ``P/admin/``.
Secrets are stored as sha256 hashes; the plaintext is shown once, at creation.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from typing import AsyncIterator, Literal

import pydantic
from etcd3aio import Etcd3Client, prefix_range_end

log = logging.getLogger(__name__)

AdminState = Literal["", "cordoned", "draining", "drained"]


class ModelEntry(pydantic.BaseModel):
    name: str
    block_size: int
    num_blocks: int
    max_model_len: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    tokenizer_digest: str = ""
    cache_tracking: Literal["exact", "approximate"] = "exact"
    engine: str = "sim"
    max_num_batched_tokens: int = 0     # token budget of one engine step; 0: unknown
    max_num_seqs: int = 0               # most sequences the engine runs at once; 0: unknown


class NodeEntry(pydantic.BaseModel):
    """A live node, as routers need it. Changes rarely: load is not here (it streams)."""

    node_id: str
    address: str
    hostname: str = ""
    models: list[ModelEntry]
    joined_unix_ms: int


class ChainHeadEntry(pydantic.BaseModel):
    block_hash: int
    depth: int


class CacheSummaryEntry(pydantic.BaseModel):
    model: str
    cached_blocks: int
    heads: list[ChainHeadEntry]


class CacheSummaries(pydantic.BaseModel):
    updated_unix_ms: int
    summaries: list[CacheSummaryEntry]


class Identity(pydantic.BaseModel):
    node_id: str
    credential_sha256: str
    created_unix_ms: int


class AdminEntry(pydantic.BaseModel):
    state: AdminState = ""
    updated_unix_ms: int = 0


class JoinToken(pydantic.BaseModel):
    id: str
    token_sha256: str
    description: str = ""
    created_unix_ms: int
    expires_unix_ms: int = 0  # 0: never
    revoked: bool = False
    uses: int = 0


class RouterEntry(pydantic.BaseModel):
    """A live router: quotas are shared among these, the batch runner dials them."""

    router_id: str
    address: str
    started_unix_ms: int
    queue_depth: dict[str, int] = {}   # requests waiting in its admission queue, by tier (refreshed each beat)
    inflight: dict[str, int] = {}      # requests it has admitted and not finished, by tier


def sha256_hex(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class RegistryEvent:
    """A change under the watched prefixes. ``value`` is None for a deletion."""

    kind: Literal["node", "admin", "summary"]
    node_id: str
    value: NodeEntry | AdminEntry | CacheSummaries | None


class Registry:
    """Typed access to the registry keys. Every method is one or two etcd round trips."""

    def __init__(self, client: Etcd3Client, prefix: str = "/kvfleet") -> None:
        self.client = client
        self.prefix = prefix.rstrip("/")

    @classmethod
    async def connect(cls, endpoints: list[str], prefix: str = "/kvfleet", timeout: float = 10.0) -> "Registry":
        """Connects and waits (up to ``timeout`` s) until etcd answers."""
        client = Etcd3Client(endpoints)
        await client.connect()
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                await client.kv.get(b"/", timeout=2.0, max_attempts=1)
                break
            except Exception as exc:  # etcd not up yet
                if asyncio.get_running_loop().time() > deadline:
                    await client.close()
                    raise ConnectionError(f"etcd at {','.join(endpoints)} is not reachable: {exc}") from exc
                await asyncio.sleep(0.2)
        return cls(client, prefix)

    async def close(self) -> None:
        await self.client.close()

    def _key(self, kind: str, ident: str = "") -> bytes:
        return f"{self.prefix}/{kind}/{ident}".encode()

    # -- generic helpers ---------------------------------------------------------------
    async def _get(self, key: bytes, model: type[pydantic.BaseModel]):
        resp = await self.client.kv.get(key)
        if not resp.kvs:
            return None
        return model.model_validate_json(resp.kvs[0].value)

    async def _list(self, kind: str, model: type[pydantic.BaseModel]) -> list:
        start = self._key(kind)
        resp = await self.client.kv.get(start, prefix_range_end(start))
        return [model.model_validate_json(kv.value) for kv in resp.kvs]

    async def _put(self, key: bytes, value: pydantic.BaseModel, lease: int = 0) -> None:
        await self.client.kv.put(key, value.model_dump_json().encode(), lease=lease)

    # -- leases ------------------------------------------------------------------------
    async def grant_lease(self, ttl_s: int) -> int:
        return (await self.client.lease.grant(ttl_s)).ID

    async def refresh_lease(self, lease_id: int) -> bool:
        """One keep-alive; False if the lease has already expired."""
        call = self.client.lease.keep_alive(lease_id)
        try:
            resp = await asyncio.wait_for(call.read(), timeout=2.0)
        finally:
            call.cancel()
        return bool(resp) and resp.TTL > 0

    async def revoke_lease(self, lease_id: int) -> None:
        try:
            await self.client.lease.revoke(lease_id)
        except Exception as exc:  # already expired: nothing to revoke
            log.debug("revoke lease %x: %s", lease_id, exc)

    # -- nodes ---------------------------------------------------------------------------
    async def put_node(self, entry: NodeEntry, lease_id: int) -> None:
        await self._put(self._key("nodes", entry.node_id), entry, lease=lease_id)

    async def get_node(self, node_id: str) -> NodeEntry | None:
        return await self._get(self._key("nodes", node_id), NodeEntry)

    async def list_nodes(self) -> list[NodeEntry]:
        return await self._list("nodes", NodeEntry)

    async def put_summary(self, node_id: str, summaries: CacheSummaries, lease_id: int) -> None:
        await self._put(self._key("summary", node_id), summaries, lease=lease_id)

    async def get_summary(self, node_id: str) -> CacheSummaries | None:
        return await self._get(self._key("summary", node_id), CacheSummaries)

    # -- identities ------------------------------------------------------------------------
    async def put_identity(self, ident: Identity) -> None:
        await self._put(self._key("identity", ident.node_id), ident)

    async def get_identity(self, node_id: str) -> Identity | None:
        return await self._get(self._key("identity", node_id), Identity)

    async def list_identities(self) -> list[Identity]:
        return await self._list("identity", Identity)

    # -- admin state -------------------------------------------------------------------------
    async def put_admin(self, node_id: str, entry: AdminEntry) -> None:
        await self._put(self._key("admin", node_id), entry)

    async def get_admin(self, node_id: str) -> AdminEntry:
        return await self._get(self._key("admin", node_id), AdminEntry) or AdminEntry()

    async def list_admin(self) -> dict[str, AdminEntry]:
        start = self._key("admin")
        resp = await self.client.kv.get(start, prefix_range_end(start))
        return {kv.key[len(start):].decode(): AdminEntry.model_validate_json(kv.value) for kv in resp.kvs}

    # -- join tokens ---------------------------------------------------------------------------
    async def put_token(self, token: JoinToken) -> None:
        await self._put(self._key("tokens", token.id), token)

    async def get_token(self, token_id: str) -> JoinToken | None:
        return await self._get(self._key("tokens", token_id), JoinToken)

    async def list_tokens(self) -> list[JoinToken]:
        return await self._list("tokens", JoinToken)

    # -- routers ---------------------------------------------------------------------------------
    async def put_router(self, entry: RouterEntry, lease_id: int) -> None:
        await self._put(self._key("routers", entry.router_id), entry, lease=lease_id)

    async def delete_router(self, router_id: str) -> None:
        await self.client.kv.delete(self._key("routers", router_id))

    async def list_routers(self) -> list[RouterEntry]:
        return await self._list("routers", RouterEntry)

    # -- watching ------------------------------------------------------------------------------
    async def snapshot_and_watch(self, kinds: tuple[str, ...] = ("nodes", "admin", "summary")
                                 ) -> tuple[list[RegistryEvent], int, AsyncIterator[RegistryEvent]]:
        """Current keys of ``kinds`` (one consistent read: a transaction of range gets at
        one revision), plus a watch of just those ranges from the revision after it. Only
        those ranges: a router must not receive every usage record and router heartbeat
        written under the prefix."""
        kv = self.client.kv
        ranges = [(self._key(k), prefix_range_end(self._key(k))) for k in kinds]
        resp = await kv.txn([], [kv.txn_op_get(start, range_end=end) for start, end in ranges])
        events = [e for r in resp.responses for item in r.response_range.kvs
                  if (e := self._decode(item.key, item.value)) is not None]
        revision = resp.header.revision
        return events, revision, self._watch(ranges, revision + 1)

    async def _watch(self, ranges: list[tuple[bytes, bytes]], start_revision: int) -> AsyncIterator[RegistryEvent]:
        """The events of every range, merged (order is kept per key, which is what readers
        need). A failed watch ends the iteration with its exception."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(start: bytes, end: bytes) -> None:
            try:
                async for resp in self.client.watch.watch(start, end, start_revision=start_revision):
                    for ev in resp.events:
                        value = ev.kv.value if ev.type == 0 else None  # 0 = PUT, 1 = DELETE
                        decoded = self._decode(ev.kv.key, value)
                        if decoded is not None:
                            queue.put_nowait(decoded)
                queue.put_nowait(ConnectionError("registry watch ended"))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                queue.put_nowait(exc)

        tasks = [asyncio.create_task(pump(s, e), name="registry-watch") for s, e in ranges]
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            for t in tasks:
                t.cancel()

    def _decode(self, key: bytes, value: bytes | None) -> RegistryEvent | None:
        rest = key[len(self.prefix) + 1 :].decode()
        kind, _, node_id = rest.partition("/")
        model = {"nodes": NodeEntry, "admin": AdminEntry, "summary": CacheSummaries}.get(kind)
        if model is None or not node_id:
            return None
        kind = {"nodes": "node"}.get(kind, kind)
        try:
            parsed = model.model_validate_json(value) if value is not None else None
        except pydantic.ValidationError as exc:
            log.warning("ignoring malformed registry key %s: %s", key, exc)
            return None
        return RegistryEvent(kind, node_id, parsed)  # type: ignore[arg-type]
