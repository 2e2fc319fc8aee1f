"""NodeAgent.Serve (many requests over one bidi stream) and the router's NodeMux, end to end
over a real in-process grpc.aio server on 127.0.0.1 with real sim engines."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import grpc
import pytest

from kvfleet.controller.registry import ModelEntry, NodeEntry
from kvfleet.controller.router.fleet import NodeConn
from kvfleet.controller.router import mux as mux_module
from kvfleet.controller.router.mux import CallMux, NodeMux, NodeStream, StreamError
from kvfleet.node_agent.block_tracker import BlockTracker
from kvfleet.node_agent.engine import LoadSnapshot
from kvfleet.node_agent.engines.sim import SimEngine
from kvfleet.node_agent.engines.sim_core import SimConfig
from kvfleet.node_agent.service import NodeAgentService
from kvfleet.node_agent.state import StatePublisher
from kvfleet.v1 import common_pb2 as cpb
from kvfleet.v1 import node_pb2 as pb
from kvfleet.v1 import node_pb2_grpc as pbg

pytestmark = pytest.mark.timeout(30)

# Decode steps of 2 ms; prefill is instant on the fast model, 1000 tokens/s on the slow one
# (a 300-token prompt takes 0.3 s to its first token).
FAST = SimConfig(model="sim-fast", decode_step_base_s=0.002, decode_step_per_seq_s=0.0,
                 prefill_tokens_per_s=1_000_000.0)
SLOW = SimConfig(model="sim-slow", decode_step_base_s=0.002, decode_step_per_seq_s=0.0,
                 prefill_tokens_per_s=1000.0)
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 50), ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 200),
]


class Node:
    """Sim engines + StatePublisher + NodeAgentService behind a grpc.aio server, as the agent wires them."""

    def __init__(self) -> None:
        self.engines = {c.model: SimEngine(c) for c in (FAST, SLOW)}
        self.trackers = {m: BlockTracker(m, e.info.block_size) for m, e in self.engines.items()}
        self.publisher = StatePublisher(
            self.trackers, load=self._load, ready=lambda: all(e.ready for e in self.engines.values()),
            inflight=lambda: self.service.inflight if self.service else 0,
        )
        self.service: NodeAgentService | None = None
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.channel: grpc.aio.Channel | None = None
        self.stub: pbg.NodeAgentStub | None = None
        self.muxes: list[NodeMux] = []

    def _load(self) -> LoadSnapshot:
        loads = [e.load() for e in self.engines.values()]
        return LoadSnapshot(running=sum(l.running for l in loads), waiting=sum(l.waiting for l in loads),
                            kv_usage=max(l.kv_usage for l in loads),
                            queued_prefill_tokens=sum(l.queued_prefill_tokens for l in loads))

    async def start_engines(self) -> None:
        for m, e in self.engines.items():
            e.set_event_sink(lambda seq, batch, m=m: self.publisher.on_kv_events(m, seq, batch))
            await e.start()

    async def start_server(self, port: int = 0, service_cls: type = NodeAgentService) -> None:
        """A fresh service and server (on ``port``, or a free one), same engines."""
        self.service = service_cls(lambda: "node-1", self.engines, self.publisher)
        self.server = grpc.aio.server()
        pbg.add_NodeAgentServicer_to_server(self.service, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        assert self.port != 0 and (port == 0 or self.port == port)
        await self.server.start()
        if self.channel is None:
            self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}", options=CHANNEL_OPTIONS)
            self.stub = pbg.NodeAgentStub(self.channel)

    def mux(self) -> NodeMux:
        m = NodeMux(self.stub, "node-1")
        self.muxes.append(m)
        return m

    def engine_requests(self) -> set[str]:
        out: set[str] = set()
        for e in self.engines.values():
            running, waiting = e.core.request_ids()
            out.update(running, waiting)
        return out

    async def stop(self) -> None:
        for m in self.muxes:
            await m.close()
        if self.channel is not None:
            await self.channel.close()
        if self.server is not None:
            await self.server.stop(0)
        for e in self.engines.values():
            await e.stop()


@pytest.fixture
async def node():
    n = Node()
    await n.start_engines()
    await n.start_server()
    try:
        yield n
    finally:
        await n.stop()


def request(rid: str, prompt: list[int], max_tokens: int, model: str = FAST.model) -> pb.NodeGenerateRequest:
    """Greedy (temperature 0): the sim engine seeds its text from the prompt, so the same
    prompt gives the same tokens whatever the request id."""
    r = pb.NodeGenerateRequest(request_id=rid, model=model, prompt_token_ids=prompt)
    r.sampling.max_tokens = max_tokens
    r.sampling.temperature = 0.0
    return r


def text_prompt(seed: int, n: int) -> list[int]:
    return [ord("a") + (seed * 7 + i) % 26 for i in range(n)]


async def unary(stub: pbg.NodeAgentStub, req: pb.NodeGenerateRequest) -> tuple[list[int], pb.NodeFinal]:
    """What the unary-stream Generate RPC gives for ``req``."""
    async def run():
        tokens, final = [], None
        async for msg in stub.Generate(req):
            if msg.HasField("tokens"):
                assert final is None
                tokens.extend(msg.tokens.ids)
            else:
                final = msg.final
        assert final is not None
        return tokens, final

    return await asyncio.wait_for(run(), 10)


async def drain(stream: NodeStream, timeout: float = 10.0) -> tuple[list[int], pb.NodeFinal, int]:
    """Reads a stream to its final: (tokens, final, number of token reads)."""
    async def run():
        tokens: list[int] = []
        reads = 0
        while True:
            kind, value = await stream.read()
            if kind == "final":
                return tokens, value, reads
            assert kind == "tokens" and value
            reads += 1
            tokens.extend(value)

    return await asyncio.wait_for(run(), timeout)


async def read_serve(call, done: asyncio.Event, ends: int, is_end, on_message=lambda resp: None,
                     timeout: float = 10.0) -> dict[int, list]:
    """Reads a raw Serve call until ``ends`` items whose kind ``is_end``, calling
    ``on_message`` on each response; then ends its request stream (``done``) and cancels
    it. Returns the items by stream id."""
    per_stream: dict[int, list] = defaultdict(list)

    async def collect():
        ended = 0
        async for resp in call:
            on_message(resp)
            for it in resp.items:
                per_stream[it.stream].append(it)
                ended += is_end(it.WhichOneof("kind"))
            if ended >= ends:
                return

    try:
        await asyncio.wait_for(collect(), timeout)
    finally:
        done.set()
        call.cancel()
    return per_stream


async def eventually(pred, timeout: float = 2.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)


def same_final(got: pb.NodeFinal, want: pb.NodeFinal) -> None:
    assert (got.prompt_tokens, got.completion_tokens, got.finish_reason) == \
        (want.prompt_tokens, want.completion_tokens, want.finish_reason)


# ---------------------------------------------------------------- 1. many requests, one stream


async def test_concurrent_requests_over_one_mux_get_what_generate_gives_and_replies_are_batched(node):
    specs = [(text_prompt(i, 5 + 3 * i), 4 + 2 * i) for i in range(16)]    # prompts 5..50 tokens, 4..34 outputs
    expected = await asyncio.gather(*(unary(node.stub, request(f"u{i}", p, n)) for i, (p, n) in enumerate(specs)))
    for (p, n), (tokens, final) in zip(specs, expected):
        assert len(tokens) == n and final.completion_tokens == n and final.prompt_tokens == len(p)
        assert final.finish_reason == cpb.FINISH_REASON_LENGTH
    assert len({tuple(t) for t, _ in expected}) > 1   # the prompts really give different outputs

    # Through NodeMux: all 16 at once on one Serve call.
    mux = node.mux()
    streams = [mux.start(request(f"m{i}", p, n)) for i, (p, n) in enumerate(specs)]
    results = await asyncio.gather(*(drain(s) for s in streams))
    for (tokens, final, _), (want_tokens, want_final) in zip(results, expected):
        assert tokens == want_tokens
        same_final(final, want_final)
    assert all(s.done for s in streams) and mux.streams == {} and not mux.closed
    await eventually(lambda: node.service.inflight == 0, what="inflight back to 0")
    assert node.engine_requests() == set()

    # A raw Serve call, to count the node's messages. The request stream stays open (no
    # half-close) until every request has its final.
    done = asyncio.Event()

    async def requests():
        for i, (p, n) in enumerate(specs):
            yield pb.ServeRequest(stream=100 + i, start=request(f"r{i}", p, n))
        await done.wait()

    responses: list[pb.ServeResponse] = []
    per_stream = await read_serve(node.stub.Serve(requests()), done, len(specs), lambda kind: kind != "tokens",
                                  responses.append)
    messages, items = len(responses), sum(len(r.items) for r in responses)
    multi_stream_messages = sum(1 for r in responses if len({it.stream for it in r.items}) > 1)
    for i, (want_tokens, want_final) in enumerate(expected):
        its = per_stream[100 + i]
        assert [it.WhichOneof("kind") for it in its[:-1]] == ["tokens"] * (len(its) - 1)
        assert its[-1].WhichOneof("kind") == "final"
        assert [t for it in its[:-1] for t in it.tokens.ids] == want_tokens
        same_final(its[-1].final, want_final)
    assert items >= 16 * 2
    assert messages < items, (messages, items)   # items ready at once share a message
    assert multi_stream_messages > 0


class CountingStub:
    """A node stub that records how many starts and cancels each Serve message carries."""

    def __init__(self, stub: pbg.NodeAgentStub) -> None:
        self.stub, self.sent, self.sizes = stub, [], []

    def Serve(self, requests):
        async def counted():
            async for m in requests:
                self.sent.append(1 + len(m.more))
                self.sizes.append(m.ByteSize())
                yield m
        return self.stub.Serve(counted())


async def test_a_batching_mux_sends_what_is_queued_in_one_message_with_the_same_output(node, monkeypatch):
    specs = [(text_prompt(i, 5 + 3 * i), 4 + 2 * i) for i in range(16)]
    expected = await asyncio.gather(*(unary(node.stub, request(f"u{i}", p, n)) for i, (p, n) in enumerate(specs)))
    for batches in (True, False):
        stub = CountingStub(node.stub)
        mux = NodeMux(stub, "node-1", batches=batches)
        node.muxes.append(mux)
        streams = [mux.start(request(f"b{batches}{i}", p, n)) for i, (p, n) in enumerate(specs)]   # queued at once
        results = await asyncio.gather(*(drain(s) for s in streams))
        for (tokens, final, _), (want_tokens, want_final) in zip(results, expected):
            assert tokens == want_tokens
            same_final(final, want_final)
        assert stub.sent == ([16] if batches else [1] * 16)

    # What is queued while a message is being written goes out together too (not one by one),
    # and a message stays under MAX_BATCH_BYTES (a node refuses messages over 4 MB; here the
    # limit is lowered to 20 KB so that 12 prompts of ~4 KB cross it).
    monkeypatch.setattr(mux_module, "MAX_BATCH_BYTES", 20_000)
    stub = CountingStub(node.stub)
    mux = NodeMux(stub, "node-1", batches=True)
    node.muxes.append(mux)
    big = [mux.start(request(f"big{i}", text_prompt(i, 4000), 1)) for i in range(12)]
    more = []
    for wave in range(4):
        await asyncio.sleep(0)
        more += [mux.start(request(f"w{wave}-{i}", text_prompt(i, 5), 2)) for i in range(8)]
    for s_ in big + more:
        tokens, final, _ = await drain(s_, timeout=30)
        assert final.completion_tokens == len(tokens) > 0
    assert sum(stub.sent) == len(big) + len(more)
    assert len(stub.sent) < len(big) + len(more) - 8   # batched beyond the first message
    assert max(stub.sizes) <= 20_000 and stub.sent[0] < len(big) and len([n for n in stub.sent if n > 1]) >= 3

    # Cancels queued together go in one message too, and each aborts its engine request.
    stub = CountingStub(node.stub)
    mux = NodeMux(stub, "node-1", batches=True)
    node.muxes.append(mux)
    streams = [mux.start(request(f"c{i}", text_prompt(i, 20), 100)) for i in range(4)]
    for s in streams:
        assert (await asyncio.wait_for(s.read(), 10))[0] == "tokens"
    streams[0].cancel()
    streams[2].cancel()
    await eventually(lambda: not {"c0", "c2"} & node.engine_requests(), what="cancelled engine requests gone")
    assert stub.sent[-1] == 2
    for s in (streams[1], streams[3]):
        tokens, final, _ = await drain(s)
        assert final.completion_tokens == 100 and final.finish_reason == cpb.FINISH_REASON_LENGTH


async def test_a_raw_serve_message_with_more_starts_them_all_in_order(node):
    specs = [(text_prompt(i, 8 + i), 3 + i) for i in range(5)]
    expected = await asyncio.gather(*(unary(node.stub, request(f"u{i}", p, n)) for i, (p, n) in enumerate(specs)))
    first = pb.ServeRequest(stream=1, start=request("r0", *specs[0]))
    first.more.extend(pb.ServeRequest(stream=1 + i, start=request(f"r{i}", p, n)) for i, (p, n) in enumerate(specs) if i)
    first.more.append(pb.ServeRequest(stream=1, start=request("dup", *specs[0])))   # taken after stream 1 started

    async def requests():
        yield first

    got: dict[int, list] = {}
    async for resp in node.stub.Serve(requests(), timeout=10):   # half-closed: ends after the last final
        for it in resp.items:
            got.setdefault(it.stream, []).append(it)
    dup = [it for it in got[1] if it.WhichOneof("kind") == "error"]
    assert len(dup) == 1 and dup[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    for i, (want_tokens, want_final) in enumerate(expected):
        its = [it for it in got[1 + i] if it.WhichOneof("kind") != "error"]
        assert [t for it in its[:-1] for t in it.tokens.ids] == want_tokens
        same_final(its[-1].final, want_final)


# ---------------------------------------------------------------- 2. cancel


async def test_cancelling_one_stream_aborts_its_engine_request_and_the_others_finish(node):
    mux = node.mux()
    specs = [(text_prompt(i, 20), 100) for i in range(4)]
    others = [mux.start(request(f"o{i}", p, n)) for i, (p, n) in enumerate(specs)]
    victim = mux.start(request("victim", text_prompt(9, 20), 3000))
    got: list[int] = []
    while len(got) < 3:
        kind, ids = await asyncio.wait_for(victim.read(), 5)
        assert kind == "tokens"
        got.extend(ids)
    assert "victim" in node.engine_requests() and node.service.inflight == 5

    victim.cancel()
    assert victim.done and victim.id not in mux.streams
    # The others still run (100 steps of 2 ms each): only the victim is gone.
    await eventually(lambda: "victim" not in node.engine_requests(), what="the victim's engine request aborted")
    await eventually(lambda: node.service.inflight == 4, what="inflight == 4")
    assert node.engine_requests() == {f"o{i}" for i in range(4)}
    victim.cancel()                                  # idempotent

    results = await asyncio.gather(*(drain(s) for s in others))
    expected = await asyncio.gather(*(unary(node.stub, request(f"u{i}", p, n)) for i, (p, n) in enumerate(specs)))
    for (tokens, final, _), (want_tokens, want_final) in zip(results, expected):
        assert tokens == want_tokens and len(tokens) == 100
        same_final(final, want_final)
    await eventually(lambda: node.service.inflight == 0, what="inflight back to 0")
    assert not mux.closed and mux.streams == {}


# ---------------------------------------------------------------- 3. per-request errors


async def test_an_unknown_model_ends_only_that_stream_with_not_found(node):
    mux = node.mux()
    specs = [(text_prompt(i, 12), 15) for i in range(3)]
    before = mux.start(request("a", *specs[0]))
    bad = mux.start(request("bad", [65, 66, 67], 5, model="no-such-model"))
    after = [mux.start(request(f"b{i}", p, n)) for i, (p, n) in enumerate(specs[1:])]

    with pytest.raises(StreamError) as ei:
        await asyncio.wait_for(bad.read(), 5)
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in ei.value.details()
    assert bad.done

    results = await asyncio.gather(*(drain(s) for s in [before, *after]))
    expected = await asyncio.gather(*(unary(node.stub, request(f"u{i}", p, n)) for i, (p, n) in enumerate(specs)))
    for (tokens, final, _), (want_tokens, want_final) in zip(results, expected):
        assert tokens == want_tokens
        same_final(final, want_final)
    assert not mux.closed
    # The unary RPC ends with the same status.
    with pytest.raises(grpc.aio.AioRpcError) as ei2:
        await unary(node.stub, request("bad2", [65], 1, model="no-such-model"))
    assert ei2.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_duplicate_stream_id_on_a_raw_serve_call_gets_invalid_argument(node):
    first = request("dup-a", text_prompt(1, 10), 30)
    second = request("dup-b", text_prompt(2, 10), 30)
    other = request("other", text_prompt(3, 10), 10)
    done = asyncio.Event()

    async def requests():
        yield pb.ServeRequest(stream=7, start=first)
        yield pb.ServeRequest(stream=7, start=second)    # 7 is still running
        yield pb.ServeRequest(stream=8, start=other)
        await done.wait()

    accepted: set[str] = set()
    items = await read_serve(node.stub.Serve(requests()), done, 2, lambda kind: kind == "final",
                             lambda _: accepted.update(node.engine_requests()))

    errors = [it.error for it in items[7] if it.WhichOneof("kind") == "error"]
    assert len(errors) == 1
    assert errors[0].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "already running" in errors[0].message
    # Stream 7 still carries the first request, whole; the duplicate never ran.
    want_tokens, want_final = await unary(node.stub, request("u-a", text_prompt(1, 10), 30))
    assert [t for it in items[7] if it.WhichOneof("kind") == "tokens" for t in it.tokens.ids] == want_tokens
    assert items[7][-1].WhichOneof("kind") == "final"
    same_final(items[7][-1].final, want_final)
    assert "dup-b" not in accepted
    assert [it.WhichOneof("kind") for it in items[8]][-1] == "final"
    assert items[8][-1].final.completion_tokens == 10


async def test_a_serve_message_whose_more_has_a_more_of_its_own_fails_the_call_and_starts_none_of_it(node, monkeypatch):
    seen: list[str] = []          # request ids the engines were asked to run
    for e in node.engines.values():
        def generate(req, run=e.generate):
            seen.append(req.request_id)
            return run(req)
        monkeypatch.setattr(e, "generate", generate)
    nested = pb.ServeRequest(stream=3, start=request("bad-1", text_prompt(3, 8), 5))
    nested.more.append(pb.ServeRequest(stream=4, start=request("bad-nested", text_prompt(4, 8), 5)))
    bad = pb.ServeRequest(stream=2, start=request("bad-0", text_prompt(2, 8), 5))
    bad.more.extend([nested, pb.ServeRequest(stream=5, start=request("bad-2", text_prompt(5, 8), 5))])
    good_ended, done = asyncio.Event(), asyncio.Event()

    async def requests():
        yield pb.ServeRequest(stream=1, start=request("good", text_prompt(1, 8), 5))
        await good_ended.wait()           # the call works until the bad message comes
        yield bad
        await done.wait()                 # not half-closed: the refusal is what ends the call

    items: list[pb.StreamItem] = []

    async def collect():
        async for resp in node.stub.Serve(requests(), timeout=10):
            for it in resp.items:
                items.append(it)
                if it.WhichOneof("kind") == "final":
                    good_ended.set()

    try:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await asyncio.wait_for(collect(), 10)
    finally:
        done.set()
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ServeRequest.more has a `more` of its own" in ei.value.details()
    assert seen == ["good"]                               # no request of the bad message ran
    assert {it.stream for it in items} == {1} and items[-1].final.completion_tokens == 5
    await eventually(lambda: node.service.inflight == 0, what="inflight back to 0")


# ---------------------------------------------------------------- 4. node shutting down


async def test_close_refuses_new_starts_and_lets_running_streams_finish(node):
    mux = node.mux()
    prompt = text_prompt(4, 16)
    want_tokens, want_final = await unary(node.stub, request("u", prompt, 60))
    running = mux.start(request("running", prompt, 60))
    kind, first = await asyncio.wait_for(running.read(), 5)
    assert kind == "tokens"

    node.service.close()
    late = mux.start(request("late", text_prompt(5, 16), 5))
    with pytest.raises(StreamError) as ei:
        await asyncio.wait_for(late.read(), 5)
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in ei.value.details()
    assert "late" not in node.engine_requests()

    rest, final, _ = await drain(running)
    assert first + rest == want_tokens
    same_final(final, want_final)
    # The unary RPC refuses too.
    with pytest.raises(grpc.aio.AioRpcError) as ei2:
        await unary(node.stub, request("late2", text_prompt(6, 16), 5))
    assert ei2.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_after_close_the_serve_call_ends_once_its_requests_have(node):
    mux = node.mux()
    running = mux.start(request("running", text_prompt(4, 16), 20))
    assert (await asyncio.wait_for(running.read(), 5))[0] == "tokens"
    node.service.close()
    await drain(running)
    await eventually(lambda: mux.closed, timeout=1.0, what="the Serve call to end after close()")
    with pytest.raises(StreamError) as ei:
        mux.start(request("later", [65, 66], 2))
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_half_closed_serve_call_ends_after_its_last_final(node):
    reqs = [pb.ServeRequest(stream=i, start=request(f"h{i}", text_prompt(i, 8), 5)) for i in (1, 2, 3)]
    call = node.stub.Serve(iter(reqs))        # sends three starts, then half-closes
    finals = 0

    async def collect():
        nonlocal finals
        async for resp in call:
            finals += sum(it.WhichOneof("kind") == "final" for it in resp.items)
        return await call.code()

    try:
        code = await asyncio.wait_for(collect(), 1.0)
    except asyncio.TimeoutError:
        raise AssertionError(f"the call did not end after {finals} finals (of 3)") from None
    finally:
        call.cancel()
    assert finals == 3 and code == grpc.StatusCode.OK


# ---------------------------------------------------------------- 5. node gone


async def test_a_hard_stopped_server_fails_every_open_stream_and_a_new_server_serves_again(node):
    mux = node.mux()
    streams = [mux.start(request(f"s{i}", text_prompt(i, 10), 3000)) for i in range(3)]
    for s in streams:
        assert (await asyncio.wait_for(s.read(), 5))[0] == "tokens"
    port = node.port

    await node.server.stop(0)
    for s in streams:
        async def until_error(s=s):
            while True:
                await s.read()        # tokens already waiting may come first
        with pytest.raises(StreamError) as ei:
            await asyncio.wait_for(until_error(), 5)
        assert ei.value.code() in RETRYABLE, ei.value
        assert s.done
    assert mux.closed and mux.streams == {}
    with pytest.raises(StreamError) as ei:
        mux.start(request("x", [65], 1))
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    # The server's handlers were cancelled: the engine requests are aborted.
    await eventually(lambda: node.engine_requests() == set(), what="engine requests aborted")
    await eventually(lambda: node.service.inflight == 0, what="inflight back to 0")

    # The node comes back on the same address; the router's NodeConn opens a new stream.
    await node.start_server(port)
    entry = NodeEntry(node_id="node-1", address=f"127.0.0.1:{port}", models=[ModelEntry(
        name=FAST.model, block_size=16, num_blocks=FAST.num_blocks, max_model_len=FAST.max_model_len,
        prefill_tokens_per_s=FAST.prefill_tokens_per_s, decode_tokens_per_s=500.0)], joined_unix_ms=0)
    conn = NodeConn(entry=entry, channel=node.channel, stub=node.stub, mux=mux)
    prompt = text_prompt(8, 12)
    deadline = time.monotonic() + 5
    attempt = 0
    while True:       # the channel may need a moment to reconnect: retry as a router would
        attempt += 1
        s = conn.stream(request(f"again{attempt}", prompt, 12))
        node.muxes.append(conn.mux)
        assert conn.mux is not mux
        try:
            tokens, final, _ = await drain(s, timeout=5)
            break
        except StreamError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, exc
            assert conn.mux.closed
            await asyncio.sleep(0.05)
    want_tokens, want_final = await unary(node.stub, request("u", prompt, 12))
    assert tokens == want_tokens
    same_final(final, want_final)
    # The reopened stream is reused while it is open.
    reopened = conn.mux
    s2 = conn.stream(request("again-2", text_prompt(9, 12), 4))
    assert conn.mux is reopened and not reopened.closed
    assert (await drain(s2))[1].completion_tokens == 4


# ---------------------------------------------------------------- 6. deadlines


async def test_expire_at_ends_the_stream_with_deadline_exceeded_and_cancels_it_on_the_node(node):
    mux = node.mux()
    loop = asyncio.get_running_loop()
    # Mid-stream (decoding).
    s = mux.start(request("decoding", text_prompt(1, 10), 3000))
    assert (await asyncio.wait_for(s.read(), 5))[0] == "tokens"
    assert node.service.inflight == 1
    t0 = loop.time()
    s.expire_at(t0 + 0.05, "deadline exceeded (test)")
    n = 0
    with pytest.raises(StreamError) as ei:
        while True:
            kind, ids = await asyncio.wait_for(s.read(), 5)
            assert kind == "tokens"
            n += len(ids)
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert ei.value.details() == "deadline exceeded (test)"
    assert loop.time() - t0 >= 0.045 and n < 3000 and s.done
    await eventually(lambda: node.service.inflight == 0, what="the node's request cancelled")
    assert node.engine_requests() == set()

    # Before the first token (a 0.3 s prefill on the slow model).
    s = mux.start(request("prefilling", text_prompt(2, 300), 5, model=SLOW.model))
    await eventually(lambda: "prefilling" in node.engine_requests(), what="the request to reach the engine")
    t0 = loop.time()
    s.expire_at(t0 + 0.05, "deadline exceeded before the first token")
    with pytest.raises(StreamError) as ei:
        await asyncio.wait_for(s.read(), 5)
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.045 <= loop.time() - t0 < 0.25
    await eventually(lambda: node.service.inflight == 0 and node.engine_requests() == set(),
                     what="the prefilling request cancelled")

    # A deadline that does not pass in time changes nothing; the mux stays usable.
    s = mux.start(request("in-time", text_prompt(3, 10), 5))
    s.expire_at(loop.time() + 5.0, "unused")
    tokens, final, _ = await drain(s)
    assert len(tokens) == 5 and final.completion_tokens == 5 and not mux.closed


# ---------------------------------------------------------------- 7. read timeout


async def test_read_with_a_timeout_raises_timeout_error_and_the_stream_reads_on_afterwards(node):
    mux = node.mux()
    prompt = text_prompt(5, 300)
    s = mux.start(request("slow", prompt, 8, model=SLOW.model))
    t0 = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        await s.read(timeout=0.05)
    assert 0.045 <= time.monotonic() - t0 < 0.25
    assert not s.done and "slow" in node.engine_requests()
    with pytest.raises(asyncio.TimeoutError):      # and again: still nothing, still fine
        await s.read(timeout=0.02)

    kind, first = await s.read(timeout=5)           # the prefill ends at ~0.3 s
    assert kind == "tokens"
    rest, final, _ = await drain(s)
    # (Computed after: the same prompt now hits the prefix cache.)
    want_tokens, want_final = await unary(node.stub, request("u", prompt, 8, model=SLOW.model))
    assert first + rest == want_tokens
    same_final(final, want_final)


# ---------------------------------------------------------------- 8. merging waiting tokens


async def test_token_items_waiting_unread_come_back_merged_from_one_read(node):
    mux = node.mux()
    prompt = text_prompt(6, 20)
    s = mux.start(request("merge", prompt, 60))
    await asyncio.sleep(0.06)          # ~30 decode steps of 2 ms, nothing read
    assert len(s._items) >= 2          # several items really waited (one per node message)
    kind, first = await s.read()
    assert kind == "tokens" and len(first) >= 5
    rest, final, reads = await drain(s)
    want_tokens, want_final = await unary(node.stub, request("u", prompt, 60))
    assert first + rest == want_tokens
    same_final(final, want_final)
    assert 1 + reads < len(want_tokens)


class OlderNodeAgentService(NodeAgentService):
    """A node agent from before Serve: gRPC's answer for a method a server does not have."""

    async def Serve(self, request_iterator, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        yield  # pragma: no cover - makes this an async generator like the real one


async def test_a_node_agent_without_serve_gets_one_call_per_request_and_the_same_output():
    n = Node()
    await n.start_engines()
    await n.start_server(service_cls=OlderNodeAgentService)
    try:
        entry = NodeEntry(node_id="node-1", address=f"127.0.0.1:{n.port}", models=[ModelEntry(
            name=FAST.model, block_size=16, num_blocks=FAST.num_blocks, max_model_len=FAST.max_model_len,
            prefill_tokens_per_s=FAST.prefill_tokens_per_s, decode_tokens_per_s=500.0)], joined_unix_ms=0)
        conn = NodeConn(entry=entry, channel=n.channel, stub=n.stub)
        prompt = text_prompt(5, 20)
        want_tokens, want_final = await unary(n.stub, request("u", prompt, 9))
        # The first request meets UNIMPLEMENTED on Serve: a retryable failure (the router
        # tries another node), and the connection remembers it.
        first = conn.stream(request("a1", prompt, 9))
        with pytest.raises(StreamError) as ei:
            await drain(first, timeout=5)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE and "no Serve" in ei.value.details()
        # From then on each request is its own Generate call, with the same output.
        second = conn.stream(request("a2", prompt, 9))
        assert isinstance(conn.mux, CallMux)
        tokens, final, _ = await drain(second, timeout=5)
        assert tokens == want_tokens
        assert (final.prompt_tokens, final.completion_tokens, final.finish_reason) == (
            want_final.prompt_tokens, want_final.completion_tokens, want_final.finish_reason)
        assert final.cached_prompt_tokens == 16      # the earlier calls left the prompt's full block cached
        # Cancel and deadline work on that path too: the node's request is aborted.
        third = conn.stream(request("a3", text_prompt(6, 10), 3000))
        assert (await asyncio.wait_for(third.read(), 5))[0] == "tokens"
        third.cancel()
        await eventually(lambda: n.service.inflight == 0, what="cancelled call aborted on the node")
        fourth = conn.stream(request("a4", text_prompt(7, 10), 3000))
        fourth.expire_at(asyncio.get_running_loop().time() + 0.05, "deadline exceeded")
        with pytest.raises(StreamError) as ei:
            await drain(fourth, timeout=5)
        assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await eventually(lambda: n.service.inflight == 0, what="expired call aborted on the node")
        await conn.mux.close()
    finally:
        await n.stop()


async def test_a_diverted_stream_hands_tokens_to_its_sink_and_read_gives_only_the_end(node):
    prompt, n = text_prompt(3, 12), 400   # ~0.8 s of 2 ms steps: many tokens come after the divert
    want_tokens, want_final = await unary(node.stub, request("ref", prompt, n))
    mux = node.mux()
    s = mux.start(request("diverted", prompt, n))
    kind, first = await asyncio.wait_for(s.read(), 10)
    assert kind == "tokens"
    await eventually(lambda: len(s._items) > 0, what="tokens waiting on the stream")
    got: list[list[int]] = []
    s.divert(got.append)                       # what waited goes first, merged into one call
    assert len(got) == 1 and got[0]
    kind, final = await asyncio.wait_for(s.read(), 10)
    assert kind == "final"
    same_final(final, want_final)
    assert first + [t for ids in got for t in ids] == want_tokens
    assert len(got) > 1                        # later tokens came as they were made

    # divert(None) from inside the sink: tokens wait for read() again, merged.
    s = mux.start(request("undiverted", prompt, n))
    kind, first = await asyncio.wait_for(s.read(), 10)
    seen: list[list[int]] = []

    def once(ids: list[int]) -> None:
        seen.append(ids)
        s.divert(None)

    await eventually(lambda: len(s._items) == 0, what="nothing waiting")
    s.divert(once)
    rest, final, _ = await drain(s)
    assert len(seen) == 1 and first + seen[0] + rest == want_tokens

    # A sink that fails ends its request with INTERNAL, not the node's stream.
    class NoMux:
        def cancel(self, sid: int) -> None:
            pass

    s = NodeStream(NoMux(), 1)

    def broken(ids: list[int]) -> None:
        raise ValueError("relay bug")

    s.divert(broken)
    s.push([1, 2])
    with pytest.raises(StreamError) as ei:
        await asyncio.wait_for(s.read(), 1)
    assert ei.value.code() == grpc.StatusCode.INTERNAL and "relay bug" in ei.value.details()


async def test_with_a_stream_interval_the_node_holds_tokens_and_sends_them_on_a_shared_clock(node):
    """8 requests, 200 tokens each (about 0.4 s of 2 ms steps): without an interval about one
    message per step; with 100 ms, every request's items at least ~100 ms apart (a lower
    bound: a busy machine only spreads them), on shared ticks, so far fewer messages."""
    specs = [(text_prompt(i, 10 + i), 200) for i in range(8)]
    expected = await asyncio.gather(*(unary(node.stub, request(f"u{i}", p, n)) for i, (p, n) in enumerate(specs)))

    async def serve(interval_ms: int) -> tuple[dict[int, list[tuple[float, list[int]]]], int]:
        def start(i: int, p: list[int], n: int) -> pb.ServeRequest:
            r = request(f"i{interval_ms}-{i}", p, n)
            r.stream_interval_ms = interval_ms
            return pb.ServeRequest(stream=i, start=r)

        async def requests():
            first = start(0, *specs[0])
            first.more.extend(start(i, p, n) for i, (p, n) in enumerate(specs) if i)
            yield first

        loop = asyncio.get_running_loop()
        tokens: dict[int, list[tuple[float, list[int]]]] = {i: [] for i in range(len(specs))}
        messages = 0
        async for resp in node.stub.Serve(requests(), timeout=30):
            messages += 1
            for it in resp.items:
                if it.WhichOneof("kind") == "tokens":
                    tokens[it.stream].append((loop.time(), list(it.tokens.ids)))
                else:
                    assert it.WhichOneof("kind") == "final"
                    same_final(it.final, expected[it.stream][1])
        return tokens, messages

    every, every_messages = await serve(0)
    held, held_messages = await serve(100)
    for i, (want, _) in enumerate(expected):
        assert [t for _, ids in every[i] for t in ids] == want
        assert [t for _, ids in held[i] for t in ids] == want
        times = [t for t, _ in held[i]][:-1]   # the last goes with the final: the end is never held
        gaps = sorted(b - a for a, b in zip(times, times[1:]))
        # 100 ms on ticks of 50 ms: 100 to 150 ms apart as sent (the median, robust to delivery jitter).
        assert 0.09 <= gaps[len(gaps) // 2] <= 0.16, gaps
        assert len(held[i]) < len(every[i]) / 4
    assert held_messages < every_messages / 4, (held_messages, every_messages)
