"""gRPC edge of the router: kvfleet.v1.Inference.

For each request: validate, tokenise with the model's own tokenizer, hash the prompt's
blocks, ask the pure policy for ranked candidates, then send token ids to the best node
and relay its stream. Before the first token reaches the client, a failed or silent
node costs only a retry on the next candidate.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass

import grpc
import numpy as np
from prometheus_client import Counter, Histogram

from kvfleet.tokenizer import IncrementalDetokenizer, Tokenizer
from kvfleet.controller.router.admission import OpenAdmission
from kvfleet.controller.router.auth import OpenAuth, Principal
from kvfleet.controller.router.chain import block_hashes   # kvfleet.hashing's, compiled
from kvfleet.controller.router.errors import RequestError
from kvfleet.controller.router.metrics import child
from kvfleet.controller.router.fleet import Fleet
from kvfleet.controller.router.mux import NodeStream, StreamError
from kvfleet.controller.router.policy import ArrivalRate, Candidate, PrefixRates, RouteRequest, get_policy
from kvfleet.controller.router.stops import StopMatcher
from kvfleet.controller.router.quota import Unlimited
from kvfleet.controller.router.tokenizers import TokenizerCache, TokenizerUnavailable
from kvfleet.controller.router.usage import NullSink, UsageRecord
from kvfleet.v1 import common_pb2 as cpb
from kvfleet.v1 import inference_pb2 as pb
from kvfleet.v1 import inference_pb2_grpc as pbg
from kvfleet.v1 import node_pb2 as npb

log = logging.getLogger(__name__)

REQUESTS = Counter("kvfleet_router_requests_total", "Requests by outcome", ["model", "outcome"])
ATTEMPTS = Counter("kvfleet_router_node_attempts_total", "Node attempts by result", ["node", "result"])
PROMPT_TOKENS = Counter("kvfleet_router_prompt_tokens_total", "Prompt tokens routed", ["model", "node"])
PREDICTED_CACHED = Counter("kvfleet_router_predicted_cached_tokens_total", "Cached prompt tokens the router predicted", ["model", "node"])
ACTUAL_CACHED = Counter("kvfleet_router_engine_cached_tokens_total", "Cached prompt tokens the engines reported", ["model", "node"])
COMPLETION_TOKENS = Counter("kvfleet_router_completion_tokens_total", "Completion tokens relayed", ["model", "node"])
TTFT = Histogram("kvfleet_router_ttft_seconds", "Time to first token as the router sees it", ["model"],
                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
DECIDE = Histogram("kvfleet_router_decision_seconds", "Tokenise + hash + policy time", ["model"],
                   buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2))

# Flex and batch pay less for latency: their cost leans towards cache affinity (policy.RouteRequest).
LATENCY_WEIGHT = {cpb.TIER_FLEX: 0.5, cpb.TIER_BATCH: 0.25}
# Default least time between token chunks per tier (GenerateRequest.stream_interval_ms):
# tiers that accept latency take their tokens in fewer, larger messages.
STREAM_INTERVAL_S = {cpb.TIER_FLEX: 0.1, cpb.TIER_BATCH: 1.0}
MAX_STREAM_INTERVAL_MS = 60_000
# Items a GenerateMany call holds for a caller that reads slower than its requests produce;
# past it, the call's requests wait for the caller (as each Generate call waits for gRPC's flow control).
MANY_BACKLOG = 4096
# Bytes of items in one GenerateManyResponse (a client's default limit is 4 MB a message).
MANY_MESSAGE_BYTES = 1 << 20


def _error_item(stream: int, exc: RequestError) -> pb.GenerateManyItem:
    retry = next((int(v) for k, v in exc.trailers if k == "retry-after-ms"), 0)
    return pb.GenerateManyItem(stream=stream, error=pb.GenerateError(
        code=exc.code.value[0], message=str(exc), retry_after_ms=retry))


def _parts(items: list, max_bytes: int):
    """``items`` in order, in runs of at most ``max_bytes`` (a single larger item alone)."""
    start, size = 0, 0
    for i, it in enumerate(items):
        n = it.ByteSize()
        if size + n > max_bytes and i > start:
            yield items[start:i]
            start, size = i, 0
        size += n
    if start < len(items):
        yield items[start:]
FINISH = {"length": cpb.FINISH_REASON_LENGTH, "stop": cpb.FINISH_REASON_STOP, "abort": cpb.FINISH_REASON_ABORT}
FINISH_NAME = {v: k for k, v in FINISH.items()}
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
}


@dataclass(frozen=True, slots=True)
class Prepared:
    request_id: str
    model: str
    tokens: np.ndarray           # uint32 prompt token ids (read-only)
    tokenizer: Tokenizer
    max_tokens: int
    tier: int
    deadline: float | None       # time.monotonic() seconds
    tokenize_us: float
    arrival_rate: float = 0.0    # requests/s this router receives for the model, this one included
    tenant: str = "default"
    batch_item: str = ""         # "<job id>/<custom_id>" when the Batch API runner sent it
    max_queue_s: float = 0.0     # the request's limit on its wait in the admission queue (0: the tier's)
    stream_interval_s: float = 0.0  # least time between two token chunks to the client


class _ItemContext:
    """What a request inside a GenerateMany call reads of its call: the call's metadata
    (API key); no deadline of its own beyond the request's ``deadline`` field."""

    __slots__ = ("_metadata",)

    def __init__(self, metadata: tuple) -> None:
        # A batch item's tag names one request: on a call of many it would name them all.
        self._metadata = tuple((k, v) for k, v in metadata if k != "x-kvfleet-batch-item")

    def invocation_metadata(self) -> tuple:
        return self._metadata

    @staticmethod
    def time_remaining() -> None:
        return None


class _Sink:
    """Where a GenerateMany request's token chunks go straight from its node's stream reader
    (``RouterService._relay``). ``send`` says whether the caller keeps up; once the call
    no longer wants the request (cancelled), nothing more is sent."""

    __slots__ = ("stream", "emit", "room", "closed")

    def __init__(self, stream: int, emit, room: asyncio.Event) -> None:
        self.stream, self.emit, self.room, self.closed = stream, emit, room, False

    def send(self, ids: list[int], text: str) -> bool:
        """Sends a token chunk (built in place: no copy of a GenerateResponse)."""
        if not self.closed:
            item = pb.GenerateManyItem(stream=self.stream)
            chunk = item.response.chunk
            chunk.token_ids.extend(ids)
            chunk.text = text
            self.emit(item)
        return self.room.is_set()

    async def drained(self) -> None:
        if not self.room.is_set():
            await self.room.wait()


@dataclass(slots=True)
class Relayed:
    """How far a request got: the node whose stream reached the client (None before a
    first token), its attempt number, the completion tokens relayed, and whether a Usage
    was billed."""

    cand: Candidate | None = None
    attempts: int = 0
    completion: int = 0
    billed: bool = False


@dataclass(frozen=True, slots=True)
class Ranked:
    candidates: list[Candidate]
    block_size: dict[str, int]
    hashes: dict[int, np.ndarray]   # block size -> the prompt's canonical block hashes
    hash_us: float
    decide_us: float
    prefix_keys: list[int]          # each block size's deepest cached block of the prompt (policy.PrefixRates)


class RouterService(pbg.InferenceServicer):
    def __init__(
        self, fleet: Fleet, policy: str = "kvfleet", first_token_timeout_s: float = 5.0, max_attempts: int = 3,
        *, auth=None, quotas=None, usage=None, admission=None,
    ) -> None:
        self.fleet = fleet
        self.auth = auth or OpenAuth()            # auth.py: API key -> tenant
        self.quotas = quotas or Unlimited()       # quota.py: per tenant and tier
        self.usage = usage or NullSink()          # usage.py: the ledger's durable inbox
        self.admission = admission or OpenAdmission()  # admission.py: the tier-ordered queue
        self.tokenizers = TokenizerCache(fleet)
        self.policy = get_policy(policy)
        self.first_token_timeout_s = first_token_timeout_s
        self.max_attempts = max_attempts
        self._arrivals: dict[str, ArrivalRate] = {}   # model -> rate of Generate calls routed for it
        self._shared_rates: dict[str, PrefixRates] = {}   # model -> rates by deepest cached block
        # Node request ids: unique per attempt even when clients reuse request ids (the node's
        # engine and this router's pending count are keyed by them), and across routers.
        self._instance = uuid.uuid4().hex[:8]
        self._attempt_ids = itertools.count(1)

    # -- validation and tokenisation -------------------------------------------------------------
    def authenticate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> Principal:
        """The caller's tenant (UNAUTHENTICATED when auth is on and the key is missing or bad)."""
        md = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        return self.auth.authenticate(md, request.tenant)

    async def prepare(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext,
                      arrival: bool = True, principal: Principal | None = None) -> Prepared:
        """Validates and tokenises ``request``. ``arrival``: count it in the model's arrival
        rate (Generate does; ExplainRoute only reads the rate)."""
        principal = principal or Principal("default")
        if not request.model:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "model is required")
        if request.tier == cpb.TIER_BATCH and not principal.internal:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               "tier batch is only accepted through the Batch API, not interactive Generate")
        serving = self.fleet.serving(request.model)
        if not serving:
            known = sorted({m for c in self.fleet.nodes.values() for m in c.models})
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"unknown model {request.model!r}; served models: {', '.join(known) or 'none'}")
        max_tokens = request.sampling.max_tokens
        if max_tokens <= 0:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens must be > 0")
        if request.stream_interval_ms > MAX_STREAM_INTERVAL_MS:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"stream_interval_ms must be at most {MAX_STREAM_INTERVAL_MS}, got {request.stream_interval_ms}")
        deadline = None
        if request.HasField("deadline"):
            remaining = request.deadline.ToMicroseconds() / 1e6 - time.time()
            if remaining <= 0:
                raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline already passed")
            deadline = time.monotonic() + remaining
        try:
            tok = await self.tokenizers.get(request.model)
        except TokenizerUnavailable as exc:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc
        t0 = time.perf_counter()
        kind = request.WhichOneof("prompt")
        # encode_ids/encode_chat_ids reuse the ids of segments seen before (system prompt,
        # tools, earlier turns), exactly; only new text is encoded.
        if kind == "text":
            tokens = tok.encode_ids(request.text)
        elif kind == "token_ids":
            ids = request.token_ids.ids
            tokens = np.array(ids, np.int64)   # (a repeated field converts in one call; fromiter iterates)
            if tokens.size and (tokens.max() >= tok.vocab_size or tokens.min() < 0):
                bad = next(t for t in ids if not 0 <= t < tok.vocab_size)
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"token id {bad} is outside the vocabulary (size {tok.vocab_size})")
        elif kind == "chat":
            msgs = [{"role": m.role, "content": m.content} for m in request.chat.messages]
            if not msgs:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "chat has no messages")
            try:
                tokens = tok.encode_chat_ids(msgs)
            except Exception as exc:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"chat template failed: {exc}") from exc
        else:
            tokens = np.zeros(0, np.uint32)
        tokens = np.asarray(tokens, dtype=np.uint32)
        tokenize_us = (time.perf_counter() - t0) * 1e6
        if not tokens.size:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty")
        max_len = min(c.models[request.model].max_model_len for c in serving)
        if len(tokens) + max_tokens > max_len:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"prompt ({len(tokens)} tokens) plus max_tokens ({max_tokens}) exceeds the model's context of {max_len} tokens",
            )
        rates = self._arrivals.setdefault(request.model, ArrivalRate())
        now = time.monotonic()
        return Prepared(
            request_id=request.request_id or uuid.uuid4().hex, model=request.model, tokens=tokens, tokenizer=tok,
            max_tokens=max_tokens, tier=request.tier or cpb.TIER_DEFAULT, deadline=deadline, tokenize_us=tokenize_us,
            arrival_rate=rates.arrive(now) if arrival else rates.peek(now),
            tenant=principal.tenant, max_queue_s=request.max_queue_ms / 1000.0,
            stream_interval_s=(request.stream_interval_ms / 1000.0 if request.stream_interval_ms
                               else STREAM_INTERVAL_S.get(request.tier or cpb.TIER_DEFAULT, 0.0)),
            batch_item=dict(context.invocation_metadata() or ()).get("x-kvfleet-batch-item", "") if principal.internal else "",
        )

    def rank(self, p: Prepared, exclude: set[str] = frozenset()) -> Ranked:  # type: ignore[assignment]
        """Ranks every node serving the model, eligible first, best first."""
        table = self.fleet.columns(p.model)
        if exclude:
            table = table.take(np.array([r for r, nid in enumerate(table.node_ids) if nid not in exclude], np.int64))
        sizes = np.unique(table.block_size).tolist()
        hash_s = decide_s = 0.0
        out = []   # the policy's ranking (list-like) for one block size; a merged list for several
        all_hashes: dict[int, np.ndarray] = {}
        prefix_keys: list[int] = []
        tokens = np.asarray(p.tokens, dtype=np.uint32)
        for bs in sizes:
            group = table if len(sizes) == 1 else table.take(np.flatnonzero(table.block_size == bs))
            t0 = time.perf_counter()
            hashes = block_hashes(tokens, bs)
            all_hashes[bs] = hashes
            t1 = time.perf_counter()
            index = self.fleet.index.get_or_create(p.model, bs)
            ranking = self.policy.rank(
                RouteRequest(hashes, len(p.tokens), bs, p.max_tokens, p.arrival_rate, time.monotonic(),
                             LATENCY_WEIGHT.get(p.tier, 1.0), self._shared_rates.setdefault(p.model, PrefixRates())),
                group, index)
            if getattr(ranking, "prefix_key", 0):
                prefix_keys.append(ranking.prefix_key)
            out = ranking if len(sizes) == 1 else [*out, *ranking]
            decide_s += time.perf_counter() - t1
            hash_s += t1 - t0
        if len(sizes) > 1:  # several block sizes: merge the groups by cost (one group keeps its policy's order)
            out.sort(key=lambda c: (not c.eligible, c.cost_s - c.credit_s))  # type: ignore[attr-defined]
        child(DECIDE, p.model).observe(hash_s + decide_s + p.tokenize_us / 1e6)
        block_size = dict(zip(table.node_ids, table.block_size.tolist()))
        return Ranked(out, block_size, all_hashes, hash_s * 1e6, decide_s * 1e6, prefix_keys)  # type: ignore[arg-type]

    # -- Generate ------------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        try:
            async with aclosing(self._serve(request, context)) as outputs:
                async for msg in outputs:
                    yield msg
        except RequestError as exc:
            await self._abort(context, exc)

    async def GenerateMany(self, request_iterator, context: grpc.aio.ServicerContext):
        """Many requests over one call (see inference.proto). Each runs as Generate's would,
        in its own task; every item ready at one moment goes out in one message."""
        ready: list[pb.GenerateManyItem] = []
        wake = asyncio.Event()
        room = asyncio.Event()    # set while the caller keeps up (ready under MANY_BACKLOG)
        room.set()
        tasks: dict[int, asyncio.Task] = {}
        sinks: dict[int, _Sink] = {}   # the running requests' (see _relay)
        unwinding: set[asyncio.Task] = set()   # cancelled by the caller, still billing
        reading = True
        failed: list[BaseException] = []
        item_context = _ItemContext(tuple(context.invocation_metadata() or ()))

        def emit(item: pb.GenerateManyItem) -> None:
            ready.append(item)
            if len(ready) >= MANY_BACKLOG:
                room.clear()
            wake.set()

        def fail(stream: int, exc: RequestError) -> None:
            emit(_error_item(stream, exc))

        async def run(stream: int, request: pb.GenerateRequest, sink: _Sink) -> None:
            me = asyncio.current_task()

            def last(item: pb.GenerateManyItem) -> None:
                """The request's last item: its id is free from here on (a cancel for it now
                finds nothing, and does not end it twice)."""
                emit(item)
                if tasks.get(stream) is me:
                    del tasks[stream]
                    del sinks[stream]

            try:
                async with aclosing(self._serve(request, item_context, sink)) as outputs:
                    async for msg in outputs:
                        if msg.HasField("usage"):
                            last(pb.GenerateManyItem(stream=stream, response=msg))
                            continue
                        emit(pb.GenerateManyItem(stream=stream, response=msg))
                        if not room.is_set():
                            await room.wait()   # the caller reads slower than its requests produce
            except RequestError as exc:
                last(_error_item(stream, exc))
            except Exception as exc:   # a bug here must end this request, not the call
                log.exception("router: request %s of a GenerateMany call failed", request.request_id)
                last(_error_item(stream, RequestError(grpc.StatusCode.INTERNAL, f"router error: {exc}")))

        def ended(stream: int, task: asyncio.Task) -> None:
            # A done callback, not a finally: it also runs for a task cancelled before it started.
            if tasks.get(stream) is task:
                del tasks[stream]
                del sinks[stream]
            wake.set()

        def take(msg: pb.GenerateManyRequest) -> None:
            kind = msg.WhichOneof("kind")
            if kind == "start":
                if msg.stream in tasks:   # ALREADY_EXISTS: no request ends with it, so not this one's end
                    fail(msg.stream, RequestError(grpc.StatusCode.ALREADY_EXISTS,
                                                  f"stream {msg.stream} is already running"))
                else:
                    sink = sinks[msg.stream] = _Sink(msg.stream, emit, room)
                    task = tasks[msg.stream] = asyncio.create_task(run(msg.stream, msg.start, sink))
                    task.add_done_callback(lambda t, sid=msg.stream: ended(sid, t))
            elif kind == "cancel":
                if (t := tasks.pop(msg.stream, None)) is not None:
                    # Nothing more of the request is sent, and its last item says so:
                    # after it the id is free (the billing unwinds in its task).
                    sinks.pop(msg.stream).closed = True
                    t.cancel()
                    unwinding.add(t)
                    t.add_done_callback(unwinding.discard)
                    fail(msg.stream, RequestError(grpc.StatusCode.CANCELLED, "cancelled by the caller"))

        async def read() -> None:
            nonlocal reading
            try:
                async for first in request_iterator:
                    if first.more and any(m.more for m in first.more):
                        failed.append(RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                                   "a request in GenerateManyRequest.more has a `more` of its own"))
                        return
                    for msg in (first, *first.more) if first.more else (first,):
                        take(msg)
            except Exception as exc:   # not the caller half-closing: the call cannot go on
                failed.append(exc)
            finally:
                reading = False
                wake.set()

        reader = asyncio.create_task(read())
        try:
            while True:
                if failed:
                    if isinstance(failed[0], RequestError):   # the caller's mistake
                        await context.abort(failed[0].code, str(failed[0]))
                    log.warning("router: a GenerateMany call's requests could not be read: %s", failed[0])
                    await context.abort(grpc.StatusCode.INTERNAL, f"reading the call's requests failed: {failed[0]}")
                if ready:
                    batch, ready[:] = list(ready), []
                    room.set()
                    for part in _parts(batch, MANY_MESSAGE_BYTES):
                        yield pb.GenerateManyResponse(items=part)
                    continue
                if not tasks and not reading:
                    return
                await wake.wait()
                wake.clear()
        finally:
            reader.cancel()
            for t in list(tasks.values()):
                t.cancel()
            await asyncio.gather(reader, *tasks.values(), *unwinding, return_exceptions=True)

    async def _serve(self, request: pb.GenerateRequest, context, sink: _Sink | None = None):
        """One request, Generate's or one of a GenerateMany call's: yields what the client
        gets, raises RequestError with the status it ends with."""
        # Order: who (auth) -> what (validate, tokenise) -> may they (quota) -> when (tier
        # queue) -> where (route) -> bill (ledger, before the client sees the usage).
        try:
            principal = self.authenticate(request, context)
            p = await self.prepare(request, context, principal=principal)
        except RequestError as exc:
            child(REQUESTS, request.model, exc.code.name.lower()).inc()
            raise
        ticket = None
        admitted = False
        relayed = Relayed()
        try:
            ticket = await self.quotas.admit(principal, p.tier, len(p.tokens), p.max_tokens)
            try:
                avoid = await self.admission.enter(p, self.rank)   # nodes past the tier's limit
            except BaseException:
                # Shed by the tier queue or gone while queued: it never reached a node, so
                # it counts against no quota (the client retries after the hint).
                ticket.refund()
                ticket = None
                raise
            admitted = True
            async for msg in self._generate(p, request, context, avoid, relayed, sink):
                if msg.HasField("usage"):
                    u = msg.usage
                    ticket.done(u.prompt_tokens, u.completion_tokens)
                    ticket = None
                    relayed.billed = True
                    await self.usage.record(self._record(p, u))
                yield msg
            child(REQUESTS, p.model, "ok").inc()
        except RequestError as exc:
            child(REQUESTS, p.model, exc.code.name.lower()).inc()
            raise
        except asyncio.CancelledError:
            child(REQUESTS, p.model, "cancelled").inc()
            raise
        finally:
            if admitted:
                self.admission.leave(p)
            if ticket is not None:
                ticket.done(len(p.tokens), relayed.completion)
            if relayed.cand is not None and not relayed.billed:
                await self._bill_unfinished(p, relayed)

    async def _bill_unfinished(self, p: Prepared, relayed: Relayed) -> None:
        """Bills a request that ended after its first token without a Usage (the client
        cancelled, or its node failed mid-stream): its prompt, the router's predicted
        cached tokens (the engine's count never came), and the tokens relayed to the
        client, with finish reason ``abort``. A client that retries with the same request
        id is billed once, for the attempt it received (the later record wins)."""
        u = self._usage(p, relayed.cand, relayed.completion, None, "abort", relayed.attempts).usage
        try:
            await self.usage.record(self._record(p, u))
        except (Exception, asyncio.CancelledError) as exc:   # the client is gone: nobody to tell
            log.warning("router: usage of unfinished request %s not recorded: %s", p.request_id, exc)

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext, exc: RequestError):
        if exc.trailers:
            context.set_trailing_metadata(exc.trailers)
        await context.abort(exc.code, str(exc))

    @staticmethod
    def _record(p: Prepared, u: pb.Usage) -> UsageRecord:
        return UsageRecord(
            request_id=p.request_id, tenant=p.tenant, model=p.model, tier=p.tier, node_id=u.node_id,
            prompt_tokens=u.prompt_tokens, cached_prompt_tokens=u.cached_prompt_tokens,
            completion_tokens=u.completion_tokens, finish_reason=u.finish_reason, unix_ms=int(time.time() * 1000),
            batch_item=p.batch_item,
        )

    def _remaining(self, p: Prepared, context: grpc.aio.ServicerContext) -> float | None:
        rem = context.time_remaining()
        if p.deadline is not None:
            own = p.deadline - time.monotonic()
            rem = own if rem is None else min(rem, own)
        return rem

    async def _generate(self, p: Prepared, request: pb.GenerateRequest, context, avoid=frozenset(),
                        relayed: Relayed | None = None, sink: _Sink | None = None):
        t_start = time.monotonic()
        tried: set[str] = set()
        attempts = 0
        last_error = "no ready node"
        while attempts < self.max_attempts:
            # The tier queue's ``avoid`` (nodes past the tier's limit) shapes the first choice;
            # once a node has failed, a retry may go to any node that has not.
            ranked = self.rank(p, exclude=tried or avoid)
            # The ranking builds candidates as they are read: take the first eligible only.
            cand = next((c for c in ranked.candidates if c.eligible), None)
            if cand is None and avoid and not tried:
                ranked = self.rank(p, exclude=tried)
                cand = next((c for c in ranked.candidates if c.eligible), None)
            if cand is None:
                break
            if not attempts:
                # Counted once per request, at its first placement.
                rates = self._shared_rates.setdefault(p.model, PrefixRates())
                now = time.monotonic()
                for key in ranked.prefix_keys:
                    rates.arrive(key, now)
            attempts += 1
            tried.add(cand.node_id)
            conn = self.fleet.nodes.get(cand.node_id)
            if conn is None or conn.stub is None:
                continue
            remaining = self._remaining(p, context)
            if remaining is not None and remaining <= 0:
                raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before a node answered")
            node_req = npb.NodeGenerateRequest(
                # Unique per attempt even when clients reuse request ids: the node's
                # engine and this router's pending count are keyed by it.
                request_id=f"{p.request_id}/{self._instance}-{next(self._attempt_ids)}/{attempts}", model=p.model,
                prompt_token_ids=p.tokens.tolist(),
                sampling=request.sampling, tier=p.tier,
            )
            # A node agent that holds tokens for the stream interval itself sends fewer
            # messages (a node with only flex and batch requests: one per tick, not per step).
            held = conn.serve_level >= 1 and p.stream_interval_s > 0 and not request.sampling.stop
            if held:
                node_req.stream_interval_ms = round(p.stream_interval_s * 1000)
            self.fleet.add_pending(cand.node_id, node_req.request_id, cand.uncached_tokens)
            self.admission.sent(p)   # the tier queue may now check the next request against this node
            stream = conn.stream(node_req)   # a failed node stream is reopened: the failure shows on read
            if remaining is not None:
                stream.expire_at(asyncio.get_running_loop().time() + remaining, "deadline exceeded before the first token")
            first_timeout = self.first_token_timeout_s + cand.cost_s
            if remaining is not None:
                first_timeout = min(first_timeout, remaining)
            try:
                try:
                    first = await stream.read(first_timeout)
                except asyncio.TimeoutError:
                    if remaining is not None and first_timeout >= remaining:
                        raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the first token")
                    self.fleet.mark_suspect(cand.node_id)
                    child(ATTEMPTS, cand.node_id, "first_token_timeout").inc()
                    last_error = f"{cand.node_id} sent no first token within {first_timeout:.1f} s"
                    log.warning("router: %s; retrying elsewhere", last_error)
                    continue
                except StreamError as exc:
                    if exc.code() not in RETRYABLE:
                        raise RequestError(exc.code(), exc.details() or exc.code().name) from exc
                    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and remaining is not None:
                        raise RequestError(exc.code(), exc.details() or "deadline exceeded") from exc
                    child(ATTEMPTS, cand.node_id, exc.code().name.lower()).inc()
                    last_error = f"{cand.node_id}: {exc.code().name} {exc.details()}"
                    log.warning("router: node failed before first token (%s); retrying elsewhere", last_error)
                    continue
                child(ATTEMPTS, cand.node_id, "ok").inc()
                bs = ranked.block_size.get(cand.node_id)
                if bs is not None and first[0] == "tokens":   # prefilled (an end before any token may not be)
                    # On the loop's next turn: the first token goes out without waiting for it.
                    asyncio.get_running_loop().call_soon(self.fleet.learn, cand.node_id, p.model, ranked.hashes[bs])
                child(TTFT, p.model).observe(time.monotonic() - t_start)
                if relayed is not None:
                    relayed.cand, relayed.attempts = cand, attempts
                async for msg in self._relay(p, request, stream, first, cand, attempts, relayed, sink, held):
                    yield msg
                return
            finally:
                self.fleet.drop_pending(cand.node_id, node_req.request_id)
                stream.cancel()
        raise RequestError(grpc.StatusCode.UNAVAILABLE,
                           f"no node could serve {p.model!r} after {attempts} attempt(s): {last_error}")

    async def _relay(self, p: Prepared, request: pb.GenerateRequest, stream: NodeStream, first, cand: Candidate,
                     attempts: int, relayed: Relayed | None = None, sink: _Sink | None = None, held: bool = False):
        """Relays a node's outputs to the client, from the first one. Token items that
        arrived while the last chunk was being written go out merged, as one chunk; with a
        stream interval, so do the tokens made until the interval has passed (``held``: the
        node already held them for it, and the router relays what arrives). With a
        ``sink`` (a request of a GenerateMany call) and neither stop strings nor an
        interval, token chunks go from the node's stream reader straight to the call: this
        task only wakes for the request's end (or while the caller is behind)."""
        detok = IncrementalDetokenizer(p.tokenizer)
        stops = StopMatcher(list(request.sampling.stop))
        # With stop strings, tokens are matched one at a time (a merged chunk ends at the
        # token that completes a stop, not after it), and no interval holds them back: the
        # node's work past a stop is cancelled as soon as the stop is seen.
        interval = 0.0 if stops.stops or held else p.stream_interval_s
        completion = 0
        kind, value = first
        if sink is not None and not stops.stops and not interval:
            def deliver(ids: list[int]) -> None:
                nonlocal completion
                if sink.closed:
                    return   # the caller cancelled: these tokens are not relayed (nor billed)
                completion += len(ids)
                if not sink.send(ids, detok.push(ids)):
                    stream.divert(None)   # the caller is behind: tokens wait on the stream, merged
                if relayed is not None:
                    relayed.completion = completion

            while kind == "tokens":
                deliver(value)
                await sink.drained()
                stream.divert(deliver)
                kind, value = await self._next(stream, cand, completion)
        while kind == "tokens":
            if stops.stops:
                parts, stopped = [], False
                for i, tok in enumerate(value):
                    part, stopped = stops.feed(detok.push([tok]))
                    parts.append(part)
                    if stopped:
                        value = value[: i + 1]
                        break
                text = "".join(parts)
            else:
                text, stopped = detok.push(value), False
            completion += len(value)
            yield pb.GenerateResponse(chunk=pb.TokenChunk(token_ids=value, text=text))
            if relayed is not None:
                relayed.completion = completion   # after the yield: what the client was given
            if stopped:
                stream.cancel()
                yield self._usage(p, cand, completion, None, "stop", attempts)
                return
            if interval:
                await stream.settle(interval)
            kind, value = await self._next(stream, cand, completion)
        text, stopped = stops.feed(detok.flush())
        if not stopped:
            text += stops.flush()
        if text:
            yield pb.GenerateResponse(chunk=pb.TokenChunk(token_ids=[], text=text))
        reason = "stop" if stopped else FINISH_NAME.get(value.finish_reason, "length")
        yield self._usage(p, cand, value.completion_tokens, value, reason, attempts)

    @staticmethod
    async def _next(stream: NodeStream, cand: Candidate, completion: int):
        """The stream's next output once tokens have reached the client."""
        try:
            return await stream.read()
        except StreamError as exc:
            # Tokens already reached the client: no silent retry (a later issue continues mid-stream).
            code = exc.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise RequestError(code, f"deadline exceeded after {completion} tokens") from exc
            raise RequestError(
                grpc.StatusCode.UNAVAILABLE if code in RETRYABLE else code,
                f"{cand.node_id} failed mid-stream after {completion} tokens: {code.name} {exc.details() or ''}".rstrip(),
            ) from exc

    def _usage(self, p: Prepared, cand: Candidate, completion: int, final, reason: str, attempts: int):
        # Ended by a stop string the router matched: the node's stream was cancelled before
        # its final message, so the engine's count never came; bill the router's prediction
        # (exact where the node publishes KV events: the vLLM suite checks it to the token).
        cached = final.cached_prompt_tokens if final is not None else cand.cached_tokens
        node = cand.node_id
        child(PROMPT_TOKENS, p.model, node).inc(len(p.tokens))
        child(PREDICTED_CACHED, p.model, node).inc(cand.cached_tokens)
        child(ACTUAL_CACHED, p.model, node).inc(cached)
        child(COMPLETION_TOKENS, p.model, node).inc(completion)
        return pb.GenerateResponse(usage=pb.Usage(
            prompt_tokens=len(p.tokens), cached_prompt_tokens=cached, completion_tokens=completion,
            predicted_cached_tokens=cand.cached_tokens, node_id=node, finish_reason=FINISH[reason],
            request_id=p.request_id, attempts=attempts, tier=p.tier,
        ))

    # -- ExplainRoute -------------------------------------------------------------------------------
    async def ExplainRoute(self, request: pb.GenerateRequest, context) -> pb.ExplainRouteResponse:
        if not request.sampling.max_tokens:
            request.sampling.max_tokens = 1
        try:
            p = await self.prepare(request, context, arrival=False, principal=self.authenticate(request, context))
        except RequestError as exc:
            await self._abort(context, exc)
        ranked = self.rank(p)
        picked = next((c.node_id for c in ranked.candidates if c.eligible), "")
        return pb.ExplainRouteResponse(
            model=p.model, prompt_tokens=len(p.tokens), block_size=next(iter(ranked.block_size.values()), 0),
            picked_node_id=picked, tokenize_us=p.tokenize_us, hash_us=ranked.hash_us, decide_us=ranked.decide_us,
            candidates=[
                pb.CandidateScore(
                    node_id=c.node_id, address=self.fleet.nodes[c.node_id].entry.address if c.node_id in self.fleet.nodes else "",
                    predicted_cached_tokens=c.cached_tokens, queued_prefill_tokens=c.queued_prefill_tokens,
                    running=self.fleet.nodes[c.node_id].running if c.node_id in self.fleet.nodes else 0,
                    kv_usage=self.fleet.nodes[c.node_id].kv_usage if c.node_id in self.fleet.nodes else 0.0,
                    estimated_ttft_s=c.cost_s, eligible=c.eligible, reason=c.reason, replica_credit_s=c.credit_s,
                )
                for c in ranked.candidates
            ],
        )
