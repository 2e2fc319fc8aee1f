"""The Batch gRPC edge in-process (real gRPC, a fake registry): tenants with auth on and off,
chunked uploads beyond gRPC's 4 MiB message limit, statuses."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import grpc
import pytest

from kvfleet.controller.batch.service import BatchService
from kvfleet.controller.batch.store import BatchStore
from kvfleet.controller.router.auth import KeyAuth
from kvfleet.controller.tenancy import ApiKey, Tenant, new_key
from kvfleet.v1 import batch_pb2 as pb
from kvfleet.v1 import batch_pb2_grpc as pbg


@dataclass
class _Model:
    name: str


@dataclass
class _Node:
    models: list


class FakeRegistry:
    async def list_nodes(self):
        return [_Node([_Model("m")])]


@dataclass
class FakeView:
    keys: dict = field(default_factory=dict)
    tenants: dict = field(default_factory=dict)

    def add(self, tenant: str) -> str:
        plaintext, key_id, digest = new_key()
        self.keys[key_id] = ApiKey(key_id=key_id, tenant=tenant, secret_sha256=digest, created_unix_ms=1)
        self.tenants[tenant] = Tenant(name=tenant, created_unix_ms=1)
        return plaintext


def _line(cid: str, pad: int = 0) -> str:
    return json.dumps({"custom_id": cid, "url": "/v1/completions",
                       "body": {"model": "m", "prompt": "p" + "x" * pad, "max_tokens": 1}})


def _chunks(data: bytes, tenant: str = "", window: str = "", size: int = 1 << 20):
    out = [pb.SubmitBatchChunk(data=data[i:i + size]) for i in range(0, len(data), size)] or [pb.SubmitBatchChunk()]
    out[0].tenant, out[0].completion_window = tenant, window
    return out


async def _serve(tmp_path, auth=None):
    server = grpc.aio.server()
    store = BatchStore.in_data_dir(tmp_path)
    pbg.add_BatchServicer_to_server(BatchService(store, None, FakeRegistry(), auth), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, grpc.aio.insecure_channel(f"127.0.0.1:{port}")


async def test_auth_off_the_chunk_names_the_tenant_and_large_files_stream_in_chunks(tmp_path):
    server, ch = await _serve(tmp_path)
    try:
        stub = pbg.BatchStub(ch)
        lines = [_line(f"c{i}", pad=500) for i in range(12_000)]   # ~6.3 MB: more than one gRPC message may carry
        data = "\n".join(lines).encode()
        assert len(data) > 4 * 1024 * 1024
        job = await stub.Submit(iter(_chunks(data, tenant="acme", window="2h")))
        assert (job.tenant, job.counts.total, job.completion_window_s) == ("acme", 12_000, 7200)
        assert [j.id for j in (await stub.ListJobs(pb.ListBatchJobsRequest(tenant="acme"))).jobs] == [job.id]
        assert (await stub.ListJobs(pb.ListBatchJobsRequest(tenant="other"))).jobs == []
        default = await stub.Submit(iter(_chunks(_line("x").encode())))
        assert default.tenant == "default"
    finally:
        await ch.close()
        await server.stop(None)


async def test_auth_on_the_key_decides_the_tenant_and_hides_other_tenants_jobs(tmp_path):
    view = FakeView()
    key_a, key_b = view.add("team-a"), view.add("team-b")
    server, ch = await _serve(tmp_path, KeyAuth(view))
    a = (("authorization", f"Bearer {key_a}"),)
    b = (("authorization", f"Bearer {key_b}"),)
    try:
        stub = pbg.BatchStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Submit(iter(_chunks(_line("c").encode())))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "API key" in e.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.ListJobs(pb.ListBatchJobsRequest(), metadata=(("authorization", "Bearer nope"),))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        job = await stub.Submit(iter(_chunks(_line("c").encode(), tenant="team-b")), metadata=a)
        assert job.tenant == "team-a"   # the chunk's tenant is ignored with auth on
        assert (await stub.GetJob(pb.BatchJobRef(job_id=job.id), metadata=a)).id == job.id
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.GetJob(pb.BatchJobRef(job_id=job.id), metadata=b)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Cancel(pb.BatchJobRef(job_id=job.id), metadata=b)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert [j.id for j in (await stub.ListJobs(pb.ListBatchJobsRequest(tenant="team-a"), metadata=b)).jobs] == []
        assert [j.id for j in (await stub.ListJobs(pb.ListBatchJobsRequest(), metadata=a)).jobs] == [job.id]
        cancelled = await stub.Cancel(pb.BatchJobRef(job_id=job.id), metadata=a)
        assert cancelled.state == pb.BATCH_JOB_STATE_CANCELLING
    finally:
        await ch.close()
        await server.stop(None)


async def test_statuses_for_bad_submissions_and_unknown_jobs(tmp_path):
    server, ch = await _serve(tmp_path)
    try:
        stub = pbg.BatchStub(ch)
        for chunks, needle in ((_chunks(b""), "empty"), (_chunks(b"\n\n"), "empty"),
                               (_chunks(_line("c").encode(), window="0s"), "completion window"),
                               (_chunks(_line("c").encode(), window="tomorrow"), "completion window")):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Submit(iter(chunks))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in e.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Cancel(pb.BatchJobRef(job_id="batch_none"))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in stub.Errors(pb.BatchJobRef(job_id="batch_none")):
                pass
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await ch.close()
        await server.stop(None)
