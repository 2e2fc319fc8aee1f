"""Prefix affinity, spreading and burst behaviour through the real router."""

from __future__ import annotations

import concurrent.futures as cf
import json
import random

import pytest

pytestmark = pytest.mark.integration


def text(seed: int, n: int) -> str:
    """n bytes (= n sim tokens) of deterministic ASCII."""
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz     ") for _ in range(n))


def test_generate_streams_tokens_and_reports_usage(cluster):
    out, usage = cluster.generate("Hello there, fleet", max_tokens=12)
    assert usage.completion_tokens == 12
    assert usage.prompt_tokens == len("Hello there, fleet".encode())
    assert usage.node_id in cluster.nodes
    assert len(out) > 0
    r = cluster.cli("generate", "Hello from the CLI", "--max-tokens", "5", "--json", check=True)
    result = json.loads(r.stdout)
    assert result["usage"]["completion_tokens"] == 5
    assert len(result["token_ids"]) == 5
    assert result["usage"]["finish_reason"] == "length"


def test_shared_prefix_returns_to_the_same_node_and_hits_its_cache(cluster):
    prefix = text(1, 1200)
    _, first = cluster.generate(prefix + " question one?", max_tokens=4)
    _, second = cluster.generate(prefix + " a different question?", max_tokens=4)
    assert second.node_id == first.node_id
    # The whole shared prefix, in full 16-token blocks, was served from cache.
    assert second.cached_prompt_tokens >= (1200 // 16) * 16
    # The router predicted exactly what the engine reported.
    assert second.predicted_cached_tokens == second.cached_prompt_tokens
    assert first.cached_prompt_tokens == 0


def test_distinct_prefixes_spread_across_nodes(cluster):
    # Ties between nodes that hold none of a prompt go to the node with the most free
    # cache, so distinct prefixes alternate instead of stacking on one node (earlier
    # tests in this module already filled some nodes' caches more than others).
    counts: dict[str, int] = {}
    for i in range(6):
        _, usage = cluster.generate(text(100 + i, 600), max_tokens=2)
        counts[usage.node_id] = counts.get(usage.node_id, 0) + 1
    assert len(counts) >= 2
    assert max(counts.values()) <= 3


def test_burst_on_one_prefix_spreads_once_queue_outweighs_recompute(cluster):
    shared = text(7, 3000)
    _, warm = cluster.generate(shared + " warm", max_tokens=2)
    hot = warm.node_id
    prompts = [shared + " " + text(1000 + i, 1000) for i in range(16)]
    with cf.ThreadPoolExecutor(16) as pool:
        usages = [u for _, u in pool.map(lambda p: cluster.generate(p, max_tokens=2), prompts)]
    per_node = {}
    for u in usages:
        per_node[u.node_id] = per_node.get(u.node_id, 0) + 1
    # Affinity still pays: the hot node took the first requests and served them from cache...
    assert per_node.get(hot, 0) >= 2
    assert any(u.node_id == hot and u.cached_prompt_tokens >= 2992 for u in usages)
    # ...but the burst did not pile up there.
    assert len(per_node) >= 2
    assert per_node[hot] < len(prompts)


def test_route_explain_lists_every_candidate_with_cost_and_pick(cluster):
    prefix = text(3, 900)
    _, first = cluster.generate(prefix + " one", max_tokens=2)
    r = cluster.cli("route", "explain", prefix + " two", "--json", check=True)
    d = json.loads(r.stdout)
    assert d["picked"] == first.node_id
    assert {c["node_id"] for c in d["candidates"]} >= set(cluster.nodes)
    best = next(c for c in d["candidates"] if c["node_id"] == first.node_id)
    assert best["predicted_cached_tokens"] == (len((prefix + " two").encode()) - 1) // 16 * 16 or best["predicted_cached_tokens"] >= 896
    assert all(c["estimated_ttft_s"] >= 0 and c["replica_credit_s"] >= 0 for c in d["candidates"])
    # the pick has the lowest estimate less its replica credit, the key kvfleet ranks by
    key = {c["node_id"]: c["estimated_ttft_s"] - c["replica_credit_s"] for c in d["candidates"] if c["eligible"]}
    assert key[d["picked"]] <= min(key.values())


def test_nodes_list_json_shows_state_models_capacity_cache_and_load(cluster):
    r = cluster.cli("nodes", "list", "--json", check=True)
    nodes = json.loads(r.stdout)
    by_id = {n["node_id"]: n for n in nodes}
    assert set(cluster.nodes) <= set(by_id)
    for node_id in cluster.nodes:
        n = by_id[node_id]
        assert n["address"] == cluster.node_addr[node_id]
        assert n["state"] in ("ready", "cordoned", "draining", "drained")
        assert n["models"][0]["name"] == "kvfleet-sim"
        assert n["models"][0]["cache_tracking"] == "exact"
        assert n["capacity_blocks"] == 4096
        assert set(n["load"]) >= {"running", "waiting", "kv_usage", "queued_prefill_tokens"}
        assert n["cached_blocks"] >= 0
    assert any(by_id[n]["cached_blocks"] > 0 for n in cluster.nodes)


def test_nodes_show_blocks_lists_exactly_the_canonical_blocks_the_engine_stored(cluster):
    from kvfleet.hashing import block_hashes

    prompt = text(11, 700)
    _, usage = cluster.generate(prompt, max_tokens=2)
    r = cluster.cli("nodes", "show", usage.node_id, "--blocks", "--json", check=True)
    d = json.loads(r.stdout)
    held = set(d["blocks"]["kvfleet-sim"])
    expected = {f"{h:016x}" for h in block_hashes(list(prompt.encode()), 16).tolist()}
    assert expected <= held


def test_stop_string_ends_the_stream_and_never_reaches_the_client(cluster):
    from kvfleet.v1 import common_pb2 as compb
    from kvfleet.v1 import inference_pb2 as ipb

    def run(stop: list[str]):
        req = ipb.GenerateRequest(model="kvfleet-sim", text="tell me a story")
        req.sampling.max_tokens = 60
        req.sampling.seed = 7
        req.sampling.stop.extend(stop)
        out, usage = [], None
        for msg in cluster.inf().Generate(req, timeout=30):
            if msg.HasField("chunk"):
                out.append(msg.chunk.text)
            else:
                usage = msg.usage
        return "".join(out), usage

    full, usage = run([])
    assert usage.finish_reason == compb.FINISH_REASON_LENGTH and len(full) == 60
    stop = full[20:24]
    cut, usage = run([stop])
    assert cut == full[: full.find(stop)]
    assert usage.finish_reason == compb.FINISH_REASON_STOP


def _chunks(cluster, **fields):
    from kvfleet.v1 import inference_pb2 as ipb

    req = ipb.GenerateRequest(model="kvfleet-sim", text="a stream of tokens, merged or not", **fields)
    req.sampling.max_tokens = 60
    req.sampling.seed = 11
    chunks, usage = [], None
    for msg in cluster.inf().Generate(req, timeout=30):
        if msg.HasField("chunk"):
            chunks.append((list(msg.chunk.token_ids), msg.chunk.text))
        else:
            usage = msg.usage
    return chunks, usage


def test_a_stream_interval_merges_tokens_into_fewer_chunks_with_the_same_output(cluster):
    from kvfleet.v1 import common_pb2 as compb

    # Sim nodes decode a token every 10 ms: 60 tokens take about 0.6 s.
    every, u1 = _chunks(cluster)
    merged, u2 = _chunks(cluster, stream_interval_ms=200)
    flex, u3 = _chunks(cluster, tier=compb.TIER_FLEX)   # the flex tier's default: 100 ms
    ids = [t for ch, _ in every for t in ch]
    assert len(ids) == 60 == u1.completion_tokens == u2.completion_tokens == u3.completion_tokens
    for chunks in (merged, flex):
        assert [t for ch, _ in chunks for t in ch] == ids
        assert "".join(t for _, t in chunks) == "".join(t for _, t in every)
        assert len(chunks[0][0]) == 1          # the first token is never held
    # 0.6 s of tokens in 200 ms (100 ms) windows, plus the first token and a flushed tail.
    assert len(merged) <= 7 and len(flex) <= 10
    assert len(every) >= 3 * len(merged)


def test_a_stream_interval_beyond_its_limit_is_refused_naming_the_field(cluster):
    import grpc

    with pytest.raises(grpc.RpcError) as exc:
        _chunks(cluster, stream_interval_ms=60_001)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stream_interval_ms" in exc.value.details()
    r = cluster.cli("generate", "hi", "--stream-interval-ms", "-5")
    assert r.returncode != 0 and "--stream-interval-ms" in r.stderr
