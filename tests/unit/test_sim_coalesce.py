"""Coalescing of a sim engine stream: a consumer that falls behind gets the outputs
already produced as one, with every token, in order, and nothing held back."""

from __future__ import annotations

import asyncio

import pytest

from kvfleet.node_agent.engine import EngineError, EngineOutput, EngineRequest
from kvfleet.node_agent.engines.sim import SimEngine, coalesce
from kvfleet.node_agent.engines.sim_core import SimConfig

from tests.unit.test_sim_engine import VirtualTime, text_prompt


def test_coalesce_concatenates_tokens_in_order_and_keeps_the_first_cached_count_and_the_last_finish():
    outs = [EngineOutput([5], num_cached_tokens=32), EngineOutput([6, 7]), EngineOutput([], num_cached_tokens=99),
            EngineOutput([8], finished=True, finish_reason="length")]
    merged = coalesce(outs)
    assert merged == EngineOutput([5, 6, 7, 8], finished=True, finish_reason="length", num_cached_tokens=32)
    assert outs[0].new_token_ids == [5]           # inputs are not mutated


def test_coalesce_of_one_output_is_that_output():
    o = EngineOutput([1])
    assert coalesce([o]) is o


async def _run(lag_steps: int, max_tokens: int = 12) -> list[EngineOutput]:
    """Outputs of one request whose consumer, after each output, lets the engine run
    ``lag_steps`` more steps before asking for the next one."""
    vt = VirtualTime()
    cfg = SimConfig()
    engine = SimEngine(cfg, clock=vt.clock, sleep=vt.sleep)
    await engine.start()
    step = cfg.decode_step_base_s + cfg.decode_step_per_seq_s
    got = []
    try:
        async for out in engine.generate(EngineRequest("r", text_prompt(40), max_tokens=max_tokens, temperature=0.0, seed=3)):
            got.append(out)
            target = vt.now + lag_steps * step - 1e-9
            while lag_steps and vt.now < target and engine.core.has_work():
                await asyncio.sleep(0)
    finally:
        await engine.stop()
    return got


async def test_a_lagging_consumer_gets_every_token_in_order_in_fewer_outputs():
    prompt_paced = await _run(lag_steps=0)
    lagging = await _run(lag_steps=3)

    tokens = [t for o in prompt_paced for t in o.new_token_ids]
    assert len(tokens) == 12
    assert [len(o.new_token_ids) for o in prompt_paced] == [1] * 12
    assert [t for o in lagging for t in o.new_token_ids] == tokens
    assert 1 < len(lagging) < len(prompt_paced)
    assert [o.finished for o in lagging] == [False] * (len(lagging) - 1) + [True]
    assert lagging[0].num_cached_tokens == prompt_paced[0].num_cached_tokens == 0


class _FailsAfter:
    """A core whose step raises after ``n`` good steps (everything else delegated)."""

    def __init__(self, core, n: int) -> None:
        self._core, self._left = core, n

    def step(self, now):
        if self._left == 0:
            raise RuntimeError("boom")
        self._left -= 1
        return self._core.step(now)

    def __getattr__(self, name):
        return getattr(self._core, name)


async def test_an_engine_failure_behind_queued_outputs_comes_after_them():
    vt = VirtualTime()
    engine = SimEngine(SimConfig(), clock=vt.clock, sleep=vt.sleep)
    engine.core = _FailsAfter(engine.core, 3)  # type: ignore[assignment]
    await engine.start()
    stream = engine.generate(EngineRequest("r", text_prompt(40), max_tokens=10))
    first = await stream.__anext__()
    while engine.ready:                       # let the engine run on (and fail) while we lag
        await asyncio.sleep(0)
    second = await stream.__anext__()
    with pytest.raises(EngineError, match="boom"):
        await stream.__anext__()
    assert len(first.new_token_ids) == 1 and len(second.new_token_ids) == 2
    await engine.stop()
