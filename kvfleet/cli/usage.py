"""`kvfleet usage`: tokens, cost and prefix-cache savings from the controller's ledger."""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone

import grpc
import typer
from rich.table import Table

from kvfleet.cli.common import ControllerOpt, JsonOpt, console, print_json, run_rpc
from kvfleet.v1 import usage_pb2 as pb
from kvfleet.v1 import usage_pb2_grpc as pbg

GROUP_BY = {"tenant": pb.USAGE_GROUP_BY_TENANT, "model": pb.USAGE_GROUP_BY_MODEL, "tier": pb.USAGE_GROUP_BY_TIER,
            "all": pb.USAGE_GROUP_BY_TENANT_MODEL_TIER}
GROUP_COLS = {"tenant": ("tenant",), "model": ("model",), "tier": ("tier",), "all": ("tenant", "model", "tier")}
_UNITS = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")


def parse_time(value: str, flag: str, now_ms: int | None = None) -> int:
    """Unix ms from ``1h``/``30m``/``2d`` (that long ago), an ISO date-time (UTC unless it
    names an offset) or unix milliseconds; ``typer.BadParameter`` naming ``flag`` otherwise."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    v = value.strip()
    if v.isdigit():
        return int(v)
    if m := _RELATIVE.match(v):
        return now_ms - int(float(m.group(1)) * _UNITS[m.group(2)])
    try:
        dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not a time: use a duration ago (90s, 30m, 1h, 2d, 1w), an ISO date-time "
            f"(2026-11-25T10:00, UTC unless an offset is given) or unix milliseconds", param_hint=flag) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp() * 1000)


def row_dict(r: pb.UsageRow, cols: tuple[str, ...]) -> dict:
    out: dict = {c: getattr(r, c) for c in cols}
    out.update(requests=r.requests, prompt_tokens=r.prompt_tokens, cached_prompt_tokens=r.cached_prompt_tokens,
               completion_tokens=r.completion_tokens, cost=r.cost, savings=r.savings)
    return out


def usage(
    tenant: str = typer.Option("", "--tenant", help="only this tenant"),
    since: str = typer.Option("", "--since", help="from this time: 1h (ago), 2026-11-25T10:00 (UTC) or unix ms"),
    until: str = typer.Option("", "--until", help="up to this time (exclusive), same forms as --since"),
    by: str = typer.Option("tenant", "--by", help="group by tenant, model, tier or all (tenant x model x tier)"),
    controller: str = ControllerOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Requests, prompt/cached/completion tokens, cost and prefix-cache savings from the usage ledger.

    Savings: what the cached prompt tokens would have cost at the uncached prompt price,
    minus what they cost. Costs are exact decimals in the price table's currency."""
    if by not in GROUP_BY:
        raise typer.BadParameter(f"unknown grouping {by!r}; choose from {', '.join(GROUP_BY)}", param_hint="--by")
    now = int(time.time() * 1000)
    since_ms = parse_time(since, "--since", now) if since else 0
    until_ms = parse_time(until, "--until", now) if until else 0
    if since_ms and until_ms and since_ms >= until_ms:
        raise typer.BadParameter(f"--since ({since}) must be before --until ({until})", param_hint="--since")
    req = pb.GetUsageRequest(tenant=tenant, since_unix_ms=since_ms, until_unix_ms=until_ms, group_by=GROUP_BY[by])

    async def call() -> pb.GetUsageResponse:
        async with grpc.aio.insecure_channel(controller) as ch:
            return await pbg.AccountingStub(ch).GetUsage(req, timeout=30.0)

    resp = run_rpc(call, controller)
    cols = GROUP_COLS[by]
    currency = resp.prices.currency
    if json_out:
        print_json({
            "currency": currency, "group_by": by, "tenant": tenant or None,
            "since_unix_ms": resp.since_unix_ms or None, "until_unix_ms": resp.until_unix_ms or None,
            "rows": [row_dict(r, cols) for r in resp.rows], "total": row_dict(resp.total, ()),
            "prices": [{"model": p.model, "tier": p.tier, "prompt": p.prompt, "cached_prompt": p.cached_prompt,
                        "completion": p.completion} for p in resp.prices.prices],
        })
        return
    window = " ".join(x for x in (
        f"since {_fmt_ms(since_ms)}" if since_ms else "", f"until {_fmt_ms(until_ms)}" if until_ms else "") if x)
    t = Table(title=f"usage{f' of {tenant}' if tenant else ''}{f' {window}' if window else ''} ({currency})")
    for c in cols:
        t.add_column(c)
    for c in ("requests", "prompt tok", "cached tok", "completion tok", "cost", "cache savings"):
        t.add_column(c, justify="right")
    for r in resp.rows:
        t.add_row(*(getattr(r, c) for c in cols), *_cells(r))
    if len(resp.rows) != 1:
        t.add_row("total", *([""] * (len(cols) - 1)), *_cells(resp.total), style="bold")
    console.print(t)


def _cells(r: pb.UsageRow) -> list[str]:
    cached = f"{r.cached_prompt_tokens:,}"
    if r.prompt_tokens:
        cached += f" ({r.cached_prompt_tokens / r.prompt_tokens:.0%})"
    return [f"{r.requests:,}", f"{r.prompt_tokens:,}", cached, f"{r.completion_tokens:,}", r.cost, r.savings]


def _fmt_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
