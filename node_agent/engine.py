"""The one small interface a node agent needs from an inference engine.

An engine serves one model. The agent calls ``generate`` per request and learns the
engine's cache through KV events in vLLM's format, pushed to the sink it registers.
Implementations: ``engines.sim``, ``engines.openai`` (an attached OpenAI-compatible server).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from kvfleet.tokenizer import TokenizerFiles
from kvfleet.node_agent.kv_events import KVEventBatch


@dataclass(frozen=True, slots=True)
class EngineModelInfo:
    name: str
    block_size: int                 # tokens per KV block
    num_blocks: int                 # KV capacity in blocks
    max_model_len: int              # context length in tokens (prompt + output)
    prefill_tokens_per_s: float     # prefill throughput of one engine
    decode_tokens_per_s: float      # decode speed of one sequence
    engine: str                     # "sim", "vllm", "openai"
    vocab_size: int                 # valid token ids are 0 .. vocab_size-1
    exact_cache_tracking: bool = True  # KV events cover the whole cache
    max_num_batched_tokens: int = 0    # token budget of one engine step (chunked prefill); 0: unknown
    max_num_seqs: int = 0              # most sequences the engine runs at once; 0: unknown


@dataclass(frozen=True, slots=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    priority: int = 0               # vLLM convention: lower runs first


@dataclass(slots=True)
class EngineOutput:
    """One step's output for one request."""

    new_token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None        # "length", "stop" or "abort" when finished
    num_cached_tokens: int | None = None    # prompt tokens served from cache; set on one output: the
                                            # first, or the last if the engine reports it only at the end


@dataclass(frozen=True, slots=True)
class LoadSnapshot:
    running: int                    # sequences in the running batch
    waiting: int                    # sequences waiting for admission
    kv_usage: float                 # fraction of blocks pinned by requests, 0..1
    queued_prefill_tokens: int      # prompt tokens still to prefill (waiting + partially prefilled)
    decode_step_s: float = 0.0      # duration of one decode step at the current batch, s (0: idle or unknown)


EventSink = Callable[[int, KVEventBatch], None]
"""Receives ``(seq, batch)``; seq increases by one per batch from the same engine."""


class EngineError(Exception):
    """The engine cannot serve a request; the message is safe to show to a client."""


class EngineUnavailable(EngineError):
    """The engine cannot be reached or failed on its side (connection refused or lost,
    timeout, HTTP 5xx): the request was not at fault, and another node may serve it."""


class Engine(abc.ABC):
    info: EngineModelInfo

    @abc.abstractmethod
    async def start(self) -> None:
        """Brings the engine up; raises EngineError with a clear message if it cannot."""

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @property
    @abc.abstractmethod
    def ready(self) -> bool:
        """True while the engine takes requests."""

    @abc.abstractmethod
    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Streams outputs until one has ``finished``. Closing the iterator early
        (``aclose()`` or cancelling the consuming task) aborts the request in the engine."""

    @abc.abstractmethod
    def load(self) -> LoadSnapshot: ...

    @abc.abstractmethod
    def set_event_sink(self, sink: EventSink) -> None:
        """Registers the receiver of KV event batches, in vLLM's format."""

    @abc.abstractmethod
    def tokenizer_files(self) -> TokenizerFiles: ...
