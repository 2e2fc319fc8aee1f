"""The batch runner against an in-process fake router (real gRPC): what it sends, how it
treats statuses, and that a restart re-runs only what was not recorded."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass

import grpc

from kvfleet.controller.batch.parse import parse_batch
from kvfleet.controller.batch.runner import BatchConfig, BatchRunner
from kvfleet.controller.batch.store import BatchStore
from kvfleet.controller.registry import RouterEntry
from kvfleet.v1 import common_pb2 as cpb
from kvfleet.v1 import inference_pb2 as ipb
from kvfleet.v1 import inference_pb2_grpc as ipbg


@dataclass
class _Model:
    name: str


@dataclass
class _Node:
    models: list


class FakeRegistry:
    def __init__(self, address: str, nodes: int = 2) -> None:
        self.address, self.nodes = address, nodes

    async def list_routers(self):
        return [RouterEntry(router_id="r1", address=self.address, started_unix_ms=0)]

    async def list_nodes(self):
        return [_Node([_Model("m")]) for _ in range(self.nodes)]


class FakeRouter(ipbg.InferenceServicer):
    """Refuses the first ``busy`` calls of each item with RESOURCE_EXHAUSTED; items whose
    prompt contains "toolong" get INVALID_ARGUMENT; others answer "ok:<prompt>"."""

    def __init__(self, busy: int = 1, delay_s: float = 0.0, retry_after_ms: int = 0) -> None:
        self.busy, self.delay_s, self.retry_after_ms = busy, delay_s, retry_after_ms
        self.calls: Counter = Counter()
        self.times: dict[str, list[float]] = {}
        self.seen: list[tuple[ipb.GenerateRequest, dict]] = []
        self.concurrent = self.max_concurrent = 0

    async def Generate(self, request, context):
        md = dict(context.invocation_metadata())
        self.seen.append((request, md))
        self.calls[request.request_id] += 1
        self.times.setdefault(request.request_id, []).append(asyncio.get_running_loop().time())
        if self.calls[request.request_id] <= self.busy:
            if self.retry_after_ms:
                context.set_trailing_metadata((("retry-after-ms", str(self.retry_after_ms)),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "no spare capacity")
        if "toolong" in request.text:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt exceeds the context")
        self.concurrent += 1
        self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            await asyncio.sleep(self.delay_s)
            yield ipb.GenerateResponse(chunk=ipb.TokenChunk(token_ids=[1], text="ok:"))
            yield ipb.GenerateResponse(chunk=ipb.TokenChunk(token_ids=[2], text=request.text))
            yield ipb.GenerateResponse(usage=ipb.Usage(prompt_tokens=len(request.text), cached_prompt_tokens=1,
                                                       completion_tokens=2, node_id="n1", request_id=request.request_id,
                                                       finish_reason=cpb.FINISH_REASON_LENGTH))
        finally:
            self.concurrent -= 1


def _file(prompts: list[str]) -> bytes:
    return "\n".join(json.dumps({"custom_id": f"id/{i} é", "url": "/v1/completions",
                                 "body": {"model": "m", "prompt": p, "max_tokens": 2, "seed": 3}})
                     for i, p in enumerate(prompts)).encode()


async def _router(fake: FakeRouter):
    server = grpc.aio.server()
    ipbg.add_InferenceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def _runner(store, address, tmp_path, nodes=2, retry_max_s=0.05) -> BatchRunner:
    r = BatchRunner(store, FakeRegistry(address, nodes), tmp_path,
                    BatchConfig(inflight_per_node=2, poll_interval_s=0.02, retry_min_s=0.01, retry_max_s=retry_max_s,
                                registry_refresh_s=0.05))
    r._auth_state = "none"   # no tenancy service key in this test
    return r


async def _until(pred, timeout: float = 10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_runner_sends_tier_batch_with_item_metadata_and_retries_busy_routers(tmp_path):
    fake = FakeRouter(busy=1, delay_s=0.02)
    server, addr = await _router(fake)
    store = BatchStore.in_data_dir(tmp_path)
    p = parse_batch(_file([f"prompt {i:02d}" for i in range(10)] + ["toolong"]), {"m"})
    store.create_job("j1", "acme", 60, p.items, p.errors)
    runner = _runner(store, addr, tmp_path)
    runner.start()
    try:
        await _until(lambda: store.get_job("j1").state == "completed")
    finally:
        await runner.close()
        await server.stop(None)
    job = store.get_job("j1")
    assert (job.counts.done, job.counts.error) == (10, 1)
    req, md = fake.seen[0]
    assert req.tier == cpb.TIER_BATCH and req.sampling.max_tokens == 2 and req.sampling.seed == 3
    assert md["x-kvfleet-tenant"] == "acme"
    assert md["x-kvfleet-batch-item"].startswith("j1/id%2F") and md["x-kvfleet-batch-item"].isascii()
    assert {r.request_id for r, _ in fake.seen} == {f"batch-j1-id/{i} é" for i in range(11)}
    assert fake.max_concurrent <= 4    # inflight_per_node x nodes
    results = store.results("j1")
    for r in results:
        i = int(r.custom_id.split("/")[1].split()[0])
        assert (r.result["text"], r.result["completion_tokens"], r.attempts) == (f"ok:prompt {i:02d}", 2, 2)
    [err] = [e for e in store.errors("j1")]
    assert (err.custom_id, err.code) == ("id/10 é", "invalid_argument") and "context" in err.message


async def test_a_restarted_runner_runs_only_what_was_not_recorded(tmp_path):
    fake = FakeRouter(busy=0, delay_s=0.05)
    server, addr = await _router(fake)
    store = BatchStore.in_data_dir(tmp_path)
    p = parse_batch(_file([f"q{i:02d}" for i in range(20)]), {"m"})
    store.create_job("j1", "t", 60, p.items, p.errors)
    first = _runner(store, addr, tmp_path)
    first.start()
    await _until(lambda: store.get_job("j1").counts.done >= 6)
    await first.close()     # as a crash would: in-flight calls abandoned, their items still pending
    done_before = {r.custom_id for r in store.results("j1")}
    second = _runner(store, addr, tmp_path)
    second.start()
    try:
        await _until(lambda: store.get_job("j1").state == "completed")
    finally:
        await second.close()
        await server.stop(None)
    results = store.results("j1")
    assert len(results) == 20 == len({r.custom_id for r in results})
    # Items recorded before the restart were not sent again.
    for cid in done_before:
        assert fake.calls[f"batch-j1-{cid}"] == 1


async def test_expiry_ends_the_job_and_cancels_calls_in_flight(tmp_path):
    fake = FakeRouter(busy=0, delay_s=5.0)
    server, addr = await _router(fake)
    store = BatchStore.in_data_dir(tmp_path)
    p = parse_batch(_file([f"q{i}" for i in range(6)]), {"m"})
    store.create_job("j1", "t", 1, p.items, p.errors)
    runner = _runner(store, addr, tmp_path)
    runner.start()
    try:
        await _until(lambda: store.get_job("j1").state == "expired", 10)
        await _until(lambda: not runner._inflight, 5)
    finally:
        await runner.close()
        await server.stop(None)
    assert store.get_job("j1").counts.expired == 6


async def test_a_shed_item_waits_the_routers_retry_after_hint(tmp_path):
    fake = FakeRouter(busy=1, retry_after_ms=400)
    server, addr = await _router(fake)
    store = BatchStore.in_data_dir(tmp_path)
    p = parse_batch(_file(["a", "b"]), {"m"})
    store.create_job("j1", "t", 60, p.items, p.errors)
    runner = _runner(store, addr, tmp_path, retry_max_s=5.0)
    runner.start()
    try:
        await _until(lambda: store.get_job("j1").state == "completed")
    finally:
        await runner.close()
        await server.stop(None)
    for times in fake.times.values():
        assert len(times) == 2 and times[1] - times[0] >= 0.4
