"""An engine that is an already-running vLLM (or other OpenAI-compatible) server.

``OpenAIEngine`` joins a server it did not start: requests go to ``POST /v1/completions``
(streaming, prompt as token ids), cache changes come from vLLM's KV event stream over
ZMQ (``kv_subscriber``), and load and readiness come from polling ``/health`` and
``/metrics``, since vLLM streams no load. API facts are vLLM 0.32's:

* Request: ``prompt`` as a list of token ids, ``stream: true`` with
  ``stream_options.include_usage`` (a last chunk with ``choices: []`` carries the usage),
  ``return_token_ids: true`` (each chunk's ``choices[0].token_ids`` holds the new token
  ids), ``priority`` (lower runs first; honoured under ``--scheduling-policy priority``,
  ignored under fcfs), ``stop_token_ids``, ``seed``, and the ``X-Request-Id`` header,
  which vLLM makes the request id ``cmpl-<id>``.
* Cached prompt tokens: ``usage.prompt_tokens_details.cached_tokens`` in that last
  chunk, present only if the server runs with ``--enable-prompt-tokens-details``. So the
  finishing output is held back until the usage chunk (it follows at once) and carries
  ``num_cached_tokens``; without the flag it stays None, with a warning.
* Closing a stream early closes its connection; vLLM aborts a request whose client
  disconnected.
* ``/metrics``: ``vllm:cache_config_info`` (labels ``block_size``, ``num_gpu_blocks``,
  ``prefix_caching_hash_algo``, ...), ``vllm:num_requests_running``,
  ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc`` (0..1).
* ``/v1/models``: the served name (``id``), ``max_model_len`` and ``root`` (the model
  path the server loaded).
* ``POST /reset_prefix_cache`` exists only when the server runs with
  ``VLLM_SERVER_DEV_MODE=1``; it answers ``{"success": false}`` while running requests
  hold blocks.

Attach policy. The KV event stream has no history: blocks the server cached before we
subscribed are never announced. At ``start`` the subscriber is connected first, then:

1. if the server has never prefilled a prompt (``vllm:prompt_tokens_total`` and
   ``vllm:prefix_cache_queries_total`` are 0), its cache is empty and tracking is exact;
2. else, if ``reset_cache_on_attach`` (the default), the prefix cache is reset through
   ``/reset_prefix_cache`` (retried for a second while requests hold blocks); vLLM
   then publishes ``AllBlocksCleared`` with its next step, and tracking is exact;
3. else (no dev mode, or reset disabled or refused) a warning is logged and tracking
   covers the blocks stored from now on only: blocks cached before the attach are
   invisible to the fleet until evicted, and a new block whose parent is one of them
   is not tracked either. ``info.exact_cache_tracking`` is then False.

Without a KV events endpoint there is no tracking at all, nothing is reset, and
``info.exact_cache_tracking`` is False.

Event numbering: the sink gets vLLM's own sequence numbers (0, 1, ... per vLLM process).
After an attach the first number is usually not 0, so a ``BlockTracker`` expecting 0
reports one gap and starts from an empty state, which is what it holds anyway.

Load: ``running``, ``waiting`` and ``kv_usage`` are the last polled values (at most
``metrics_interval_s`` old); ``queued_prefill_tokens`` is counted here, exactly: the
prompt tokens of this engine's requests that have no first token yet (cached ones
included, since the hit is only known at the end). A server without vLLM's metrics
gets ``running``/``waiting`` from this engine's own requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import httpx
import zmq
from pydantic import BaseModel, ConfigDict, Field

from kvfleet.node_agent.engine import (
    Engine,
    EngineError,
    EngineModelInfo,
    EngineOutput,
    EngineRequest,
    EngineUnavailable,
    EventSink,
    LoadSnapshot,
)
from kvfleet.node_agent.kv_events import KVEventBatch
from kvfleet.node_agent.kv_subscriber import KVEventSubscriber
from kvfleet.tokenizer import Tokenizer, TokenizerFiles, load_tokenizer_files

log = logging.getLogger(__name__)

# vLLM's finish reasons (vllm/v1/engine/__init__.py FINISH_REASON_STRINGS) in ours.
# "repetition" (repetition detection ended it early) is a stop by the model's output;
# "error" never reaches a client as a finish reason: vLLM streams an error instead.
_FINISH = {"stop": "stop", "length": "length", "abort": "abort", "repetition": "stop"}


class OpenAIEngineConfig(BaseModel):
    """Where the server is and what this side cannot read from it. Times are seconds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field("http://127.0.0.1:8000", description="Base URL of the server, without /v1.")
    model: str | None = Field(None, description="Served model name; default: the first model /v1/models lists.")
    kv_events_endpoint: str | None = Field(
        None, description="vLLM's --kv-events-config endpoint (tcp://host:port: vLLM connects and we bind; "
                          "'*' or ipc://: vLLM binds); unset: no cache tracking.")
    kv_events_topic: str = Field("", description="vLLM's --kv-events-config topic.")
    replay_endpoint: str | None = Field(
        None, description="vLLM's --kv-events-config replay_endpoint, used to fill gaps in the event stream.")
    tokenizer: str | None = Field(
        None, description="Hugging Face model directory with tokenizer.json; default: the root /v1/models "
                          "reports, if it is a local directory or a model in the local Hugging Face cache.")
    block_size: int | None = Field(
        None, ge=1, description="Tokens per KV block; used only if /metrics has no vllm:cache_config_info.")
    num_blocks: int | None = Field(
        None, ge=1, description="KV cache capacity in blocks; used only if /metrics has no vllm:cache_config_info.")
    max_model_len: int | None = Field(
        None, ge=2, description="Context length in tokens; used only if /v1/models reports none.")
    prefill_tokens_per_s: float = Field(
        95.0, gt=0, description="Prefill throughput, tokens/s (default: vLLM on 2 CPU cores, SmolLM2-135M, fp32).")
    decode_tokens_per_s: float = Field(
        10.0, gt=0, description="Decode speed of one sequence, tokens/s (default: as prefill_tokens_per_s).")
    reset_cache_on_attach: bool = Field(
        True, description="Reset a used server's prefix cache at start so tracking is exact "
                          "(needs VLLM_SERVER_DEV_MODE=1 on the server).")
    metrics_interval_s: float = Field(0.2, gt=0, description="Seconds between polls of /health and /metrics.")
    poll_timeout_s: float = Field(2.0, gt=0, description="Seconds a poll may take before the server counts as down.")
    connect_timeout_s: float = Field(5.0, gt=0, description="Seconds to open a connection to the server.")
    request_timeout_s: float = Field(
        600.0, gt=0, description="Seconds a completion stream may stay silent (queueing and prefill included).")


@dataclass(frozen=True, slots=True)
class _Polled:
    running: int
    waiting: int
    kv_usage: float
    itl_sum: float = 0.0        # vllm:inter_token_latency_seconds _sum / _count, cumulative
    itl_count: float = 0.0


@dataclass(slots=True)
class _Flight:
    prompt_tokens: int
    started: bool = False       # a first token arrived


class OpenAIEngine(Engine):
    """One model served by a running OpenAI-compatible server; see the module docstring.

    ``info`` is read from the server, so it exists only after ``start()``. ``transport``
    replaces httpx's network transport (tests).
    """

    def __init__(self, config: OpenAIEngineConfig | None = None, *,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config or OpenAIEngineConfig()
        self.url = self.config.url.rstrip("/")
        self.hash_algo: str | None = None              # the server's prefix_caching_hash_algo
        self._transport = transport
        self._info: EngineModelInfo | None = None
        self._client: httpx.AsyncClient | None = None
        self._stream_timeout = httpx.Timeout(
            self.config.request_timeout_s, connect=self.config.connect_timeout_s, pool=self.config.connect_timeout_s)
        self._health_path = "/health"
        self._has_metrics = False
        self._polled: _Polled | None = None
        self._decode_step_s = 0.0      # decode step estimate from /metrics (see _step_estimate)
        self._healthy = False
        self._poller: asyncio.Task[None] | None = None
        self._subscriber: KVEventSubscriber | None = None
        self._sink: EventSink | None = None
        self._flights: dict[str, _Flight] = {}
        self._queued_prefill = 0                       # prompt tokens of flights not started
        self._files: TokenizerFiles | None = None
        self._tokenizer: Tokenizer | None = None
        self._closing = False
        self._warned: set[str] = set()

    @property
    def info(self) -> EngineModelInfo:
        if self._info is None:
            raise EngineError(f"{self.url}: the model's info is read from the server; call start() first")
        return self._info

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Attaches to the server. Raises EngineError naming the URL (and model) if the
        server does not answer, does not serve the model, or lacks what kvfleet needs.
        A second call while started does nothing."""
        if self._poller is not None and not self._poller.done():
            return
        self._closing = False
        self._client = httpx.AsyncClient(
            base_url=self.url, transport=self._transport,
            timeout=httpx.Timeout(self.config.poll_timeout_s, connect=self.config.connect_timeout_s),
            # Streams are long-lived and many; the engine bounds concurrency, not the pool.
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64, keepalive_expiry=2.0),
            trust_env=False,   # the engine is on this host's network: no proxy from the environment
        )
        try:
            await self._attach()
        except BaseException:
            await self._teardown()
            raise
        self._healthy = True
        self._poller = asyncio.create_task(self._poll_loop(), name=f"openai-engine-poll:{self.url}")

    async def stop(self) -> None:
        """Detaches: stops polling and events, and ends open streams with an "abort"
        output (closing their connections makes vLLM abort the requests)."""
        self._closing = True
        self._healthy = False
        await self._teardown()

    async def _teardown(self) -> None:
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
        sub, self._subscriber = self._subscriber, None
        if sub is not None:
            await sub.close()
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    @property
    def ready(self) -> bool:
        """True while the server answers: set by each poll (every ``metrics_interval_s``),
        cleared at once when a request cannot connect."""
        return self._healthy and self._poller is not None and not self._poller.done()

    async def _attach(self) -> None:
        cfg = self.config
        await self._check_health()
        card = await self._model_card()
        name = card["id"]
        max_model_len = card.get("max_model_len") or cfg.max_model_len
        if not max_model_len:
            raise EngineError(f"{self.url}: /v1/models reports no max_model_len for {name!r}; set max_model_len")
        metrics = await self._metrics_text()
        cache_cfg = _cache_config(metrics)
        block_size, num_blocks = self._cache_shape(cache_cfg, name)
        self._files, self._tokenizer = self._load_tokenizer(card)
        exact = False
        if cfg.kv_events_endpoint:
            await self._subscribe()
            exact = await self._empty_cache_at_attach(name)
        self._info = EngineModelInfo(
            name=name, block_size=block_size, num_blocks=num_blocks, max_model_len=int(max_model_len),
            prefill_tokens_per_s=cfg.prefill_tokens_per_s, decode_tokens_per_s=cfg.decode_tokens_per_s,
            engine="openai", vocab_size=self._tokenizer.vocab_size, exact_cache_tracking=exact,
        )
        log.info("attached to %s serving %s: %d blocks of %d tokens, hash %s, max_model_len %d, KV events %s",
                 self.url, name, num_blocks, block_size, self.hash_algo or "unknown", max_model_len,
                 ("exact" if exact else "partial") if cfg.kv_events_endpoint else "off")

    async def _check_health(self) -> None:
        try:
            r = await self._client.get("/health")
        except httpx.HTTPError as exc:
            raise EngineError(f"no server answers at {self.url}: {_why(exc)}") from exc
        if r.status_code == 404:       # not vLLM: liveness from /v1/models instead
            self._health_path = "/v1/models"
        elif r.status_code != 200:
            raise EngineError(f"{self.url}/health answered HTTP {r.status_code}: the server is not healthy")

    async def _model_card(self) -> dict:
        try:
            r = await self._client.get("/v1/models")
            r.raise_for_status()
            cards = [c for c in r.json().get("data", []) if isinstance(c, dict) and "id" in c]
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            raise EngineError(f"{self.url}/v1/models: cannot list the served models: {_why(exc)}") from exc
        # LoRA adapters are listed too, with a parent; only base models are engines.
        bases = [c for c in cards if not c.get("parent")]
        if not bases:
            raise EngineError(f"{self.url} serves no model")
        want = self.config.model
        if want is None:
            return bases[0]
        for c in bases:
            if c["id"] == want:
                return c
        raise EngineError(f"{self.url} does not serve model {want!r}; it serves: "
                          + ", ".join(repr(c["id"]) for c in bases))

    async def _metrics_text(self) -> str:
        try:
            r = await self._client.get("/metrics", headers=_PLAIN)
        except httpx.HTTPError as exc:
            raise EngineError(f"{self.url}/metrics: {_why(exc)}") from exc
        self._has_metrics = r.status_code == 200
        return r.text if self._has_metrics else ""

    def _cache_shape(self, cache_cfg: dict[str, str] | None, name: str) -> tuple[int, int]:
        cfg = self.config
        if cache_cfg is None:
            if cfg.block_size is None or cfg.num_blocks is None:
                raise EngineError(f"{self.url}/metrics has no vllm:cache_config_info (not vLLM, or started with "
                                  "--disable-log-stats); set block_size and num_blocks for model " + repr(name))
            return cfg.block_size, cfg.num_blocks
        try:
            block_size, num_blocks = int(cache_cfg["block_size"]), int(cache_cfg["num_gpu_blocks"])
        except (KeyError, ValueError) as exc:
            raise EngineError(f"{self.url}/metrics: vllm:cache_config_info lacks block_size or "
                              f"num_gpu_blocks ({exc})") from exc
        self.hash_algo = cache_cfg.get("prefix_caching_hash_algo")
        if cache_cfg.get("enable_prefix_caching") == "False":
            log.warning("%s serves %s with prefix caching off: no prompt will ever hit its cache", self.url, name)
        for key, given, read in (("block_size", cfg.block_size, block_size),
                                 ("num_blocks", cfg.num_blocks, num_blocks)):
            if given is not None and given != read:
                log.warning("%s: %s=%d is ignored; the server reports %d", self.url, key, given, read)
        return block_size, num_blocks

    def _load_tokenizer(self, card: dict) -> tuple[TokenizerFiles, Tokenizer]:
        given = self.config.tokenizer
        root = card.get("root")
        where = Path(given).expanduser() if given else (_local_model_dir(root) if root else None)
        if where is None:
            raise EngineError(f"{self.url}: the model's root {root!r} is not a local directory; "
                              "set tokenizer to a directory holding its tokenizer.json")
        try:
            files = load_tokenizer_files(where)
            return files, Tokenizer(files)
        except Exception as exc:   # missing files, bad JSON, a tokenizer the library rejects
            raise EngineError(f"tokenizer for {card['id']!r} from {where}: {exc}") from exc

    async def _subscribe(self) -> None:
        cfg = self.config
        sub = KVEventSubscriber(cfg.kv_events_endpoint, self._on_batch, topic=cfg.kv_events_topic,
                                replay_endpoint=cfg.replay_endpoint)
        try:
            await sub.start()
        except zmq.ZMQError as exc:
            raise EngineError(f"KV events endpoint {cfg.kv_events_endpoint}: {exc}") from exc
        self._subscriber = sub
        if await sub.wait_connected(2.0):
            await asyncio.sleep(0.05)   # the subscription reaches vLLM's PUB just after the handshake
        else:
            log.warning("%s: no KV event publisher has connected to %s yet; is the server running with "
                        "--kv-events-config endpoint %s?", self.url, sub.endpoint, cfg.kv_events_endpoint)

    async def _empty_cache_at_attach(self, name: str) -> bool:
        """Makes the server's cache empty, or finds it empty; True if tracking is exact."""
        served = _prompt_tokens_served(await self._metrics_text())
        if served == 0:
            return True
        if not self.config.reset_cache_on_attach:
            log.warning("%s: %s has served requests and reset_cache_on_attach is off: blocks cached before the "
                        "attach stay unknown to the fleet until evicted", self.url, name)
            return False
        for _ in range(5):
            try:
                if await self.reset_prefix_cache():
                    log.info("%s: reset the prefix cache of %s at attach; KV tracking is exact", self.url, name)
                    return True
            except EngineUnavailable:
                raise
            except EngineError as exc:
                log.warning("%s: %s; blocks of %s cached before the attach stay unknown to the fleet until "
                            "evicted (start the server with VLLM_SERVER_DEV_MODE=1 to allow a reset)",
                            self.url, exc, name)
                return False
            await asyncio.sleep(0.2)
        log.warning("%s: the prefix cache of %s could not be reset (requests hold blocks); blocks cached "
                    "before the attach stay unknown to the fleet until evicted", self.url, name)
        return False

    async def reset_prefix_cache(self) -> bool:
        """Asks the server to clear its prefix cache; True if it did. vLLM refuses (False)
        while running requests hold blocks, and publishes ``AllBlocksCleared`` with its
        next step. Raises EngineError if the server has no such endpoint (vLLM without
        ``VLLM_SERVER_DEV_MODE=1``)."""
        if self._client is None:
            raise EngineError(f"{self.url}: not started")
        try:
            r = await self._client.post("/reset_prefix_cache")
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"{self.url}/reset_prefix_cache: {_why(exc)}") from exc
        if r.status_code in (404, 405):
            raise EngineError(f"{self.url} offers no /reset_prefix_cache")
        if r.status_code != 200:
            return False
        try:
            return bool(r.json().get("success"))
        except (ValueError, AttributeError):
            return False

    # ------------------------------------------------------------------ polling

    async def _poll_loop(self) -> None:
        while True:
            try:
                await self._poll_once()
                if not self._healthy:
                    log.info("%s answers again: ready", self.url)
                self._healthy = True
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._healthy:
                    log.warning("%s stopped answering (%s): not ready", self.url, _why(exc))
                self._healthy = False
            await asyncio.sleep(self.config.metrics_interval_s)

    async def _poll_once(self) -> None:
        r = await self._client.get(self._health_path)
        if r.status_code != 200:
            raise EngineUnavailable(f"{self._health_path} answered HTTP {r.status_code}")
        if self._has_metrics:
            r = await self._client.get("/metrics", headers=_PLAIN)
            r.raise_for_status()
            polled = _load_from_metrics(r.text)
            self._decode_step_s = _step_estimate(self._polled, polled, self._decode_step_s)
            self._polled = polled

    # ------------------------------------------------------------------ requests

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Streams the request's outputs; the last has ``finished`` set and carries
        ``num_cached_tokens`` when the server reports it.

        Raises (on iteration) EngineError with the server's message when it rejects the
        request (HTTP 4xx, or an error in the stream), and EngineUnavailable when it
        cannot be reached, drops the connection, stays silent for ``request_timeout_s``,
        or fails with HTTP 5xx / 429. Closing the iterator closes the HTTP stream, and
        vLLM aborts the request.
        """
        if not self.ready or self._client is None:
            raise EngineUnavailable("the engine is not ready")
        rid = request.request_id
        if rid in self._flights:
            raise EngineError(f"request id {rid!r} is already in use")
        flight = self._flights[rid] = _Flight(len(request.prompt_token_ids))
        self._queued_prefill += flight.prompt_tokens
        consumer_left = False
        try:
            async with self._client.stream("POST", "/v1/completions", json=self._body(request),
                                           headers={"X-Request-Id": rid}, timeout=self._stream_timeout) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    raise _http_error(resp)
                async with contextlib.aclosing(self._outputs(resp, flight)) as outputs:
                    async for out in outputs:
                        try:
                            yield out
                        except GeneratorExit:
                            consumer_left = True
                            raise
        except (httpx.HTTPError, RuntimeError) as exc:
            if consumer_left:
                return   # closing the connection failed (stop() closed it first): nothing to tell
            # stop() closed the client under this stream: its read fails (ReadError), or its
            # send does ("the client has been closed", a RuntimeError).
            if self._closing:
                yield EngineOutput(new_token_ids=[], finished=True, finish_reason="abort")
                return
            if not isinstance(exc, httpx.HTTPError):
                raise
            if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
                self._healthy = False   # the poller turns it back on when the server answers
            log.warning("%s: request %s failed: %s", self.url, rid, _why(exc))
            raise EngineUnavailable(f"the engine stopped answering: {_why(exc)}") from exc
        finally:
            del self._flights[rid]
            if not flight.started:
                self._queued_prefill -= flight.prompt_tokens

    def _body(self, request: EngineRequest) -> dict:
        body = {
            "model": self.info.name, "prompt": request.prompt_token_ids, "max_tokens": request.max_tokens,
            "temperature": request.temperature, "top_p": request.top_p, "priority": request.priority,
            "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True,
        }
        if request.seed is not None:
            body["seed"] = request.seed
        if request.stop_token_ids:
            body["stop_token_ids"] = list(request.stop_token_ids)
        return body

    async def _outputs(self, resp: httpx.Response, flight: _Flight) -> AsyncIterator[EngineOutput]:
        final: EngineOutput | None = None
        cached: int | None = None
        async for data in _sse_data(resp):
            if data == "[DONE]":
                break
            try:
                chunk = json.loads(data)
            except ValueError as exc:
                raise EngineUnavailable(f"the engine sent a malformed stream chunk: {data[:200]!r}") from exc
            if "error" in chunk:
                raise _stream_error(chunk["error"])
            usage = chunk.get("usage") or {}
            details = usage.get("prompt_tokens_details") or {}
            if details.get("cached_tokens") is not None:
                cached = int(details["cached_tokens"])
            for choice in chunk.get("choices") or ():
                if choice.get("index", 0) != 0:
                    continue
                ids = self._token_ids(choice)
                if ids and not flight.started:
                    flight.started = True
                    self._queued_prefill -= flight.prompt_tokens
                reason = choice.get("finish_reason")
                if reason is not None:
                    # Held back: the usage chunk with the cached tokens comes right after.
                    final = EngineOutput(new_token_ids=ids, finished=True, finish_reason=_FINISH.get(reason, "stop"))
                elif ids:
                    yield EngineOutput(new_token_ids=ids)
        if final is None:
            raise EngineUnavailable("the engine ended the stream without a finish reason")
        if cached is None:
            self._warn_once("cached", "%s reports no usage.prompt_tokens_details.cached_tokens; start vLLM with "
                            "--enable-prompt-tokens-details so cache hits are measured", self.url)
        final.num_cached_tokens = cached
        yield final

    def _token_ids(self, choice: dict) -> list[int]:
        ids = choice.get("token_ids")
        if ids is not None:
            return list(ids)
        text = choice.get("text") or ""
        if not text:
            return []
        # A server without vLLM's return_token_ids: re-encode the text, which need not
        # give the ids the model sampled (merges across chunk boundaries).
        self._warn_once("token_ids", "%s returns no token_ids (not vLLM?): re-encoding streamed text, "
                        "which is approximate", self.url)
        assert self._tokenizer is not None
        return self._tokenizer.encode(text)

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    # ------------------------------------------------------------------ the rest of Engine

    def load(self) -> LoadSnapshot:
        p = self._polled
        if p is None:   # no vLLM load metrics: what this engine itself has in flight
            started = sum(f.started for f in self._flights.values())
            p = _Polled(running=started, waiting=len(self._flights) - started, kv_usage=0.0)
        return LoadSnapshot(running=p.running, waiting=p.waiting, kv_usage=p.kv_usage,
                            queued_prefill_tokens=self._queued_prefill,
                            decode_step_s=self._decode_step_s if p.running else 0.0)

    def set_event_sink(self, sink: EventSink) -> None:
        self._sink = sink

    def tokenizer_files(self) -> TokenizerFiles:
        if self._files is None:
            raise EngineError(f"{self.url}: the tokenizer is loaded in start()")
        return self._files

    def _on_batch(self, seq: int, batch: KVEventBatch) -> None:
        """vLLM's numbers pass through unchanged; the subscriber logs a sink's failure."""
        if self._sink is not None:
            self._sink(seq, batch)


# ---------------------------------------------------------------------- HTTP helpers


def _why(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _error_message(resp: httpx.Response) -> str:
    """The server's own words: vLLM/OpenAI ``{"error": {"message": ...}}``, FastAPI
    ``{"detail": ...}``, or the body's text."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str) and err:
            return err
        if "detail" in body:
            d = body["detail"]
            return d if isinstance(d, str) else json.dumps(d)
    return resp.text.strip()[:500] or f"HTTP {resp.status_code}"


def _http_error(resp: httpx.Response) -> EngineError:
    msg = _error_message(resp)
    if resp.status_code >= 500 or resp.status_code == 429:
        return EngineUnavailable(msg)
    return EngineError(msg)


def _stream_error(err: object) -> EngineError:
    """An error vLLM streamed in place of a chunk (``{"error": {...}}``, code inside)."""
    if isinstance(err, dict):
        msg, code = str(err.get("message") or "the engine failed"), err.get("code")
    else:
        msg, code = str(err), None
    return EngineUnavailable(msg) if isinstance(code, int) and code >= 500 else EngineError(msg)


async def _sse_data(resp: httpx.Response) -> AsyncIterator[str]:
    """The ``data`` of each server-sent event; comments (``: keep-alive``) and other fields are skipped."""
    buf: list[str] = []
    async for line in resp.aiter_lines():
        if not line:
            if buf:
                yield "\n".join(buf)
                buf = []
        elif line.startswith("data:"):
            v = line[5:]
            buf.append(v[1:] if v.startswith(" ") else v)
    if buf:
        yield "\n".join(buf)


# ---------------------------------------------------------------------- /metrics


_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def _samples(text: str, names: frozenset[str]) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples of the named metrics in Prometheus text: name -> [(labels, value)].

    Reads only lines of the wanted names (vLLM's page is mostly histogram buckets),
    so a poll costs little more than the download.
    """
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        end = _NAME.match(line).end()
        name = line[:end]
        if name not in names:
            continue
        labels: dict[str, str] = {}
        rest = line[end:]
        if rest.startswith("{"):
            close = rest.rfind("}")
            labels = {k: re.sub(r'\\[\\"n]', lambda m: _UNESCAPE[m.group(0)], v)
                      for k, v in _LABEL.findall(rest[1:close])}
            rest = rest[close + 1:]
        try:
            value = float(rest.split()[0])
        except (IndexError, ValueError):
            continue
        out.setdefault(name, []).append((labels, value))
    return out


# prometheus_client gzips the page for clients that accept it: wasted CPU on both ends
# of a loopback poll five times a second.
_PLAIN = {"Accept-Encoding": "identity"}
_CACHE_INFO = "vllm:cache_config_info"
_ITL_SUM, _ITL_COUNT = "vllm:inter_token_latency_seconds_sum", "vllm:inter_token_latency_seconds_count"
_LOAD = frozenset({"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                   _ITL_SUM, _ITL_COUNT})
_SERVED = frozenset({"vllm:prompt_tokens_total", "vllm:prefix_cache_queries_total"})


def _cache_config(text: str) -> dict[str, str] | None:
    """The labels of ``vllm:cache_config_info`` (one engine's; all engines share the config)."""
    found = _samples(text, frozenset({_CACHE_INFO})).get(_CACHE_INFO)
    return found[0][0] if found else None


def _load_from_metrics(text: str) -> _Polled | None:
    """Running and waiting summed over the server's engines (data parallel ranks);
    kv usage is the fullest engine's. None if the page has none of them (vLLM with
    ``--disable-log-stats``, or not vLLM)."""
    s = _samples(text, _LOAD)
    if not s:
        return None

    def total(name: str) -> float:
        return sum(v for _, v in s.get(name, ()) if not math.isnan(v))

    usage = [v for _, v in s.get("vllm:kv_cache_usage_perc", ()) if not math.isnan(v)]
    return _Polled(running=int(total("vllm:num_requests_running")), waiting=int(total("vllm:num_requests_waiting")),
                   kv_usage=min(1.0, max(usage, default=0.0)), itl_sum=total(_ITL_SUM), itl_count=total(_ITL_COUNT))


def _step_estimate(prev: _Polled | None, cur: _Polled | None, last: float) -> float:
    """Duration of one decode step now: the mean inter-token latency over the tokens
    decoded since the previous poll (each decode step gives every running sequence one
    token, so the gap between a sequence's tokens is one step), smoothed (half weight to
    the newest window). ``last`` when no token was decoded in the window."""
    if prev is None or cur is None:
        return last
    n, t = cur.itl_count - prev.itl_count, cur.itl_sum - prev.itl_sum
    if n <= 0 or t < 0:     # nothing decoded, or the server restarted (counters reset)
        return last
    return t / n if last <= 0 else 0.5 * last + 0.5 * (t / n)


def _prompt_tokens_served(text: str) -> float | None:
    """Prompt tokens the server has ever looked up or prefilled; None if it does not say."""
    s = _samples(text, _SERVED)
    if not s:
        return None
    return sum(v for samples in s.values() for _, v in samples)


# ---------------------------------------------------------------------- tokenizer


def _local_model_dir(root: str) -> Path | None:
    """``root`` as a local directory: itself if it is one, else the snapshot of a
    Hugging Face model id (``org/name``) in the local hub cache, else None."""
    p = Path(root).expanduser()
    if p.is_dir():
        return p
    if root.count("/") != 1 or root.startswith(("/", ".")):
        return None
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(os.environ.get("HF_HOME", "~/.cache/huggingface"), "hub")
    repo = Path(hub).expanduser() / ("models--" + root.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.is_file():
        snap = repo / "snapshots" / ref.read_text().strip()
        if snap.is_dir():
            return snap
    return None
