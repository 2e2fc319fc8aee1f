"""Tenants, API keys and quotas on a real cluster with auth on: the CLI, UNAUTHENTICATED for
missing, bad and revoked keys, the key deciding the tenant, RESOURCE_EXHAUSTED naming the
limit, the Batch runner's internal key, and two router processes sharing one quota."""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import threading
import time

import grpc
import httpx
import pytest

from kvfleet.controller.registry import Registry
from kvfleet.controller.tenancy import SERVICE_KEY_FILE, ensure_service_key, new_key, parse_key
from kvfleet.v1 import common_pb2 as compb
from kvfleet.v1 import inference_pb2 as ipb
from kvfleet.v1 import inference_pb2_grpc as ipbg
from kvfleet.v1 import tenancy_pb2 as tpb
from kvfleet.v1 import tenancy_pb2_grpc as tpbg

from .conftest import KVFLEET, Cluster, Proc, free_port, spawn, start_cluster, wait_for

pytestmark = pytest.mark.integration

KEY_RE = re.compile(r"kvf_[0-9a-f]{12}_[A-Za-z0-9_-]{43}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two sim nodes behind a controller whose router requires API keys."""
    c = start_cluster(tmp_path_factory.mktemp("tenants"), 2, auth=True)
    yield c
    c.stop()


def tenants(c: Cluster) -> tpbg.TenantsStub:
    return tpbg.TenantsStub(grpc.insecure_channel(c.controller))


def md(key: str | None, **extra: str) -> tuple[tuple[str, str], ...]:
    items = [("authorization", f"Bearer {key}")] if key else []
    return tuple(items + [(k.replace("_", "-"), v) for k, v in extra.items()])


def generate(router: str, metadata=(), text: str = "hello there", max_tokens: int = 4, **kw) -> ipb.Usage:
    """One Generate on its own channel (no cluster key); raises grpc.RpcError."""
    req = ipb.GenerateRequest(model="kvfleet-sim", text=text, **kw)
    req.sampling.max_tokens = max_tokens
    usage = None
    with grpc.insecure_channel(router) as ch:
        for msg in ipbg.InferenceStub(ch).Generate(req, metadata=metadata, timeout=60):
            if msg.HasField("usage"):
                usage = msg.usage
    assert usage is not None
    return usage


def refused(router: str, metadata=(), **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        generate(router, metadata, **kw)
    return info.value


def retry_after_ms(exc: grpc.RpcError) -> int | None:
    return next((int(v) for k, v in (exc.trailing_metadata() or ()) if k == "retry-after-ms"), None)


def authorized(router: str, key: str) -> bool:
    """The router knows the key (ExplainRoute authenticates but charges no quota)."""
    req = ipb.GenerateRequest(model="kvfleet-sim", text="x")
    req.sampling.max_tokens = 1
    try:
        with grpc.insecure_channel(router) as ch:
            ipbg.InferenceStub(ch).ExplainRoute(req, metadata=md(key), timeout=5)
        return True
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
            raise
        return False


def new_tenant(c: Cluster, name: str, routers: tuple[str, ...] = (), tier=compb.TIER_DEFAULT, **limits: int) -> str:
    """Creates ``name`` with ``limits`` on ``tier`` and a key; returns the key once every router knows it."""
    t = tenants(c)
    t.CreateTenant(tpb.CreateTenantRequest(name=name), timeout=10)
    if limits:
        t.SetQuota(tpb.SetQuotaRequest(tenant=name, tier=tier, **limits), timeout=10)
    key = t.CreateKey(tpb.CreateKeyRequest(tenant=name), timeout=10).key
    for r in routers or (c.router,):
        wait_for(lambda: authorized(r, key), 10, what=f"{r} to know the key of {name}")
    return key


# -- CLI -----------------------------------------------------------------------------------------
def test_cli_creates_a_tenant_and_a_key_that_is_shown_only_once(cluster):
    r = cluster.cli("tenants", "create", "acme", "--description", "Acme Corp", check=True)
    assert "created tenant acme" in r.stdout
    r = cluster.cli("tenants", "keys", "create", "acme", check=True)
    keys = KEY_RE.findall(r.stdout)
    assert len(keys) == 1
    key = keys[0]
    assert "shown only once" in r.stderr
    key_id, secret = parse_key(key)
    for args in (("tenants", "keys", "list"), ("tenants", "keys", "list", "--json"), ("tenants", "keys", "list", "--tenant", "acme"),
                 ("tenants", "list"), ("tenants", "list", "--json")):
        out = cluster.cli(*args, check=True)
        assert secret not in out.stdout + out.stderr
    listed = json.loads(cluster.cli("tenants", "keys", "list", "--tenant", "acme", "--json", check=True).stdout)
    assert [(k["key_id"], k["tenant"], k["revoked"]) for k in listed] == [(key_id, "acme", False)]
    acme = next(t for t in json.loads(cluster.cli("tenants", "list", "--json", check=True).stdout) if t["name"] == "acme")
    assert acme["active_keys"] == 1 and acme["quotas"] == {} and acme["description"] == "Acme Corp"

    r = cluster.cli("tenants", "quota", "acme", "--tier", "flex", "--rpm", "600", "--concurrency", "8", "--json", check=True)
    assert json.loads(r.stdout)["quotas"] == {"flex": {"requests_per_min": 600, "tokens_per_min": 0, "concurrent": 8}}
    r = cluster.cli("tenants", "quota", "acme", "--tier", "flex", "--tpm", "50000", "--json", check=True)  # others unchanged
    assert json.loads(r.stdout)["quotas"]["flex"] == {"requests_per_min": 600, "tokens_per_min": 50000, "concurrent": 8}

    wait_for(lambda: authorized(cluster.router, key), 10, what="the router to know the key")
    r = cluster.cli("generate", "hello", "-n", "3", "--api-key", key, "--json", check=True)
    assert json.loads(r.stdout)["usage"]["completion_tokens"] == 3
    r = cluster.cli("route", "explain", "hello")
    assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr and "API key is required" in r.stderr
    r = cluster.cli("generate", "hello", "-n", "3")
    assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr and "API key is required" in r.stderr
    env_run = cluster.cli("route", "explain", "hello", "--json", "--api-key", key, check=True)
    assert json.loads(env_run.stdout)["prompt_tokens"] > 0


def test_cli_errors_name_the_flag_or_the_argument(cluster):
    def err(*args: str) -> tuple[int, str]:
        r = cluster.cli(*args)
        return r.returncode, " ".join((r.stdout + r.stderr).split())

    code, out = err("tenants", "create", "Bad Name")
    assert code == 2 and "NAME" in out and "not valid" in out
    code, out = err("tenants", "create", "kvfleet-mine")
    assert code == 2 and "reserved" in out
    cluster.cli("tenants", "create", "dup", check=True)
    code, out = err("tenants", "create", "dup")
    assert code == 1 and "ALREADY_EXISTS" in out and "'dup' already exists" in out
    code, out = err("tenants", "quota", "dup", "--tier", "gold", "--rpm", "1")
    assert code == 2 and "--tier" in out and "gold" in out
    code, out = err("tenants", "quota", "dup")
    assert code == 2 and "--rpm/--tpm/--concurrency" in out
    code, out = err("tenants", "quota", "dup", "--rpm", "-1")
    assert code == 2 and "--rpm" in out
    code, out = err("tenants", "quota", "nosuch", "--rpm", "5")
    assert code == 1 and "NOT_FOUND" in out and "no tenant named 'nosuch'" in out
    code, out = err("tenants", "keys", "create", "nosuch")
    assert code == 1 and "NOT_FOUND" in out
    code, out = err("tenants", "keys", "revoke", "0123456789ab")
    assert code == 1 and "NOT_FOUND" in out and "no API key with id" in out
    code, out = err("tenants", "keys", "list", "--tenant", "Not A Name")
    assert code == 2 and "--tenant" in out
    code, out = err("tenants", "delete", "nosuch")
    assert code == 1 and "NOT_FOUND" in out
    code, out = err("generate", "hi", "--api-key", "not-a-key")
    assert code == 2 and "--api-key" in out and "not-a-key" not in out.replace("--api-key", "")
    # The gRPC API itself says the same, with the right statuses.
    t = tenants(cluster)
    for call, req, status in [
        (t.CreateTenant, tpb.CreateTenantRequest(name="UPPER"), grpc.StatusCode.INVALID_ARGUMENT),
        (t.CreateTenant, tpb.CreateTenantRequest(name="dup"), grpc.StatusCode.ALREADY_EXISTS),
        (t.SetQuota, tpb.SetQuotaRequest(tenant="dup", tier=99, requests_per_min=1), grpc.StatusCode.INVALID_ARGUMENT),
        (t.SetQuota, tpb.SetQuotaRequest(tenant="nosuch", requests_per_min=1), grpc.StatusCode.NOT_FOUND),
        (t.DeleteTenant, tpb.DeleteTenantRequest(name="kvfleet-batch"), grpc.StatusCode.INVALID_ARGUMENT),
        (t.CreateKey, tpb.CreateKeyRequest(tenant="kvfleet-batch"), grpc.StatusCode.INVALID_ARGUMENT),
        (t.RevokeKey, tpb.RevokeKeyRequest(key_id="nope"), grpc.StatusCode.NOT_FOUND),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            call(req, timeout=10)
        assert info.value.code() == status, (req, info.value.details())


# -- auth ----------------------------------------------------------------------------------------
def test_missing_malformed_unknown_wrong_and_revoked_keys_are_unauthenticated(cluster):
    key = new_tenant(cluster, "authco")
    key_id, secret = parse_key(key)
    assert generate(cluster.router, md(key)).completion_tokens == 4

    cases = [
        ((), "an API key is required"),
        ((("authorization", key),), "expected 'Bearer <key>'"),
        (md("sk-not-ours-123"), "malformed API key"),
        (md(new_key()[0]), "unknown API key"),
        (md(f"kvf_{key_id}_{'A' * 43}"), f"API key {key_id}: wrong secret"),
    ]
    for metadata, words in cases:
        exc = refused(cluster.router, metadata)
        assert exc.code() == grpc.StatusCode.UNAUTHENTICATED, exc.details()
        assert words in exc.details()
        assert secret not in exc.details() and "sk-not-ours-123" not in exc.details()

    info = tenants(cluster).RevokeKey(tpb.RevokeKeyRequest(key_id=key_id), timeout=10)
    assert info.revoked and info.tenant == "authco"
    # Revocation reaches the router through its etcd watch: well within a second.
    t0 = time.monotonic()
    wait_for(lambda: not authorized(cluster.router, key), 2, interval=0.005, what="the revocation to apply")
    print(f"revocation applied at the router after {1000 * (time.monotonic() - t0):.1f} ms")
    exc = refused(cluster.router, md(key))
    assert exc.code() == grpc.StatusCode.UNAUTHENTICATED and f"API key {key_id} was revoked" in exc.details()


def test_deleting_a_tenant_revokes_its_keys(cluster):
    key = new_tenant(cluster, "shortlived")
    second = tenants(cluster).CreateKey(tpb.CreateKeyRequest(tenant="shortlived"), timeout=10).key
    r = tenants(cluster).DeleteTenant(tpb.DeleteTenantRequest(name="shortlived"), timeout=10)
    assert r.revoked_keys == 2
    wait_for(lambda: not authorized(cluster.router, key) and not authorized(cluster.router, second), 2, what="revocation")
    keys = tenants(cluster).ListKeys(tpb.ListKeysRequest(tenant="shortlived"), timeout=10).keys
    assert len(keys) == 2 and all(k.revoked for k in keys)
    assert "shortlived" not in {t.name for t in tenants(cluster).ListTenants(tpb.ListTenantsRequest(), timeout=10).tenants}


def test_the_key_decides_the_tenant_not_the_request(cluster):
    small = new_tenant(cluster, "small", requests_per_min=2)
    new_tenant(cluster, "big", requests_per_min=1)
    # Both name "big", in the request and in metadata; "big" allows one request a minute.
    for _ in range(2):
        generate(cluster.router, md(small, x_kvfleet_tenant="big"), tenant="big")
    exc = refused(cluster.router, md(small, x_kvfleet_tenant="big"), tenant="big")
    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tenant small over its tier default requests-per-minute quota (2/min)" in exc.details()
    assert 0 < retry_after_ms(exc) <= 60_000


# -- quotas ---------------------------------------------------------------------------------------
def test_over_the_concurrency_quota_is_resource_exhausted_until_one_finishes(cluster):
    key = new_tenant(cluster, "conc", concurrent=1)
    first_token = threading.Event()
    done: dict = {}

    def long_request():
        req = ipb.GenerateRequest(model="kvfleet-sim", text="a long one")
        req.sampling.max_tokens = 300    # 10 ms a step on the sim: about 3 s
        with grpc.insecure_channel(cluster.router) as ch:
            for msg in ipbg.InferenceStub(ch).Generate(req, metadata=md(key), timeout=60):
                first_token.set()
                if msg.HasField("usage"):
                    done["usage"] = msg.usage

    t = threading.Thread(target=long_request)
    t.start()
    assert first_token.wait(30)
    exc = refused(cluster.router, md(key))
    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tenant conc over its tier default concurrent-requests quota (1)" in exc.details()
    # Other tiers have no limit here.
    generate(cluster.router, md(key), tier=compb.TIER_PRIORITY)
    t.join(60)
    assert done["usage"].completion_tokens == 300
    generate(cluster.router, md(key))


def test_over_the_tokens_per_minute_quota_is_resource_exhausted_with_a_retry_hint(cluster):
    key = new_tenant(cluster, "tokco", tier=compb.TIER_FLEX, tokens_per_min=300)
    exc = refused(cluster.router, md(key), max_tokens=1000, tier=compb.TIER_FLEX)
    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tier flex tokens-per-minute quota (300/min): this request alone reserves" in exc.details()
    assert retry_after_ms(exc) is None   # waiting cannot help: the request must shrink
    used = 0
    for _ in range(10):   # each uses over 100 tokens: the quota runs out by the third
        try:
            u = generate(cluster.router, md(key), max_tokens=100, tier=compb.TIER_FLEX)
            used += u.prompt_tokens + u.completion_tokens
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "tenant tokco over its tier flex tokens-per-minute quota (300/min)" in exc.details()
            assert 0 < retry_after_ms(exc) <= 60_000
            break
    else:
        pytest.fail(f"10 requests of 100 tokens within a 300/min quota ({used} tokens used)")
    assert 0 < used <= 300


def test_the_batch_runners_internal_key_is_kept_and_names_the_tenant(cluster, tmp_path):
    async def service_keys():
        reg = await Registry.connect([cluster.etcd.endpoint])
        try:
            first = await ensure_service_key(reg, tmp_path)
            again = await ensure_service_key(reg, tmp_path)
            await reg.client.kv.delete(reg._key("apikeys", parse_key(first)[0]))
            fresh = await ensure_service_key(reg, tmp_path)
            return first, again, fresh
        finally:
            await reg.close()

    first, again, fresh = asyncio.run(service_keys())
    assert first == again and fresh != first
    path = tmp_path / SERVICE_KEY_FILE
    assert path.read_text().strip() == fresh
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    keys = tenants(cluster).ListKeys(tpb.ListKeysRequest(tenant="kvfleet-batch"), timeout=10).keys
    assert [k.internal for k in keys if k.key_id == parse_key(fresh)[0]] == [True]

    new_tenant(cluster, "batchco", requests_per_min=1)
    wait_for(lambda: authorized(cluster.router, fresh), 10, what="the service key")
    generate(cluster.router, md(fresh, x_kvfleet_tenant="batchco"))
    exc = refused(cluster.router, md(fresh, x_kvfleet_tenant="batchco"))
    assert "tenant batchco over its tier default requests-per-minute quota (1/min)" in exc.details()


# -- two routers ----------------------------------------------------------------------------------
def _routers_in_etcd(c: Cluster) -> int:
    async def count():
        reg = await Registry.connect([c.etcd.endpoint])
        try:
            return len(await reg.list_routers())
        finally:
            await reg.close()

    return asyncio.run(count())


def _metric(metrics: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in metrics.splitlines():
        if not labels and line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
        if line.startswith(name + "{"):
            got = ",".join(sorted(line[line.index("{") + 1:line.index("}")].split(",")))
            if got == want:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_two_routers_share_a_quota_and_the_key_decides_the_tenant_in_metrics(cluster):
    router2, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    proc: Proc = spawn("router2", KVFLEET + [
        "router", "run", "--etcd", cluster.etcd.endpoint, "--listen", router2, "--auth", "--metrics-listen", metrics,
    ], cluster.tmp)
    cluster.extra.append(proc)
    wait_for(lambda: '"router_ready"' in proc.output() or not proc.alive(), 60, what="the second router")
    assert proc.alive(), proc.output()[-2000:]
    wait_for(lambda: _routers_in_etcd(cluster) == 2, 15, what="both routers registered")
    key = new_tenant(cluster, "shared", routers=(cluster.router, router2), requests_per_min=10)

    admitted = {cluster.router: 0, router2: 0}
    for i in range(20):
        r = (cluster.router, router2)[i % 2]
        try:
            generate(r, md(key), tenant="someone-else")
            admitted[r] += 1
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "requests-per-minute quota (10/min across 2 routers, 5 on this one)" in exc.details()
    assert admitted == {cluster.router: 5, router2: 5}

    text = httpx.get(f"http://{metrics}/metrics", timeout=10).text
    assert _metric(text, "kvfleet_router_quota_admitted_total", tenant="shared", tier="default") == 5
    assert _metric(text, "kvfleet_router_quota_rejections_total", tenant="shared", tier="default", limit="requests_per_min") == 5
    assert _metric(text, "kvfleet_router_quota_admitted_total", tenant="someone-else", tier="default") == 0
    assert _metric(text, "kvfleet_router_quota_routers") == 2

    # The second router leaves (its lease is revoked at a clean stop): the first now holds
    # the whole quota, of which its window already counts 5.
    proc.stop()
    wait_for(lambda: _routers_in_etcd(cluster) == 1, 15, what="the second router to leave")
    time.sleep(0.5)  # the first router's watch sees the deletion within milliseconds
    more = 0
    for _ in range(8):
        try:
            generate(cluster.router, md(key))
            more += 1
        except grpc.RpcError as exc:
            assert "requests-per-minute quota (10/min)" in exc.details()
    assert more == 5
