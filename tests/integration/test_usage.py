"""Exact accounting end to end: the ledger's totals equal the usages clients received,
across a SIGKILLed router and a SIGKILLed controller; the savings figure is exact."""

from __future__ import annotations

import json
import random
import re
import signal
import threading
import time
import urllib.request
from collections import defaultdict
from decimal import Decimal

import grpc
import pytest

from kvfleet.v1 import common_pb2 as compb
from kvfleet.v1 import inference_pb2 as ipb
from kvfleet.v1 import inference_pb2_grpc as ipbg
from kvfleet.v1 import usage_pb2 as upb
from kvfleet.v1 import usage_pb2_grpc as upbg

from .conftest import KVFLEET, Proc, free_port, spawn, start_cluster, wait_for
from .test_routing import text

pytestmark = pytest.mark.integration

TIERS = {compb.TIER_DEFAULT: "default", compb.TIER_FLEX: "flex", compb.TIER_PRIORITY: "priority"}
TENANTS = ("acme", "globex", "initech")
NEW_PRICES = """
currency = "EUR"
[tier_multipliers]
flex = 0.25
[models."*".default]
prompt = 3
cached_prompt = 0.3
completion = 4
[models."kvfleet-sim".default]
prompt = 1.0
cached_prompt = 0.1
completion = 2.2
[models."kvfleet-sim".priority]
prompt = 1.7
cached_prompt = 0.17
completion = 3.3
"""


@pytest.fixture(scope="module")
def acct(tmp_path_factory):
    c = start_cluster(tmp_path_factory.mktemp("usage"), 2)
    yield c
    c.stop()


def start_router(c, port: int, metrics_port: int) -> Proc:
    """A standalone router process (its own usage sink) on a fixed port, so a restart keeps the address."""
    proc = spawn(f"router-{port}", KVFLEET + [
        "router", "run", "--etcd", c.etcd.endpoint, "--listen", f"127.0.0.1:{port}",
        "--metrics-listen", f"127.0.0.1:{metrics_port}", "--first-token-timeout", "1.5", "--no-auth",
    ], c.tmp)
    c.extra.append(proc)

    def ready() -> bool:
        if not proc.alive():
            raise AssertionError(f"router exited: {proc.output()[-2000:]}")
        return '"router_ready"' in proc.output()

    wait_for(ready, 30, what="standalone router")
    return proc


def usage_json(c, *args: str) -> dict:
    return json.loads(c.cli("usage", "--json", *args, check=True).stdout)


def price_of(report: dict, model: str, tier: str) -> dict[str, Decimal]:
    table = {(p["model"], p["tier"]): p for p in report["prices"]}
    p = table.get((model, tier)) or table[("*", tier)]
    return {k: Decimal(p[k]) for k in ("prompt", "cached_prompt", "completion")}


def expected_money(report: dict, model: str, tier: str, prompt: int, cached: int, completion: int) -> tuple[Decimal, Decimal]:
    """Cost and savings from the published per-1M-token prices, in Decimal (independent of the ledger's integers)."""
    p = price_of(report, model, tier)
    cost = ((prompt - cached) * p["prompt"] + cached * p["cached_prompt"] + completion * p["completion"]) / 1_000_000
    savings = cached * (p["prompt"] - p["cached_prompt"]) / 1_000_000
    return cost, savings


def send(target: str, req: ipb.GenerateRequest, timeout: float = 30) -> ipb.Usage:
    with grpc.insecure_channel(target) as ch:
        usage = None
        for msg in ipbg.InferenceStub(ch).Generate(req, timeout=timeout):
            if msg.HasField("usage"):
                usage = msg.usage
        assert usage is not None
        return usage


def test_ledger_totals_equal_the_usages_clients_received_across_router_and_controller_restarts(acct):
    c = acct
    port, mport = free_port(), free_port()
    router = start_router(c, port, mport)
    standalone = f"127.0.0.1:{port}"
    wait_for(lambda: any(x.eligible for x in ipbg.InferenceStub(grpc.insecure_channel(standalone)).ExplainRoute(
        ipb.GenerateRequest(model="kvfleet-sim", text="x", sampling={"max_tokens": 1}), timeout=5).candidates),
        15, what="standalone router sees the nodes")

    n_requests, n_threads = 96, 6
    received: dict[str, tuple[str, ipb.Usage]] = {}   # request_id -> (tenant, the usage the client got)
    delivered_by_restarted: set[str] = set()
    failures: list[str] = []
    lock = threading.Lock()
    restarted = threading.Event()
    counter = iter(range(n_requests))
    rng_lock = threading.Lock()

    def worker(w: int) -> None:
        rng = random.Random(w)
        # Four workers use the router that gets SIGKILLed, two the controller's in-process one.
        target = standalone if w < 4 else c.router
        while True:
            with rng_lock:
                i = next(counter, None)
            if i is None:
                return
            tenant = TENANTS[i % 3]
            tier = list(TIERS)[(i // 3) % 3]
            # Shared prefixes (some cache hits) and 24-40 tokens each at 10 ms a token: requests are in flight.
            prompt = text(1000 + i % 7, 48 * (1 + i % 3)) + f" q{i}"
            req = ipb.GenerateRequest(model="kvfleet-sim", text=prompt, tier=tier, tenant=tenant, request_id=f"req-{i:04d}")
            req.sampling.max_tokens = rng.randint(24, 40)
            deadline = time.monotonic() + 60
            while True:
                # A client that saw a failure retries with the same request id: billed once, for what it received.
                try:
                    was_restarted = restarted.is_set()
                    u = send(target, req)
                    with lock:
                        received[req.request_id] = (tenant, u)
                        if target == standalone and was_restarted:
                            delivered_by_restarted.add(req.request_id)
                    break
                except grpc.RpcError as exc:
                    with lock:
                        failures.append(f"{req.request_id}: {exc.code().name}")
                    assert time.monotonic() < deadline, f"{req.request_id} kept failing: {failures[-3:]}"
                    time.sleep(0.2)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(n_threads)]
    for t in threads:
        t.start()
    wait_for(lambda: len(received) >= n_requests // 3, 60, what="a third of the requests")
    router.stop(signal.SIGKILL)                       # mid-run, requests in flight
    killed_with = len(received)
    restarted.set()   # from here, an attempt on the standalone address reaches the new process (or fails)
    router = start_router(c, port, mport)
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert len(received) == n_requests
    assert killed_with < n_requests
    assert failures, "the SIGKILL should have cut some requests in flight"

    # What the clients received, per (tenant, model, tier).
    want: dict[tuple, list] = defaultdict(lambda: [0, 0, 0, 0])
    for tenant, u in received.values():
        w = want[(tenant, "kvfleet-sim", TIERS[u.tier])]
        w[0] += 1
        w[1] += u.prompt_tokens
        w[2] += u.cached_prompt_tokens
        w[3] += u.completion_tokens
    assert sum(w[2] for w in want.values()) > 0, "the workload shares prefixes: some tokens come from cache"

    def check(report: dict) -> None:
        got = {(r["tenant"], r["model"], r["tier"]): [r["requests"], r["prompt_tokens"], r["cached_prompt_tokens"],
                                                      r["completion_tokens"]]
               for r in report["rows"] if r["tenant"] in TENANTS}
        assert got == dict(want)
        cost_total = savings_total = Decimal(0)
        for r in report["rows"]:
            if r["tenant"] not in TENANTS:
                continue
            cost, savings = expected_money(report, r["model"], r["tier"], r["prompt_tokens"], r["cached_prompt_tokens"],
                                           r["completion_tokens"])
            assert Decimal(r["cost"]) == cost and Decimal(r["savings"]) == savings, r
            cost_total += cost
            savings_total += savings
        assert cost_total > 0 and savings_total > 0

    report = usage_json(c, "--by", "all")
    check(report)
    # Filters: one tenant, and a window that ends before the run.
    acme = usage_json(c, "--tenant", "acme")
    assert [r["tenant"] for r in acme["rows"]] == ["acme"]
    assert acme["total"]["requests"] == sum(w[0] for k, w in want.items() if k[0] == "acme")
    assert usage_json(c, "--until", "2020-01-01T00:00")["total"]["requests"] == 0
    by_tier = usage_json(c, "--by", "tier")
    assert {r["tier"] for r in by_tier["rows"]} >= {"default", "flex", "priority"}

    # The restarted router's Prometheus counters carry what it delivered (counters restart with it).
    body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
    prompt_metric = sum(float(v) for v in re.findall(r'^kvfleet_usage_prompt_tokens_total\{[^}]*\} (\S+)$', body, re.M))
    assert prompt_metric == sum(received[r][1].prompt_tokens for r in delivered_by_restarted)
    assert "kvfleet_usage_cost_total{" in body and "kvfleet_usage_cache_savings_total{" in body

    # The controller (and its in-process router) SIGKILLed and restarted on the same data dir, with a new
    # price table: nothing lost, nothing double counted, and what was billed is not repriced.
    prices = c.tmp / "prices.toml"
    prices.write_text(NEW_PRICES)
    args = [*c.controller_proc.popen.args, "--prices", str(prices)]
    c.controller_proc.stop(signal.SIGKILL)
    c.controller_proc = spawn("controller-restarted", args, c.tmp)
    wait_for(lambda: '"controller_ready"' in c.controller_proc.output(), 60, what="restarted controller")
    after = usage_json(c, "--by", "all")
    assert after["rows"] == report["rows"]
    assert after["currency"] == "EUR"
    assert price_of(after, "kvfleet-sim", "flex") == {
        "prompt": Decimal("0.25"), "cached_prompt": Decimal("0.025"), "completion": Decimal("0.55")}


def test_savings_are_exact_for_a_known_cache_hit_rate(acct):
    c = acct
    nodes = sorted(c.nodes)
    keep, others = nodes[0], nodes[1:]
    for node in others:   # one node serves: every repeat of the prefix hits its cache
        c.cli("nodes", "cordon", node, check=True)
    try:
        wait_for(lambda: [x.node_id for x in c.explain("y").candidates if x.eligible] == [keep], 30, what="one eligible node")
        prefix = text(4242, 64)           # 4 blocks of 16 tokens, never sent before
        n = 9
        usages = []
        for i in range(n):
            for tier in (compb.TIER_DEFAULT, compb.TIER_FLEX):
                # The prefix plus one distinct token: every request after the first hits exactly 64 tokens.
                req = ipb.GenerateRequest(model="kvfleet-sim", text=prefix + "!#$%&()*+,-./:;<=>?@[]^_`{|}~"[i * 2 + tier % 2],
                                          tenant="cachey", tier=tier, request_id=f"cache-{i}-{tier}")
                req.sampling.max_tokens = 4
                usages.append(send(c.router, req))
    finally:
        for node in others:
            c.cli("nodes", "uncordon", node, check=True)
    assert [u.cached_prompt_tokens for u in usages] == [0] + [64] * (2 * n - 1)
    assert {u.node_id for u in usages} == {keep}

    report = usage_json(c, "--tenant", "cachey", "--by", "tier")
    rows = {r["tier"]: r for r in report["rows"]}
    assert set(rows) == {"default", "flex"}
    for tier, cached in (("default", 64 * (n - 1)), ("flex", 64 * n)):
        p = price_of(report, "kvfleet-sim", tier)
        assert rows[tier]["cached_prompt_tokens"] == cached
        assert Decimal(rows[tier]["savings"]) == cached * (p["prompt"] - p["cached_prompt"]) / 1_000_000
        assert rows[tier]["prompt_tokens"] == 65 * n
    # Same cache hit, cheaper tier: flex saves less per token than default, since its prices are lower.
    assert Decimal(rows["flex"]["savings"]) / (64 * n) < Decimal(rows["default"]["savings"]) / (64 * (n - 1))


def stream_then_stop(target: str, req: ipb.GenerateRequest, chunks: int, stop) -> tuple[int, grpc.RpcError | None]:
    """Reads ``chunks`` token chunks, calls ``stop(call)``, then reads on until the stream
    ends; returns (tokens the client read, the error that ended the stream, if any)."""
    read = 0
    with grpc.insecure_channel(target) as ch:
        call = ipbg.InferenceStub(ch).Generate(req, timeout=60)
        try:
            for i, msg in enumerate(call):
                assert not msg.HasField("usage"), "the stream finished before it was stopped"
                read += len(msg.chunk.token_ids)
                if i + 1 == chunks:
                    stop(call)
        except grpc.RpcError as exc:
            return read, exc
    return read, None


def billed(c, tenant: str) -> dict:
    """The tenant's ledger totals, once its one request is in the ledger."""
    return wait_for(lambda: (r := usage_json(c, "--tenant", tenant)["total"])["requests"] == 1 and r, 15,
                    what=f"{tenant}'s request in the ledger")


def test_a_stream_the_client_cancels_is_billed_for_the_tokens_relayed(acct):
    prompt = text(5150, 40)
    req = ipb.GenerateRequest(model="kvfleet-sim", text=prompt, tenant="quitter", request_id="cancelled-1")
    req.sampling.max_tokens = 400          # ~4 s of tokens: cancelled long before the end
    read, err = stream_then_stop(acct.router, req, 5, lambda call: call.cancel())
    assert err is not None and err.code() == grpc.StatusCode.CANCELLED and read >= 5
    total = billed(acct, "quitter")
    ref = ipb.GenerateRequest(model="kvfleet-sim", text=prompt, tenant="quitter-ref", request_id="reference-1")
    ref.sampling.max_tokens = 1
    assert total["prompt_tokens"] == send(acct.router, ref).prompt_tokens
    # What the router wrote to the stream: at least what the client read, far from all 400.
    assert read <= total["completion_tokens"] < 200, (read, total)
    assert Decimal(total["cost"]) > 0


def test_a_stream_whose_node_dies_mid_way_is_billed_for_the_tokens_relayed(tmp_path):
    c = start_cluster(tmp_path, 1)
    try:
        (node,) = c.nodes
        req = ipb.GenerateRequest(model="kvfleet-sim", text=text(5151, 40), tenant="orphan", request_id="orphaned-1")
        req.sampling.max_tokens = 400
        read, err = stream_then_stop(c.router, req, 5, lambda call: c.nodes[node].stop(signal.SIGKILL))
        assert err is not None and err.code() == grpc.StatusCode.UNAVAILABLE and "mid-stream" in err.details()
        total = billed(c, "orphan")
        # The client read every token the router relayed before the node's stream broke.
        assert total["completion_tokens"] == read and total["prompt_tokens"] > 0
    finally:
        c.stop()


def test_usage_cli_rejects_bad_times_naming_the_flag(acct):
    r = acct.cli("usage", "--since", "bogus")
    assert r.returncode != 0 and "--since" in r.stderr and "bogus" in r.stderr
    r = acct.cli("usage", "--until", "yesterday-ish")
    assert r.returncode != 0 and "--until" in r.stderr
    r = acct.cli("usage", "--by", "colour")
    assert r.returncode != 0 and "--by" in r.stderr
    r = acct.cli("usage", "--since", "1h", "--until", "2h")
    assert r.returncode != 0 and "--since" in r.stderr
    # The gRPC edge checks the window itself.
    with pytest.raises(grpc.RpcError) as exc:
        upbg.AccountingStub(grpc.insecure_channel(acct.controller)).GetUsage(
            upb.GetUsageRequest(since_unix_ms=2000, until_unix_ms=1000), timeout=10)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "since" in exc.value.details()
    # A bad price table stops the controller before it starts, naming the flag.
    bad = acct.tmp / "bad-prices.toml"
    bad.write_text('[models."*".default]\nprompt = 1\ncached_prompt = 2\ncompletion = 1\n')
    r = acct.cli("controller", "run", "--etcd", acct.etcd.endpoint, "--listen", "127.0.0.1:0", "--prices", str(bad))
    assert r.returncode == 2 and "--prices" in r.stderr and "cached_prompt (2) is above prompt (1)" in r.stderr
    # The table form prints too.
    r = acct.cli("usage", "--since", "1d", check=True)
    assert "cache savings" in r.stdout
