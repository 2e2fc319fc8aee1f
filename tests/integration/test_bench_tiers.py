"""`kvfleet bench tiers`: a small run through real etcd, router and sim node agents."""

from __future__ import annotations

import json
import math
import os
import subprocess

import pytest

from .conftest import KVFLEET

pytestmark = pytest.mark.integration


@pytest.mark.timeout(240)
def test_tier_bench_accounts_for_every_request_and_reports_each_tier(tmp_path):
    out = tmp_path / "tiers.json"
    r = subprocess.run(
        KVFLEET + ["bench", "tiers", "--requests", "60", "--nodes", "2", "--time-scale", "5", "--idle-samples", "4",
                   "--json", str(out)],
        capture_output=True, text=True, timeout=230, env=dict(os.environ, COLUMNS="200"),
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "priority p99 within 1.5x idle" in r.stdout
    rep = json.loads(out.read_text())
    assert rep["offered_req_s"] == pytest.approx(2.0 * rep["capacity_req_s"], rel=0.01)
    assert set(rep["tiers"]) == {"priority", "default", "flex"}
    assert sum(t["offered"] for t in rep["tiers"].values()) == rep["requests"] == 60
    for name, t in rep["tiers"].items():
        # Nothing vanishes: every request ends completed, given up after sheds, or failed with a status.
        assert t["completed"] + t["gave_up"] + t["failed"] == t["offered"], name
        assert t["failed"] == 0, (name, t["errors"])
        if t["completed"]:
            assert math.isfinite(t["ttft_overload_p99_s"]) and t["ttft_overload_p99_s"] > 0
        assert math.isfinite(t["ttft_idle_p99_s"]) and t["ttft_idle_p99_s"] > 0
    assert rep["tiers"]["priority"]["shed"] == 0          # priority is never held or shed
    assert rep["none_dropped"] is True
    assert len(rep["priority_requests"]) == rep["tiers"]["priority"]["offered"]
