"""A shared-prefix batch workload and its interactive baseline (the batch test and
``bench/bench_batch.py`` use both).

The file has ``groups`` system prompts, each shared by ``per_group`` requests with their own
question, in shuffled line order. Run as a batch job, the runner sends them in prompt order
(each group together); the baseline sends the same requests to a router as interactive
calls, shuffled, with the same concurrency.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass

import grpc

from kvfleet.controller.batch.parse import CHAT_URL
from kvfleet.controller.batch.runner import CHANNEL_OPTIONS, build_generate
from kvfleet.controller.batch.store import PendingItem
from kvfleet.v1 import common_pb2 as cpb
from kvfleet.v1 import inference_pb2_grpc as ipbg

_ALPHABET = "abcdefghijklmnopqrstuvwxyz     "


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_ALPHABET) for _ in range(n))


def shared_prefix_lines(groups: int, per_group: int, prefix_chars: int, suffix_chars: int, max_tokens: int,
                        model: str = "kvfleet-sim", salt: int = 0) -> list[dict]:
    """``groups * per_group`` chat requests in the common batch format, shuffled
    (deterministic for a given ``salt``; a different salt gives different prefixes)."""
    rng = random.Random(salt)
    lines = []
    for g in range(groups):
        system = f"[{salt}:{g}] " + _text(rng, prefix_chars)
        for k in range(per_group):
            lines.append({"custom_id": f"g{g:03d}-q{k:03d}", "method": "POST", "url": CHAT_URL, "body": {
                "model": model, "max_tokens": max_tokens,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": _text(rng, suffix_chars)}],
            }})
    rng.shuffle(lines)
    return lines


def to_jsonl(lines: list[dict]) -> bytes:
    return ("\n".join(json.dumps(x) for x in lines) + "\n").encode()


@dataclass(frozen=True, slots=True)
class RunStats:
    items: int
    failed: int
    seconds: float
    prompt_tokens: int
    cached_prompt_tokens: int

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0

    @property
    def hit_rate(self) -> float:
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


async def run_interactive(router: str, lines: list[dict], concurrency: int, seed: int = 1,
                          tier: int = cpb.TIER_DEFAULT, metadata=None, shuffle: bool = True) -> RunStats:
    """Sends ``lines`` as interactive Generate calls, ``concurrency`` at a time: shuffled, or
    (``shuffle=False``) in the batch runner's prompt order."""
    order = list(lines)
    if shuffle:
        random.Random(seed).shuffle(order)
    else:
        order.sort(key=lambda x: (x["body"]["model"], x["url"], json.dumps(x["body"].get("messages") or x["body"].get("prompt"))))
    queue: asyncio.Queue = asyncio.Queue()
    for i, line in enumerate(order):
        queue.put_nowait((i, line))
    totals = {"items": 0, "failed": 0, "prompt": 0, "cached": 0}
    async with grpc.aio.insecure_channel(router, options=CHANNEL_OPTIONS) as ch:
        stub = ipbg.InferenceStub(ch)

        async def worker() -> None:
            while not queue.empty():
                i, line = queue.get_nowait()
                item = PendingItem("interactive", line["custom_id"], i + 1, i, line["url"], line["body"])
                req = build_generate(item, "interactive")
                req.tier = tier
                req.request_id = f"interactive-{seed}-{i}"
                try:
                    async for msg in stub.Generate(req, timeout=120, metadata=metadata):
                        if msg.HasField("usage"):
                            totals["items"] += 1
                            totals["prompt"] += msg.usage.prompt_tokens
                            totals["cached"] += msg.usage.cached_prompt_tokens
                except grpc.aio.AioRpcError:
                    totals["failed"] += 1

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.monotonic() - t0
    return RunStats(totals["items"], totals["failed"], seconds, totals["prompt"], totals["cached"])
