"""bench/bench_router.py runs end to end (``--quick``) and reports positive figures."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_router.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_router", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module        # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_quick_reports_positive_figures(tmp_path, capsys):
    out = tmp_path / "bench.json"
    r = load_bench().main(["--quick", "--json", str(out)])
    for key in ("route_hot_us", "match_hot_us", "route_niche_us", "match_niche_us", "hash_us"):
        assert positive(r[key]["p50"]) and positive(r[key]["p99"]), key
        assert r[key]["p99"] >= r[key]["p50"], key
    assert positive(r["bytes_per_pair"]) and r["bytes_per_pair"] <= 64
    assert positive(r["dict_of_sets_bytes_per_pair"])
    assert r["pairs"] == r["nodes"] * r["blocks_per_node"]
    assert set(r["store_blocks_per_s"]) == {"1", "16", "256"}
    assert all(positive(v) for v in r["store_blocks_per_s"].values())
    assert positive(r["tokenise_us"]["p50"]) and "8000 tokens" in r["tokenise_label"]
    assert r["route_hot_best"]["hot_node_cached_tokens"] == (128 + 300) * 16
    assert json.loads(out.read_text())["pairs"] == r["pairs"]
    assert "(c) index memory per (node, block) pair" in capsys.readouterr().out
