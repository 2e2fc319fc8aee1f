"""The usage ledger: every billed request, durable in SQLite, drained from etcd's inbox.

Routers write each finished request's ``UsageRecord`` to ``P/usage/inbox/<tenant>/<request_id>``
(``router/usage.py``) before the client sees its usage. The controller's ``UsageDrain``
moves them into ``<data_dir>/ledger.sqlite`` (WAL):

1. read a page of the inbox (keys, values, each key's etcd ``mod_revision``);
2. upsert every record in **one SQLite transaction** and commit, pricing each one with the
   price table in force (the row keeps the three prices it was billed at);
3. only then delete the drained keys from etcd, each only if its ``mod_revision`` is still
   the one read (a key rewritten meanwhile is read again next pass).

A crash between 2 and 3 re-reads the same records next time: the upsert keeps one row per
(tenant, request id) and replaces it only with a record from a later etcd revision, so a
re-drained record changes nothing and a client's retry with the same request id replaces
the failed attempt's record. Nothing acknowledged to a client is lost (it is in etcd or in
SQLite at every instant) and nothing is counted twice.

Queries drain first, then aggregate in SQL (token sums, grouped by the prices billed) and
price the sums in Python integers: exact, with no float and no 64-bit overflow.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, Sequence

import msgspec
from etcd3aio import prefix_range_end
from etcd3aio._protobuf import Compare

from kvfleet.controller.prices import MicroPrice, PriceTable, TIER_BY_VALUE
from kvfleet.controller.router.usage import INBOX, UsageRecord, decode_record

log = logging.getLogger(__name__)

GroupBy = Literal["tenant", "model", "tier", "tenant_model_tier"]
_GROUP_COLS: dict[str, tuple[str, ...]] = {
    "tenant": ("tenant",), "model": ("model",), "tier": ("tier",), "tenant_model_tier": ("tenant", "model", "tier"),
}
DRAIN_PAGE = 500         # inbox keys read per page
DELETE_CHUNK = 100       # deletes (and compares) per etcd transaction; etcd's default limit is 128

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    tenant TEXT NOT NULL,
    request_id TEXT NOT NULL,
    model TEXT NOT NULL,
    tier TEXT NOT NULL,                       -- priority | default | flex | batch
    node_id TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,           -- all prompt tokens, cached ones included
    cached_prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    finish_reason INTEGER NOT NULL,           -- kvfleet.v1.FinishReason
    unix_ms INTEGER NOT NULL,                 -- when the router recorded it
    batch_item TEXT NOT NULL,
    prompt_price INTEGER NOT NULL,            -- micro-units per 1M tokens, as billed
    cached_price INTEGER NOT NULL,
    completion_price INTEGER NOT NULL,
    revision INTEGER NOT NULL,                -- etcd mod_revision of the inbox key it came from
    PRIMARY KEY (tenant, request_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_time ON usage (unix_ms);
CREATE TABLE IF NOT EXISTS rejected (        -- inbox values that could not be decoded
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    reason TEXT NOT NULL,
    unix_ms INTEGER NOT NULL
);
"""

_UPSERT = """
INSERT INTO usage (tenant, request_id, model, tier, node_id, prompt_tokens, cached_prompt_tokens,
                   completion_tokens, finish_reason, unix_ms, batch_item, prompt_price, cached_price,
                   completion_price, revision)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (tenant, request_id) DO UPDATE SET
    model = excluded.model, tier = excluded.tier, node_id = excluded.node_id,
    prompt_tokens = excluded.prompt_tokens, cached_prompt_tokens = excluded.cached_prompt_tokens,
    completion_tokens = excluded.completion_tokens, finish_reason = excluded.finish_reason,
    unix_ms = excluded.unix_ms, batch_item = excluded.batch_item, prompt_price = excluded.prompt_price,
    cached_price = excluded.cached_price, completion_price = excluded.completion_price, revision = excluded.revision
WHERE excluded.revision > usage.revision
"""


@dataclass(frozen=True, slots=True)
class InboxItem:
    key: bytes
    revision: int        # etcd mod_revision: orders two records of one request id
    value: bytes


@dataclass(frozen=True, slots=True)
class UsageTotals:
    """Sums over a group; ``cost_pico``/``savings_pico`` in 1e-12 of the currency."""

    tenant: str
    model: str
    tier: str
    requests: int
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    cost_pico: int
    savings_pico: int


class Ledger:
    """The SQLite ledger. Thread-safe (one connection behind a lock): the controller calls
    it from worker threads so the event loop never waits on the disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before the inbox keys are deleted from etcd.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:  # the CLI reports OSErrors as one line naming the path
            raise OSError(f"usage ledger {path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def ingest(self, items: Sequence[InboxItem], prices: PriceTable) -> int:
        """Upserts ``items`` in one transaction; returns how many rows were written
        (a record already in the ledger at the same or a later revision writes nothing)."""
        rows, bad = [], []
        for it in items:
            try:
                rec = decode_record(it.value)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                bad.append((it.key.decode(errors="replace"), it.value, str(exc), int(time.time() * 1000)))
                continue
            rows.append(self._row(rec, prices.price(rec.model, rec.tier), it.revision))
        if bad:
            log.warning("usage inbox: %d malformed record(s) set aside in the ledger's rejected table", len(bad))
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                before = self._db.total_changes
                cur.executemany(_UPSERT, rows)
                written = self._db.total_changes - before
                cur.executemany("INSERT OR REPLACE INTO rejected VALUES (?, ?, ?, ?)", bad)
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
        return written

    @staticmethod
    def _row(rec: UsageRecord, p: MicroPrice, revision: int) -> tuple:
        return (rec.tenant, rec.request_id, rec.model, TIER_BY_VALUE.get(rec.tier, "default"), rec.node_id,
                rec.prompt_tokens, rec.cached_prompt_tokens, rec.completion_tokens, rec.finish_reason,
                rec.unix_ms, rec.batch_item, p.prompt, p.cached_prompt, p.completion, revision)

    def query(self, tenant: str = "", since_ms: int = 0, until_ms: int = 0,
              group_by: GroupBy = "tenant") -> list[UsageTotals]:
        """Totals per group over records with ``since_ms <= unix_ms < until_ms`` (0: open),
        sorted by group. Cost and savings are exact integer sums."""
        cols = _GROUP_COLS[group_by]
        where, args = [], []
        if tenant:
            where.append("tenant = ?")
            args.append(tenant)
        if since_ms:
            where.append("unix_ms >= ?")
            args.append(since_ms)
        if until_ms:
            where.append("unix_ms < ?")
            args.append(until_ms)
        # Sum tokens per group and price: the prices multiply the sums in Python (exact).
        sql = (f"SELECT {', '.join(cols)}, prompt_price, cached_price, completion_price, COUNT(*), "
               f"SUM(prompt_tokens), SUM(cached_prompt_tokens), SUM(completion_tokens) FROM usage "
               f"{'WHERE ' + ' AND '.join(where) if where else ''} "
               f"GROUP BY {', '.join(cols)}, prompt_price, cached_price, completion_price")
        with self._lock:
            fetched = self._db.execute(sql, args).fetchall()
        acc: dict[tuple, list[int]] = {}
        for row in fetched:
            group, (pp, cp, op, n, prompt, cached, completion) = row[:len(cols)], row[len(cols):]
            price = MicroPrice(pp, cp, op)
            a = acc.setdefault(tuple(group), [0] * 6)
            a[0] += n
            a[1] += prompt
            a[2] += cached
            a[3] += completion
            a[4] += price.cost_pico(prompt, cached, completion)
            a[5] += price.savings_pico(cached)
        out = []
        for group, a in sorted(acc.items()):
            named = dict(zip(cols, group))
            out.append(UsageTotals(named.get("tenant", ""), named.get("model", ""), named.get("tier", ""), *a))
        return out

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM usage").fetchone()[0]


def total(rows: Sequence[UsageTotals]) -> UsageTotals:
    return UsageTotals("", "", "", *(sum(getattr(r, f) for r in rows) for f in (
        "requests", "prompt_tokens", "cached_prompt_tokens", "completion_tokens", "cost_pico", "savings_pico")))


class Inbox(Protocol):
    """Where routers leave records: etcd in production, a dict in unit tests."""

    async def read(self, limit: int) -> list[InboxItem]: ...

    async def delete(self, items: Sequence[InboxItem]) -> None: ...


class EtcdInbox:
    """``P/usage/inbox/`` in etcd."""

    def __init__(self, client, prefix: str) -> None:
        self.client = client
        self.start = f"{prefix.rstrip('/')}/{INBOX}/".encode()

    async def read(self, limit: int) -> list[InboxItem]:
        resp = await self.client.kv.get(self.start, prefix_range_end(self.start), limit=limit, timeout=5.0)
        return [InboxItem(kv.key, kv.mod_revision, kv.value) for kv in resp.kvs]

    async def delete(self, items: Sequence[InboxItem]) -> None:
        """Deletes each key only if it still holds the revision drained."""
        kv = self.client.kv

        def guard(it: InboxItem) -> Compare:
            return Compare(result=Compare.EQUAL, target=Compare.MOD, key=it.key, mod_revision=it.revision)

        for i in range(0, len(items), DELETE_CHUNK):
            chunk = items[i:i + DELETE_CHUNK]
            resp = await kv.txn([guard(it) for it in chunk], [kv.txn_op_delete(it.key) for it in chunk], timeout=5.0)
            if not resp.succeeded:  # some key was rewritten since it was read: delete the others one by one
                for it in chunk:
                    await kv.txn([guard(it)], [kv.txn_op_delete(it.key)], timeout=5.0)


class UsageDrain:
    """Moves the inbox into the ledger: every ``interval_s`` and before each query."""

    def __init__(self, inbox: Inbox, ledger: Ledger, prices: PriceTable, page: int = DRAIN_PAGE) -> None:
        self.inbox = inbox
        self.ledger = ledger
        self.prices = prices
        self.page = page
        self._lock = asyncio.Lock()

    async def drain_once(self, max_pages: int = 100) -> int:
        """Drains up to ``max_pages`` pages; returns the records read. Order per page:
        read, commit to SQLite, then delete from etcd (see the module docstring)."""
        n = 0
        async with self._lock:
            for _ in range(max_pages):
                items = await self.inbox.read(self.page)
                if not items:
                    break
                await asyncio.to_thread(self.ledger.ingest, items, self.prices)
                await self.inbox.delete(items)
                n += len(items)
                if len(items) < self.page:
                    break
        return n

    async def run(self, interval_s: float = 0.5) -> None:
        # A failed pass (etcd away) is logged and retried: records wait in the inbox.
        while True:
            try:
                await self.drain_once()
            except Exception:
                log.exception("usage drain pass failed")
            await asyncio.sleep(interval_s)

    async def query(self, tenant: str = "", since_ms: int = 0, until_ms: int = 0,
                    group_by: GroupBy = "tenant") -> list[UsageTotals]:
        await self.drain_once()
        return await asyncio.to_thread(self.ledger.query, tenant, since_ms, until_ms, group_by)
