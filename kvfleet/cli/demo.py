"""The routing demo `kvfleet up --demo` runs: prefix affinity, spreading, and cache hits."""

from __future__ import annotations

import time

import grpc
from rich.table import Table

from kvfleet.cli.common import console
from kvfleet.v1 import inference_pb2 as pb
from kvfleet.v1 import inference_pb2_grpc as pbg

SYSTEM_PROMPTS = [
    "You are a meticulous travel agent. Always answer with an itinerary that lists trains before flights, "
    "names each station, and gives times in 24-hour format. Keep a friendly tone and mention one local dish. " * 3,
    "You are a senior Python reviewer. Point out correctness bugs first, then performance, then style. "
    "Quote the offending line, explain why it is wrong, and propose the smallest fix that keeps the tests. " * 3,
    "You are a patient maths tutor for secondary school. Explain each step, check the learner's units, and "
    "finish every answer with a short exercise the learner can try alone, with its solution hidden. " * 3,
]
QUESTIONS = ["How do I get from Lyon to Turin?", "Review: for i in range(len(xs)): print(xs[i])",
             "Why is 0.1 + 0.2 not 0.3?", "And from Turin to Venice?"]


async def _one(stub, model: str, system: str, question: str) -> tuple[pb.Usage, float]:
    req = pb.GenerateRequest(model=model, text=system + "\n\nUser: " + question + "\nAssistant:")
    req.sampling.max_tokens = 24
    t0 = time.monotonic()
    ttft, usage = None, None
    async for msg in stub.Generate(req, timeout=30):
        if msg.HasField("chunk") and ttft is None:
            ttft = time.monotonic() - t0
        if msg.HasField("usage"):
            usage = msg.usage
    return usage, ttft or 0.0


async def run_demo(router: str, model: str = "kvfleet-sim") -> None:
    plan = [(0, 0), (1, 1), (2, 2), (0, 3), (1, 0), (2, 1)]
    t = Table(title="Prefix-aware routing: the same system prompt goes back to the node that holds it")
    for col in ("#", "system prompt", "question", "node", "prompt tok", "cached tok (engine)", "predicted", "TTFT"):
        t.add_column(col)
    async with grpc.aio.insecure_channel(router) as ch:
        stub = pbg.InferenceStub(ch)
        for i, (s, q) in enumerate(plan, 1):
            usage, ttft = await _one(stub, model, SYSTEM_PROMPTS[s], QUESTIONS[q])
            t.add_row(str(i), ["travel", "review", "maths"][s], QUESTIONS[q][:28], usage.node_id,
                      str(usage.prompt_tokens), str(usage.cached_prompt_tokens), str(usage.predicted_cached_tokens),
                      f"{1000 * ttft:.0f} ms")
    console.print(t)
