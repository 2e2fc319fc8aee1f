"""OpenAIEngine against a fake vLLM 0.32 OpenAI server on a loopback socket.

``FakeVLLM`` is a small HTTP/1.1 server (asyncio streams), so connections, chunked
streaming, client disconnects and refused connections are real. What it sends is
shaped as vLLM 0.32 sends it (sources under vllm/entrypoints/):

* completion chunks: ``openai/completion/serving.py`` ``completion_stream_generator``:
  ``CompletionStreamResponse.model_dump_json(exclude_unset=True)``, every choice field
  present; ``prompt_token_ids`` only in the first chunk, ``token_ids`` per chunk; then
  a usage chunk (``choices: []``, ``exclude_none=True``; ``prompt_tokens_details`` only
  with ``--enable-prompt-tokens-details``); then ``data: [DONE]``;
* errors: ``serve/engine/protocol.py`` ``ErrorResponse`` ``{"error": {message, type, param, code}}``;
* ``/v1/models``: ``ModelList`` of ``ModelCard`` (``id``, ``root``, ``max_model_len``);
* ``/metrics``: prometheus_client text with vLLM's names and labels
  (``v1/metrics/loggers.py``), ``vllm:cache_config_info`` labelled with CacheConfig's fields;
* ``/reset_prefix_cache``: only in dev mode (``serve/dev/cache/api_router.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time

import httpx
import msgspec
import pytest
import zmq
import zmq.asyncio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kvfleet.node_agent.engine import EngineError, EngineRequest, EngineUnavailable
from kvfleet.node_agent.engines.openai import OpenAIEngine, OpenAIEngineConfig, _local_model_dir
from kvfleet.node_agent.kv_events import BlockStored
from kvfleet.tokenizer import byte_level_tokenizer_files

pytestmark = pytest.mark.timeout(30)

MODEL = "smol"


class FakeVLLM:
    """vLLM 0.32's OpenAI server as far as OpenAIEngine uses it."""

    def __init__(self, root: str, *, dev_mode: bool = True, prompt_tokens_details: bool = True,
                 served_prompt_tokens: int = 0, metrics: bool = True) -> None:
        self.root = root
        self.dev_mode = dev_mode
        self.prompt_tokens_details = prompt_tokens_details
        self.served_prompt_tokens = served_prompt_tokens
        self.metrics = metrics
        self.max_model_len = 256
        self.block_size, self.num_gpu_blocks = 16, 1000
        self.running, self.waiting, self.kv_usage = 0, 0, 0.0
        self.health_status = 200
        self.script: list[list[int]] = [[5, 6], [7], [8]]   # token ids per chunk; the last one finishes
        self.finish_reason, self.stop_reason = "length", None
        self.cached_tokens = 32
        self.reject: tuple[int, dict] | None = None         # answer completions with this status and body
        self.stream_error_after_first = False                # vLLM's GenerationError, streamed
        self.die_after_first = False                         # the process dies mid-stream
        self.gate: asyncio.Event | None = None               # hold streams after the first chunk
        self.reset_success = True
        self.resets = 0
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.client_gone = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Like a killed server: the socket stops listening and open connections are cut."""
        self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        await self._server.wait_closed()

    # -- HTTP plumbing -------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {k.lower(): v for k, v in (ln.split(": ", 1) for ln in lines[1:] if ln)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                if not await self._route(method, target.partition("?")[0], headers, body, reader, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _send(self, writer, status: int, body: bytes = b"", ctype: str = "application/json") -> bool:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error",
                  503: "Service Unavailable"}[status]
        writer.write(f"HTTP/1.1 {status} {reason}\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}\r\n\r\n"
                     .encode() + body)
        await writer.drain()
        return True

    async def _event(self, writer, data: str) -> None:
        payload = f"data: {data}\n\n".encode()
        writer.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
        await writer.drain()

    async def _route(self, method, path, headers, body, reader, writer) -> bool:
        if (method, path) == ("GET", "/health"):
            return await self._send(writer, self.health_status)
        if (method, path) == ("GET", "/v1/models"):
            card = {"id": MODEL, "object": "model", "created": 1, "owned_by": "vllm", "root": self.root,
                    "parent": None, "max_model_len": self.max_model_len,
                    "permission": [{"id": "modelperm-1", "object": "model_permission", "created": 1}]}
            return await self._send(writer, 200, _json({"object": "list", "data": [card]}))
        if (method, path) == ("GET", "/metrics") and self.metrics:
            return await self._send(writer, 200, self._metrics(), "text/plain; version=0.0.4; charset=utf-8")
        if (method, path) == ("POST", "/reset_prefix_cache") and self.dev_mode:
            self.resets += 1
            return await self._send(writer, 200, _json({"success": self.reset_success}))
        if (method, path) == ("POST", "/v1/completions"):
            self.bodies.append(json.loads(body))
            self.headers.append(headers)
            if self.reject is not None:
                return await self._send(writer, self.reject[0], _json(self.reject[1]))
            return await self._stream(self.bodies[-1], headers, reader, writer)
        return await self._send(writer, 404, _json({"detail": "Not Found"}))

    # -- vLLM's shapes -------------------------------------------------------------------

    async def _stream(self, body, headers, reader, writer) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        rid = f"cmpl-{headers.get('x-request-id', 'x')}"
        created, prompt, n_out = int(time.time()), body["prompt"], 0
        for i, ids in enumerate(self.script):
            last = i == len(self.script) - 1
            if i == 1:
                if self.die_after_first:
                    writer.transport.abort()
                    return False
                if self.stream_error_after_first:
                    err = {"error": {"message": "Internal server error", "type": "InternalServerError",
                                     "param": None, "code": 500}}
                    await self._event(writer, json.dumps(err))
                    break
                if self.gate is not None and not await self._wait_or_disconnect(reader, self.gate):
                    return False
            choice = {"index": 0, "text": "t" * len(ids), "logprobs": None,
                      "finish_reason": self.finish_reason if last else None,
                      "stop_reason": self.stop_reason if last else None,
                      "prompt_token_ids": prompt if i == 0 else None, "token_ids": ids}
            await self._event(writer, _compact({"id": rid, "object": "text_completion", "created": created,
                                                "model": MODEL, "choices": [choice]}))
            n_out += len(ids)
        else:
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": len(prompt), "total_tokens": len(prompt) + n_out, "completion_tokens": n_out}
                if self.prompt_tokens_details:
                    usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
                await self._event(writer, _compact({"id": rid, "object": "text_completion", "created": created,
                                                    "model": MODEL, "choices": [], "usage": usage}))
        await self._event(writer, "[DONE]")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    async def _wait_or_disconnect(self, reader, gate: asyncio.Event) -> bool:
        """Waits for ``gate`` while watching for the client going away, as vLLM's
        StreamingResponse does (it then aborts the request)."""
        eof = asyncio.ensure_future(reader.read(1))
        go = asyncio.ensure_future(gate.wait())
        done, _ = await asyncio.wait({eof, go}, return_when=asyncio.FIRST_COMPLETED)
        if eof in done:
            go.cancel()
            self.client_gone.set()
            return False
        eof.cancel()
        return True

    def _metrics(self) -> bytes:
        reg = CollectorRegistry()
        lv = {"model_name": MODEL, "engine": "0"}
        for name, doc, value in (
            ("vllm:num_requests_running", "Number of requests in model execution batches.", self.running),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", self.waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", self.kv_usage),
        ):
            Gauge(name, doc, list(lv), registry=reg, multiprocess_mode="mostrecent").labels(**lv).set(value)
        by_reason = Gauge("vllm:num_requests_waiting_by_reason", "Number of waiting requests by reason.",
                          [*lv, "reason"], registry=reg)
        by_reason.labels(**lv, reason="capacity").set(99)     # shares a prefix with num_requests_waiting
        cache_info = {   # CacheConfig.metrics_info(): str() of every field, in declaration order
            "block_size": str(self.block_size), "user_specified_block_size": "False", "kv_cache_layout": "None",
            "gpu_memory_utilization": "0.92", "cache_dtype": "auto", "is_attention_free": "False",
            "num_gpu_blocks_override": "None", "sliding_window": "None", "enable_prefix_caching": "True",
            "prefix_caching_hash_algo": "sha256", "num_gpu_blocks": str(self.num_gpu_blocks),
            "num_cpu_blocks": "None", "hash_block_size": str(self.block_size), "engine": "0",
        }
        Gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig", list(cache_info),
              registry=reg).labels(**cache_info).set(1)
        for name, doc in (("vllm:prompt_tokens", "Number of prefill tokens processed."),
                          ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.")):
            Counter(name, doc, list(lv), registry=reg).labels(**lv).inc(self.served_prompt_tokens)
        Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", list(lv),
                  registry=reg, buckets=[0.001, 0.01, 0.1, 1.0]).labels(**lv).observe(0.05)
        return generate_latest(reg)


def _json(obj) -> bytes:
    return json.dumps(obj).encode()


def _compact(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))   # pydantic's model_dump_json spacing


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "smol"
    d.mkdir()
    files = byte_level_tokenizer_files()
    (d / "tokenizer.json").write_bytes(files.tokenizer_json)
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return d


@pytest.fixture
async def server(model_dir):
    s = FakeVLLM(str(model_dir))
    await s.start()
    yield s
    with contextlib.suppress(Exception):
        await s.stop()


def config(server: FakeVLLM, **kw) -> OpenAIEngineConfig:
    kw.setdefault("metrics_interval_s", 0.02)
    return OpenAIEngineConfig(url=server.url, **kw)


@contextlib.asynccontextmanager
async def engine_on(server: FakeVLLM, **kw):
    engine = OpenAIEngine(config(server, **kw))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


def req(rid: str = "r1", prompt=None, **kw) -> EngineRequest:
    kw.setdefault("max_tokens", 4)
    return EngineRequest(request_id=rid, prompt_token_ids=list(range(40)) if prompt is None else prompt, **kw)


async def collect(engine: OpenAIEngine, request: EngineRequest):
    return [out async for out in engine.generate(request)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def eventually(cond, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------- start


async def test_start_reads_model_shape_and_hash_algo_from_the_server(server, model_dir):
    async with engine_on(server) as engine:
        info = engine.info
        assert (info.name, info.block_size, info.num_blocks, info.max_model_len) == (MODEL, 16, 1000, 256)
        assert info.engine == "openai" and info.vocab_size == 257
        assert engine.hash_algo == "sha256"
        assert engine.ready
        assert engine.tokenizer_files().tokenizer_json == (model_dir / "tokenizer.json").read_bytes()
        assert engine.tokenizer_files().eos_token_ids == [256]


async def test_info_before_start_is_a_clear_error():
    with pytest.raises(EngineError, match="call start"):
        OpenAIEngine(OpenAIEngineConfig(url="http://127.0.0.1:9")).info


async def test_start_names_the_url_when_no_server_answers():
    url = f"http://127.0.0.1:{free_port()}"
    engine = OpenAIEngine(OpenAIEngineConfig(url=url, connect_timeout_s=1.0))
    with pytest.raises(EngineError, match=f"no server answers at {url}"):
        await engine.start()
    assert not engine.ready


async def test_start_names_the_model_the_server_does_not_serve(server):
    engine = OpenAIEngine(config(server, model="llama-70b"))
    with pytest.raises(EngineError, match=rf"{server.url} does not serve model 'llama-70b'; it serves: 'smol'"):
        await engine.start()


async def test_start_fails_when_health_reports_a_dead_engine(server):
    server.health_status = 503
    with pytest.raises(EngineError, match=r"/health answered HTTP 503"):
        await OpenAIEngine(config(server)).start()


async def test_a_server_without_vllm_metrics_needs_block_size_and_num_blocks(server):
    server.metrics = False
    with pytest.raises(EngineError, match="set block_size and num_blocks"):
        await OpenAIEngine(config(server)).start()
    async with engine_on(server, block_size=32, num_blocks=64) as engine:
        assert (engine.info.block_size, engine.info.num_blocks) == (32, 64)


async def test_block_size_override_is_ignored_when_the_server_reports_its_own(server):
    async with engine_on(server, block_size=32) as engine:
        assert engine.info.block_size == 16


async def test_tokenizer_comes_from_the_root_the_server_reports_or_a_clear_error(server, model_dir, tmp_path,
                                                                                  monkeypatch):
    server.root = "HuggingFaceTB/SmolLM2-135M"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(EngineError, match="set tokenizer"):
        await OpenAIEngine(config(server)).start()
    async with engine_on(server, tokenizer=str(model_dir)) as engine:     # given explicitly
        assert engine.info.vocab_size == 257
    snap = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc\n")
    assert _local_model_dir("HuggingFaceTB/SmolLM2-135M") == snap          # found in the local hub cache


# ---------------------------------------------------------------- generate


async def test_generate_streams_the_exact_token_ids_and_the_last_output_carries_cached_tokens(server):
    async with engine_on(server) as engine:
        outs = await collect(engine, req("r1", prompt=list(range(40)), max_tokens=4, temperature=0.0,
                                         top_p=0.9, seed=7, stop_token_ids=[256], priority=2))
    assert [o.new_token_ids for o in outs] == [[5, 6], [7], [8]]
    assert [o.finished for o in outs] == [False, False, True]
    assert outs[-1].finish_reason == "length"
    assert [o.num_cached_tokens for o in outs] == [None, None, 32]
    body = server.bodies[0]
    assert body == {
        "model": MODEL, "prompt": list(range(40)), "max_tokens": 4, "temperature": 0.0, "top_p": 0.9,
        "priority": 2, "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True,
        "seed": 7, "stop_token_ids": [256],
    }
    assert server.headers[0]["x-request-id"] == "r1"


@pytest.mark.parametrize("vllm_reason, ours", [("length", "length"), ("stop", "stop"), ("abort", "abort"),
                                                ("repetition", "stop")])
async def test_vllm_finish_reasons_map_to_ours(server, vllm_reason, ours):
    server.finish_reason = vllm_reason
    async with engine_on(server) as engine:
        outs = await collect(engine, req())
    assert outs[-1].finished and outs[-1].finish_reason == ours


async def test_a_finish_chunk_without_tokens_still_ends_the_stream(server):
    server.script = [[5], []]
    async with engine_on(server) as engine:
        outs = await collect(engine, req())
    assert [(o.new_token_ids, o.finished) for o in outs] == [([5], False), ([], True)]


async def test_without_prompt_tokens_details_cached_tokens_stay_unknown_and_a_warning_says_why(server, caplog):
    server.prompt_tokens_details = False
    async with engine_on(server) as engine:
        outs = await collect(engine, req())
    assert outs[-1].finished and outs[-1].num_cached_tokens is None
    assert "--enable-prompt-tokens-details" in caplog.text


async def test_http_400_is_an_engine_error_with_the_servers_message(server):
    msg = ("This model's maximum context length is 256 tokens. However, your prompt contains 300 input tokens, "
           "which exceeds this limit even without any output tokens. Please reduce the length of the input prompt.")
    server.reject = (400, {"error": {"message": msg, "type": "BadRequestError", "param": "input_tokens", "code": 400}})
    async with engine_on(server) as engine:
        with pytest.raises(EngineError) as ei:
            await collect(engine, req(prompt=list(range(300))))
        assert not isinstance(ei.value, EngineUnavailable)
        assert str(ei.value) == msg
        assert engine.load().queued_prefill_tokens == 0     # nothing left counted for the failed request


async def test_http_500_is_engine_unavailable(server):
    server.reject = (500, {"error": {"message": "EngineCore encountered an issue", "type": "InternalServerError",
                                     "param": None, "code": 500}})
    async with engine_on(server) as engine:
        with pytest.raises(EngineUnavailable, match="EngineCore encountered an issue"):
            await collect(engine, req())


async def test_an_error_vllm_streams_mid_response_is_raised(server):
    server.stream_error_after_first = True
    async with engine_on(server) as engine:
        got = []
        with pytest.raises(EngineUnavailable, match="Internal server error"):
            async for out in engine.generate(req()):
                got.append(out.new_token_ids)
    assert got == [[5, 6]]


async def test_a_server_dying_mid_stream_is_engine_unavailable(server):
    server.die_after_first = True
    async with engine_on(server) as engine:
        with pytest.raises(EngineUnavailable, match="stopped answering"):
            await collect(engine, req())


async def test_closing_the_stream_early_closes_the_connection_so_vllm_aborts(server):
    server.gate = asyncio.Event()                 # the server holds the stream after the first chunk
    async with engine_on(server) as engine:
        stream = engine.generate(req())
        first = await stream.__anext__()
        assert first.new_token_ids == [5, 6]
        await stream.aclose()
        await asyncio.wait_for(server.client_gone.wait(), 2.0)
        assert engine.load().queued_prefill_tokens == 0


async def test_cancelling_the_consumer_closes_the_connection_too(server):
    server.gate = asyncio.Event()
    async with engine_on(server) as engine:
        got = asyncio.Event()

        async def consume():
            async with contextlib.aclosing(engine.generate(req())) as stream:
                async for _ in stream:
                    got.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(got.wait(), 2.0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.wait_for(server.client_gone.wait(), 2.0)


async def test_a_request_id_already_in_flight_is_rejected(server):
    server.gate = asyncio.Event()
    async with engine_on(server) as engine:
        stream = engine.generate(req("dup"))
        await stream.__anext__()
        with pytest.raises(EngineError, match="already in use"):
            await collect(engine, req("dup"))
        server.gate.set()
        await stream.aclose()


async def test_stop_ends_open_streams_with_abort(server):
    server.gate = asyncio.Event()
    engine = OpenAIEngine(config(server))
    await engine.start()
    stream = engine.generate(req())
    await stream.__anext__()
    rest = asyncio.create_task(collect_rest(stream))
    await asyncio.sleep(0.05)
    await engine.stop()
    outs = await asyncio.wait_for(rest, 2.0)
    assert outs[-1].finished and outs[-1].finish_reason == "abort"
    assert not engine.ready


async def test_closing_a_stream_after_stop_ends_it_quietly_even_if_closing_the_connection_fails(server,
                                                                                                   monkeypatch):
    """After stop(), closing the response can fail (its connection is gone). The consumer's
    aclose() must still just end the stream: no "abort" output yielded into a closing
    generator ("async generator ignored GeneratorExit")."""
    server.gate = asyncio.Event()
    engine = OpenAIEngine(config(server))
    await engine.start()
    stream = engine.generate(req())
    await stream.__anext__()                      # suspended at a yield, not reading
    await engine.stop()

    async def failing_close(self):
        raise httpx.ReadError("connection already closed")

    monkeypatch.setattr(httpx.Response, "aclose", failing_close)
    await stream.aclose()                         # neither raises nor yields again


async def collect_rest(stream):
    return [o async for o in stream]


# ---------------------------------------------------------------- load and readiness


async def test_load_is_polled_metrics_plus_prompt_tokens_still_awaiting_their_first_token(server):
    server.running, server.waiting, server.kv_usage = 3, 2, 0.25
    server.script = [[], [9], [10]]               # vLLM skips empty chunks; here the first has no token yet
    server.gate = asyncio.Event()
    async with engine_on(server) as engine:
        await eventually(lambda: engine.load().running == 3)
        load = engine.load()
        assert (load.running, load.waiting, load.kv_usage) == (3, 2, 0.25)   # waiting_by_reason is not waiting
        assert load.queued_prefill_tokens == 0

        stream = engine.generate(req("a", prompt=list(range(40))))
        pending = asyncio.ensure_future(stream.__anext__())
        await eventually(lambda: engine.load().queued_prefill_tokens == 40)
        server.gate.set()
        first = await pending
        assert first.new_token_ids == [9]
        assert engine.load().queued_prefill_tokens == 0      # prefill done once a token came
        await stream.aclose()


async def test_without_vllm_load_metrics_load_counts_this_engines_own_requests(server):
    server.metrics = False
    server.script = [[], [9], [10]]               # no token before the gate opens: still prefilling
    server.gate = asyncio.Event()
    async with engine_on(server, block_size=16, num_blocks=64) as engine:
        a = asyncio.ensure_future(collect(engine, req("a", prompt=list(range(10)))))
        b = asyncio.ensure_future(collect(engine, req("b", prompt=list(range(7)))))
        await eventually(lambda: engine.load().queued_prefill_tokens == 17)
        load = engine.load()
        assert (load.running, load.waiting, load.kv_usage) == (0, 2, 0.0)
        server.gate.set()
        assert [o.new_token_ids for o in await a] == [[9], [10]]
        await b
        load = engine.load()
        assert (load.running, load.waiting, load.queued_prefill_tokens) == (0, 0, 0)


async def test_ready_turns_false_when_the_server_goes_away_and_back_when_it_answers(server):
    async with engine_on(server) as engine:
        assert engine.ready
        port = server.port
        await server.stop()
        await eventually(lambda: not engine.ready, 1.0)
        with pytest.raises(EngineUnavailable, match="not ready"):
            await collect(engine, req())
        await server.start(port)
        await eventually(lambda: engine.ready, 2.0)
        assert [o.new_token_ids for o in await collect(engine, req())] == [[5, 6], [7], [8]]


async def test_a_dead_engine_behind_a_live_server_is_not_ready(server):
    async with engine_on(server) as engine:
        server.health_status = 503                  # vLLM's /health on EngineDeadError
        await eventually(lambda: not engine.ready, 1.0)
        server.health_status = 200
        await eventually(lambda: engine.ready, 1.0)


# ---------------------------------------------------------------- KV events and the attach policy


@contextlib.asynccontextmanager
async def vllm_publisher(endpoint: str):
    """vLLM's PUB connecting to the engine's bound SUB (XPUB: same wire, and it reports the subscription)."""
    ctx = zmq.asyncio.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.connect(endpoint)
    try:
        yield pub
    finally:
        ctx.destroy(linger=0)


def vllm_batch(seq: int) -> list[bytes]:
    stored = {"type": "BlockStored", "block_hashes": [77], "parent_block_hash": None, "token_ids": list(range(16)),
              "block_size": 16, "lora_id": None, "medium": "GPU", "lora_name": None, "extra_keys": [None],
              "group_idx": 0, "kv_cache_spec_kind": "full_attention", "kv_cache_spec_sliding_window": None,
              "locality": None, "ownership": None, "session_id": None}
    return [b"kv", seq.to_bytes(8, "big"), msgspec.msgpack.encode([1.0, [stored], 0])]


async def test_kv_events_reach_the_sink_with_vllms_own_sequence_numbers(server):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    got = []
    async with vllm_publisher(endpoint) as pub:
        engine = OpenAIEngine(config(server, kv_events_endpoint=endpoint, kv_events_topic="kv"))
        engine.set_event_sink(lambda seq, batch: got.append((seq, batch)))
        await engine.start()
        try:
            assert engine.info.exact_cache_tracking
            await asyncio.wait_for(pub.recv(), 2.0)     # the subscription
            await pub.send_multipart(vllm_batch(12))
            await pub.send_multipart(vllm_batch(13))
            await eventually(lambda: len(got) == 2)
        finally:
            await engine.stop()
    assert [s for s, _ in got] == [12, 13]
    ev = got[0][1].events[0]
    assert isinstance(ev, BlockStored) and ev.block_hashes == [77] and ev.token_ids == list(range(16))


async def test_attach_to_an_unused_server_is_exact_without_a_reset(server):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    async with vllm_publisher(endpoint):
        async with engine_on(server, kv_events_endpoint=endpoint) as engine:
            assert engine.info.exact_cache_tracking
    assert server.resets == 0


async def test_attach_to_a_used_server_resets_its_prefix_cache_so_tracking_is_exact(server):
    server.served_prompt_tokens = 1280
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    async with vllm_publisher(endpoint):
        async with engine_on(server, kv_events_endpoint=endpoint) as engine:
            assert engine.info.exact_cache_tracking
    assert server.resets == 1


async def test_attach_to_a_used_server_without_dev_mode_warns_and_is_approximate(server, caplog):
    server.served_prompt_tokens = 1280
    server.dev_mode = False
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    async with vllm_publisher(endpoint):
        with caplog.at_level(logging.WARNING):
            async with engine_on(server, kv_events_endpoint=endpoint) as engine:
                assert not engine.info.exact_cache_tracking
    assert "VLLM_SERVER_DEV_MODE=1" in caplog.text


async def test_attach_without_kv_events_is_approximate_and_resets_nothing(server):
    server.served_prompt_tokens = 1280
    async with engine_on(server) as engine:
        assert not engine.info.exact_cache_tracking
    assert server.resets == 0
