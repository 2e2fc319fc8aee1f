"""Two nodes, each running a managed vLLM engine on CPU, through the real router.

The tests share one fleet (engines are expensive) and run in file order; the SIGKILL
test goes last since it restarts an engine. The fleet's ledger records what each engine
computed, so block listings can be checked exactly.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest

from tests.integration.conftest import wait_for
from tests.vllm.conftest import (
    BLOCK_SIZE, MODEL, engine_server, full_block_hashes, metrics, token_ids, tokenizer, words,
)

pytestmark = pytest.mark.vllm


def other(fleet, node_id: str) -> str:
    (rest,) = [n for n in fleet.cluster.nodes if n != node_id]
    return rest


def test_nodes_advertise_what_their_engines_report(fleet):
    r = fleet.cluster.cli("nodes", "list", "--json", check=True)
    import json

    nodes = json.loads(r.stdout)
    assert len(nodes) == 2
    for n in nodes:
        (m,) = n["models"]
        assert (m["name"], m["engine"], m["cache_tracking"]) == (MODEL, "vllm", "exact")
        assert m["block_size"] == BLOCK_SIZE
        assert m["capacity_blocks"] > 0          # read from the engine (vllm:cache_config_info)
        assert n["state"] == "ready"


def test_shared_prefix_lands_on_the_same_node_and_the_router_predicts_vllms_cached_tokens_exactly(fleet):
    prefix = words(1, 330)
    first_text = prefix + " Question: which word comes up most often?"
    second_text = prefix + " Another question: which word is the rarest here?"
    tok = tokenizer()
    first_ids, second_ids = tok.encode(first_text), tok.encode(second_text)
    shared = next(i for i, (a, b) in enumerate(zip(first_ids, second_ids)) if a != b)
    assert len(first_ids) >= 300 and shared >= 2 * BLOCK_SIZE, (len(first_ids), shared)

    _, first = fleet.generate(first_text)
    node = first.node_id
    assert first.prompt_tokens == len(first_ids)      # the router tokenised exactly as the engine
    assert first.cached_prompt_tokens == 0 and first.predicted_cached_tokens == 0
    url = engine_server(fleet.cluster.nodes[node]).url
    hits_before = metrics(url)["vllm:prefix_cache_hits_total"]

    _, second = fleet.generate(second_text)
    assert second.node_id == node
    # vLLM served every full block of the shared prefix from its cache...
    assert second.cached_prompt_tokens == shared // BLOCK_SIZE * BLOCK_SIZE
    assert metrics(url)["vllm:prefix_cache_hits_total"] - hits_before == second.cached_prompt_tokens
    # ...and the router knew it to the token: nothing was evicted, so any difference is a bug.
    assert second.predicted_cached_tokens == second.cached_prompt_tokens


def test_a_different_prefix_goes_to_the_other_node_and_nodes_show_lists_the_engines_blocks(fleet):
    nodes = list(fleet.cluster.nodes)
    held = {n: fleet.blocks(n) for n in nodes}
    if not any(held.values()):      # run alone: give one node a prefix first
        _, a = fleet.generate(token_ids(21, 2 * BLOCK_SIZE + 40))
        wait_for(lambda: fleet.blocks(a.node_id), 5, interval=0.2, what=f"{a.node_id} to list its blocks")
        held = {n: fleet.blocks(n) for n in nodes}
    holder = max(nodes, key=lambda n: len(held[n]))
    assert len(held[holder]) > min(len(h) for h in held.values())
    # A prefix nobody holds costs the same everywhere; the tie goes to the node with more
    # free cache, so it does not pile onto the node holding the other prefix.
    _, b = fleet.generate(token_ids(22, 3 * BLOCK_SIZE + 10))
    assert b.node_id != holder
    assert b.cached_prompt_tokens == 0 and b.predicted_cached_tokens == 0
    # Each node lists exactly the full blocks its engine computed: the canonical hashes of
    # the token ids that vLLM's BlockStored events carried.
    for node in nodes:
        expected = fleet.expected_blocks(node)
        assert expected, f"{node} served nothing"
        wait_for(lambda: fleet.blocks(node) == expected, 5, interval=0.2,
                 what=f"{node}'s blocks to equal its engine's ({len(expected)})")


def test_client_cancellation_aborts_the_request_in_vllm(fleet):
    urls = {n: engine_server(p).url for n, p in fleet.cluster.nodes.items()}

    def running() -> dict[str, float]:
        return {n: metrics(u)["vllm:num_requests_running"] for n, u in urls.items()}

    def finished() -> float:
        # Requests vLLM finished by stop or length; an abort from a disconnected client is not counted.
        return sum(metrics(u)["vllm:request_success_total"] for u in urls.values())

    assert sum(running().values()) == 0
    finished_before = finished()
    req = fleet.request(token_ids(31, 64), max_tokens=1500)   # minutes of decoding on CPU
    req.sampling.temperature = 1.0
    req.sampling.seed = 7
    call = fleet.cluster.inf().Generate(req, timeout=300)
    first_chunk = threading.Event()

    def consume():
        try:
            for msg in call:
                if msg.HasField("chunk") and msg.chunk.token_ids:
                    first_chunk.set()
        except grpc.RpcError:
            pass

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    try:
        assert first_chunk.wait(60), "no token within 60 s"
        busy = wait_for(lambda: [n for n, r in running().items() if r == 1], 5, what="the request running in vLLM")
        call.cancel()
        t0 = time.monotonic()
        wait_for(lambda: sum(running().values()) == 0, 3, interval=0.05, what="vLLM's running count to drop after cancel")
        print(f"vllm:num_requests_running reached 0 {time.monotonic() - t0:.2f} s after the cancel")
        # It was aborted, not finished: vLLM counts no finished request, and decodes no more.
        assert finished() == finished_before
        decoded = {n: metrics(u)["vllm:generation_tokens_total"] for n, u in urls.items()}
        time.sleep(1.0)
        assert {n: metrics(u)["vllm:generation_tokens_total"] for n, u in urls.items()} == decoded
    finally:
        call.cancel()
        t.join(10)
    assert len(busy) == 1


def test_sigkill_of_the_engine_leaves_routing_at_once_drops_its_blocks_and_restarts_it(fleet):
    prefix = token_ids(41, 2 * BLOCK_SIZE + 30)
    _, warm = fleet.generate(prefix)
    victim, survivor = warm.node_id, other(fleet, warm.node_id)
    agent = fleet.cluster.nodes[victim]
    old = engine_server(agent)
    wait_for(lambda: fleet.blocks(victim) >= full_block_hashes(prefix), 5, interval=0.2, what=f"{victim} to list the prefix")

    os.kill(old.pid, signal.SIGKILL)
    t0 = time.monotonic()
    wait_for(lambda: not fleet.routable(victim), 2, interval=0.02, what=f"{victim} to leave routing")
    left_after = time.monotonic() - t0
    # Its index entries are gone (AllBlocksCleared), not left to mislead the router.
    wait_for(lambda: fleet.blocks(victim) == set(), 2, interval=0.05, what=f"{victim}'s blocks to be dropped")
    fleet.ledger[victim] = []
    assert agent.alive(), "the agent itself must survive its engine"

    # During the outage, even the victim's favourite prefix goes to the other node.
    _, during = fleet.generate(prefix + token_ids(42, 20))
    assert during.node_id == survivor
    assert during.predicted_cached_tokens == 0

    # The agent restarts the engine (backoff 1 s, then a cold start) and rejoins routing.
    wait_for(lambda: fleet.routable(victim), 240, interval=0.5, what=f"{victim} to be routable again")
    print(f"{victim}: left routing {left_after:.3f} s after SIGKILL, routable again after {time.monotonic() - t0:.1f} s")
    new = engine_server(agent)
    assert new.pid != old.pid
    # A new engine, an empty cache: no entries until new events arrive.
    assert fleet.blocks(victim) == set()
    fresh = token_ids(43, 2 * BLOCK_SIZE + 5)
    _, after = fleet.generate(fresh)
    assert after.node_id == victim          # the emptier node
    wait_for(lambda: fleet.blocks(victim) == fleet.expected_blocks(victim), 5, interval=0.2,
             what=f"{victim}'s blocks to follow the new engine's events")
    log = (fleet.data_dir(fleet.names[victim]) / f"vllm-{MODEL}.log").read_text(errors="replace")
    assert log.count("=== kvfleet") == 2, "the engine log should show the start and one restart"
    assert left_after < 1.0, f"left routing {left_after:.2f} s after the kill"
