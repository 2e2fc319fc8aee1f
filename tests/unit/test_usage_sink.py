"""The router's usage sink against a fake etcd: group commit, bounded retry, flush on close."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from kvfleet.controller.router.errors import RequestError
from kvfleet.controller.router.usage import EtcdUsageSink, UsageRecord, decode_record, inbox_key


class FakeKV:
    """Just enough of etcd3aio's KV: transactions of puts, each taking ``latency_s``."""

    def __init__(self, latency_s: float = 0.01) -> None:
        self.latency_s = latency_s
        self.data: dict[bytes, bytes] = {}
        self.txn_sizes: list[int] = []
        self.down = False

    @staticmethod
    def txn_op_put(key: bytes, value: bytes):
        return (key, value)

    async def txn(self, compare, success, **kw):
        await asyncio.sleep(self.latency_s)
        if self.down:
            raise ConnectionError("etcd unreachable")
        keys = [k for k, _ in success]
        assert len(keys) == len(set(keys)), "etcd rejects a key named twice in one txn"
        assert len(keys) <= 128
        self.txn_sizes.append(len(success))
        self.data.update(success)

    async def get(self, key, **kw):
        class R:
            kvs = []
        return R()


class FakeClient:
    def __init__(self, **kw) -> None:
        self.kv = FakeKV(**kw)


def rec(i: int, tenant: str = "t", request_id: str | None = None, cached: int = 0) -> UsageRecord:
    return UsageRecord(request_id=request_id or f"r{i}", tenant=tenant, model="m", tier=2, node_id="n", prompt_tokens=10,
                       cached_prompt_tokens=cached, completion_tokens=2, finish_reason=1, unix_ms=1)


async def test_records_queued_during_a_txn_go_together_in_the_next():
    client = FakeClient(latency_s=0.02)
    sink = EtcdUsageSink(client, "/kvfleet")
    await asyncio.gather(*(sink.record(rec(i)) for i in range(450)))
    sizes = client.kv.txn_sizes
    assert sum(sizes) == 450 and max(sizes) <= 100
    assert len(sizes) <= 6          # 450 concurrent records: a handful of transactions, not 450
    assert decode_record(client.kv.data[inbox_key("/kvfleet", "t", "r7")]) == rec(7)
    await sink.close()


async def test_keys_escape_slashes_and_repeated_ids_share_one_key():
    client = FakeClient()
    sink = EtcdUsageSink(client, "/kvfleet")
    assert inbox_key("/kvfleet", "a/b", "x/y%") == b"/kvfleet/usage/inbox/a%2Fb/x%2Fy%25"
    await asyncio.gather(sink.record(rec(1, cached=0)), sink.record(rec(1, cached=5)), sink.record(rec(1, tenant="u")))
    assert len(client.kv.data) == 2
    assert decode_record(client.kv.data[inbox_key("/kvfleet", "t", "r1")]).cached_prompt_tokens == 5  # the later wins
    await sink.close()


async def test_a_failing_etcd_fails_the_request_unavailable_after_the_timeout():
    client = FakeClient()
    client.kv.down = True
    sink = EtcdUsageSink(client, "/kvfleet", timeout_s=0.3)
    t0 = asyncio.get_running_loop().time()
    with pytest.raises(RequestError) as exc:
        await sink.record(rec(1))
    assert exc.value.code == grpc.StatusCode.UNAVAILABLE
    assert "not billed" in str(exc.value)
    assert 0.3 <= asyncio.get_running_loop().time() - t0 < 2.0
    assert client.kv.data == {}
    await sink.close()


async def test_a_brief_etcd_outage_only_delays_the_record():
    client = FakeClient()
    client.kv.down = True
    sink = EtcdUsageSink(client, "/kvfleet", timeout_s=5.0)
    task = asyncio.create_task(sink.record(rec(1)))
    await asyncio.sleep(0.3)
    assert not task.done()
    client.kv.down = False
    await asyncio.wait_for(task, 3.0)
    assert len(client.kv.data) == 1
    await sink.close()


async def test_a_cancelled_request_still_has_its_record_written_and_close_flushes():
    client = FakeClient(latency_s=0.05)
    sink = EtcdUsageSink(client, "/kvfleet")
    tasks = [asyncio.create_task(sink.record(rec(i))) for i in range(20)]
    await asyncio.sleep(0.01)
    for t in tasks[10:]:
        t.cancel()
    await sink.close()
    assert len(client.kv.data) == 20
    with pytest.raises(RequestError):
        await sink.record(rec(99))
