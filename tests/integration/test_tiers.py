"""Service tiers through a real router: the admission queue holds lower tiers on a busy
node, sheds flex with RESOURCE_EXHAUSTED and a retry hint, lets priority through at once,
and shows its queue per tier in `kvfleet nodes routers`."""

from __future__ import annotations

import json
import threading
import time

import grpc
import numpy as np
import pytest

from kvfleet.v1 import common_pb2 as cpb
from kvfleet.v1 import inference_pb2 as ipb
from kvfleet.v1 import inference_pb2_grpc as ipbg

from .conftest import KVFLEET, free_port, spawn, start_cluster, wait_for

pytestmark = pytest.mark.integration

# One node prefilling 1,000 tokens/s with a 2,048-token step budget: a 2,000-token prompt
# is ~one step of queue. Default may queue 4 steps, flex 2.
PREFILL_TPS = 1000


@pytest.fixture(scope="module")
def tiered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiers")
    c = start_cluster(tmp, 1, ("--sim-prefill-tps", str(PREFILL_TPS)))
    router = f"127.0.0.1:{free_port()}"
    admission = {"flex_max_wait_s": 3.0, "default_max_wait_s": 60.0}
    proc = spawn("tier-router", KVFLEET + [
        "router", "run", "--etcd", c.etcd.endpoint, "--listen", router, "--no-auth",
        "--admission", json.dumps(admission),
    ], tmp)
    c.extra.append(proc)
    wait_for(lambda: '"router_ready"' in proc.output() or not proc.alive(), 30, what="tier router")
    assert proc.alive(), proc.output()
    yield c, router
    c.stop()


def _req(seed: int, tokens: int, tier: int, max_tokens: int = 4) -> ipb.GenerateRequest:
    ids = np.random.default_rng(seed).integers(1, 255, tokens).tolist()
    req = ipb.GenerateRequest(model="kvfleet-sim", tier=tier)
    req.token_ids.ids.extend(ids)
    req.sampling.max_tokens = max_tokens
    return req


class Timed(threading.Thread):
    """Runs one Generate in the background; records when its first token came, or its error."""

    def __init__(self, router: str, req: ipb.GenerateRequest) -> None:
        super().__init__(daemon=True)
        self.router, self.req = router, req
        self.first_token_at: float | None = None
        self.error: grpc.RpcError | None = None

    def run(self) -> None:
        stub = ipbg.InferenceStub(grpc.insecure_channel(self.router))
        try:
            for msg in stub.Generate(self.req, timeout=120):
                if msg.HasField("chunk") and msg.chunk.token_ids and self.first_token_at is None:
                    self.first_token_at = time.monotonic()
        except grpc.RpcError as exc:
            self.error = exc


def test_flex_is_held_then_shed_while_priority_goes_first(tiered):
    c, router = tiered
    # Fill the node: 6 default requests of 2,000 uncached tokens = 12 s of prefill (the
    # last two wait in the router: default may queue 4 steps on a node, 8,192 tokens).
    defaults = [Timed(router, _req(100 + i, 2000, cpb.TIER_DEFAULT)) for i in range(6)]
    for t in defaults:
        t.start()
        time.sleep(0.05)
    time.sleep(0.3)

    # Flex waits in the router's queue (the node is past flex's 2 steps) ...
    flex = Timed(router, _req(200, 200, cpb.TIER_FLEX))
    flex.start()

    def flex_queued():
        r = c.cli("nodes", "routers", "--json")
        routers = json.loads(r.stdout) if r.returncode == 0 else []
        return any(x["address"] == router and x["queue_depth"].get("flex", 0) == 1 for x in routers)

    wait_for(flex_queued, 3, interval=0.2, what="flex in the router's queue")

    # ... while priority is admitted at once and the engine schedules it first.
    prio = Timed(router, _req(300, 200, cpb.TIER_PRIORITY))
    t_prio = time.monotonic()
    prio.start()
    prio.join(60)
    assert prio.error is None and prio.first_token_at is not None
    later_defaults = [t for t in defaults if t.first_token_at is None or t.first_token_at > prio.first_token_at]
    assert len(later_defaults) >= 3, "priority should overtake the defaults still queued on the node"
    assert prio.first_token_at - t_prio < 4.0   # its 200 tokens plus at most the step in progress

    # Flex was never admitted while the node stayed busy: shed after its 3 s wait.
    flex.join(30)
    assert flex.error is not None and flex.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tier flex" in flex.error.details() and "retry after" in flex.error.details()
    trailers = dict(flex.error.trailing_metadata() or ())
    assert int(trailers["retry-after-ms"]) > 0
    for t in defaults:
        t.join(60)
        assert t.error is None and t.first_token_at is not None


def test_flex_is_served_once_the_node_has_room(tiered):
    c, router = tiered
    wait_for(lambda: all(n.load.queued_prefill_tokens == 0 for n in c.list_nodes()), 30, what="an idle node")
    flex = Timed(router, _req(400, 300, cpb.TIER_FLEX))
    flex.start()
    flex.join(30)
    assert flex.error is None and flex.first_token_at is not None
