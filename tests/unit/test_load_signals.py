"""The decode-step load signal: the sim engine's model of it, and the vLLM /metrics estimate."""

from __future__ import annotations

import pytest

from kvfleet.node_agent.engine import EngineRequest
from kvfleet.node_agent.engines.openai import _Polled, _load_from_metrics, _step_estimate
from kvfleet.node_agent.engines.sim_core import SimConfig, SimEngineCore


def test_sim_core_reports_the_step_it_will_run() -> None:
    cfg = SimConfig(decode_step_base_s=0.01, decode_step_per_seq_s=0.001, decode_step_per_context_token_s=1e-6,
                    max_num_batched_tokens=2048)
    core = SimEngineCore(cfg)
    assert core.load().decode_step_s == 0.0                       # idle: no decode step
    for i in range(3):
        core.add_request(EngineRequest(request_id=f"r{i}", prompt_token_ids=[i + 1] * 40, max_tokens=50), 0.0)
    t = 0.0
    t += core.step(t).duration_s                                   # prefill all three (120 tokens, one step)
    ld = core.load()
    assert ld.running == 3
    pinned_tokens = ld.kv_usage * cfg.num_blocks * cfg.block_size
    expected = 0.01 + 0.001 * 3 + 1e-6 * pinned_tokens
    assert ld.decode_step_s == pytest.approx(expected)
    # The next step decodes the three sequences; its context is their 41 tokens each, and the
    # pinned blocks (3 x 3 blocks of 16) overestimate it by the unfilled block tails only.
    res = core.step(t)
    exact = 0.01 + 0.001 * 3 + 1e-6 * 3 * 41
    assert res.duration_s == pytest.approx(exact)
    assert 0 <= ld.decode_step_s - exact <= 1e-6 * 3 * cfg.block_size


def _metrics(count: float, total: float, running: int = 2) -> str:
    return (f"vllm:num_requests_running{{engine=\"0\"}} {running}\n"
            "vllm:num_requests_waiting{engine=\"0\"} 0\n"
            "vllm:kv_cache_usage_perc{engine=\"0\"} 0.5\n"
            f"vllm:inter_token_latency_seconds_sum{{engine=\"0\"}} {total}\n"
            f"vllm:inter_token_latency_seconds_count{{engine=\"0\"}} {count}\n"
            "vllm:inter_token_latency_seconds_bucket{engine=\"0\",le=\"0.01\"} 3\n")


def test_vllm_step_estimate_is_the_mean_gap_between_tokens_since_the_last_poll() -> None:
    a = _load_from_metrics(_metrics(100, 2.0))
    b = _load_from_metrics(_metrics(150, 3.5))                    # 50 tokens, 1.5 s: 30 ms each
    assert (b.itl_count, b.itl_sum) == (150, 3.5)
    assert _step_estimate(a, b, 0.0) == pytest.approx(0.030)
    assert _step_estimate(a, b, 0.010) == pytest.approx(0.020)     # smoothed with the previous estimate
    assert _step_estimate(b, b, 0.025) == 0.025                    # nothing decoded: keep the last
    restarted = _load_from_metrics(_metrics(5, 0.1))               # counters reset: keep the last
    assert _step_estimate(b, restarted, 0.025) == 0.025
    assert _step_estimate(None, b, 0.0) == 0.0
    old = _Polled(running=1, waiting=0, kv_usage=0.0)               # a server without the histogram
    assert _step_estimate(old, _Polled(running=1, waiting=0, kv_usage=0.0), 0.0) == 0.0
