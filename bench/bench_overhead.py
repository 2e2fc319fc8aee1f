"""The router's live overhead against the floor of any Python gRPC relay, in one call.

Five relays, each a real process between a real client and real upstream processes on
127.0.0.1, measured the same way:

* ``floor-call``: a bare ``grpc.aio`` relay, one upstream call per request (what the router
  did before ``NodeAgent.Serve``): a server streaming K raw-byte messages, the relay
  forwarding each, no routing, no protobuf, no bookkeeping;
* ``floor-mux``: the same over one multiplexed upstream stream, the upstream batching the
  messages that are ready at once (what the router does with ``Generate``);
* ``floor-mux2``: multiplexed on the client's side too: the client's requests on one stream,
  their outputs batched back as they arrive (what the router does with ``GenerateMany``);
* ``kvfleet``: the real router (`router run`, auth off) in front of ``--nodes`` sim node
  agents of the ``h100-llama3-8b`` preset at ``--time-scale`` (1: real H100 speed), with
  etcd and a controller (`controller/sim/live.py`), one ``Generate`` call per request;
* ``kvfleet-many``: the same router and fleet, the client's requests over one
  ``GenerateMany`` call (``kvfleet/many.py``).

For each: the relay's CPU (utime + stime from /proc) over bursts of ``--requests``
requests, ``--concurrency`` (32) at a time, of 1 and of 32 output messages, after its idle rate is subtracted:
the difference gives CPU per message, the rest CPU per request (on a multiplexed client
stream a message is one relayed item, a stream's chunk; many share one gRPC message); and
the relay's added latency: time to the first message through the relay minus straight to
the upstream, alternating, medians over ``--samples`` pairs. For kvfleet also the CPU per
token when a 32-token request's tokens are merged into chunks at least 100 ms apart (the
flex tier). Prints the figures and the router's ratio to each floor; ``--json OUT`` keeps
them. With more requests in flight a node's engine step carries more tokens, so the
per-step and per-write costs are shared by more items (``--concurrency 128``).

    .venv/bin/python bench/bench_overhead.py [--nodes 2] [--time-scale 1] [--requests 1000] [--reps 2] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import grpc

_CLK_TCK = os.sysconf("SC_CLK_TCK")
# A port already taken must fail the bind, not be shared (gRPC sets SO_REUSEPORT by default).
_NO_REUSEPORT = [("grpc.so_reuseport", 0)]
BURST_TIMEOUT_S = 300.0
CONCURRENCY = 32
LONG = 32


def _raw(b: bytes) -> bytes:
    return b


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


# ---------------------------------------------------------------------------- floor processes

async def _upstream(port: int) -> None:
    """Streams K 8-byte messages per request (K: the request's first 4 bytes); ``Mux``
    serves many requests over one stream, batching what is ready at once."""

    async def gen(req, ctx):
        for _ in range(int.from_bytes(req[:4], "little")):
            yield b"t" * 8

    async def mux(reqs, ctx):
        ready: list[bytes] = []
        wake = asyncio.Event()

        async def run(sid: bytes, k: int) -> None:
            for i in range(k):
                await asyncio.sleep(0)     # one token per loop turn, like an engine step
                ready.append(sid + (b"\x01" if i == k - 1 else b"\x00") + b"t" * 8)
                wake.set()

        async def pump() -> None:
            async for r in reqs:
                asyncio.ensure_future(run(r[:4], int.from_bytes(r[4:8], "little")))

        task = asyncio.ensure_future(pump())
        try:
            while True:
                await wake.wait()
                wake.clear()
                if ready:
                    batch, ready[:] = b"".join(ready), []
                    yield batch
        finally:
            task.cancel()

    server = grpc.aio.server(options=_NO_REUSEPORT)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("floor.Up", {
        "Gen": grpc.unary_stream_rpc_method_handler(gen, _raw, _raw),
        "Mux": grpc.stream_stream_rpc_method_handler(mux, _raw, _raw),
    }),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


async def _relay_call(port: int, up: int) -> None:
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{up}")
    call = ch.unary_stream("/floor.Up/Gen", request_serializer=_raw, response_deserializer=_raw)

    async def gen(req, ctx):
        async for m in call(req):
            yield m

    await _serve_relay(port, grpc.unary_stream_rpc_method_handler(gen, _raw, _raw))


def _mux_upstream(up: int, name: str, deliver):
    """One multiplexed stream to the upstream. Returns ``send(body) -> upstream sid``, which
    starts a request, and the reader task, which calls ``deliver(sid, item)`` for each
    item (1 byte: last or not, then 8 bytes) as batches arrive."""
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{up}")
    out: deque[bytes] = deque()
    out_wake = asyncio.Event()
    counter = [0]

    async def requests():
        while True:
            while out:
                yield out.popleft()
            out_wake.clear()
            await out_wake.wait()

    upstream = ch.stream_stream("/floor.Up/Mux", request_serializer=_raw, response_deserializer=_raw)(requests())

    async def read() -> None:
        try:
            async for batch in upstream:
                for off in range(0, len(batch), 13):
                    deliver(int.from_bytes(batch[off:off + 4], "little"), batch[off + 4:off + 13])
        except BaseException as exc:   # fail loudly: the bench times out rather than wait
            print(f"{name} upstream failed: {exc!r}", file=sys.stderr, flush=True)
            os._exit(1)

    def send(body: bytes) -> int:
        counter[0] += 1
        out.append(counter[0].to_bytes(4, "little") + body)
        out_wake.set()
        return counter[0]

    return send, asyncio.ensure_future(read())


async def _relay_mux(port: int, up: int) -> None:
    streams: dict[int, tuple[deque, asyncio.Event]] = {}

    def deliver(sid: int, item: bytes) -> None:
        s = streams.get(sid)
        if s is not None:
            s[0].append(item)
            s[1].set()

    send, reader = _mux_upstream(up, "floor-mux", deliver)

    async def gen(req, ctx):
        q, ev = deque(), asyncio.Event()
        sid = send(req)
        streams[sid] = (q, ev)   # before any item can come: delivery needs a loop turn
        try:
            while True:
                while not q:
                    ev.clear()
                    await ev.wait()
                item = q.popleft()
                yield item[1:]
                if item[0]:
                    return
        finally:
            streams.pop(sid, None)

    await _serve_relay(port, grpc.unary_stream_rpc_method_handler(gen, _raw, _raw))
    reader.cancel()


async def _relay_mux2(port: int, up: int) -> None:
    """Multiplexed on both sides: the client's requests arrive on one stream and their
    outputs leave batched, as they arrive from the upstream; no per-request task."""
    fronts: dict[int, tuple[bytes, list, asyncio.Event]] = {}   # upstream sid -> (client sid, its stream's ready list, wake)

    def deliver(usid: int, item: bytes) -> None:
        f = fronts.get(usid)
        if f is not None:
            f[1].append(f[0] + item)
            f[2].set()
            if item[0]:
                del fronts[usid]

    send, reader = _mux_upstream(up, "floor-mux2", deliver)

    async def mux(reqs, ctx):
        ready: list[bytes] = []
        wake = asyncio.Event()

        async def pump() -> None:
            async for r in reqs:
                fronts[send(r[4:])] = (r[:4], ready, wake)

        task = asyncio.ensure_future(pump())
        try:
            while True:
                await wake.wait()
                wake.clear()
                if ready:
                    batch, ready[:] = b"".join(ready), []
                    yield batch
        finally:
            task.cancel()

    await _serve_relay(port, grpc.stream_stream_rpc_method_handler(mux, _raw, _raw), "Mux")
    reader.cancel()


async def _serve_relay(port: int, handler, method: str = "Gen") -> None:
    server = grpc.aio.server(options=_NO_REUSEPORT)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("floor.Relay", {method: handler}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


# ---------------------------------------------------------------------------- floor client

async def _floor_burst(port: int, n: int, k: int, concurrency: int = CONCURRENCY) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_stream("/floor.Relay/Gen", request_serializer=_raw, response_deserializer=_raw)
        sem = asyncio.Semaphore(concurrency)
        msgs = 0

        async def one() -> None:
            nonlocal msgs
            async with sem:
                async for _ in call(k.to_bytes(4, "little") + b"x" * 512):   # ~128 token ids' worth
                    msgs += 1

        await asyncio.gather(*(one() for _ in range(n)))
    return msgs


async def _floor_burst_mux(port: int, n: int, k: int, concurrency: int = CONCURRENCY) -> int:
    """Like ``_floor_burst`` over one multiplexed stream: returns the items (tokens) received."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        sent = asyncio.Queue()
        left = n
        done = asyncio.Event()
        items = 0

        async def reqs():
            for sid in range(1, n + 1):
                await sent.get()
                yield sid.to_bytes(4, "little") + k.to_bytes(4, "little") + b"x" * 512

        for _ in range(concurrency):
            sent.put_nowait(None)
        call = ch.stream_stream("/floor.Relay/Mux", request_serializer=_raw, response_deserializer=_raw)(reqs())
        async for batch in call:
            for off in range(0, len(batch), 13):
                items += 1
                if batch[off + 4]:
                    left -= 1
                    sent.put_nowait(None)
            if not left:
                break
        call.cancel()
    return items


async def _floor_latency(relay: int, up: int, samples: int) -> dict:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{relay}") as rch, grpc.aio.insecure_channel(f"127.0.0.1:{up}") as uch:
        via = rch.unary_stream("/floor.Relay/Gen", request_serializer=_raw, response_deserializer=_raw)
        direct = uch.unary_stream("/floor.Up/Gen", request_serializer=_raw, response_deserializer=_raw)
        req = (1).to_bytes(4, "little") + b"x" * 512

        async def first(call) -> float:
            t0 = time.perf_counter()
            async for _ in call(req):
                return time.perf_counter() - t0
            return float("nan")

        await first(via), await first(direct)
        a, b = [], []
        for i in range(samples):
            for which in ((0, 1) if i % 2 == 0 else (1, 0)):
                (a if which == 0 else b).append(await first(via if which == 0 else direct))
    return {"samples": samples, "routed_ttft_p50_s": statistics.median(a), "direct_ttft_p50_s": statistics.median(b),
            "added_p50_s": statistics.median(a) - statistics.median(b)}


async def _floor_latency_mux(relay: int, up: int, samples: int) -> dict:
    """``_floor_latency`` with the relayed requests on one open multiplexed stream."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{relay}") as rch, grpc.aio.insecure_channel(f"127.0.0.1:{up}") as uch:
        direct = uch.unary_stream("/floor.Up/Gen", request_serializer=_raw, response_deserializer=_raw)
        body = (1).to_bytes(4, "little") + b"x" * 512
        q: asyncio.Queue = asyncio.Queue()

        async def reqs():
            while (sid := await q.get()) is not None:
                yield sid.to_bytes(4, "little") + body

        call = rch.stream_stream("/floor.Relay/Mux", request_serializer=_raw, response_deserializer=_raw)(reqs())
        sid = 0

        async def via() -> float:
            nonlocal sid
            sid += 1
            t0 = time.perf_counter()
            q.put_nowait(sid)
            await call.read()
            return time.perf_counter() - t0

        async def first() -> float:
            t0 = time.perf_counter()
            async for _ in direct(body):
                return time.perf_counter() - t0
            return float("nan")

        await via(), await first()
        a, b = [], []
        for i in range(samples):
            for which in ((0, 1) if i % 2 == 0 else (1, 0)):
                (a if which == 0 else b).append(await (via() if which == 0 else first()))
        call.cancel()
    return {"samples": samples, "routed_ttft_p50_s": statistics.median(a), "direct_ttft_p50_s": statistics.median(b),
            "added_p50_s": statistics.median(a) - statistics.median(b)}


def _per(phases: list[tuple[int, int, float]]) -> dict:
    (n1, m1, c1), (n2, m2, c2) = phases
    per_msg = (c2 / n2 - c1 / n1) / max(m2 / n2 - m1 / n1, 1e-9)
    per_req = c1 / n1 - per_msg * m1 / n1
    return {"cpu_us_per_request": per_req * 1e6, "cpu_us_per_message": per_msg * 1e6,
            "messages_per_request": [m1 / n1, m2 / n2]}


def run_floor(kind: str, requests: int, reps: int, samples: int, concurrency: int = CONCURRENCY) -> dict:
    from kvfleet.controller.sim.live import _free_port

    up = _free_port()
    relay = _free_port()
    while relay == up:
        relay = _free_port()
    me = [sys.executable, os.path.abspath(__file__)]
    procs: list[subprocess.Popen] = []
    try:
        # The relay dials the upstream as it starts: start it once the upstream listens.
        for args in (["_up", str(up)], [f"_relay-{kind}", str(relay), str(up)]):
            procs.append(p := subprocess.Popen(me + args, stdout=subprocess.PIPE, text=True))
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"floor process {p.args} did not start")
        pid = procs[1].pid
        burst = _floor_burst_mux if kind == "mux2" else _floor_burst
        asyncio.run(asyncio.wait_for(burst(relay, 100, 4), BURST_TIMEOUT_S))   # warm up
        c0, t0 = cpu_seconds(pid), time.perf_counter()
        time.sleep(1.0)
        idle = (cpu_seconds(pid) - c0) / (time.perf_counter() - t0)
        runs = []
        for _ in range(reps):
            phases = []
            for k in (1, LONG):
                c0, t0 = cpu_seconds(pid), time.perf_counter()
                msgs = asyncio.run(asyncio.wait_for(burst(relay, requests, k, concurrency), BURST_TIMEOUT_S))
                wall = time.perf_counter() - t0
                phases.append((requests, msgs, max(0.0, cpu_seconds(pid) - c0 - idle * wall)))
            runs.append(_per(phases))
        latency = _floor_latency_mux if kind == "mux2" else _floor_latency
        lat = asyncio.run(asyncio.wait_for(latency(relay, up, samples), BURST_TIMEOUT_S))
    finally:
        for p in reversed(procs):   # the relay first: its upstream going away is not an error
            p.kill()
            p.wait()
    return {"runs": runs, "latency": lat}


# ---------------------------------------------------------------------------- the router

def run_router(nodes: int, time_scale: float, requests: int, reps: int, samples: int,
               concurrency: int = CONCURRENCY) -> dict[str, dict]:
    """The router's figures through Generate (one call per request) and through
    GenerateMany (one call for all), on the same fleet, alternating."""
    from kvfleet.controller.sim.live import added_latency, router_cpu, scaled_config, start_fleet
    from kvfleet.controller.sim.presets import preset_config

    data = Path(tempfile.mkdtemp(prefix="kvfleet-overhead-"))
    fleet = start_fleet(data, nodes, scaled_config(preset_config("h100-llama3-8b"), time_scale), "kvfleet")
    out = {"kvfleet": {"runs": [], "data_dir": str(data)}, "kvfleet-many": {"runs": [], "data_dir": str(data)}}
    try:
        for rep in range(reps):
            for name, many in (("kvfleet", False), ("kvfleet-many", True)):
                # New prompts for each run: none finds another's cached.
                seed = 100 + 10 * (2 * rep + many)
                out[name]["runs"].append(asyncio.run(router_cpu(fleet, requests, LONG, concurrency, time_scale=time_scale,
                                                                many=many, seed=seed)))
        for name, many in (("kvfleet", False), ("kvfleet-many", True)):
            out[name]["latency"] = asyncio.run(added_latency(fleet, samples, many=many))
    finally:
        fleet.stop()
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        role, args = sys.argv[1], [int(a) for a in sys.argv[2:]]
        asyncio.run({"_up": lambda: _upstream(*args), "_relay-call": lambda: _relay_call(*args),
                     "_relay-mux": lambda: _relay_mux(*args), "_relay-mux2": lambda: _relay_mux2(*args)}[role]())
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=2, help="sim node agents behind the router")
    ap.add_argument("--time-scale", type=float, default=1.0, help="sim engines this many times slower than the preset")
    ap.add_argument("--requests", type=int, default=1000, help="requests per burst")
    ap.add_argument("--reps", type=int, default=2, help="burst pairs per relay (each reported)")
    ap.add_argument("--samples", type=int, default=100, help="latency pairs per relay")
    ap.add_argument("--concurrency", type=int, default=CONCURRENCY,
                    help="requests in flight during a burst (the items of a node's engine step, and of a write to the client, grow with it)")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    a = ap.parse_args()
    if a.nodes < 1 or a.requests < 32 or a.reps < 1 or a.samples < 1 or a.time_scale <= 0 or not 1 <= a.concurrency <= a.requests:
        ap.error("--nodes, --reps and --samples must be >= 1, --requests >= 32, --time-scale > 0, "
                 "--concurrency between 1 and --requests")
    out = {
        "floor-call": run_floor("call", a.requests, a.reps, a.samples, a.concurrency),
        "floor-mux": run_floor("mux", a.requests, a.reps, a.samples, a.concurrency),
        "floor-mux2": run_floor("mux2", a.requests, a.reps, a.samples, a.concurrency),
        **run_router(a.nodes, a.time_scale, a.requests, a.reps, a.samples, a.concurrency),
        "config": {"nodes": a.nodes, "time_scale": a.time_scale, "requests": a.requests, "reps": a.reps,
                   "concurrency": a.concurrency, "long_tokens": LONG},
    }
    print(f"{a.requests} requests per burst, {a.concurrency} at a time; kvfleet: {a.nodes} sim nodes at time scale {a.time_scale:g}")
    print("floor-mux2 and kvfleet-many: requests multiplexed on the client's side too (one GenerateMany call);")
    print("a message there is one relayed item (a stream's chunk), many of which share a gRPC message")
    print(f"{'relay':<13} {'CPU µs/request':>16} {'µs/message':>12} {'µs/token merged':>16} {'added TTFT p50 ms':>18}")
    best = {}
    for name in ("floor-call", "floor-mux", "floor-mux2", "kvfleet", "kvfleet-many"):
        r = out[name]
        req = [x["cpu_us_per_request"] for x in r["runs"]]
        msg = [x["cpu_us_per_message"] for x in r["runs"]]
        tok = [x["cpu_us_per_token"]["flex"] for x in r["runs"]] if name.startswith("kvfleet") else []
        best[name] = (min(req), min(msg), r["latency"]["added_p50_s"] * 1e3)
        rng = lambda v: f"{min(v):,.0f}-{max(v):,.0f}" if len(v) > 1 else f"{v[0]:,.0f}"
        rng1 = lambda v: f"{min(v):.1f}-{max(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}"
        print(f"{name:<13} {rng(req):>16} {rng1(msg):>12} {rng1(tok) if tok else '-':>16} {r['latency']['added_p50_s'] * 1e3:>18.2f}")
    for router, floors in (("kvfleet", ("floor-call", "floor-mux")), ("kvfleet-many", ("floor-mux2",))):
        k = best[router]
        for floor in floors:
            f = best[floor]
            # A ratio to a floor within noise of zero says nothing: name the floor instead.
            msg = f"per message {k[1] / f[1]:.2f}x" if f[1] >= 1.0 else f"per message: the floor's is {f[1]:.1f} µs"
            ttft = (f", added TTFT {k[2] / f[2]:.2f}x" if f[2] >= 0.1
                    else f" (the floor adds no measurable TTFT: {f[2]:.2f} ms)")
            print(f"{router} / {floor} (best runs): CPU per request {k[0] / f[0]:.2f}x, {msg}{ttft}")
    k, g = best["kvfleet-many"], best["kvfleet"]
    print(f"kvfleet-many / kvfleet (best runs): CPU per request {k[0] / g[0]:.2f}x, per message {k[1] / g[1]:.2f}x, "
          f"added TTFT {k[2] / g[2]:.2f}x")
    print("targets: <= 500 µs CPU per request, <= 25 µs per relayed message, <= 1 ms added TTFT p50")
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
