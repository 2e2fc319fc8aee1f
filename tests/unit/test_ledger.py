"""The SQLite ledger drained from a fake inbox: idempotency, exact sums, savings, crash points."""

from __future__ import annotations

import random
from decimal import Decimal
from pathlib import Path

import pytest

from kvfleet.controller.ledger import InboxItem, Ledger, UsageDrain, total
from kvfleet.controller.prices import PriceTable, parse_prices, to_decimal
from kvfleet.controller.router.usage import UsageRecord, encode_record, inbox_key

PRICES = parse_prices({"models": {"*": {"default": {"prompt": "1", "cached_prompt": "0.1", "completion": "2"}}}})


class FakeInbox:
    """etcd's inbox semantics: one value per key, a global revision, guarded deletes."""

    def __init__(self) -> None:
        self.kv: dict[bytes, tuple[int, bytes]] = {}
        self.rev = 0
        self.fail_delete = False

    def put(self, rec: UsageRecord) -> None:
        self.rev += 1
        self.kv[inbox_key("/kvfleet", rec.tenant, rec.request_id)] = (self.rev, encode_record(rec))

    async def read(self, limit: int) -> list[InboxItem]:
        return [InboxItem(k, r, v) for k, (r, v) in sorted(self.kv.items())[:limit]]

    async def delete(self, items) -> None:
        if self.fail_delete:
            raise ConnectionError("etcd away")
        for it in items:
            if self.kv.get(it.key, (None,))[0] == it.revision:
                del self.kv[it.key]


def rec(i: int, tenant: str = "acme", tier: int = 2, prompt: int = 100, cached: int = 0, completion: int = 10,
        model: str = "m", unix_ms: int = 1_000, request_id: str | None = None) -> UsageRecord:
    return UsageRecord(request_id=request_id or f"r{i}", tenant=tenant, model=model, tier=tier, node_id="n1",
                       prompt_tokens=prompt, cached_prompt_tokens=cached, completion_tokens=completion,
                       finish_reason=1, unix_ms=unix_ms)


@pytest.fixture
def ledger(tmp_path: Path):
    led = Ledger(tmp_path / "ledger.sqlite")
    yield led
    led.close()


async def test_drain_moves_every_record_and_empties_the_inbox(ledger):
    inbox = FakeInbox()
    for i in range(1234):
        inbox.put(rec(i))
    drain = UsageDrain(inbox, ledger, PRICES, page=100)
    assert await drain.drain_once() == 1234
    assert inbox.kv == {}
    [row] = ledger.query()
    assert (row.tenant, row.requests, row.prompt_tokens, row.completion_tokens) == ("acme", 1234, 123_400, 12_340)


async def test_a_record_drained_twice_is_counted_once(ledger):
    """The crash between the SQLite commit and the etcd delete: the next pass re-reads."""
    inbox = FakeInbox()
    for i in range(10):
        inbox.put(rec(i))
    drain = UsageDrain(inbox, ledger, PRICES)
    inbox.fail_delete = True
    with pytest.raises(ConnectionError):
        await drain.drain_once()
    assert len(inbox.kv) == 10 and ledger.count() == 10   # committed, not deleted
    inbox.fail_delete = False
    assert await drain.drain_once() == 10
    assert inbox.kv == {} and ledger.count() == 10
    assert total(ledger.query()).requests == 10


async def test_the_same_request_id_again_replaces_not_adds_and_a_stale_copy_never_wins(ledger):
    inbox = FakeInbox()
    drain = UsageDrain(inbox, ledger, PRICES)
    inbox.put(rec(1, cached=0))
    first = await inbox.read(10)
    await drain.drain_once()
    inbox.put(rec(1, cached=64))     # the client's retry of r1 with the same request id, on another router
    await drain.drain_once()
    [row] = ledger.query()
    assert (row.requests, row.cached_prompt_tokens) == (1, 64)
    assert ledger.ingest(first, PRICES) == 0           # an old copy (lower revision) arriving late changes nothing
    assert ledger.query()[0].cached_prompt_tokens == 64


async def test_same_request_id_in_two_tenants_is_two_requests(ledger):
    inbox = FakeInbox()
    inbox.put(rec(1, tenant="a"))
    inbox.put(rec(1, tenant="b"))
    inbox.put(rec(1, tenant="a/b", request_id="x/y"))  # slashes are escaped in keys, kept in the ledger
    await UsageDrain(inbox, ledger, PRICES).drain_once()
    assert [(r.tenant, r.requests) for r in ledger.query()] == [("a", 1), ("a/b", 1), ("b", 1)]


async def test_sums_cost_and_savings_are_exact_over_random_records(ledger):
    rng = random.Random(7)
    prices = PriceTable()   # built-in: tier multipliers 1.5 / 1 / 0.5 / 0.5
    inbox = FakeInbox()
    want: dict[str, list[int]] = {}
    cost = savings = 0
    for i in range(3000):
        prompt = rng.randint(1, 4000)
        r = rec(i, tenant=rng.choice("abc"), tier=rng.randint(1, 4), prompt=prompt, cached=rng.randint(0, prompt),
                completion=rng.randint(1, 500), model=rng.choice(["m1", "m2"]), unix_ms=rng.randint(0, 10_000))
        inbox.put(r)
        w = want.setdefault(r.tenant, [0, 0, 0, 0])
        w[0] += 1
        w[1] += r.prompt_tokens
        w[2] += r.cached_prompt_tokens
        w[3] += r.completion_tokens
        p = prices.price(r.model, r.tier)
        # Independent of MicroPrice: Decimal arithmetic on the published prices.
        d = {"prompt": Decimal(p.prompt) / 10**6, "cached_prompt": Decimal(p.cached_prompt) / 10**6,
             "completion": Decimal(p.completion) / 10**6}
        cost += ((r.prompt_tokens - r.cached_prompt_tokens) * d["prompt"] + r.cached_prompt_tokens * d["cached_prompt"]
                 + r.completion_tokens * d["completion"]) / 10**6
        savings += r.cached_prompt_tokens * (d["prompt"] - d["cached_prompt"]) / 10**6
    drain = UsageDrain(inbox, ledger, prices, page=250)
    rows = await drain.query(group_by="tenant")
    assert {r.tenant: [r.requests, r.prompt_tokens, r.cached_prompt_tokens, r.completion_tokens] for r in rows} == want
    t = total(rows)
    assert to_decimal(t.cost_pico) == cost
    assert to_decimal(t.savings_pico) == savings
    by_tier = await drain.query(group_by="tier")
    assert [r.tier for r in by_tier] == ["batch", "default", "flex", "priority"]
    assert sum(r.cost_pico for r in by_tier) == t.cost_pico
    full = await drain.query(group_by="tenant_model_tier")
    assert len(full) == 3 * 2 * 4 and sum(r.savings_pico for r in full) == t.savings_pico


async def test_filters_by_tenant_and_half_open_time_window(ledger):
    inbox = FakeInbox()
    for i, (tenant, ms) in enumerate([("a", 100), ("a", 200), ("a", 300), ("b", 200)]):
        inbox.put(rec(i, tenant=tenant, unix_ms=ms))
    drain = UsageDrain(inbox, ledger, PRICES)
    assert total(await drain.query(tenant="a")).requests == 3
    assert total(await drain.query(since_ms=200)).requests == 3
    assert total(await drain.query(since_ms=200, until_ms=300)).requests == 2
    assert total(await drain.query(tenant="a", until_ms=200)).requests == 1
    assert await drain.query(tenant="nobody") == []


async def test_savings_is_cached_tokens_times_the_price_difference(ledger):
    inbox = FakeInbox()
    for i in range(5):
        inbox.put(rec(i, prompt=1024, cached=768, completion=8))
    [row] = await UsageDrain(inbox, ledger, PRICES).query()
    assert row.cached_prompt_tokens == 5 * 768
    assert to_decimal(row.savings_pico) == Decimal(5 * 768) * (Decimal("1") - Decimal("0.1")) / 10**6
    assert to_decimal(row.cost_pico) == (Decimal(5 * 256) * 1 + Decimal(5 * 768) * Decimal("0.1") + 5 * 8 * 2) / 10**6


async def test_records_keep_the_price_they_were_billed_at(ledger, tmp_path):
    inbox = FakeInbox()
    inbox.put(rec(1, prompt=1_000_000, completion=0))
    await UsageDrain(inbox, ledger, PRICES).drain_once()
    dearer = parse_prices({"models": {"*": {"default": {"prompt": "3", "cached_prompt": "0.1", "completion": "2"}}}})
    inbox.put(rec(2, prompt=1_000_000, completion=0))
    [row] = await UsageDrain(inbox, ledger, dearer).query()
    assert to_decimal(row.cost_pico) == Decimal(4)


async def test_a_malformed_inbox_value_is_set_aside_not_blocking(ledger):
    inbox = FakeInbox()
    inbox.put(rec(1))
    inbox.rev += 1
    inbox.kv[b"/kvfleet/usage/inbox/acme/bad"] = (inbox.rev, b'{"request_id": 3}')
    assert await UsageDrain(inbox, ledger, PRICES).drain_once() == 2
    assert inbox.kv == {} and ledger.count() == 1


def test_the_ledger_survives_reopening(tmp_path: Path):
    path = tmp_path / "l.sqlite"
    led = Ledger(path)
    led.ingest([InboxItem(b"k", 1, encode_record(rec(1)))], PRICES)
    led.close()
    led = Ledger(path)
    assert led.count() == 1
    led.close()


def test_an_unusable_ledger_file_is_an_oserror_naming_it(tmp_path: Path):
    bad = tmp_path / "ledger.sqlite"
    bad.write_bytes(b"not a database" * 100)
    with pytest.raises(OSError, match="usage ledger .*ledger.sqlite"):
        Ledger(bad)
