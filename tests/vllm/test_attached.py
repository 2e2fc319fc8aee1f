"""Attached mode: a vLLM server started outside kvfleet joins as a node (`--engine openai`).

One external engine serves both tests, one node at a time: first attached through its
KV-events endpoint (exact tracking), then without it (approximate tracking, learned by
the router from the prompts it sent there).
"""

from __future__ import annotations

import json

import pytest

from tests.integration.conftest import free_port, wait_for
from tests.vllm.conftest import (
    BLOCK_SIZE, MODEL, MODEL_DIR, kill_engine_groups, start_external_vllm, start_fleet, token_ids, wait_healthy,
)

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def external(tmp_path_factory):
    """(fleet without nodes, server URL, the server's KV-events endpoint)."""
    tmp = tmp_path_factory.mktemp("vllm-attached")
    port, events = free_port(), f"tcp://127.0.0.1:{free_port()}"
    # A plain tcp endpoint: the server's PUB connects to it, the node agent binds it.
    server = start_external_vllm(tmp, port, "--kv-events-config", json.dumps(
        {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": events, "topic": "kv"}))
    fleet = None
    try:
        fleet = start_fleet(tmp)          # etcd and controller start while the engine loads
        url = f"http://127.0.0.1:{port}"
        wait_healthy(server, url)
        yield fleet, url, events
    finally:
        if fleet is not None:
            fleet.stop()
        server.stop(timeout=30)
        kill_engine_groups([server.popen.pid])


def tracking(fleet, node_id: str) -> str:
    r = fleet.cluster.cli("nodes", "list", "--json", check=True)
    (node,) = [n for n in json.loads(r.stdout) if n["node_id"] == node_id]
    (model,) = node["models"]
    assert (model["name"], model["engine"]) == (MODEL, "openai")
    return model["cache_tracking"]


def test_attached_with_kv_events_routes_on_exact_cache_state(external):
    fleet, url, events = external
    proc = fleet.spawn_node("attached-exact", "--engine", "openai", "--url", url,
                            "--kv-events-endpoint", events, "--tokenizer", str(MODEL_DIR))
    node = fleet.await_node(proc, timeout=60)
    assert tracking(fleet, node) == "exact"
    prefix = token_ids(51, 2 * BLOCK_SIZE + 20)
    _, first = fleet.generate(prefix + token_ids(52, 30))
    _, second = fleet.generate(prefix + token_ids(53, 30))
    assert first.node_id == second.node_id == node
    assert second.cached_prompt_tokens == 2 * BLOCK_SIZE
    assert second.predicted_cached_tokens == second.cached_prompt_tokens
    wait_for(lambda: fleet.blocks(node) == fleet.expected_blocks(node), 5, interval=0.2,
             what="the node's blocks to equal the engine's events")
    proc.stop()
    wait_for(lambda: not fleet.routable(node), 15, what="the attached node to leave")


def test_attached_without_kv_events_falls_back_to_approximate_tracking(external):
    fleet, url, _ = external
    # No --tokenizer either: the node finds it from the model path the server reports.
    proc = fleet.spawn_node("attached-approx", "--engine", "openai", "--url", url)
    node = fleet.await_node(proc, timeout=60)
    assert tracking(fleet, node) == "approximate"
    prefix = token_ids(61, 2 * BLOCK_SIZE + 20)
    _, first = fleet.generate(prefix + token_ids(62, 30))
    assert first.node_id == node and first.cached_prompt_tokens == 0
    _, second = fleet.generate(prefix + token_ids(63, 30))
    assert second.node_id == node
    assert second.cached_prompt_tokens == 2 * BLOCK_SIZE        # vLLM's own count
    # The router learned the prefix from the prompt it sent, not from events.
    assert second.predicted_cached_tokens == 2 * BLOCK_SIZE
