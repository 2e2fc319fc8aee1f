"""SimEngine, the asyncio driver of SimEngineCore, in virtual time (and once in real time)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from kvfleet.hashing import block_hashes
from kvfleet.node_agent.block_tracker import BlockTracker
from kvfleet.node_agent.engine import EngineError, EngineOutput, EngineRequest, LoadSnapshot
from kvfleet.node_agent.engines.sim import SimEngine
from kvfleet.node_agent.engines.sim_core import SimConfig, SimEngineCore
from kvfleet.node_agent.kv_events import AllBlocksCleared, KVEventBatch
from kvfleet.tokenizer import Tokenizer, byte_level_tokenizer_files


class VirtualTime:
    """A clock that only moves when the engine sleeps.

    ``sleep`` yields first, so consumers woken by the previous step read the clock
    at that step's end, then jumps forward.
    """

    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(0)
        self.now += seconds


@pytest.fixture
async def vt_engine():
    vt = VirtualTime()
    engine = SimEngine(SimConfig(), clock=vt.clock, sleep=vt.sleep)
    await engine.start()
    yield vt, engine
    await engine.stop()


async def collect(engine: SimEngine, request: EngineRequest) -> list[EngineOutput]:
    return [out async for out in engine.generate(request)]


def text_prompt(n: int) -> list[int]:
    return [ord("a") + i % 26 for i in range(n)]


# ---------------------------------------------------------------- streaming


async def test_generate_streams_max_tokens_and_reports_cached_tokens_on_the_first_output(vt_engine):
    _, engine = vt_engine
    prompt = text_prompt(100)
    first = await collect(engine, EngineRequest("a", prompt, max_tokens=5))
    second = await collect(engine, EngineRequest("b", prompt + [1, 2, 3], max_tokens=5))

    assert [len(o.new_token_ids) for o in first] == [1] * 5
    assert [o.finished for o in first] == [False] * 4 + [True]
    assert first[-1].finish_reason == "length"
    assert first[0].num_cached_tokens == 0
    assert second[0].num_cached_tokens == 96        # 6 full blocks of 16
    assert engine.load() == LoadSnapshot(running=0, waiting=0, kv_usage=0.0, queued_prefill_tokens=0)


async def test_first_token_of_a_4000_token_prompt_arrives_after_half_a_virtual_second(vt_engine):
    vt, engine = vt_engine
    arrivals = []
    async for out in engine.generate(EngineRequest("a", text_prompt(4000), max_tokens=3)):
        arrivals.append(vt.now)
    assert arrivals == pytest.approx([0.5, 0.5102, 0.5204])


async def test_concurrent_requests_are_batched_into_shared_decode_steps(vt_engine):
    vt, engine = vt_engine
    outs = await asyncio.gather(*(collect(engine, EngineRequest(f"r{i}", [i + 1] * 8, max_tokens=10))
                                  for i in range(4)))
    assert [len(o) for o in outs] == [10] * 4
    # One prefill step (32 tokens) and nine decode steps of a batch of 4.
    assert vt.now == pytest.approx(32 / 8000 + 9 * (0.010 + 4 * 0.0002))


async def test_closing_the_stream_early_aborts_the_request_at_once(vt_engine):
    _, engine = vt_engine
    stream = engine.generate(EngineRequest("a", text_prompt(40), max_tokens=500))
    await stream.__anext__()
    assert engine.load().running == 1
    await stream.aclose()
    assert engine.load() == LoadSnapshot(running=0, waiting=0, kv_usage=0.0, queued_prefill_tokens=0)
    assert engine.core.num_pinned_blocks == 0


async def test_cancelling_the_consumer_aborts_the_request_at_once(vt_engine):
    _, engine = vt_engine
    got_first = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(EngineRequest("a", text_prompt(40), max_tokens=500)):
            got_first.set()

    task = asyncio.create_task(consume())
    await got_first.wait()
    assert engine.load().running == 1
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert engine.load().running == 0
    assert engine.core.num_pinned_blocks == 0


async def test_aborting_a_waiting_request_drops_it_from_the_queue():
    vt = VirtualTime()
    engine = SimEngine(SimConfig(max_num_seqs=1), clock=vt.clock, sleep=vt.sleep)
    await engine.start()
    running = engine.generate(EngineRequest("a", [1, 2, 3], max_tokens=50))
    await running.__anext__()
    waiting = engine.generate(EngineRequest("b", [4, 5, 6], max_tokens=50))
    pending = asyncio.ensure_future(waiting.__anext__())
    await asyncio.sleep(0)
    assert engine.load().waiting == 1
    pending.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await pending
    assert (engine.load().running, engine.load().waiting) == (1, 0)
    await running.aclose()
    await engine.stop()


# ---------------------------------------------------------------- KV events


async def test_kv_events_reach_the_sink_numbered_consecutively_and_translate_to_canonical(vt_engine):
    _, engine = vt_engine
    batches: list[tuple[int, KVEventBatch]] = []
    engine.set_event_sink(lambda seq, b: batches.append((seq, b)))
    tracker = BlockTracker(engine.info.name, engine.info.block_size)
    prompt = text_prompt(70)                           # 4 full blocks
    out = await collect(engine, EngineRequest("a", prompt, max_tokens=40))
    tokens = prompt + [t for o in out for t in o.new_token_ids]

    assert [seq for seq, _ in batches] == list(range(len(batches)))
    for seq, b in batches:
        d = tracker.apply(seq, b)
        assert not (d.gap or d.cleared)
    computed = len(tokens) - 1                         # the last sampled token is never fed back
    assert tracker.snapshot() == block_hashes(tokens[:computed], 16).tolist()
    assert batches[0][1].events[0].block_hashes == engine.core.engine_block_hashes(prompt)


async def test_a_failing_sink_does_not_stop_the_engine(vt_engine):
    _, engine = vt_engine

    def broken(seq: int, batch: KVEventBatch) -> None:
        raise RuntimeError("sink down")

    engine.set_event_sink(broken)
    out = await collect(engine, EngineRequest("a", text_prompt(40), max_tokens=3))
    assert out[-1].finish_reason == "length"
    assert engine.ready


async def test_reset_prefix_cache_emits_all_blocks_cleared(vt_engine):
    _, engine = vt_engine
    batches = []
    engine.set_event_sink(lambda seq, b: batches.append((seq, b.events)))
    await collect(engine, EngineRequest("a", text_prompt(40), max_tokens=1))
    assert engine.reset_prefix_cache() is True
    assert batches[-1] == (len(batches) - 1, [AllBlocksCleared()])
    again = await collect(engine, EngineRequest("b", text_prompt(40), max_tokens=1))
    assert again[0].num_cached_tokens == 0


# ---------------------------------------------------------------- validation and lifecycle


@pytest.mark.parametrize(
    "prompt, max_tokens, message",
    [
        ([], 4, "prompt is empty"),
        ([1, 2, 257], 4, "token id 257 at position 2 is outside the vocabulary 0..256"),
        ([1] * 8000, 193, "prompt (8000 tokens) + max_tokens (193) = 8193 exceeds max_model_len 8192"),
    ],
)
async def test_invalid_requests_raise_engine_error(vt_engine, prompt, max_tokens, message):
    _, engine = vt_engine
    with pytest.raises(EngineError) as err:
        await collect(engine, EngineRequest("bad", prompt, max_tokens=max_tokens))
    assert message in str(err.value)
    assert engine.load().waiting == 0


async def test_a_request_id_in_use_is_rejected(vt_engine):
    _, engine = vt_engine
    stream = engine.generate(EngineRequest("a", [1, 2], max_tokens=100))
    await stream.__anext__()
    with pytest.raises(EngineError, match="already in use"):
        await collect(engine, EngineRequest("a", [3, 4], max_tokens=1))
    await stream.aclose()


async def test_generate_before_start_raises():
    engine = SimEngine()
    assert not engine.ready
    with pytest.raises(EngineError, match="not running"):
        await collect(engine, EngineRequest("a", [1], max_tokens=1))


async def test_stop_ends_open_streams_with_abort():
    vt = VirtualTime()
    engine = SimEngine(SimConfig(), clock=vt.clock, sleep=vt.sleep)
    await engine.start()
    stream = engine.generate(EngineRequest("a", [1, 2, 3], max_tokens=1000))
    await stream.__anext__()
    await engine.stop()
    assert not engine.ready
    rest = [o async for o in stream]
    assert rest[-1] == EngineOutput(new_token_ids=[], finished=True, finish_reason="abort")
    assert engine.load().running == 0


async def test_a_crash_in_the_core_fails_open_streams_instead_of_hanging(vt_engine, monkeypatch):
    _, engine = vt_engine

    def broken_step(self, now: float):
        raise RuntimeError("bug in the core")

    monkeypatch.setattr(SimEngineCore, "step", broken_step)
    with pytest.raises(EngineError, match="bug in the core"):
        await asyncio.wait_for(collect(engine, EngineRequest("a", [1, 2], max_tokens=3)), timeout=5)
    assert not engine.ready
    with pytest.raises(EngineError, match="bug in the core"):
        await collect(engine, EngineRequest("b", [1, 2], max_tokens=3))


async def test_info_and_tokenizer_describe_a_byte_level_sim_model():
    engine = SimEngine()
    info = engine.info
    assert (info.engine, info.vocab_size, info.block_size, info.num_blocks, info.max_model_len) == (
        "sim", 257, 16, 4096, 8192)
    assert info.prefill_tokens_per_s == 8000.0
    assert info.decode_tokens_per_s == pytest.approx(1 / 0.0102)
    assert engine.tokenizer_files() == byte_level_tokenizer_files()


async def test_output_decodes_to_readable_text_with_the_served_tokenizer(vt_engine):
    _, engine = vt_engine
    tok = Tokenizer(engine.tokenizer_files())
    out = await collect(engine, EngineRequest("a", tok.encode("Hello"), max_tokens=60, seed=3))
    text = tok.decode([t for o in out for t in o.new_token_ids])
    assert len(text) == 60 and text.isprintable()


async def test_default_real_clock_serves_a_request_in_modelled_time():
    engine = SimEngine(SimConfig(prefill_tokens_per_s=1e6, decode_step_base_s=0.002, decode_step_per_seq_s=0.0))
    await engine.start()
    try:
        t0 = time.monotonic()
        out = await collect(engine, EngineRequest("a", [1, 2, 3], max_tokens=6))
        elapsed = time.monotonic() - t0
    finally:
        await engine.stop()
    assert len(out) == 6
    assert 0.0095 <= elapsed < 0.5                       # five 2 ms decode steps, plus slack
