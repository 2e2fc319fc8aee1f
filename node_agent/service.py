"""gRPC edge of the node agent: kvfleet.v1.NodeAgent."""

from __future__ import annotations

import asyncio
import logging
import math

import grpc
from prometheus_client import Counter

from kvfleet.node_agent.engine import Engine, EngineError, EngineRequest, EngineUnavailable
from kvfleet.node_agent.state import StatePublisher, Update
from kvfleet.v1 import common_pb2 as cpb
from kvfleet.v1 import node_pb2 as pb
from kvfleet.v1 import node_pb2_grpc as pbg

log = logging.getLogger(__name__)

NODE_REQUESTS = Counter("kvfleet_node_requests_total", "Generate calls by outcome", ["model", "outcome"])
FINISH = {"length": cpb.FINISH_REASON_LENGTH, "stop": cpb.FINISH_REASON_STOP, "abort": cpb.FINISH_REASON_ABORT}
# vLLM's priority scheduling: lower values run first.
TIER_PRIORITY = {cpb.TIER_PRIORITY: 0, cpb.TIER_AUTO: 1, cpb.TIER_DEFAULT: 1, cpb.TIER_FLEX: 2, cpb.TIER_BATCH: 3}


def model_info_pb(engine: Engine) -> cpb.ModelInfo:
    i = engine.info
    return cpb.ModelInfo(
        name=i.name, block_size=i.block_size, num_blocks=i.num_blocks, max_model_len=i.max_model_len,
        prefill_tokens_per_s=i.prefill_tokens_per_s, decode_tokens_per_s=i.decode_tokens_per_s,
        tokenizer_digest=engine.tokenizer_files().digest,
        cache_tracking=cpb.CACHE_TRACKING_EXACT if i.exact_cache_tracking else cpb.CACHE_TRACKING_APPROXIMATE,
        engine=i.engine, max_num_batched_tokens=i.max_num_batched_tokens, max_num_seqs=i.max_num_seqs,
    )


def update_to_pb(u: Update, block_sizes: dict[str, int]) -> pb.StateUpdate:
    def blocks(d: dict[str, list[int]]) -> list[pb.ModelBlocks]:
        return [pb.ModelBlocks(model=m, block_size=block_sizes[m], block_hashes=h) for m, h in d.items()]

    return pb.StateUpdate(
        seq=u.seq, snapshot=u.snapshot, stored=blocks(u.stored), removed=blocks(u.removed),
        cleared_models=u.cleared, ready=u.ready, accepted_request_ids=u.accepted, load=load_pb(u),
        serve_level=SERVE_LEVEL,
    )


def load_pb(u: Update) -> cpb.LoadSignals:
    return cpb.LoadSignals(
        running=u.load.running, waiting=u.load.waiting, kv_usage=u.load.kv_usage,
        queued_prefill_tokens=u.load.queued_prefill_tokens, cached_blocks=u.cached_blocks, inflight=u.inflight,
        decode_step_s=u.load.decode_step_s,
    )


# What this node agent's Serve takes (StateUpdate.serve_level): ServeRequest.more and
# NodeGenerateRequest.stream_interval_ms.
SERVE_LEVEL = 1


class StreamFailed(Exception):
    """A request ends with this status instead of a final message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class NodeAgentService(pbg.NodeAgentServicer):
    def __init__(self, node_id_fn, engines: dict[str, Engine], publisher: StatePublisher) -> None:
        self._node_id = node_id_fn
        self.engines = engines
        self.publisher = publisher
        self.inflight = 0
        self._block_sizes = {m: e.info.block_size for m, e in engines.items()}
        self.closing = False
        self._serving: set[asyncio.Event] = set()   # wakes open Serve streams on close()

    async def Generate(self, request: pb.NodeGenerateRequest, context: grpc.aio.ServicerContext):
        """One request per call (the CLI, benchmarks calling a node directly); routers use Serve."""
        if self.closing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "node is shutting down")
        try:
            async for resp in self._outputs(request):
                yield resp
        except StreamFailed as exc:
            await context.abort(exc.code, exc.message)

    async def Serve(self, request_iterator, context: grpc.aio.ServicerContext):
        """Many requests over one stream (see node.proto). Outputs of every request go to one
        list; each message sent carries all that is ready, so the per-message cost of gRPC is
        paid per engine step, not per token and request."""
        ready: list[pb.StreamItem] = []
        wake = asyncio.Event()
        tasks: dict[int, asyncio.Task] = {}
        reading = True

        def emit(item: pb.StreamItem) -> None:
            ready.append(item)
            wake.set()

        def fail(stream: int, code: grpc.StatusCode, message: str) -> None:
            emit(pb.StreamItem(stream=stream, error=pb.StreamError(code=code.value[0], message=message)))

        loop = asyncio.get_running_loop()

        async def run(stream: int, request: pb.NodeGenerateRequest) -> None:
            interval = request.stream_interval_ms / 1000.0
            held: list[int] = []              # tokens not sent yet (with an interval)
            timer: asyncio.TimerHandle | None = None
            last = -math.inf                   # loop time of this request's last token item

            def flush(at: float) -> None:
                """Sends the held tokens as of ``at``: the tick a timer was set for (not
                when it ran, a little later, which would push the next one a tick on)."""
                nonlocal timer, last
                timer = None
                if held:
                    emit(pb.StreamItem(stream=stream, tokens=cpb.TokenIds(ids=held)))
                    held.clear()
                    last = at

            def release() -> None:
                """The request ends: what is held goes now (the end is never held)."""
                if timer is not None:
                    timer.cancel()
                flush(loop.time())

            try:
                async for resp in self._outputs(request):
                    if not resp.HasField("tokens"):
                        release()
                        emit(pb.StreamItem(stream=stream, final=resp.final))
                    elif not interval:
                        emit(pb.StreamItem(stream=stream, tokens=resp.tokens))
                    else:
                        held.extend(resp.tokens.ids)
                        if timer is None:
                            due, now = last + interval, loop.time()
                            if due <= now:
                                flush(now)
                            else:   # on the shared clock: requests with this interval go out together
                                tick = interval / 2
                                at = math.ceil(due / tick - 1e-9) * tick   # (due on a tick stays on it)
                                timer = loop.call_at(at, flush, at)
            except StreamFailed as exc:
                release()   # what was made before the failure still goes first
                fail(stream, exc.code, exc.message)
            except Exception as exc:   # a bug here must end this request, not the stream
                log.exception("node: request %s failed", request.request_id)
                release()
                fail(stream, grpc.StatusCode.INTERNAL, f"node agent error: {exc}")
            finally:
                if timer is not None:
                    timer.cancel()

        def ended(stream: int, task: asyncio.Task) -> None:
            # A done callback, not a finally: it also runs for a task cancelled before it started.
            if tasks.get(stream) is task:
                del tasks[stream]
            wake.set()

        failed: list[BaseException] = []

        async def read() -> None:
            nonlocal reading
            try:
                async for first in request_iterator:
                    if first.more and any(m.more for m in first.more):
                        # Refused whole, before any of it starts (as the router's GenerateMany does).
                        failed.append(StreamFailed(grpc.StatusCode.INVALID_ARGUMENT,
                                                   "a request in ServeRequest.more has a `more` of its own"))
                        return
                    for msg in (first, *first.more) if first.more else (first,):
                        kind = msg.WhichOneof("kind")
                        if kind == "start":
                            if msg.stream in tasks:
                                fail(msg.stream, grpc.StatusCode.INVALID_ARGUMENT, f"stream {msg.stream} is already running")
                            elif self.closing:
                                fail(msg.stream, grpc.StatusCode.UNAVAILABLE, "node is shutting down")
                            else:
                                task = tasks[msg.stream] = asyncio.create_task(run(msg.stream, msg.start))
                                task.add_done_callback(lambda t, sid=msg.stream: ended(sid, t))
                        elif kind == "cancel":
                            if (t := tasks.get(msg.stream)) is not None:
                                t.cancel()
            except Exception as exc:   # not the caller half-closing: the stream cannot go on
                failed.append(exc)
            finally:
                reading = False
                wake.set()

        reader = asyncio.create_task(read())
        self._serving.add(wake)
        try:
            while True:
                if failed:
                    if isinstance(failed[0], StreamFailed):   # the caller's mistake
                        await context.abort(failed[0].code, failed[0].message)
                    log.warning("node: a Serve stream's requests could not be read: %s", failed[0])
                    await context.abort(grpc.StatusCode.INTERNAL, f"reading the stream's requests failed: {failed[0]}")
                if ready:
                    batch, ready[:] = list(ready), []
                    yield pb.ServeResponse(items=batch)
                    continue
                if not tasks and (not reading or self.closing):
                    return
                await wake.wait()
                wake.clear()
        finally:
            self._serving.discard(wake)
            reader.cancel()
            for t in list(tasks.values()):
                t.cancel()
            await asyncio.gather(reader, *tasks.values(), return_exceptions=True)

    def close(self) -> None:
        """Shutting down: refuse new requests; Serve streams end once their requests have."""
        self.closing = True
        for wake in self._serving:
            wake.set()

    async def _outputs(self, request: pb.NodeGenerateRequest):
        """What one request streams; raises StreamFailed with the status it ends with."""
        engine = self.engines.get(request.model)
        if engine is None:
            raise StreamFailed(grpc.StatusCode.NOT_FOUND, f"model {request.model!r} is not served by this node")
        if not engine.ready:
            raise StreamFailed(grpc.StatusCode.UNAVAILABLE, f"engine for {request.model!r} is not ready")
        s = request.sampling
        ereq = EngineRequest(
            request_id=request.request_id, prompt_token_ids=list(request.prompt_token_ids),
            max_tokens=s.max_tokens, temperature=s.temperature if s.HasField("temperature") else 1.0,
            top_p=s.top_p if s.HasField("top_p") else 1.0, seed=s.seed if s.HasField("seed") else None,
            stop_token_ids=list(s.stop_token_ids), priority=TIER_PRIORITY.get(request.tier, 1),
        )
        prompt_tokens = len(ereq.prompt_token_ids)
        cached = 0
        completion = 0
        outcome = "cancelled"
        self.inflight += 1
        self.publisher.poke()
        outputs = engine.generate(ereq)
        first = asyncio.ensure_future(outputs.__anext__())
        try:
            # Let the engine admit the request before announcing it (a cancel here is
            # cleaned up by the finally below).
            await asyncio.sleep(0)
            self.publisher.on_accepted(request.request_id)
            try:
                out = await first
            except EngineUnavailable as exc:
                outcome = "unavailable"
                raise StreamFailed(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc
            except EngineError as exc:
                outcome = "invalid"
                raise StreamFailed(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
            while True:
                if out.num_cached_tokens is not None:
                    cached = out.num_cached_tokens
                if out.new_token_ids:
                    completion += len(out.new_token_ids)
                    yield pb.NodeGenerateResponse(tokens=cpb.TokenIds(ids=out.new_token_ids))
                if out.finished:
                    outcome = "ok"
                    yield pb.NodeGenerateResponse(final=pb.NodeFinal(
                        prompt_tokens=prompt_tokens, cached_prompt_tokens=cached, completion_tokens=completion,
                        finish_reason=FINISH.get(out.finish_reason or "length", cpb.FINISH_REASON_LENGTH),
                    ))
                    return
                try:
                    out = await outputs.__anext__()
                except EngineError as exc:
                    outcome = "error"
                    raise StreamFailed(grpc.StatusCode.UNAVAILABLE, f"engine failed mid-stream: {exc}") from exc
                except StopAsyncIteration:
                    outcome = "error"
                    raise StreamFailed(grpc.StatusCode.INTERNAL, "engine stream ended without a final output") from None
        finally:
            if not first.done():
                first.cancel()
            await outputs.aclose()  # aborts the engine request if it is still running
            self.inflight -= 1
            NODE_REQUESTS.labels(request.model, outcome).inc()
            self.publisher.poke()

    async def GetInfo(self, request, context) -> pb.NodeInfoResponse:
        u = self.publisher.current()
        return pb.NodeInfoResponse(
            node_id=self._node_id(), models=[model_info_pb(e) for e in self.engines.values()], ready=u.ready,
            load=load_pb(u),
        )

    async def GetTokenizer(self, request: pb.GetTokenizerRequest, context) -> pb.TokenizerResponse:
        engine = self.engines.get(request.model)
        if engine is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.model!r} is not served by this node")
        f = engine.tokenizer_files()
        return pb.TokenizerResponse(
            tokenizer_json=f.tokenizer_json, digest=f.digest, chat_template=f.chat_template,
            eos_token_ids=f.eos_token_ids, bos_token=f.bos_token, eos_token=f.eos_token,
        )

    async def WatchState(self, request, context):
        async for update in self.publisher.subscribe():
            yield update_to_pb(update, self._block_sizes)
