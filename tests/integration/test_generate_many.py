"""Inference.GenerateMany through a real router: many Generate requests over one bidi call
answer, per request, exactly what Generate answers (tokens, text, usage, or the status as an
error item), batched; errors, auth, quotas and cancels stay per request; a half-closed call
finishes what runs; a cancelled call leaves the router healthy and bills what it relayed."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field

import grpc
import pytest

from kvfleet.controller.router.service import MANY_BACKLOG
from kvfleet.controller.tenancy import parse_key
from kvfleet.aio import STATUS_BY_VALUE
from kvfleet.many import ManyClient, ManyError
from kvfleet.v1 import common_pb2 as compb
from kvfleet.v1 import inference_pb2 as ipb
from kvfleet.v1 import inference_pb2_grpc as ipbg
from kvfleet.v1 import node_pb2 as npb
from kvfleet.v1 import node_pb2_grpc as npbg
from kvfleet.v1 import usage_pb2 as upb
from kvfleet.v1 import usage_pb2_grpc as upbg

from .conftest import Cluster, start_cluster
from .test_routing import text
from .test_tenants import md, new_tenant

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

CALL_TIMEOUT = 60     # seconds, on every call
LONG = 2000           # max_tokens of a request meant to be cancelled: ~20 s of sim decoding


@pytest.fixture(scope="module")
def authed(tmp_path_factory):
    """One sim node behind a controller whose router requires API keys."""
    c = start_cluster(tmp_path_factory.mktemp("many-auth"), 1, auth=True)
    yield c
    c.stop()


def req(seed: int, max_tokens: int = 16, n: int = 100, **kw) -> ipb.GenerateRequest:
    """A greedy request: the sim's output depends only on the prompt, whatever the node."""
    kw.setdefault("model", "kvfleet-sim")
    r = ipb.GenerateRequest(text=text(seed, n), request_id=f"many-{seed}-{uuid.uuid4().hex[:8]}", **kw)
    r.sampling.max_tokens = max_tokens
    r.sampling.temperature = 0.0
    return r


@dataclass
class Result:
    """What one request got: its tokens and text, then its Usage or its status."""

    ids: list[int] = field(default_factory=list)
    text: str = ""
    usage: ipb.Usage | None = None
    code: grpc.StatusCode | None = None
    message: str = ""
    retry_after_ms: int = 0

    @property
    def done(self) -> bool:
        return self.usage is not None or self.code is not None

    def add(self, msg: ipb.GenerateResponse) -> None:
        assert not self.done, f"an item after the request's last: {msg}"
        if msg.HasField("usage"):
            self.usage = msg.usage
        else:
            self.ids += msg.chunk.token_ids
            self.text += msg.chunk.text

    def fail(self, code: grpc.StatusCode, message: str, retry_after_ms: int = 0) -> None:
        assert not self.done, f"an error after the request's last item: {code} {message}"
        self.code, self.message, self.retry_after_ms = code, message, retry_after_ms

    def key(self) -> tuple:
        """What must be equal between Generate and GenerateMany."""
        u = self.usage
        return (self.ids, self.text, self.code, self.message,
                u and (u.prompt_tokens, u.completion_tokens, u.finish_reason, u.request_id, u.tier))


async def generate(stub, r: ipb.GenerateRequest, metadata=()) -> Result:
    """The reference: the same request over Generate."""
    out = Result()
    try:
        async for msg in stub.Generate(r, metadata=metadata, timeout=CALL_TIMEOUT):
            out.add(msg)
    except grpc.aio.AioRpcError as exc:
        retry = next((int(v) for k, v in (exc.trailing_metadata() or ()) if k == "retry-after-ms"), 0)
        out.fail(exc.code(), exc.details(), retry)
    return out


async def via_client(client: ManyClient, r: ipb.GenerateRequest, stop_after: int = 0) -> Result:
    """``r`` through ManyClient; ``stop_after``: break out of the iterator after that many tokens."""
    out = Result()
    try:
        async for msg in client.generate(r, timeout=CALL_TIMEOUT):
            out.add(msg)
            if stop_after and len(out.ids) >= stop_after:
                break
    except ManyError as exc:
        out.fail(exc.code(), exc.details(), exc.retry_after_ms)
    return out


class Many:
    """One raw GenerateMany call: writes starts and cancels, reads items by stream."""

    def __init__(self, stub, metadata=()) -> None:
        self.call = stub.GenerateMany(metadata=metadata, timeout=CALL_TIMEOUT)
        self.items: dict[int, list[ipb.GenerateManyItem]] = defaultdict(list)
        self.messages = 0
        self.largest = 0     # items in the largest message read

    async def start(self, reqs: dict[int, ipb.GenerateRequest]) -> None:
        for sid, r in reqs.items():
            await self.call.write(ipb.GenerateManyRequest(stream=sid, start=r))

    async def cancel(self, sid: int) -> None:
        await self.call.write(ipb.GenerateManyRequest(stream=sid, cancel=True))

    async def read_until(self, pred=None) -> None:
        """Reads messages until ``pred()`` holds, or (no ``pred``) until the call ends."""
        while pred is None or not pred():
            msg = await self.call.read()
            if msg is grpc.aio.EOF:
                assert pred is None, "the call ended early"
                return
            assert msg.items, "an empty GenerateManyResponse"
            self.messages += 1
            self.largest = max(self.largest, len(msg.items))
            for item in msg.items:
                self.items[item.stream].append(item)

    async def finish(self) -> None:
        """Half-closes, reads to the end: the call must end OK."""
        await self.call.done_writing()
        await self.read_until()
        assert await self.call.code() == grpc.StatusCode.OK, await self.call.details()

    def tokens(self, sid: int) -> int:
        return sum(len(i.response.chunk.token_ids) for i in self.items[sid] if i.HasField("response"))

    def result(self, sid: int, items=None) -> Result:
        out = Result()
        for item in self.items[sid] if items is None else items:
            if item.HasField("error"):
                e = item.error
                out.fail(STATUS_BY_VALUE[e.code], e.message, e.retry_after_ms)
            else:
                out.add(item.response)
        return out


def assert_same(got: dict[int, Result], want: dict[int, Result], nodes) -> None:
    """Per request: GenerateMany's answer is Generate's; usages name real nodes, and a request
    sent to the node that served its reference finds its prompt there, as predicted."""
    assert got.keys() == want.keys()
    for sid, w in want.items():
        g = got[sid]
        assert g.done and g.key() == w.key(), sid
        if w.usage is not None:
            assert g.usage.node_id in nodes and w.usage.node_id in nodes
            assert g.usage.predicted_cached_tokens == g.usage.cached_prompt_tokens
            if g.usage.node_id == w.usage.node_id:
                assert g.usage.cached_prompt_tokens >= (g.usage.prompt_tokens - 1) // 16 * 16 > 0


async def billed(c: Cluster, tenant: str, requests: int) -> upb.UsageRow:
    """The tenant's ledger totals once ``requests`` of its requests are in the ledger."""
    deadline = time.monotonic() + 30
    async with grpc.aio.insecure_channel(c.controller) as ch:
        stub = upbg.AccountingStub(ch)
        while True:
            total = (await stub.GetUsage(upb.GetUsageRequest(tenant=tenant), timeout=10)).total
            if total.requests >= requests or time.monotonic() > deadline:
                assert total.requests == requests, total
                return total
            await asyncio.sleep(0.1)


async def engines_ran_and_idle(c: Cluster, timeout: float = 30) -> None:
    """Returns once the nodes' engines have run requests and are all idle again: every
    token of the requests sent meanwhile has been made and sent to the router."""
    channels = [grpc.aio.insecure_channel(a) for a in c.node_addr.values()]
    try:
        stubs = [npbg.NodeAgentStub(ch) for ch in channels]
        busy, deadline = False, time.monotonic() + timeout
        while time.monotonic() < deadline:
            loads = [(await s.GetInfo(npb.GetInfoRequest(), timeout=10)).load for s in stubs]
            if any(load.running or load.waiting for load in loads):
                busy = True
            elif busy:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"the engines did not run and finish the requests within {timeout} s (busy: {busy})")
    finally:
        await asyncio.gather(*(ch.close() for ch in channels))


@pytest.fixture
async def inf(cluster):
    async with grpc.aio.insecure_channel(cluster.router) as ch:
        yield ipbg.InferenceStub(ch)


class CountingStub:
    """An InferenceStub that counts the GenerateMany calls opened through it."""

    def __init__(self, stub) -> None:
        self.stub, self.calls = stub, 0

    def GenerateMany(self, *args, **kw):
        self.calls += 1
        return self.stub.GenerateMany(*args, **kw)


# -- same answers as Generate ----------------------------------------------------------------------
async def test_raw_call_of_16_requests_answers_as_generate_in_fewer_messages(cluster, inf):
    reqs = {sid: req(1000 + sid, max_tokens=8 + 2 * sid, n=60 + 7 * sid) for sid in range(1, 19)}
    reqs[5].stream_interval_ms = 50          # merged chunks: the same tokens and text
    reqs[6].tier = compb.TIER_FLEX
    want = dict(zip(reqs, await asyncio.gather(*(generate(inf, r) for r in reqs.values()))))
    many = Many(inf)
    await many.start(reqs)
    await many.finish()    # half-closed right after the starts: every request still finishes
    assert_same({sid: many.result(sid) for sid in reqs}, want, cluster.nodes)
    items = sum(len(v) for v in many.items.values())
    assert many.messages < items, (many.messages, items)


async def test_many_client_of_20_requests_answers_as_generate_over_one_call(cluster, inf):
    reqs = {i: req(2000 + i, max_tokens=4 + i, n=50 + 11 * i) for i in range(20)}
    want = dict(zip(reqs, await asyncio.gather(*(generate(inf, r) for r in reqs.values()))))
    client = ManyClient(stub := CountingStub(inf))
    got = dict(zip(reqs, await asyncio.gather(*(via_client(client, r) for r in reqs.values()))))
    await client.close()
    assert stub.calls == 1
    assert_same(got, want, cluster.nodes)
    assert all(g.usage.finish_reason == compb.FINISH_REASON_LENGTH for g in got.values())


async def test_starts_and_cancels_batched_in_one_message_are_taken_in_order(cluster, inf):
    """GenerateManyRequest.more: one message carries many starts (answered as Generate's),
    a cancel of one of them, and a start under an id the same message already started."""
    reqs = {sid: req(2500 + sid, max_tokens=6 + sid, n=40 + 9 * sid) for sid in range(1, 13)}
    want = dict(zip(reqs, await asyncio.gather(*(generate(inf, r) for r in reqs.values()))))
    many = Many(inf)
    msgs = [ipb.GenerateManyRequest(stream=sid, start=r) for sid, r in reqs.items()]
    msgs.append(ipb.GenerateManyRequest(stream=99, start=req(2599, max_tokens=LONG)))
    msgs.append(ipb.GenerateManyRequest(stream=99, cancel=True))       # taken after its start
    msgs.append(ipb.GenerateManyRequest(stream=1, start=req(2598)))    # 1 runs: refused, 1 goes on
    first, *rest = msgs
    first.more.extend(rest)
    await many.call.write(first)
    await many.finish()
    refusal, *served = many.items[1]   # the refusal comes first: 1 had made no token when it was read
    assert refusal.error.code == grpc.StatusCode.ALREADY_EXISTS.value[0], refusal
    got = {sid: many.result(sid, served if sid == 1 else None) for sid in reqs}
    assert_same(got, want, cluster.nodes)
    cancelled = many.result(99)
    assert cancelled.code == grpc.StatusCode.CANCELLED and not cancelled.ids


async def test_a_more_inside_more_fails_the_call_with_invalid_argument_and_starts_none_of_it(cluster, inf):
    many = Many(inf)
    msg = ipb.GenerateManyRequest(stream=1, start=req(2700))
    inner = msg.more.add(stream=2, start=req(2701))
    inner.more.add(stream=3, start=req(2702))
    await many.call.write(msg)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await many.read_until(lambda: False)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more" in err.value.details()
    assert not many.items, "a request of the refused message ran"


# -- per-request errors ------------------------------------------------------------------------------
async def test_bad_requests_fail_alone_with_generates_status(cluster, inf):
    past = req(3010)
    past.deadline.FromSeconds(int(time.time()) - 60)
    reqs = {
        **{sid: req(3000 + sid, max_tokens=24) for sid in range(1, 5)},
        10: req(3010, model="no-such-model"),
        11: req(3011, max_tokens=0),
        12: req(3012, stream_interval_ms=60_001),
        13: past,
    }
    want = dict(zip(reqs, await asyncio.gather(*(generate(inf, r) for r in reqs.values()))))
    many = Many(inf)
    await many.start(reqs)
    await many.finish()
    got = {sid: many.result(sid) for sid in reqs}
    assert_same(got, want, cluster.nodes)
    assert all(got[sid].usage.completion_tokens == 24 for sid in range(1, 5))
    assert [(got[sid].code, len(many.items[sid])) for sid in (10, 11, 12, 13)] == [
        (grpc.StatusCode.NOT_FOUND, 1), (grpc.StatusCode.INVALID_ARGUMENT, 1),
        (grpc.StatusCode.INVALID_ARGUMENT, 1), (grpc.StatusCode.DEADLINE_EXCEEDED, 1)]
    assert "no-such-model" in got[10].message and "kvfleet-sim" in got[10].message
    assert "max_tokens" in got[11].message
    assert "stream_interval_ms" in got[12].message


async def test_a_start_under_a_running_id_is_refused_and_the_running_one_completes(cluster, inf):
    first, again = req(4001, max_tokens=500), req(4002, max_tokens=4)   # first: ~5 s of tokens
    many = Many(inf)
    await many.start({7: first})
    await many.read_until(lambda: many.tokens(7) > 0)
    await many.start({7: again})
    await many.read_until(lambda: many.result(7, [i for i in many.items[7] if not i.HasField("error")]).done)
    errors = [i.error for i in many.items[7] if i.HasField("error")]
    # ALREADY_EXISTS: no request ends with it, so the caller can tell it from the running one's end.
    assert [(e.code, "already running" in e.message) for e in errors] == [(grpc.StatusCode.ALREADY_EXISTS.value[0], True)]
    running = many.result(7, [i for i in many.items[7] if i.HasField("response")])
    assert running.key() == (await generate(inf, first)).key()
    # Ended: the id is free again.
    many.items.clear()
    await many.start({7: again})
    await many.finish()
    assert many.result(7).key() == (await generate(inf, again)).key()


# -- auth and quotas -----------------------------------------------------------------------------------
async def test_auth_is_checked_per_request_and_the_key_decides_the_billed_tenant(authed):
    key = new_tenant(authed, "manyco")
    async with grpc.aio.insecure_channel(authed.router) as ch:
        stub = ipbg.InferenceStub(ch)
        for metadata in ((), md("sk-not-ours-123"), md(f"kvf_{parse_key(key)[0]}_{'A' * 43}")):
            reqs = {sid: req(5000 + sid, max_tokens=4) for sid in (1, 2, 3)}
            want = dict(zip(reqs, await asyncio.gather(*(generate(stub, r, metadata) for r in reqs.values()))))
            many = Many(stub, metadata)
            await many.start(reqs)
            await many.finish()
            got = {sid: many.result(sid) for sid in reqs}
            assert_same(got, want, authed.nodes)
            assert {g.code for g in got.values()} == {grpc.StatusCode.UNAUTHENTICATED}

        reqs = [req(5100 + i, max_tokens=3 + i, tenant="someone-else") for i in range(6)]
        client = ManyClient(stub, metadata=md(key))
        got = await asyncio.gather(*(via_client(client, r) for r in reqs))
        await client.close()
    assert all(g.usage is not None and g.usage.completion_tokens == 3 + i for i, g in enumerate(got))
    total = await billed(authed, "manyco", len(reqs))
    assert (total.prompt_tokens, total.completion_tokens) == (
        sum(g.usage.prompt_tokens for g in got), sum(g.usage.completion_tokens for g in got))
    assert (await billed(authed, "someone-else", 0)).requests == 0


async def test_over_quota_is_resource_exhausted_with_generates_retry_hint(authed):
    key = new_tenant(authed, "manyquota", requests_per_min=2)
    async with grpc.aio.insecure_channel(authed.router) as ch:
        stub = ipbg.InferenceStub(ch)
        client = ManyClient(stub, metadata=md(key))
        first = await generate(stub, req(5200), md(key))
        second, third = [await via_client(client, req(5201 + i)) for i in range(2)]
        fourth = await generate(stub, req(5203), md(key))
        await client.close()
    assert first.usage is not None and second.usage is not None
    for refused in (third, fourth):
        assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tenant manyquota over its tier default requests-per-minute quota (2/min)" in refused.message
        assert 0 < refused.retry_after_ms <= 60_000


# -- cancels -------------------------------------------------------------------------------------------
async def test_a_cancel_stops_one_stream_while_the_others_finish(cluster, inf):
    tenant = f"many-cancel-{uuid.uuid4().hex[:8]}"
    reqs = {1: req(6001, max_tokens=LONG, tenant=tenant), **{sid: req(6000 + sid, max_tokens=32) for sid in range(2, 6)}}
    many = Many(inf)
    await many.start(reqs)
    await many.read_until(lambda: many.tokens(1) > 0)
    await many.cancel(1)
    await many.cancel(99)    # no such stream: ignored
    await many.finish()
    assert all(many.result(sid).usage.completion_tokens == 32 for sid in range(2, 6))
    assert 99 not in many.items
    stopped = many.result(1)   # what came before the cancel was read, then its end: CANCELLED
    assert stopped.code == grpc.StatusCode.CANCELLED and stopped.usage is None and 0 < len(stopped.ids) < LONG
    assert many.items[1][-1].HasField("error")
    # The router stopped it: billed for what it relayed, far from all of it.
    assert len(stopped.ids) <= (await billed(cluster, tenant, 1)).completion_tokens < LONG


async def test_breaking_out_of_many_client_cancels_that_request_only(cluster, inf):
    tenant = f"many-break-{uuid.uuid4().hex[:8]}"
    client = ManyClient(stub := CountingStub(inf))
    quitter, *others = await asyncio.gather(
        via_client(client, req(6101, max_tokens=LONG, tenant=tenant), stop_after=3),
        *(via_client(client, req(6110 + i, max_tokens=40)) for i in range(6)))
    await client.close()   # returns once the call ended: the broken-off request no longer runs
    assert stub.calls == 1
    assert not quitter.done and len(quitter.ids) >= 3
    assert all(o.usage is not None and o.usage.completion_tokens == 40 for o in others)
    assert len(quitter.ids) <= (await billed(cluster, tenant, 1)).completion_tokens < LONG


async def test_a_cancelled_call_stops_its_requests_and_the_router_serves_the_next(cluster, inf):
    tenant = f"many-drop-{uuid.uuid4().hex[:8]}"
    many = Many(inf)
    await many.start({sid: req(6200 + sid, max_tokens=LONG, tenant=tenant) for sid in range(1, 5)})
    await many.read_until(lambda: all(many.tokens(sid) for sid in range(1, 5)))
    many.call.cancel()
    assert await many.call.code() == grpc.StatusCode.CANCELLED
    total = await billed(cluster, tenant, 4)
    assert sum(map(many.tokens, range(1, 5))) <= total.completion_tokens < LONG

    # ManyClient.cancel() ends its call: the running request fails with CANCELLED and stops.
    client = ManyClient(stub := CountingStub(inf))
    first_token = asyncio.Event()

    async def consume():
        async for _ in client.generate(req(6300, max_tokens=LONG, tenant=tenant + "-client"), timeout=CALL_TIMEOUT):
            first_token.set()

    pending = asyncio.create_task(consume())
    await asyncio.wait_for(first_token.wait(), CALL_TIMEOUT)
    client.cancel()
    with pytest.raises(ManyError) as exc:
        await asyncio.wait_for(pending, CALL_TIMEOUT)
    assert exc.value.code() == grpc.StatusCode.CANCELLED
    assert (await billed(cluster, tenant + "-client", 1)).completion_tokens < LONG

    # The router serves the next calls: the same ManyClient (on a new call) and a raw one.
    reqs = {sid: req(6400 + sid, max_tokens=12) for sid in range(1, 5)}
    want = dict(zip(reqs, await asyncio.gather(*(generate(inf, r) for r in reqs.values()))))
    got = dict(zip(reqs, await asyncio.gather(*(via_client(client, r) for r in reqs.values()))))
    await client.close()
    assert stub.calls == 2
    assert_same(got, want, cluster.nodes)
    many = Many(inf)
    await many.start(reqs)
    await many.finish()
    assert_same({sid: many.result(sid) for sid in reqs}, want, cluster.nodes)


async def test_an_id_is_free_again_once_its_cancelled_item_came(cluster, inf):
    again = req(7002, max_tokens=4)
    want = await generate(inf, again)
    for early in (False, True):   # cancelled after its first token, and before it
        many = Many(inf)
        await many.start({1: req(7001 + 10 * early, max_tokens=LONG)})
        if not early:
            await many.read_until(lambda: many.tokens(1) > 0)
        await many.cancel(1)
        await many.read_until(lambda: any(i.HasField("error") for i in many.items[1]))
        first = many.result(1)
        assert first.code == grpc.StatusCode.CANCELLED and first.message == "cancelled by the caller"
        many.items.clear()
        await many.start({1: again})
        await many.finish()
        assert many.result(1).key() == want.key()   # the new request's own answer, nothing of the old one


# -- a caller that reads slower than its requests produce -------------------------------------------
async def test_a_caller_that_stops_reading_holds_its_requests_back_and_then_gets_every_token(cluster, inf):
    """Past MANY_BACKLOG items held for the caller, the call's requests wait for it: further
    tokens wait on the node streams, merged, and go out once it reads again, in order."""
    reqs = {sid: req(8000 + sid, max_tokens=60, n=48) for sid in range(1, 151)}
    # While the caller keeps up, one item per request and engine step (one token), plus the usage.
    assert len(reqs) * (60 + 1) > 2 * MANY_BACKLOG
    want = dict(zip(reqs, await asyncio.gather(*(generate(inf, r) for r in reqs.values()))))
    # gRPC's default receive window grows (BDP probing) to hold all these ~120 KB unread
    # in the caller's transport: the router would never hold more than a message's worth.
    # Fixed at 1 KB, the router's writes wait for the caller after ~100 items.
    small_window = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
    async with grpc.aio.insecure_channel(cluster.router, options=small_window) as ch:
        many = Many(ipbg.InferenceStub(ch))
        await many.start(reqs)
        await engines_ran_and_idle(cluster)   # not reading meanwhile
        await many.finish()
    got = {sid: many.result(sid) for sid in reqs}
    assert_same(got, want, cluster.nodes)   # every request's tokens in order, its text and usage
    for sid in reqs:
        items = many.items[sid]
        assert not any(i.HasField("error") for i in items), sid
        assert [i.response.HasField("usage") for i in items].count(True) == 1, sid
        assert items[-1].response.HasField("usage"), sid
        assert got[sid].usage.completion_tokens == len(got[sid].ids) == 60, sid
    # The backlog was reached: the router held MANY_BACKLOG items and sent them as one
    # message; then its requests waited (each added an item or two, not its other ~30
    # tokens), and the tokens made meanwhile came merged.
    assert MANY_BACKLOG <= many.largest < MANY_BACKLOG + 4 * len(reqs), many.largest
    chunks = [i.response.chunk for items in many.items.values() for i in items if i.response.HasField("chunk")]
    assert any(len(c.token_ids) > 1 for c in chunks)


async def test_a_cancel_after_a_request_ended_is_ignored(cluster, inf):
    short = req(7101, max_tokens=3)
    want = await generate(inf, short)
    many = Many(inf)
    await many.start({1: short})
    await many.read_until(lambda: many.result(1).done)
    await many.cancel(1)                      # too late: its usage came, the id is free
    await many.start({2: req(7102, max_tokens=2)})
    await many.read_until(lambda: many.result(2).done)
    assert many.result(1).key() == want.key() and not any(i.HasField("error") for i in many.items[1])
    await many.start({1: short})              # and taken again by a new request
    await many.finish()
    assert len([i for i in many.items[1] if i.response.HasField("usage")]) == 2
    assert not any(i.HasField("error") for i in many.items[1])
