"""The sim engine in real time: a ``SimEngineCore`` driven by one asyncio task.

The task loops: wait until there is work; ``res = core.step(clock())``; sleep until
the step's modelled end; then hand each request its outputs and push the step's KV
events to the sink as one ``KVEventBatch``, numbered 0, 1, 2, ... So a client sees
tokens, and the node agent sees cache changes, when a real engine of that speed
would show them. Clock and sleep are injectable: tests pass a fake clock whose sleep
advances it, and run in virtual time.

A consumer that falls behind (a busy event loop) finds several steps' outputs waiting
in its stream; ``generate`` hands them over as one output (:func:`coalesce`), so the
node agent sends one stream message instead of several. Nothing waits to be merged:
only outputs already produced are, so no token is delayed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Awaitable, Callable

from kvfleet.aio import cancel_and_wait
from kvfleet.node_agent.engine import (
    Engine,
    EngineError,
    EngineModelInfo,
    EngineOutput,
    EngineRequest,
    EventSink,
    LoadSnapshot,
)
from kvfleet.node_agent.engines.sim_core import KVEvent, SimConfig, SimEngineCore, StepResult
from kvfleet.node_agent.kv_events import KVEventBatch
from kvfleet.tokenizer import TokenizerFiles, byte_level_tokenizer_files

log = logging.getLogger(__name__)

_Item = EngineOutput | EngineError


def coalesce(outputs: list[EngineOutput]) -> EngineOutput:
    """One output equivalent to ``outputs`` (consecutive outputs of one request, in
    order): their tokens concatenated in order, the first reported cached-token count,
    and the last output's finish state. A finished output must be the last."""
    if len(outputs) == 1:
        return outputs[0]
    tokens: list[int] = []
    cached = None
    for o in outputs:
        tokens.extend(o.new_token_ids)
        if cached is None:
            cached = o.num_cached_tokens
    last = outputs[-1]
    return EngineOutput(new_token_ids=tokens, finished=last.finished, finish_reason=last.finish_reason,
                        num_cached_tokens=cached)


class SimEngine(Engine):
    """A simulated vLLM engine serving the byte-level sim tokenizer in real (or injected) time.

    ``clock`` returns seconds (default ``time.monotonic``); ``sleep`` waits that many
    seconds of the same clock (default ``asyncio.sleep``). KV event batches carry
    ``ts`` in the clock's domain.
    """

    def __init__(
        self,
        config: SimConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.config = config or SimConfig()
        self.core = SimEngineCore(self.config)
        cfg = self.config
        one_seq_step = cfg.decode_step_base_s + cfg.decode_step_per_seq_s
        self.info = EngineModelInfo(
            name=cfg.model,
            block_size=cfg.block_size,
            num_blocks=cfg.num_blocks,
            max_model_len=cfg.max_model_len,
            prefill_tokens_per_s=cfg.prefill_tokens_per_s,
            decode_tokens_per_s=1.0 / one_seq_step if one_seq_step > 0 else float("inf"),
            engine="sim",
            vocab_size=cfg.vocab_size,
            exact_cache_tracking=True,
            max_num_batched_tokens=cfg.max_num_batched_tokens, max_num_seqs=cfg.max_num_seqs,
        )
        self._clock = clock
        self._sleep = sleep
        self._sink: EventSink | None = None
        self._seq = -1                                   # seq of the last batch emitted
        self._streams: dict[str, asyncio.Queue[_Item]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._error: EngineError | None = None
        self.busy_s = 0.0                                # sum of modelled step durations, clock seconds

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self.ready:
            return
        self._error = None
        self._task = asyncio.create_task(self._run(), name=f"sim-engine:{self.info.name}")

    async def stop(self) -> None:
        """Stops the loop; every open stream ends with an output finished by "abort"."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        now = self._clock()
        for rid, q in list(self._streams.items()):
            self.core.abort(rid, now)
            q.put_nowait(EngineOutput(new_token_ids=[], finished=True, finish_reason="abort"))

    @property
    def ready(self) -> bool:
        return self._task is not None and not self._task.done() and self._error is None

    # ------------------------------------------------------------------ requests

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Streams the request's outputs; the last has ``finished`` set.

        Raises EngineError (on the first iteration) if the engine is not running or
        the request is invalid: empty prompt, token ids outside the vocabulary,
        prompt + max_tokens over max_model_len, or a request id already in use.
        Closing the stream early (``aclose()``, or cancelling the consumer) aborts the
        request in the core at once, freeing its blocks and its place in the batch. A
        consumer that merely ``break``s out of ``async for`` leaves the closing to the
        event loop's async-generator finaliser, one loop iteration later; wrap the
        stream in ``contextlib.aclosing`` to abort at once.
        """
        if not self.ready:
            raise EngineError(str(self._error) if self._error else "the sim engine is not running")
        rid = request.request_id
        if rid in self._streams:
            raise EngineError(f"request id {rid!r} is already in use")
        self.core.add_request(request, self._clock())
        q: asyncio.Queue[_Item] = asyncio.Queue()
        self._streams[rid] = q
        self._wake.set()
        done = False
        try:
            while True:
                batch = [await q.get()]
                # Whatever is already queued behind it goes out together (see the module doc).
                while isinstance(batch[-1], EngineOutput) and not batch[-1].finished and not q.empty():
                    batch.append(q.get_nowait())
                error = batch.pop() if isinstance(batch[-1], EngineError) else None
                if batch:
                    item = coalesce(batch)  # type: ignore[arg-type]
                    done = item.finished
                    yield item
                    if done:
                        return
                if error is not None:
                    done = True
                    raise error
        finally:
            if self._streams.get(rid) is q:
                del self._streams[rid]
            if not done:
                self.core.abort(rid, self._clock())

    def load(self) -> LoadSnapshot:
        return self.core.load()

    def set_event_sink(self, sink: EventSink) -> None:
        self._sink = sink

    def tokenizer_files(self) -> TokenizerFiles:
        return byte_level_tokenizer_files()

    def reset_prefix_cache(self) -> bool:
        """Clears the prefix cache if no request holds a block (as vLLM); emits AllBlocksCleared."""
        ok = self.core.reset_prefix_cache()
        events = self.core.drain_events()
        if events:
            self._emit(events, self._clock())
        return ok

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        core = self.core
        try:
            while True:
                if not core.has_work():
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                started = self._clock()
                res = core.step(started)
                self.busy_s += res.duration_s
                # Sleep to the step's modelled end, so time spent in Python between
                # steps does not accumulate as drift.
                delay = started + res.duration_s - self._clock()
                if delay > 0:
                    await self._sleep(delay)
                else:
                    await asyncio.sleep(0)
                self._deliver(res)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in the core: fail every stream rather than hang them
            log.exception("sim engine %s failed", self.info.name)
            self._error = EngineError(f"the sim engine failed: {exc!r}")
            for q in self._streams.values():
                q.put_nowait(self._error)

    def _deliver(self, res: StepResult) -> None:
        streams = self._streams
        for rid, out in res.outputs:
            q = streams.get(rid)
            if q is not None:          # None: the consumer went away and aborted the request
                q.put_nowait(out)
        if res.events:
            self._emit(res.events, self._clock())

    def _emit(self, events: list[KVEvent], ts: float) -> None:
        """Numbers and delivers one batch. Batches emitted with no sink registered are
        still numbered, so a sink registered later sees the gap."""
        self._seq += 1
        if self._sink is None:
            return
        try:
            self._sink(self._seq, KVEventBatch(ts=ts, events=events))
        except Exception:
            log.exception("KV event sink of sim engine %s failed on batch %d", self.info.name, self._seq)
