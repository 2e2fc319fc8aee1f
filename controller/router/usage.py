"""Where each finished request's usage goes (the accounting ledger's router side).

Before a client sees its ``Usage`` message, the router makes the record durable in etcd's
usage inbox; the controller drains the inbox into its SQLite ledger (``ledger.py``).

Keys under the registry prefix ``P``::

    P/usage/inbox/<tenant>/<request_id>   UsageRecord JSON (tenant and request id percent-encoded)
    P/config/prices                       the price table (written by the controller, read here)

One key per (tenant, request id): writing a record twice leaves one record, and a client
that retries a failed request with the same request id is billed once, for the attempt
whose usage it received (the later write wins, in etcd and in the ledger).

Group commit: ``record`` queues the record and waits; one writer task sends everything
queued while the previous etcd transaction was in flight as the next transaction (at most
``MAX_TXN_PUTS`` puts; etcd's default ``--max-txn-ops`` is 128). Under load a request
waits for one etcd round trip plus the part of the one in flight, not for a round trip per
request queued ahead of it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from urllib.parse import quote

import grpc
import msgspec
from prometheus_client import Counter

from kvfleet.aio import cancel_and_wait
from kvfleet.controller.prices import PRICES_KEY, PriceTable, TIER_BY_VALUE, table_from_json
from kvfleet.controller.router.errors import RequestError
from kvfleet.controller.router.metrics import child

log = logging.getLogger(__name__)

INBOX = "usage/inbox"        # under the registry prefix
MAX_TXN_PUTS = 100           # puts per etcd transaction (etcd's default limit is 128 ops)
RECORD_TIMEOUT_S = 5.0       # how long record() retries a failing etcd before the request fails
TXN_TIMEOUT_S = 2.0          # one transaction's deadline
PRICES_REFRESH_S = 5.0       # how often the router re-reads P/config/prices

_LABELS = ["tenant", "model", "tier"]
USAGE_REQUESTS = Counter("kvfleet_usage_requests_total", "Requests recorded in the usage ledger", _LABELS)
USAGE_PROMPT = Counter("kvfleet_usage_prompt_tokens_total", "Prompt tokens billed (cached ones included)", _LABELS)
USAGE_CACHED = Counter("kvfleet_usage_cached_prompt_tokens_total", "Prompt tokens served from the prefix cache", _LABELS)
USAGE_COMPLETION = Counter("kvfleet_usage_completion_tokens_total", "Completion tokens billed", _LABELS)
USAGE_COST = Counter("kvfleet_usage_cost_total", "Cost billed, in the price table's currency", _LABELS)
USAGE_SAVINGS = Counter("kvfleet_usage_cache_savings_total",
                        "What cached prompt tokens would have cost at the uncached price, minus their price (currency)", _LABELS)


@dataclass(frozen=True, slots=True)
class UsageRecord:
    request_id: str
    tenant: str
    model: str
    tier: int                  # kvfleet.v1.Tier value
    node_id: str
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    finish_reason: int         # kvfleet.v1.FinishReason value
    unix_ms: int
    batch_item: str = ""       # "<job id>/<custom_id>" for Batch API items


def inbox_key(prefix: str, tenant: str, request_id: str) -> bytes:
    """``P/usage/inbox/<tenant>/<request_id>``, both parts percent-encoded (no ``/`` inside)."""
    return f"{prefix.rstrip('/')}/{INBOX}/{quote(tenant, safe='')}/{quote(request_id, safe='')}".encode()


def encode_record(rec: UsageRecord) -> bytes:
    return msgspec.json.encode(rec)


def decode_record(raw: bytes) -> UsageRecord:
    """Raises ``msgspec.ValidationError`` / ``DecodeError`` on a malformed value."""
    return msgspec.json.decode(raw, type=UsageRecord)


class NullSink:
    """Accounting off: nothing is recorded."""

    async def record(self, rec: UsageRecord) -> None:  # noqa: ARG002
        return None

    async def close(self) -> None:
        return None


@dataclass(slots=True)
class _Pending:
    key: bytes
    value: bytes
    rec: UsageRecord
    done: asyncio.Future
    deadline: float            # loop time after which record() gives up


class EtcdUsageSink:
    """Durable usage records in etcd's inbox, written in group commits.

    ``record`` returns once the record is in etcd (a committed transaction), or raises
    ``RequestError(UNAVAILABLE)`` after retrying a failing etcd for ``timeout_s``: a client
    never receives a usage that is not stored. A request cancelled while it waits still has
    its record written (the work was done). ``close`` flushes what is queued.
    """

    def __init__(self, client, prefix: str, *, timeout_s: float = RECORD_TIMEOUT_S,
                 max_batch: int = MAX_TXN_PUTS, prices_refresh_s: float = PRICES_REFRESH_S) -> None:
        self.client = client
        self.prefix = prefix.rstrip("/")
        self.timeout_s = timeout_s
        self.max_batch = max_batch
        self.prices_refresh_s = prices_refresh_s
        self.prices = PriceTable()            # replaced by P/config/prices once read
        self.txns = 0                         # transactions committed (group commit's effect, for tests)
        self._queue: list[_Pending] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task | None = None
        self._prices_task: asyncio.Task | None = None
        self._closing = False

    # -- request path ----------------------------------------------------------------------------
    async def record(self, rec: UsageRecord) -> None:
        if self._closing:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "router is shutting down; usage not recorded")
        loop = asyncio.get_running_loop()
        self._start()
        item = _Pending(inbox_key(self.prefix, rec.tenant, rec.request_id), encode_record(rec), rec,
                        loop.create_future(), loop.time() + self.timeout_s)
        self._queue.append(item)
        self._wake.set()
        # shield: the write goes on if the client goes away meanwhile.
        await asyncio.shield(item.done)

    async def close(self) -> None:
        """Flushes the queue (each record still bounded by its deadline), then stops."""
        self._closing = True
        self._wake.set()
        if self._writer is not None:
            try:
                await self._writer
            except asyncio.CancelledError:
                pass
        await cancel_and_wait(self._prices_task)

    # -- writer ------------------------------------------------------------------------------------
    def _start(self) -> None:
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_loop(), name="usage-writer")
            self._prices_task = asyncio.create_task(self._prices_loop(), name="usage-prices")

    def _take(self) -> dict[bytes, list[_Pending]]:
        """Up to ``max_batch`` distinct keys from the head of the queue (etcd rejects a
        transaction that names a key twice; the later record of a key wins)."""
        batch: dict[bytes, list[_Pending]] = {}
        i = 0
        while i < len(self._queue) and (len(batch) < self.max_batch or self._queue[i].key in batch):
            p = self._queue[i]
            batch.setdefault(p.key, []).append(p)
            i += 1
        del self._queue[:i]
        return batch

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.05
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = self._take()
            ops = [self.client.kv.txn_op_put(key, items[-1].value) for key, items in batch.items()]
            try:
                await self.client.kv.txn([], ops, timeout=TXN_TIMEOUT_S, max_attempts=1)
            except Exception as exc:  # etcd away or slow: retry until each record's deadline
                now = loop.time()
                keep = []
                for items in batch.values():
                    for p in items:
                        if p.deadline <= now:
                            if not p.done.done():
                                p.done.set_exception(RequestError(
                                    grpc.StatusCode.UNAVAILABLE,
                                    f"usage ledger unavailable for {self.timeout_s:g} s ({type(exc).__name__}: {exc}); "
                                    "the request is not billed and its usage not returned; retry with the same request_id"))
                        else:
                            keep.append(p)
                self._queue[:0] = keep
                log.warning("usage inbox write of %d record(s) failed: %s", len(ops), exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.05
            self.txns += 1
            for items in batch.values():
                self._count(items[-1].rec)
                for p in items:
                    if not p.done.done():
                        p.done.set_result(None)

    def _count(self, rec: UsageRecord) -> None:
        tier = TIER_BY_VALUE.get(rec.tier, "default")
        labels = (rec.tenant, rec.model, tier)
        price = self.prices.price(rec.model, tier)
        child(USAGE_REQUESTS, *labels).inc()
        child(USAGE_PROMPT, *labels).inc(rec.prompt_tokens)
        child(USAGE_CACHED, *labels).inc(rec.cached_prompt_tokens)
        child(USAGE_COMPLETION, *labels).inc(rec.completion_tokens)
        # Prometheus counters are floats: the exact figures are the ledger's.
        child(USAGE_COST, *labels).inc(price.cost_pico(rec.prompt_tokens, rec.cached_prompt_tokens, rec.completion_tokens) / 1e12)
        child(USAGE_SAVINGS, *labels).inc(price.savings_pico(rec.cached_prompt_tokens) / 1e12)

    # -- prices ------------------------------------------------------------------------------------
    async def _prices_loop(self) -> None:
        key = f"{self.prefix}/{PRICES_KEY}".encode()
        while True:
            try:
                resp = await self.client.kv.get(key, timeout=TXN_TIMEOUT_S)
                if resp.kvs:
                    self.prices = table_from_json(resp.kvs[0].value)
            except Exception as exc:  # keep the last table; the ledger prices exactly anyway
                log.warning("reading %s: %s", key.decode(), exc)
            await asyncio.sleep(self.prices_refresh_s)


def build_usage_sink(cfg, registry):  # noqa: ARG001
    """Called in the router's event loop: the price reader starts now, so the first
    requests' cost counters already use the published table."""
    sink = EtcdUsageSink(registry.client, registry.prefix)
    sink._start()
    return sink
