"""gRPC edge of the usage ledger: kvfleet.v1.Accounting, served by the controller.

Translates between the wire and ``ledger.py``/``prices.py``; money goes on the wire as
exact decimal strings in the price table's currency.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc

from kvfleet.aio import cancel_and_wait
from kvfleet.controller.ledger import EtcdInbox, Ledger, UsageDrain, UsageTotals, total
from kvfleet.controller.prices import PRICES_KEY, TIERS, PriceTable, micro_to_decimal, table_json, to_decimal
from kvfleet.v1 import usage_pb2 as pb
from kvfleet.v1 import usage_pb2_grpc as pbg

log = logging.getLogger(__name__)

GROUP_BY = {
    pb.USAGE_GROUP_BY_TENANT: "tenant", pb.USAGE_GROUP_BY_MODEL: "model", pb.USAGE_GROUP_BY_TIER: "tier",
    pb.USAGE_GROUP_BY_TENANT_MODEL_TIER: "tenant_model_tier",
}
DRAIN_INTERVAL_S = 0.5


def price_info(table: PriceTable) -> pb.PriceTableInfo:
    return pb.PriceTableInfo(currency=table.currency, prices=[
        pb.TierPrice(model=model, tier=tier, prompt=str(micro_to_decimal(p.prompt)),
                     cached_prompt=str(micro_to_decimal(p.cached_prompt)), completion=str(micro_to_decimal(p.completion)))
        for model, tiers in sorted(table.resolved().items()) for tier in TIERS for p in [tiers[tier]]
    ])


def _row(t: UsageTotals) -> pb.UsageRow:
    return pb.UsageRow(tenant=t.tenant, model=t.model, tier=t.tier, requests=t.requests, prompt_tokens=t.prompt_tokens,
                       cached_prompt_tokens=t.cached_prompt_tokens, completion_tokens=t.completion_tokens,
                       cost=f"{to_decimal(t.cost_pico):f}", savings=f"{to_decimal(t.savings_pico):f}")


class AccountingService(pbg.AccountingServicer):
    def __init__(self, drain: UsageDrain, prices: PriceTable) -> None:
        self.drain = drain
        self.prices = prices

    async def GetUsage(self, request: pb.GetUsageRequest, context) -> pb.GetUsageResponse:
        if request.since_unix_ms < 0 or request.until_unix_ms < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "since_unix_ms and until_unix_ms must be >= 0")
        if request.until_unix_ms and request.since_unix_ms >= request.until_unix_ms:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"since ({request.since_unix_ms}) must be before until ({request.until_unix_ms})")
        group = GROUP_BY.get(request.group_by)
        if group is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown group_by {request.group_by}")
        try:
            rows = await self.drain.query(request.tenant, request.since_unix_ms, request.until_unix_ms, group)
        except Exception as exc:  # etcd away: the inbox cannot be drained, so totals would be short
            log.warning("usage query: %s", exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot drain the usage inbox from etcd: {exc}")
        return pb.GetUsageResponse(rows=[_row(r) for r in rows], total=_row(total(rows)), prices=price_info(self.prices),
                                   since_unix_ms=request.since_unix_ms, until_unix_ms=request.until_unix_ms)

    async def GetPrices(self, request: pb.GetPricesRequest, context) -> pb.GetPricesResponse:  # noqa: ARG002
        return pb.GetPricesResponse(prices=price_info(self.prices))


class Accounting:
    """The controller's accounting: ledger, drain loop, published prices, gRPC service."""

    def __init__(self, registry, data_dir: Path, prices: PriceTable) -> None:
        self.registry = registry
        self.prices = prices
        self.ledger = Ledger(data_dir / "ledger.sqlite")
        self.drain = UsageDrain(EtcdInbox(registry.client, registry.prefix), self.ledger, prices)
        self.service = AccountingService(self.drain, prices)
        self._task: asyncio.Task | None = None

    async def start(self, server: grpc.aio.Server) -> None:
        """Publishes the price table (routers price their metrics with it), registers the
        service, starts the drain loop."""
        await self.registry.client.kv.put(f"{self.registry.prefix}/{PRICES_KEY}".encode(), table_json(self.prices))
        pbg.add_AccountingServicer_to_server(self.service, server)
        self._task = asyncio.create_task(self.drain.run(DRAIN_INTERVAL_S), name="usage-drain")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        try:  # a last pass: what routers flushed while stopping is committed now, not at next start
            await asyncio.wait_for(self.drain.drain_once(), 5.0)
        except Exception as exc:
            log.warning("final usage drain: %s", exc)
        self.ledger.close()
