"""Tenancy without etcd: key format and hashing, tenant names, the router's KeyAuth over a
plain view, and quota windows and shares with an injected clock."""

from __future__ import annotations

import asyncio
import hashlib

import grpc
import pytest

from kvfleet.controller.registry import RouterEntry
from kvfleet.controller.router.auth import KeyAuth, OpenAuth, Principal
from kvfleet.controller.router.errors import RequestError
from kvfleet.controller.router.quota import WINDOW_S, Quotas, split
from kvfleet.controller.tenancy import (
    TIER_NAMES,
    ApiKey,
    InvalidArgument,
    Tenant,
    TierQuota,
    check_tenant_name,
    key_matches,
    new_key,
    parse_key,
    secret_sha256,
)
from kvfleet.v1 import common_pb2 as cpb

DEFAULT, PRIORITY, AUTO = cpb.TIER_DEFAULT, cpb.TIER_PRIORITY, cpb.TIER_AUTO


# -- keys and names ------------------------------------------------------------------------------
def test_tier_names_match_the_proto_enum():
    assert TIER_NAMES == {cpb.TIER_PRIORITY: "priority", cpb.TIER_DEFAULT: "default", cpb.TIER_FLEX: "flex",
                          cpb.TIER_BATCH: "batch"}


def test_a_new_key_parses_back_and_only_the_secret_hash_is_kept():
    plaintext, key_id, digest = new_key()
    assert plaintext.startswith(f"kvf_{key_id}_")
    parsed = parse_key(plaintext)
    assert parsed is not None and parsed[0] == key_id
    secret = parsed[1]
    assert len(secret) == 43  # 32 random bytes, URL-safe base64 without padding
    assert digest == hashlib.sha256(secret.encode()).hexdigest() == secret_sha256(secret)
    assert secret not in digest
    # Fresh randomness every time.
    assert len({new_key()[0] for _ in range(50)}) == 50


@pytest.mark.parametrize("text", [
    "", "kvf_", "Bearer kvf_0123456789ab_" + "a" * 43, "kvf_0123456789ab_" + "a" * 42, "kvf_0123456789ab_" + "a" * 44,
    "kvf_0123456789AB_" + "a" * 43, "kvf_0123456789a_" + "a" * 43, "kvx_0123456789ab_" + "a" * 43,
    "kvf_0123456789ab_" + "a" * 42 + "=", "kvf_" + "A" * 32,  # a join token's shape
])
def test_malformed_keys_do_not_parse(text):
    assert parse_key(text) is None


def test_key_matches_only_its_own_secret():
    plaintext, key_id, digest = new_key()
    record = ApiKey(key_id=key_id, tenant="t", secret_sha256=digest, created_unix_ms=1)
    assert key_matches(record, parse_key(plaintext)[1])
    assert not key_matches(record, "b" * 43)


@pytest.mark.parametrize("name", ["a", "acme", "team-7", "x_y", "0abc", "a" * 63])
def test_valid_tenant_names(name):
    assert check_tenant_name(name) == name


@pytest.mark.parametrize("name", ["", "Acme", "-a", "_a", "a b", "a.b", "a" * 64, "ünï", "a/b"])
def test_invalid_tenant_names_say_what_is_allowed(name):
    with pytest.raises(InvalidArgument, match="1-63 characters"):
        check_tenant_name(name)


def test_kvfleet_prefixed_names_are_reserved():
    with pytest.raises(InvalidArgument, match="reserved"):
        check_tenant_name("kvfleet-batch")
    assert check_tenant_name("kvfleet-batch", allow_reserved=True) == "kvfleet-batch"


# -- a plain view ------------------------------------------------------------------------------
class View:
    """What TenancyView offers the router, without etcd."""

    def __init__(self) -> None:
        self.keys: dict[str, ApiKey] = {}
        self.tenants: dict[str, Tenant] = {}
        self.routers: dict[str, RouterEntry] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def add_tenant(self, name: str, **quotas: TierQuota) -> None:
        self.tenants[name] = Tenant(name=name, created_unix_ms=1, quotas=quotas)

    def add_key(self, tenant: str, *, internal: bool = False, revoked: bool = False) -> str:
        plaintext, key_id, digest = new_key()
        self.keys[key_id] = ApiKey(key_id=key_id, tenant=tenant, secret_sha256=digest, created_unix_ms=1,
                                   internal=internal, revoked=revoked)
        return plaintext

    def add_router(self, address: str) -> None:
        self.routers[address] = RouterEntry(router_id=address, address=address, started_unix_ms=1)


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def refused(auth, md: dict[str, str], match: str, code=grpc.StatusCode.UNAUTHENTICATED) -> RequestError:
    with pytest.raises(RequestError, match=match) as info:
        auth.authenticate(md, "")
    assert info.value.code == code
    return info.value


# -- auth --------------------------------------------------------------------------------------
def test_open_auth_takes_the_request_tenant_then_the_header_then_default():
    auth = OpenAuth()
    assert auth.authenticate({"x-kvfleet-tenant": "h"}, "r") == Principal("r")
    assert auth.authenticate({"x-kvfleet-tenant": "h"}, "") == Principal("h")
    assert auth.authenticate({}, "") == Principal("default")


def test_key_auth_refuses_missing_malformed_unknown_wrong_and_revoked_keys_without_echoing_them():
    view = View()
    view.add_tenant("acme")
    good = view.add_key("acme")
    revoked = view.add_key("acme", revoked=True)
    auth = KeyAuth(view)
    refused(auth, {}, "an API key is required")
    refused(auth, {"authorization": good}, "expected 'Bearer <key>'")
    refused(auth, {"authorization": "Basic " + good}, "expected 'Bearer <key>'")
    refused(auth, {"authorization": "Bearer "}, "expected 'Bearer <key>'")
    exc = refused(auth, bearer("sk-live-secret-value"), "malformed API key")
    assert "sk-live-secret-value" not in str(exc)
    unknown, _, _ = new_key()
    exc = refused(auth, bearer(unknown), f"unknown API key {parse_key(unknown)[0]}")
    assert parse_key(unknown)[1] not in str(exc)
    key_id = parse_key(good)[0]
    wrong = f"kvf_{key_id}_{'x' * 43}"
    exc = refused(auth, bearer(wrong), "wrong secret")
    assert "x" * 43 not in str(exc)
    refused(auth, bearer(revoked), "was revoked")
    assert auth.authenticate(bearer(good), "") == Principal("acme", key_id, False)


def test_with_auth_the_key_decides_the_tenant_whatever_the_request_names():
    view = View()
    view.add_tenant("acme")
    key = view.add_key("acme")
    p = KeyAuth(view).authenticate({**bearer(key), "x-kvfleet-tenant": "other", "x-kvfleet-batch-item": "j/1"}, "other")
    assert (p.tenant, p.internal) == ("acme", False)


def test_a_key_of_a_deleted_tenant_is_refused():
    view = View()
    view.add_tenant("gone")
    key = view.add_key("gone")
    del view.tenants["gone"]
    refused(KeyAuth(view), bearer(key), "tenant 'gone', which was deleted")


def test_the_internal_key_names_the_tenant_in_metadata():
    view = View()
    key = view.add_key("kvfleet-batch", internal=True)
    auth = KeyAuth(view)
    key_id = parse_key(key)[0]
    assert auth.authenticate({**bearer(key), "x-kvfleet-tenant": "acme"}, "ignored") == Principal("acme", key_id, True)
    assert auth.authenticate(bearer(key), "ignored") == Principal("kvfleet-batch", key_id, True)
    refused(auth, {**bearer(key), "x-kvfleet-tenant": "Not Valid"}, "x-kvfleet-tenant", grpc.StatusCode.INVALID_ARGUMENT)


# -- quotas ------------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def quotas(view: View, me: str = "r1:1") -> tuple[Quotas, Clock]:
    clock = Clock()
    return Quotas(view, me, clock), clock


async def over(q: Quotas, tenant: str, tier: int, prompt: int, max_tokens: int, match: str) -> RequestError:
    with pytest.raises(RequestError, match=match) as info:
        await q.admit(Principal(tenant), tier, prompt, max_tokens)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    return info.value


def retry_ms(exc: RequestError) -> int | None:
    return next((int(v) for k, v in exc.trailers if k == "retry-after-ms"), None)


def test_split_gives_integer_shares_that_add_up_to_the_limit():
    for limit in (0, 1, 2, 5, 10, 999):
        for n in (1, 2, 3, 7):
            shares = [split(limit, n, r) for r in range(n)]
            assert sum(shares) == limit
            assert max(shares) - min(shares) <= 1
    assert [split(10, 3, r) for r in range(3)] == [4, 3, 3]
    assert [split(1, 2, r) for r in range(2)] == [1, 0]


async def test_no_record_or_no_limits_for_the_tier_is_unlimited():
    view = View()
    view.add_tenant("acme", priority=TierQuota(requests_per_min=1))
    q, _ = quotas(view)
    for _ in range(100):
        (await q.admit(Principal("stranger"), DEFAULT, 10, 10)).done(10, 10)
        (await q.admit(Principal("acme"), DEFAULT, 10, 10)).done(10, 10)
    await q.admit(Principal("acme"), PRIORITY, 1, 1)
    await over(q, "acme", PRIORITY, 1, 1, "tenant acme over its tier priority requests-per-minute quota")


async def test_requests_per_minute_is_a_sliding_60_s_window_with_an_exact_retry_hint():
    view = View()
    view.add_tenant("acme", default=TierQuota(requests_per_min=3))
    q, clock = quotas(view)
    for dt in (0, 10, 20):
        clock.t = 1000 + dt
        (await q.admit(Principal("acme"), AUTO, 5, 5)).done(5, 5)  # auto means default
    clock.t = 1030
    exc = await over(q, "acme", DEFAULT, 5, 5, r"requests-per-minute quota \(3/min\)")
    assert retry_ms(exc) == 30_000  # the admit at t=1000 leaves the window at t=1060
    clock.t = 1000 + WINDOW_S - 0.001
    await over(q, "acme", DEFAULT, 5, 5, "requests-per-minute")
    clock.t = 1000 + WINDOW_S
    await q.admit(Principal("acme"), DEFAULT, 5, 5)
    exc = await over(q, "acme", DEFAULT, 5, 5, "requests-per-minute")
    assert retry_ms(exc) == 10_000  # next to leave: the admit at t=1010


async def test_tokens_are_reserved_at_admit_and_settled_to_actual_use():
    view = View()
    view.add_tenant("acme", default=TierQuota(tokens_per_min=1000))
    q, clock = quotas(view)
    first = await q.admit(Principal("acme"), DEFAULT, 100, 500)      # reserves 600
    exc = await over(q, "acme", DEFAULT, 100, 500, r"tokens-per-minute quota \(1000/min\): 600 used or reserved")
    assert retry_ms(exc) == 60_000
    first.done(100, 50)                                              # used 150: 450 freed
    second = await q.admit(Principal("acme"), DEFAULT, 100, 500)     # 150 + 600 = 750
    await over(q, "acme", DEFAULT, 100, 200, "750 used or reserved")  # 750 + 300 > 1000
    second.done(100, 500)
    clock.t += 20
    await q.admit(Principal("acme"), DEFAULT, 50, 50)                # 750 + 100 = 850
    clock.t += WINDOW_S - 20                                         # the first two leave
    await q.admit(Principal("acme"), DEFAULT, 400, 400)              # 100 + 800 = 900


async def test_a_request_bigger_than_the_whole_token_quota_is_refused_without_a_retry_hint():
    view = View()
    view.add_tenant("acme", default=TierQuota(tokens_per_min=100))
    q, _ = quotas(view)
    exc = await over(q, "acme", DEFAULT, 20, 200, r"this request alone reserves 220 tokens .*lower max_tokens")
    assert retry_ms(exc) is None


async def test_concurrent_requests_are_released_by_done_once():
    view = View()
    view.add_tenant("acme", flex=TierQuota(concurrent=2))
    q, _ = quotas(view)
    a = await q.admit(Principal("acme"), cpb.TIER_FLEX, 1, 1)
    await q.admit(Principal("acme"), cpb.TIER_FLEX, 1, 1)
    exc = await over(q, "acme", cpb.TIER_FLEX, 1, 1, r"tier flex concurrent-requests quota \(2\): 2 running")
    assert retry_ms(exc) is None
    a.done(1, 1)
    a.done(1, 1)  # a second done must not free a second slot
    await q.admit(Principal("acme"), cpb.TIER_FLEX, 1, 1)
    await over(q, "acme", cpb.TIER_FLEX, 1, 1, "concurrent-requests")


async def test_each_router_enforces_its_share_and_the_shares_add_up_to_the_quota():
    view = View()
    view.add_tenant("acme", default=TierQuota(requests_per_min=5, concurrent=3))
    for addr in ("r1:1", "r2:1"):
        view.add_router(addr)
    admitted = 0
    for me in ("r1:1", "r2:1"):
        q, _ = quotas(view, me)
        for _ in range(5):
            try:
                (await q.admit(Principal("acme"), DEFAULT, 1, 1)).done(1, 1)
                admitted += 1
            except RequestError as exc:
                assert "requests-per-minute quota (5/min across 2 routers" in str(exc)
    assert admitted == 5  # 3 on the first router in address order, 2 on the second
    q, _ = quotas(view, "r2:1")
    await q.admit(Principal("acme"), DEFAULT, 1, 1)
    await over(q, "acme", DEFAULT, 1, 1, r"concurrent-requests quota \(3 across 2 routers, 1 on this one\)")


async def test_a_router_not_yet_registered_counts_itself():
    view = View()
    view.add_tenant("acme", default=TierQuota(requests_per_min=4))
    view.add_router("other:1")
    q, _ = quotas(view, "me:1")
    assert q.routers() == (2, 1)
    await q.admit(Principal("acme"), DEFAULT, 1, 1)
    await q.admit(Principal("acme"), DEFAULT, 1, 1)
    await over(q, "acme", DEFAULT, 1, 1, "across 2 routers, 2 on this one")


async def test_a_request_bigger_than_the_router_share_runs_when_its_window_is_empty():
    view = View()
    view.add_tenant("acme", default=TierQuota(tokens_per_min=1000))
    for addr in ("a:1", "b:1", "c:1", "d:1"):
        view.add_router(addr)
    q, _ = quotas(view, "a:1")  # share 250
    t = await q.admit(Principal("acme"), DEFAULT, 200, 200)
    await over(q, "acme", DEFAULT, 10, 10, "tokens-per-minute quota")
    t.done(0, 0)
    await q.admit(Principal("acme"), DEFAULT, 10, 10)


async def test_a_refunded_request_counts_against_no_limit():
    view = View()
    view.add_tenant("acme", default=TierQuota(requests_per_min=1, tokens_per_min=100, concurrent=1))
    q, _ = quotas(view)
    t = await q.admit(Principal("acme"), DEFAULT, 40, 40)
    await over(q, "acme", DEFAULT, 1, 1, "concurrent-requests")
    t.refund()
    t.refund()
    t = await q.admit(Principal("acme"), DEFAULT, 40, 40)  # requests, tokens and the slot all came back
    t.done(40, 40)
    t.refund()  # after done: nothing to give back
    await over(q, "acme", DEFAULT, 1, 1, "requests-per-minute")


async def test_the_shared_view_follows_etcd_until_its_last_user_closes_it():
    from types import SimpleNamespace

    from kvfleet.controller.tenancy import TenancyView

    async def get(start, end):  # noqa: ARG001 - an empty registry at revision 5
        return SimpleNamespace(kvs=[], header=SimpleNamespace(revision=5))

    async def watch(*args, **kw):  # noqa: ARG001 - nothing ever changes
        await asyncio.Event().wait()
        yield

    client = SimpleNamespace(kv=SimpleNamespace(get=get), watch=SimpleNamespace(watch=watch))
    view = TenancyView(SimpleNamespace(client=client, _key=lambda kind, ident="": f"/p/{kind}/{ident}".encode()))
    await view.start()   # the router's auth
    await view.start()   # its quotas
    task = view._task
    await view.close()
    assert not task.done() and view.synced.is_set()
    await view.close()
    assert task.done() and not view.synced.is_set()
