"""`kvfleet up`: the one-command local cluster, its demo, clean stop and restart."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import time

import pytest

from .conftest import KVFLEET, wait_for

pytestmark = pytest.mark.integration


def port_base() -> int:
    for _ in range(50):
        base = random.randrange(20000, 40000)
        try:
            for off in list(range(5)) + list(range(10, 14)):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + off))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port range")


def cli(base: int, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, KVFLEET_CONTROLLER=f"127.0.0.1:{base}", KVFLEET_ROUTER=f"127.0.0.1:{base + 1}")
    return subprocess.run(KVFLEET + list(args), capture_output=True, text=True, env=env, timeout=60)


def start_up(base: int, data, log) -> subprocess.Popen:
    fh = open(log, "w")
    p = subprocess.Popen(KVFLEET + ["up", "--nodes", "2", "--port-base", str(base), "--data-dir", str(data)],
                         stdout=fh, stderr=subprocess.STDOUT, env=dict(os.environ, COLUMNS="200"))
    wait_for(lambda: "Serving" in log.read_text() or p.poll() is not None, 90, what="up to serve")
    assert p.poll() is None, log.read_text()
    return p


def stop_up(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGINT)
    p.wait(timeout=60)


def test_up_demo_shows_prefix_routing_and_exits_cleanly(tmp_path):
    base = port_base()
    r = subprocess.run(KVFLEET + ["up", "--nodes", "3", "--port-base", str(base), "--data-dir", str(tmp_path),
                                  "--demo", "--exit-after-demo"],
                       capture_output=True, text=True, timeout=180, env=dict(os.environ, COLUMNS="200"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Prefix-aware routing" in r.stdout
    assert "stopped." in r.stdout
    # Every child is gone: nothing listens on the cluster's ports any more (SO_REUSEADDR
    # skips client sockets in TIME_WAIT but still fails against a listener).
    for off in (0, 1, 2, 10, 11, 12):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", base + off))


def test_second_up_on_the_same_data_dir_keeps_node_ids_tokens_and_admin_state(tmp_path):
    base = port_base()
    p = start_up(base, tmp_path / "data", tmp_path / "up1.log")
    try:
        nodes = json.loads(cli(base, "nodes", "list", "--json").stdout)
        ids = sorted(n["node_id"] for n in nodes)
        assert len(ids) == 2
        assert cli(base, "nodes", "cordon", ids[0]).returncode == 0
        tokens = json.loads(cli(base, "tokens", "list", "--json").stdout)
        r = cli(base, "generate", "hello", "--json")
        assert r.returncode == 0, r.stderr
    finally:
        stop_up(p)
    p = start_up(base, tmp_path / "data", tmp_path / "up2.log")
    try:
        nodes2 = json.loads(cli(base, "nodes", "list", "--json").stdout)
        assert sorted(n["node_id"] for n in nodes2) == ids
        assert {n["node_id"]: n["state"] for n in nodes2}[ids[0]] == "cordoned"
        assert json.loads(cli(base, "tokens", "list", "--json").stdout) == tokens
    finally:
        stop_up(p)
