"""The Batch API end to end: a real etcd, the controller (store + runner), a separate router
process and sim nodes. A 1,000-item job survives SIGKILL of the controller and of a router
mid-run with exactly one result or error per custom_id; compared with the same requests sent
interactively, shuffled."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import grpc
import pytest

from kvfleet.controller.batch.workload import run_interactive, shared_prefix_lines, to_jsonl
from kvfleet.v1 import batch_pb2 as bpb
from kvfleet.v1 import batch_pb2_grpc as bpbg

from .conftest import KVFLEET, Cluster, free_port, spawn, start_etcd, wait_for

pytestmark = pytest.mark.integration

# Fast sim, small KV cache (384 blocks of 16 = 6,144 tokens per node: about five of the
# workload's 1 KiB system prompts), so the order in which requests arrive decides hit rates.
NODE_ARGS = ("--sim-prefill-tps", "20000", "--sim-decode-step-ms", "2", "--sim-blocks", "384", "--sim-max-model-len", "4096")
GROUPS, PER_GROUP, PREFIX, SUFFIX, MAX_TOKENS = 50, 20, 1024, 32, 4
INFLIGHT_PER_NODE = 3   # BatchConfig's default: the interactive baseline uses the same concurrency

BAD_LINES = {   # line number in the file -> the error code it must get
    3: ("{not json", "invalid_json", ""),
    10: (json.dumps({"method": "POST", "url": "/v1/chat/completions",
                     "body": {"model": "kvfleet-sim", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}}),
         "missing_custom_id", ""),
    20: (None, "duplicate_custom_id", "DUP"),   # filled in: a copy of line 1's custom_id
    30: (json.dumps({"custom_id": "bad-model", "url": "/v1/chat/completions",
                     "body": {"model": "no-such-model", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}}),
         "unknown_model", "bad-model"),
    40: (json.dumps({"custom_id": "bad-url", "url": "/v1/embeddings", "body": {"model": "kvfleet-sim", "input": "x"}}),
         "unsupported_url", "bad-url"),
    50: (json.dumps({"custom_id": "no-max", "url": "/v1/completions", "body": {"model": "kvfleet-sim", "prompt": "x"}}),
         "missing_max_tokens", "no-max"),
}


class BatchCluster:
    """Controller (with its own router) + a separate router process + sim nodes, auth off."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.etcd = start_etcd(tmp)
        self.controller = f"127.0.0.1:{free_port()}"
        self.inproc_router = f"127.0.0.1:{free_port()}"
        self.router = f"127.0.0.1:{free_port()}"
        self.starts = 0
        self.router_proc = None
        self.cluster = Cluster(tmp, self.etcd, self.controller, self.router, self.start_controller())
        self.cluster.token = self.cluster.create_token()
        self.start_router()
        for i in range(3):
            self.cluster.start_node(f"node{i}", *NODE_ARGS)

    def start_controller(self):
        self.starts += 1
        proc = spawn(f"controller{self.starts}", KVFLEET + [
            "controller", "run", "--etcd", self.etcd.endpoint, "--listen", self.controller,
            "--router-listen", self.inproc_router, "--lease-ttl", "5", "--first-token-timeout", "3",
            "--data-dir", str(self.tmp / "controller-data"), "--no-auth",
        ], self.tmp)

        def ready():
            if not proc.alive():
                raise AssertionError(f"controller exited: {proc.output()[-3000:]}")
            return '"controller_ready"' in proc.output()

        wait_for(ready, 60, what="controller")
        return proc

    def restart_controller(self) -> None:
        self.cluster.controller_proc.stop(signal.SIGKILL)
        self.cluster.controller_proc = self.start_controller()

    def start_router(self) -> None:
        self.starts += 1
        proc = spawn(f"router{self.starts}", KVFLEET + [
            "router", "run", "--etcd", self.etcd.endpoint, "--listen", self.router, "--first-token-timeout", "3", "--no-auth",
        ], self.tmp)
        self.cluster.extra.append(proc)

        def ready():
            if not proc.alive():
                raise AssertionError(f"router exited: {proc.output()[-3000:]}")
            return '"router_ready"' in proc.output()

        wait_for(ready, 60, what="router")
        self.router_proc = proc

    def stub(self) -> bpbg.BatchStub:
        return bpbg.BatchStub(grpc.insecure_channel(self.controller))

    def submit(self, data: bytes, window: str = "", **kw) -> bpb.BatchJob:
        chunks = [bpb.SubmitBatchChunk(data=data[i:i + 65536]) for i in range(0, len(data), 65536)] or [bpb.SubmitBatchChunk()]
        chunks[0].completion_window = window
        chunks[0].filename = kw.get("filename", "test.jsonl")
        return self.stub().Submit(iter(chunks), timeout=60)

    def job(self, job_id: str) -> bpb.BatchJob:
        return self.stub().GetJob(bpb.BatchJobRef(job_id=job_id), timeout=10)

    def done(self, job_id: str) -> int:
        try:
            return self.job(job_id).counts.completed
        except grpc.RpcError:   # the controller is restarting
            return -1

    def stop(self) -> None:
        self.cluster.stop()


@pytest.fixture(scope="module")
def bc(tmp_path_factory):
    c = BatchCluster(tmp_path_factory.mktemp("batch"))
    yield c
    c.stop()


def _file_with_bad_lines(lines: list[dict]) -> tuple[bytes, dict[int, tuple[str, str]]]:
    out: list[str] = [json.dumps(x) for x in lines]
    expected = {}
    for number in sorted(BAD_LINES):
        raw, code, cid = BAD_LINES[number]
        if raw is None:
            first = json.loads(out[0])
            cid = first["custom_id"]
            raw = json.dumps(first)
        out.insert(number - 1, raw)
        expected[number] = (code, cid)
    return ("\n".join(out) + "\n").encode(), expected


def test_thousand_item_job_survives_controller_and_router_sigkill_with_one_outcome_per_item(bc):
    lines = shared_prefix_lines(GROUPS, PER_GROUP, PREFIX, SUFFIX, MAX_TOKENS, salt=1)
    data, expected_errors = _file_with_bad_lines(lines)
    t0 = time.monotonic()
    job = bc.submit(data, window="10m")
    assert job.state == bpb.BATCH_JOB_STATE_IN_PROGRESS
    assert (job.counts.total, job.counts.rejected) == (1000, len(BAD_LINES))

    # SIGKILL the controller (store + runner + its router) mid-job, restart it on the same data dir.
    wait_for(lambda: bc.done(job.id) >= 200, 90, 0.05, "200 items done")
    before_kill = bc.done(job.id)
    bc.restart_controller()
    after_restart = bc.done(job.id)
    assert after_restart >= before_kill   # nothing recorded was lost
    # SIGKILL the separate router mid-job; the runner retries its in-flight items elsewhere.
    wait_for(lambda: bc.done(job.id) >= after_restart + 150, 90, 0.05, "progress after the controller restart")
    router_killed_at = bc.done(job.id)
    bc.router_proc.stop(signal.SIGKILL)
    time.sleep(1.0)
    bc.start_router()

    wait_for(lambda: bc.job(job.id).state == bpb.BATCH_JOB_STATE_COMPLETED, 120, 0.2, "job completed")
    batch_s = time.monotonic() - t0
    final = bc.job(job.id)
    assert before_kill < 1000 and router_killed_at < 1000, "both restarts happened mid-job"
    assert (final.counts.completed, final.counts.failed, final.counts.pending) == (1000, 0, 0)
    assert final.finished_unix_ms > 0

    # Every custom_id: exactly one result or one error; every bad line: exactly one error.
    results = list(bc.stub().Results(bpb.BatchJobRef(job_id=job.id), timeout=60))
    errors = list(bc.stub().Errors(bpb.BatchJobRef(job_id=job.id), timeout=60))
    ids = [r.custom_id for r in results]
    assert len(ids) == len(set(ids)) == 1000
    assert set(ids) == {x["custom_id"] for x in lines}
    assert {e.line: (e.code, e.custom_id) for e in errors} == expected_errors
    assert len(errors) == len(expected_errors)
    assert all(r.completion_tokens == MAX_TOKENS and r.prompt_tokens > PREFIX for r in results)
    assert all(r.request_id == f"batch-{job.id}-{r.custom_id}" for r in results)
    # Lines are numbered in the file as submitted (bad lines included).
    by_id = {r.custom_id: r.line for r in results}
    assert by_id[lines[0]["custom_id"]] == 1

    # The CLI gives the same picture.
    out = bc.tmp / "results.jsonl"
    bc.cluster.cli("batch", "results", job.id, "-o", str(out), check=True)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 1000 and all(r["response"]["status_code"] == 200 and r["error"] is None for r in rows)
    assert rows[0]["response"]["body"]["usage"]["completion_tokens"] == MAX_TOKENS
    err_rows = [json.loads(x) for x in bc.cluster.cli("batch", "errors", job.id, check=True).stdout.splitlines()]
    assert sorted((r["line"], r["error"]["code"]) for r in err_rows) == sorted((k, v[0]) for k, v in expected_errors.items())
    status = json.loads(bc.cluster.cli("batch", "status", job.id, "--json", check=True).stdout)
    assert status["state"] == "completed" and status["counts"]["completed"] == 1000

    # The same requests (fresh prefixes: cold caches) sent interactively, shuffled, same concurrency.
    batch_prompt = sum(r.prompt_tokens for r in results)
    batch_cached = sum(r.cached_prompt_tokens for r in results)
    interactive = asyncio.run(run_interactive(
        bc.router, shared_prefix_lines(GROUPS, PER_GROUP, PREFIX, SUFFIX, MAX_TOKENS, salt=2), concurrency=3 * INFLIGHT_PER_NODE))
    assert interactive.items == 1000 and interactive.failed == 0
    batch_hit = batch_cached / batch_prompt
    print(f"\nbatch (with a controller and a router SIGKILL): 1000 items in {batch_s:.1f} s = {1000 / batch_s:.0f} items/s, "
          f"cache hit rate {batch_hit:.1%}\ninteractive, shuffled, no prefix ordering: {interactive.seconds:.1f} s = "
          f"{interactive.items_per_s:.0f} items/s, cache hit rate {interactive.hit_rate:.1%}")
    # Prefix ordering is where batch gets its low cost: most prompt tokens come from cache.
    assert batch_hit > interactive.hit_rate


def test_bad_requests_get_the_right_status(bc):
    stub = bc.stub()
    with pytest.raises(grpc.RpcError) as e:
        stub.GetJob(bpb.BatchJobRef(job_id="batch_nope"), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "batch_nope" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Results(bpb.BatchJobRef(job_id="batch_nope"), timeout=10))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        stub.GetJob(bpb.BatchJobRef(job_id=""), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for data, window, needle in ((b"", "", "empty"), (b"\n \n", "", "empty"),
                                 (to_jsonl(shared_prefix_lines(1, 1, 10, 10, 2)), "3d", "completion window")):
        with pytest.raises(grpc.RpcError) as e:
            bc.submit(data, window)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in e.value.details(), e.value.details()
    # A file with no valid line: a failed job whose every line has its error.
    job = bc.submit(b"{x\n[1]\n")
    assert job.state == bpb.BATCH_JOB_STATE_FAILED and job.counts.rejected == 2
    assert [e.code for e in stub.Errors(bpb.BatchJobRef(job_id=job.id), timeout=10)] == ["invalid_json", "invalid_request"]
    with pytest.raises(grpc.RpcError) as e:
        stub.Cancel(bpb.BatchJobRef(job_id=job.id), timeout=10)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "failed" in e.value.details()


def test_cli_errors_name_the_argument_or_flag(bc):
    r = bc.cluster.cli("batch", "submit", str(bc.tmp / "missing.jsonl"))
    assert r.returncode != 0 and "FILE" in r.stderr and "does not exist" in r.stderr
    f = bc.tmp / "one.jsonl"
    f.write_bytes(to_jsonl(shared_prefix_lines(1, 1, 10, 10, 2)))
    r = bc.cluster.cli("batch", "submit", str(f), "--window", "soon")
    assert r.returncode != 0 and "--window" in r.stderr
    r = bc.cluster.cli("batch", "results", "batch_x", "-o", str(bc.tmp / "no" / "dir.jsonl"))
    assert r.returncode != 0 and "--output" in r.stderr
    r = bc.cluster.cli("batch", "status", "batch_nope")
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr
    r = bc.cluster.cli("batch", "submit", str(f), check=True)
    job_id = r.stdout.strip()
    assert job_id.startswith("batch_")
    wait_for(lambda: json.loads(bc.cluster.cli("batch", "status", job_id, "--json").stdout)["state"] == "completed", 30)
    assert job_id in bc.cluster.cli("batch", "list", check=True).stdout


def test_cancel_ends_queued_items_and_every_item_has_one_outcome(bc):
    lines = shared_prefix_lines(10, 30, 256, 16, 32, salt=3)
    job = bc.submit(to_jsonl(lines))
    wait_for(lambda: bc.job(job.id).counts.completed >= 5, 30, 0.05, "some items done")
    cancelled = bc.stub().Cancel(bpb.BatchJobRef(job_id=job.id), timeout=10)
    assert cancelled.state in (bpb.BATCH_JOB_STATE_CANCELLING, bpb.BATCH_JOB_STATE_CANCELLED)
    wait_for(lambda: bc.job(job.id).state == bpb.BATCH_JOB_STATE_CANCELLED, 30, 0.1, "job cancelled")
    final = bc.job(job.id)
    c = final.counts
    assert c.cancelled > 0 and c.completed >= 5 and c.pending == 0
    assert c.completed + c.cancelled == 300
    res = {r.custom_id for r in bc.stub().Results(bpb.BatchJobRef(job_id=job.id), timeout=30)}
    errs = {e.custom_id for e in bc.stub().Errors(bpb.BatchJobRef(job_id=job.id), timeout=30) if e.code == "cancelled"}
    assert not res & errs and res | errs == {x["custom_id"] for x in lines}


def test_items_not_done_within_the_window_expire(bc):
    lines = shared_prefix_lines(4, 100, 512, 16, 64, salt=4)   # ~400 items of 64 tokens: more than 2 s of work
    job = bc.submit(to_jsonl(lines), window="2s")
    assert job.completion_window_s == 2
    wait_for(lambda: bc.job(job.id).state == bpb.BATCH_JOB_STATE_EXPIRED, 30, 0.1, "job expired")
    c = bc.job(job.id).counts
    assert c.expired > 0 and c.pending == 0 and c.completed + c.expired == 400
    errs = [e for e in bc.stub().Errors(bpb.BatchJobRef(job_id=job.id), timeout=30)]
    assert len(errs) == c.expired and all(e.code == "expired" and "completion window" in e.message for e in errs)


def test_with_auth_on_the_key_decides_the_tenant_and_the_runner_uses_its_internal_key(tmp_path):
    """Auth on (the default outside local mode): Submit needs a key, the job belongs to the
    key's tenant, and the runner's own internal key gets its items through the router."""
    from kvfleet.v1 import tenancy_pb2 as tpb
    from kvfleet.v1 import tenancy_pb2_grpc as tpbg

    etcd = start_etcd(tmp_path)
    controller, router = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    proc = spawn("controller", KVFLEET + [
        "controller", "run", "--etcd", etcd.endpoint, "--listen", controller, "--router-listen", router,
        "--lease-ttl", "5", "--data-dir", str(tmp_path / "controller-data"),
    ], tmp_path)
    c = Cluster(tmp_path, etcd, controller, router, proc)
    try:
        wait_for(lambda: '"controller_ready"' in proc.output() or not proc.alive(), 60, what="controller")
        assert proc.alive(), proc.output()[-3000:]
        c.token = c.create_token()
        # The router needs a key even for the readiness probe: join, then wait until the node is listed.
        port = free_port()
        node = spawn("node0", KVFLEET + ["node", "join", "--controller", controller, "--token", c.token,
                                         "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "node0"),
                                         "--sim-prefill-tps", "20000", "--sim-decode-step-ms", "2"], tmp_path)
        c.extra.append(node)
        wait_for(lambda: len(c.list_nodes()) == 1, 30, what="node joined")
        tenants = tpbg.TenantsStub(grpc.insecure_channel(controller))
        keys = {}
        for name in ("team-a", "team-b"):
            tenants.CreateTenant(tpb.CreateTenantRequest(name=name), timeout=10)
            keys[name] = tenants.CreateKey(tpb.CreateKeyRequest(tenant=name), timeout=10).key
        stub = bpbg.BatchStub(grpc.insecure_channel(controller))
        lines = shared_prefix_lines(2, 5, 64, 8, 2, salt=5)
        data = to_jsonl(lines)
        with pytest.raises(grpc.RpcError) as e:
            stub.Submit(iter([bpb.SubmitBatchChunk(data=data, tenant="team-b")]), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        md_a = (("authorization", f"Bearer {keys['team-a']}"),)
        job = stub.Submit(iter([bpb.SubmitBatchChunk(data=data, tenant="team-b")]), timeout=30, metadata=md_a)
        assert job.tenant == "team-a"
        wait_for(lambda: stub.GetJob(bpb.BatchJobRef(job_id=job.id), metadata=md_a, timeout=10).state
                 == bpb.BATCH_JOB_STATE_COMPLETED, 60, 0.2, "job completed with auth on")
        assert stub.GetJob(bpb.BatchJobRef(job_id=job.id), metadata=md_a, timeout=10).counts.completed == 10
        with pytest.raises(grpc.RpcError) as e:
            stub.GetJob(bpb.BatchJobRef(job_id=job.id), timeout=10,
                        metadata=(("authorization", f"Bearer {keys['team-b']}"),))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        # The CLI with --api-key (and KVFLEET_API_KEY) reads it back.
        r = c.cli("batch", "status", job.id, "--json", "--api-key", keys["team-a"], check=True)
        assert json.loads(r.stdout)["tenant"] == "team-a"
        r = c.cli("batch", "status", job.id)
        assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr
    finally:
        c.stop()
