"""Integration fixtures: a real etcd, a real controller process, real node agent processes.

Everything binds 127.0.0.1 on free ports; every process is stopped at teardown.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import namedtuple
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from kvfleet.cli.up import etcd_command
from kvfleet.v1 import controller_pb2 as cpb
from kvfleet.v1 import controller_pb2_grpc as cpbg
from kvfleet.v1 import inference_pb2 as ipb
from kvfleet.v1 import inference_pb2_grpc as ipbg
from kvfleet.v1 import node_pb2 as npb
from kvfleet.v1 import node_pb2_grpc as npbg
from kvfleet.v1 import tenancy_pb2 as tpb
from kvfleet.v1 import tenancy_pb2_grpc as tpbg

pytestmark = pytest.mark.integration

KVFLEET = [sys.executable, "-m", "kvfleet.cli.main"]
LEASE_TTL = 3
FIRST_TOKEN_TIMEOUT = 1.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            try:
                os.kill(self.popen.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def spawn(name: str, args: list[str], tmp: Path) -> Proc:
    log = tmp / f"{name}.log"
    fh = open(log, "ab")
    p = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return Proc(name, p, log)


@dataclass
class Etcd:
    endpoint: str
    proc: Proc


def start_etcd(tmp: Path) -> Etcd:
    client, peer = free_port(), free_port()
    proc = spawn("etcd", etcd_command("t", tmp / "etcd-data", f"127.0.0.1:{client}", f"127.0.0.1:{peer}"), tmp)
    return Etcd(f"127.0.0.1:{client}", proc)


@dataclass
class Cluster:
    tmp: Path
    etcd: Etcd
    controller: str
    router: str
    controller_proc: Proc
    token: str = ""
    nodes: dict[str, Proc] = field(default_factory=dict)      # node_id -> process
    node_addr: dict[str, str] = field(default_factory=dict)   # node_id -> address
    extra: list[Proc] = field(default_factory=list)
    api_key: str = ""   # start_cluster(auth=True): inf() sends it as the bearer token

    # -- clients -----------------------------------------------------------------------
    def ctl(self) -> cpbg.ControllerStub:
        return cpbg.ControllerStub(grpc.insecure_channel(self.controller))

    def inf(self) -> ipbg.InferenceStub:
        ch = grpc.insecure_channel(self.router)
        if self.api_key:
            ch = grpc.intercept_channel(ch, BearerKey(self.api_key))
        return ipbg.InferenceStub(ch)

    def node_stub(self, node_id: str) -> npbg.NodeAgentStub:
        return npbg.NodeAgentStub(grpc.insecure_channel(self.node_addr[node_id]))

    def list_nodes(self) -> list[cpb.NodeRecord]:
        return list(self.ctl().ListNodes(cpb.ListNodesRequest(), timeout=10).nodes)

    def node_info(self, node_id: str) -> npb.NodeInfoResponse:
        return self.node_stub(node_id).GetInfo(npb.GetInfoRequest(), timeout=5)

    def generate(self, text: str, max_tokens: int = 8, **kw) -> tuple[str, ipb.Usage]:
        req = ipb.GenerateRequest(model=kw.pop("model", "kvfleet-sim"), text=text, **kw)
        req.sampling.max_tokens = max_tokens
        out, usage = [], None
        for msg in self.inf().Generate(req, timeout=60):
            if msg.HasField("chunk"):
                out.append(msg.chunk.text)
            else:
                usage = msg.usage
        assert usage is not None
        return "".join(out), usage

    def explain(self, text: str) -> ipb.ExplainRouteResponse:
        req = ipb.GenerateRequest(model="kvfleet-sim", text=text)
        req.sampling.max_tokens = 1
        return self.inf().ExplainRoute(req, timeout=10)

    def live_nodes(self) -> list[str]:
        return sorted(n for n, p in self.nodes.items() if p.alive())

    def routable(self, node_id: str) -> bool:
        try:
            return any(c.node_id == node_id and c.eligible for c in self.explain("x").candidates)
        except grpc.RpcError:
            return False

    def cli(self, *args: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
        env = dict(os.environ, KVFLEET_CONTROLLER=self.controller, KVFLEET_ROUTER=self.router, COLUMNS="200")
        r = subprocess.run(KVFLEET + list(args), capture_output=True, text=True, env=env, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"kvfleet {' '.join(args)} failed ({r.returncode}): {r.stderr}")
        return r

    # -- nodes -------------------------------------------------------------------------
    def start_node(self, name: str, *extra: str, data_dir: Path | None = None, token: str | None = None) -> tuple[str, Proc]:
        port = free_port()
        data = data_dir or self.tmp / "nodes" / name
        proc = spawn(name, KVFLEET + [
            "node", "join", "--controller", self.controller, "--token", self.token if token is None else token,
            "--listen", f"127.0.0.1:{port}", "--data-dir", str(data), *extra,
        ], self.tmp)
        self.extra.append(proc)

        def joined():
            if not proc.alive():
                raise AssertionError(f"{name} exited: {proc.output()[-2000:]}")
            for line in proc.output().splitlines():
                if '"node_ready"' in line:
                    return json.loads(line[line.index("{"):])
            return None

        ready = wait_for(joined, 30, what=f"{name} to join")
        node_id = ready["node_id"]
        self.nodes[node_id] = proc
        self.node_addr[node_id] = ready["address"]
        # Routable once the router holds its state stream.
        wait_for(lambda: self.routable(node_id), 15, what=f"{node_id} routable")
        return node_id, proc

    def create_token(self, ttl_s: int = 0) -> str:
        return self.ctl().CreateJoinToken(cpb.CreateJoinTokenRequest(ttl_s=ttl_s, description="test"), timeout=10).token

    def stop(self) -> None:
        for p in self.extra:
            p.stop()
        self.controller_proc.stop()
        self.etcd.proc.stop()


class _CallDetails(namedtuple("_CallDetails", "method timeout metadata credentials wait_for_ready compression"),
                   grpc.ClientCallDetails):
    pass


class BearerKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds ``authorization: Bearer <key>`` to every call on a channel."""

    def __init__(self, key: str) -> None:
        self.md = (("authorization", f"Bearer {key}"),)

    def _with_key(self, d):
        return _CallDetails(d.method, d.timeout, tuple(d.metadata or ()) + self.md, d.credentials,
                            d.wait_for_ready, d.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_key(details), request)


def start_cluster(tmp: Path, n_nodes: int, node_args: tuple[str, ...] = (),
                  first_token_timeout: float = FIRST_TOKEN_TIMEOUT, auth: bool = False,
                  lease_ttl: int = LEASE_TTL) -> Cluster:
    """etcd, a controller with its router, and ``n_nodes`` sim nodes. ``auth``: the router
    requires API keys; the cluster then holds one (tenant ``test``) for its own calls."""
    etcd = start_etcd(tmp)
    controller, router = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    cproc = spawn("controller", KVFLEET + [
        "controller", "run", "--etcd", etcd.endpoint, "--listen", controller, "--router-listen", router,
        "--lease-ttl", str(lease_ttl), "--first-token-timeout", str(first_token_timeout),
        "--data-dir", str(tmp / "controller-data"), *(() if auth else ("--no-auth",)),
    ], tmp)
    c = Cluster(tmp, etcd, controller, router, cproc)
    try:
        def controller_ready() -> bool:
            if not cproc.alive():
                raise AssertionError(f"controller exited: {cproc.output()[-3000:]}")
            return '"controller_ready"' in cproc.output()

        wait_for(controller_ready, 60, what="controller")
        c.token = c.create_token()
        if auth:
            tenants = tpbg.TenantsStub(grpc.insecure_channel(controller))
            tenants.CreateTenant(tpb.CreateTenantRequest(name="test"), timeout=10)
            c.api_key = tenants.CreateKey(tpb.CreateKeyRequest(tenant="test"), timeout=10).key
        for i in range(n_nodes):
            c.start_node(f"node{i}", *node_args)
    except BaseException:
        c.stop()
        raise
    return c


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Cluster:
    """Three sim nodes behind a controller with its router, on a real etcd."""
    c = start_cluster(tmp_path_factory.mktemp("cluster"), 3, ("--sim-prefill-tps", "4000"))
    yield c
    c.stop()
