"""Where each finished request's usage goes (the accounting ledger's router side)."""

from __future__ import annotations

from dataclasses import dataclass


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


class NullSink:
    """Accounting off: nothing is recorded."""

    async def record(self, rec: UsageRecord) -> None:  # noqa: ARG002
        return None

    async def close(self) -> None:
        return None


def build_usage_sink(cfg, registry):  # noqa: ARG001 - filled in by the accounting work
    return NullSink()
