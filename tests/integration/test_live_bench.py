"""`kvfleet bench routing --live`: a tiny replay through real etcd, router and node agents."""

from __future__ import annotations

import json
import math
import os
import subprocess
import time

import pytest

from .conftest import KVFLEET

pytestmark = pytest.mark.integration

REQUESTS = 24


def tiny_trace(path) -> None:
    """Mooncake-format requests over 3 shared 512-token prefixes, 8 output tokens each,
    arriving 200 ms apart (before the load scaling)."""
    with path.open("w") as f:
        for i in range(REQUESTS):
            group = i % 3
            ids = [1000 * group, 1000 * group + 1, 100_000 + i]
            f.write(json.dumps({"timestamp": 200 * i, "input_length": 1200, "output_length": 8, "hash_ids": ids}) + "\n")


@pytest.mark.timeout(150)
def test_live_bench_completes_every_request_and_reports_every_figure(tmp_path):
    trace = tmp_path / "trace.jsonl"
    tiny_trace(trace)
    out = tmp_path / "live.json"
    t0 = time.monotonic()
    r = subprocess.run(
        KVFLEET + ["bench", "routing", "--live", "--trace", str(trace), "--format", "mooncake", "--nodes", "2",
                   "--load", "0.5", "--time-scale", "5", "--overhead-requests", "20", "--json", str(out)],
        capture_output=True, text=True, timeout=140, env=dict(os.environ, COLUMNS="200"),
    )
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "LIVE" in r.stdout and "added TTFT p50" in r.stdout
    report = json.loads(out.read_text())
    assert report["mode"] == "live" and report["nodes"] == 2
    (p,) = report["policies"]
    assert p["policy"] == "kvfleet"
    assert p["completed"] == p["requests"] == REQUESTS and p["errors"] == []
    # Every request after the first of its group can reuse the 1,024-token prefix.
    assert 0.5 < p["hit_rate"] <= report["bounds"]["infinite_cache_hit_rate"] + 1e-9
    assert abs(p["hit_rate"] - p["sim"]["hit_rate"]) <= 0.1
    for k in ("ttft_mean_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "e2e_p99_s", "throughput_req_s",
              "throughput_out_tok_s", "load_imbalance", "router_cpu_us_per_request", "router_cpu_us_per_message"):
        assert math.isfinite(p[k]) and p[k] > 0, k
    assert p["ttft_p50_s"] <= p["ttft_p90_s"] <= p["ttft_p99_s"] <= p["e2e_p99_s"]
    assert len(p["busy_s"]) == 2 and p["load_imbalance"] >= 1.0
    assert p["messages"] >= REQUESTS * 2       # at least one chunk and the usage each
    lat, cpu = p["overhead"]["latency"], p["overhead"]["cpu"]
    assert lat["samples"] >= 2 and math.isfinite(lat["added_p50_s"]) and lat["direct_ttft_p50_s"] > 0
    assert cpu["short"]["requests"] == cpu["long"]["requests"] == 20
    assert cpu["long"]["messages"] > cpu["short"]["messages"]
    assert math.isfinite(cpu["cpu_us_per_request"]) and math.isfinite(cpu["cpu_us_per_message"])
    # The flex burst's tokens come merged (chunks 100 ms of preset time apart): 32 tokens
    # decode in well under 0.5 s of preset time, so a handful of messages instead of 33.
    assert cpu["flex"]["requests"] == 20
    assert cpu["flex"]["messages"] * 3 <= cpu["long"]["messages"]
    assert set(cpu["cpu_us_per_token"]) == {"default", "flex"}
    # The same over one GenerateMany call, where a message is one relayed item.
    lat, cpu = p["overhead"]["latency_many"], p["overhead"]["cpu_many"]
    assert lat["samples"] >= 2 and math.isfinite(lat["added_p50_s"])
    assert cpu["short"]["requests"] == cpu["long"]["requests"] == cpu["flex"]["requests"] == 20
    assert cpu["flex"]["messages"] * 3 <= cpu["long"]["messages"]
    assert math.isfinite(cpu["cpu_us_per_request"]) and math.isfinite(cpu["cpu_us_per_message"])
    assert took < 120
