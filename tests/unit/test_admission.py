"""The tier admission queue: the pure node check, and the queue's order, aging and shedding
(with a fake fleet table and a fake clock; no network)."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from kvfleet.controller.router.admission import AdmissionConfig, TierQueue, admissible, queued_steps
from kvfleet.controller.router.errors import RequestError
from kvfleet.controller.router.nodes import NodeTable, NodeView
from kvfleet.v1 import common_pb2 as cpb

MODEL = "m"


def view(node_id: str, queued: int, running: int = 0, budget: int = 1000, routable: bool = True) -> NodeView:
    return NodeView(node_id=node_id, address="", routable=routable, block_size=16, num_blocks=10_000,
                    prefill_tokens_per_s=10_000.0, decode_tokens_per_s=50.0, running=running, waiting=0,
                    kv_usage=0.0, queued_prefill_tokens=queued, cached_blocks=0, slot=-1,
                    max_num_batched_tokens=budget)


def test_queued_steps_counts_prefill_over_what_one_step_carries_beside_the_decodes():
    t = NodeTable.from_views([view("a", 4000, running=0), view("b", 4000, running=500), view("c", 0)])
    np.testing.assert_allclose(queued_steps(t, float("-inf")), [4.0, 8.0, 0.0])


def test_queued_steps_without_a_step_budget_uses_fifty_ms_of_prefill():
    t = NodeTable.from_views([view("a", 1000, budget=0)])
    np.testing.assert_allclose(queued_steps(t, float("-inf")), [2.0])  # 1000 / (10000 tok/s * 0.05 s)


def test_admissible_keeps_routable_nodes_within_the_tier_limit():
    t = NodeTable.from_views([view("a", 4000), view("b", 1000), view("c", 0, routable=False)])
    assert admissible(t, 4.0, float("-inf")).tolist() == [True, True, False]
    assert admissible(t, 2.0, float("-inf")).tolist() == [False, True, False]
    assert admissible(t, float("inf"), float("-inf")).tolist() == [True, True, False]


class FakeFleet:
    def __init__(self, views: list[NodeView], others: dict[str, list[NodeView]] | None = None) -> None:
        self.table = NodeTable.from_views(views)
        self.others = {m: NodeTable.from_views(v) for m, v in (others or {}).items()}

    def columns(self, model: str) -> NodeTable:
        return self.table if model == MODEL else self.others[model]

    def set_queued(self, queued: list[int]) -> None:
        self.table = NodeTable.from_views([view(nid, q) for nid, q in zip(self.table.node_ids, queued)])


@dataclass
class Req:
    tier: int
    model: str = MODEL
    deadline: float | None = None
    max_queue_s: float = 0.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(coro):
    return asyncio.run(coro)


def test_priority_is_never_held_even_on_a_saturated_fleet():
    async def main():
        q = TierQueue(FakeFleet([view("a", 100_000)]), clock=Clock())
        assert await q.enter(Req(cpb.TIER_PRIORITY)) == frozenset()
        assert q.inflight()["priority"] == 1
    run(main())


def test_default_goes_to_nodes_within_its_limit_and_avoids_the_rest():
    async def main():
        q = TierQueue(FakeFleet([view("a", 10_000), view("b", 1000)]), AdmissionConfig(default_steps=4), clock=Clock())
        assert await q.enter(Req(cpb.TIER_DEFAULT)) == frozenset({"a"})
    run(main())


def test_flex_waits_where_default_still_goes():
    async def main():
        fleet = FakeFleet([view("a", 3000)])   # 3 steps: default's limit is 4, flex's 2
        q = TierQueue(fleet, AdmissionConfig(default_steps=4, flex_steps=2), clock=Clock(), poll_s=0.001)
        assert await q.enter(Req(cpb.TIER_DEFAULT)) == frozenset()
        flex = asyncio.create_task(q.enter(Req(cpb.TIER_FLEX)))
        await asyncio.sleep(0.01)
        assert not flex.done() and q.depths()["flex"] == 1
        fleet.set_queued([1000])
        assert await asyncio.wait_for(flex, 1.0) == frozenset()
        assert q.depths()["flex"] == 0
        await q.close()
    run(main())


def test_queue_releases_by_tier_and_aging_order():
    async def main():
        clock = Clock()
        fleet = FakeFleet([view("a", 50_000)])
        q = TierQueue(fleet, AdmissionConfig(flex_aging_s=10.0), clock=clock, poll_s=0.001)
        order: list[str] = []

        async def one(name: str, tier: int):
            await q.enter(Req(tier))
            order.append(name)
            fleet.set_queued([50_000])   # the admitted request fills the node again

        tasks = [asyncio.create_task(one("flex-old", cpb.TIER_FLEX))]
        await asyncio.sleep(0.005)
        clock.now += 11.0   # the flex request has aged past a fresh default one
        tasks.append(asyncio.create_task(one("default-new", cpb.TIER_DEFAULT)))
        await asyncio.sleep(0.005)
        tasks.append(asyncio.create_task(one("flex-new", cpb.TIER_FLEX)))
        await asyncio.sleep(0.005)
        assert q.depths() == {"priority": 0, "default": 1, "flex": 2, "batch": 0}
        for _ in range(3):
            fleet.set_queued([0])
            while len(order) < _ + 1:
                await asyncio.sleep(0.001)
        await asyncio.gather(*tasks)
        assert order == ["flex-old", "default-new", "flex-new"]
        await q.close()
    run(main())


def test_a_request_past_its_wait_is_shed_with_resource_exhausted_and_a_retry_hint():
    async def main():
        q = TierQueue(FakeFleet([view("a", 50_000)]), AdmissionConfig(flex_max_wait_s=0.05), poll_s=0.001)
        with pytest.raises(RequestError) as err:
            await q.enter(Req(cpb.TIER_FLEX))
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tier flex" in str(err.value) and "retry after" in str(err.value)
        assert dict(err.value.trailers)["retry-after-ms"].isdigit()
        assert q.depths()["flex"] == 0 and q.shed[cpb.TIER_FLEX] == 1
        await q.close()
    run(main())


def test_a_request_that_cannot_drain_before_its_deadline_is_shed_at_once():
    async def main():
        clock = Clock()
        fleet = FakeFleet([view("a", 0)])
        q = TierQueue(fleet, clock=clock, poll_s=0.001)
        for _ in range(5):                  # the router admits about 1 request/s
            await q.enter(Req(cpb.TIER_DEFAULT))
            clock.now += 1.0
        fleet.set_queued([50_000])
        q.config = AdmissionConfig(default_max_wait_s=60.0)
        waiting = [asyncio.create_task(q.enter(Req(cpb.TIER_DEFAULT, max_queue_s=30.0))) for _ in range(3)]
        await asyncio.sleep(0.005)
        # Just saturated: the rate is the trickle before the burst, so nobody is shed yet.
        late = asyncio.create_task(q.enter(Req(cpb.TIER_DEFAULT, max_queue_s=1.0)))
        await asyncio.sleep(0.005)
        assert not late.done()
        late.cancel()
        await asyncio.gather(late, return_exceptions=True)
        clock.now += 5.0   # saturated for the rate's time constant: it is now the fleet's pace
        with pytest.raises(RequestError) as err:   # 3 ahead at well under 1/s: more than its 1 s wait
            await q.enter(Req(cpb.TIER_DEFAULT, max_queue_s=1.0))
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queued ahead" in str(err.value)
        for t in waiting:
            t.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        assert q.depths()["default"] == 0
        await q.close()
    run(main())


def test_a_full_queue_sheds_the_newest_of_the_lowest_tier_first():
    async def main():
        q = TierQueue(FakeFleet([view("a", 50_000)]), AdmissionConfig(max_queue=2), poll_s=0.001)
        flex = asyncio.create_task(q.enter(Req(cpb.TIER_FLEX)))
        d1 = asyncio.create_task(q.enter(Req(cpb.TIER_DEFAULT)))
        await asyncio.sleep(0.005)
        d2 = asyncio.create_task(q.enter(Req(cpb.TIER_DEFAULT)))   # full: the flex one goes
        await asyncio.sleep(0.005)
        with pytest.raises(RequestError) as err:
            await flex
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in str(err.value)
        assert q.depths() == {"priority": 0, "default": 2, "flex": 0, "batch": 0}
        for t in (d1, d2):
            t.cancel()
        await asyncio.gather(d1, d2, return_exceptions=True)
        assert q.depths()["default"] == 0
        await q.close()
    run(main())


def test_leave_frees_the_in_flight_count():
    async def main():
        q = TierQueue(FakeFleet([view("a", 0)]), clock=Clock())
        r = Req(cpb.TIER_DEFAULT)
        await q.enter(r)
        assert q.inflight()["default"] == 1
        q.leave(r)
        assert q.inflight()["default"] == 0
    run(main())


def test_lower_tiers_leave_sequence_slots_free_for_the_tiers_above():
    v = lambda name, running, waiting, seqs=16: dataclasses.replace(  # noqa: E731
        view(name, 0), running=running, waiting=waiting, max_num_seqs=seqs)
    t = NodeTable.from_views([v("a", 13, 0), v("b", 11, 0), v("c", 7, 0), v("d", 20, 0, seqs=0)])
    # 16 slots: default may fill 14 (12.5 % kept), flex 12, batch 8; 0 = unknown: no limit.
    assert admissible(t, float("inf"), float("-inf"), 0.125).tolist() == [True, True, True, True]
    assert admissible(t, float("inf"), float("-inf"), 0.25).tolist() == [False, True, True, True]
    assert admissible(t, float("inf"), float("-inf"), 0.5).tolist() == [False, False, True, True]
    t = NodeTable.from_views([v("a", 12, 2)])   # waiting requests hold slots too
    assert admissible(t, float("inf"), float("-inf"), 0.125).tolist() == [False]


def numpy_admissible(t: NodeTable, steps_limit: float, now_s: float, headroom: float) -> np.ndarray:
    """The vectorised form ``cost.admissible_rows`` replaced."""
    ok = t.routable.copy()
    if not np.isinf(steps_limit):
        ok &= queued_steps(t, now_s) <= steps_limit
    if headroom > 0:
        seqs = t.max_num_seqs
        ok &= (seqs <= 0) | (t.running + t.waiting + 1 <= np.floor(seqs * (1.0 - headroom)))
    return ok


def test_the_compiled_check_equals_the_numpy_form_on_random_tables():
    rng = np.random.default_rng(7)
    n = 500
    views = [dataclasses.replace(
        view(f"n{i}", int(rng.integers(0, 20_000)), running=int(rng.integers(0, 600)),
             budget=int(rng.choice([0, 512, 2048, 8192])), routable=bool(rng.random() < 0.9)),
        waiting=int(rng.integers(0, 4)), max_num_seqs=int(rng.choice([0, 16, 256])),
        prefill_tokens_per_s=float(rng.choice([0.0, 5_000.0, 20_000.0])),
        work_since_s=float(rng.choice([np.inf, 10.0, 10.3])))
        for i in range(n)]
    t = NodeTable.from_views(views)
    checked = 0
    for limit in (0.125, 0.5, 4.0, float("inf")):
        for now in (float("-inf"), 10.2, 11.0):
            for headroom in (0.0, 0.125, 0.5):
                want = numpy_admissible(t, limit, now, headroom)
                got = admissible(t, limit, now, headroom)
                assert got.tolist() == want.tolist()
                checked += int(want.sum()) > 0 and int((~want & t.routable).sum()) > 0
    assert checked > 10   # the cases are mixed: some nodes pass, some routable ones are held


def test_a_flex_request_may_ask_for_a_longer_wait_and_default_only_for_a_shorter_one():
    async def main():
        fleet = FakeFleet([view("a", 50_000)])
        q = TierQueue(fleet, AdmissionConfig(flex_max_wait_s=0.01, default_max_wait_s=10.0), poll_s=0.001)
        flex = asyncio.create_task(q.enter(Req(cpb.TIER_FLEX, max_queue_s=5.0)))
        await asyncio.sleep(0.05)          # past the router's 10 ms flex default: still waiting
        assert not flex.done()
        fleet.set_queued([0])
        assert await asyncio.wait_for(flex, 1.0) == frozenset()
        fleet.set_queued([50_000])
        with pytest.raises(RequestError):  # default asked for 20 ms of its 10 s
            await asyncio.wait_for(q.enter(Req(cpb.TIER_DEFAULT, max_queue_s=0.02)), 1.0)
        await q.close()
    run(main())


def test_a_model_with_room_is_not_held_behind_another_models_queue():
    async def main():
        fleet = FakeFleet([view("a", 50_000)], others={"other": [view("b", 0)]})
        q = TierQueue(fleet, AdmissionConfig(default_max_wait_s=5.0), poll_s=0.001)
        held = [asyncio.create_task(q.enter(Req(cpb.TIER_DEFAULT))) for _ in range(10)]
        await asyncio.sleep(0.01)
        assert q.depths()["default"] == 10
        # The other model's node is idle: its requests go at once, flex included.
        assert await asyncio.wait_for(q.enter(Req(cpb.TIER_DEFAULT, model="other")), 0.5) == frozenset()
        assert await asyncio.wait_for(q.enter(Req(cpb.TIER_FLEX, model="other")), 0.5) == frozenset()
        for t in held:
            t.cancel()
        await asyncio.gather(*held, return_exceptions=True)
        await q.close()
    run(main())


def test_a_request_whose_own_deadline_passes_in_the_queue_gets_deadline_exceeded_without_a_retry_hint():
    async def main():
        import time as _time
        q = TierQueue(FakeFleet([view("a", 50_000)]), poll_s=0.001)
        with pytest.raises(RequestError) as err:
            await q.enter(Req(cpb.TIER_DEFAULT, deadline=_time.monotonic() + 0.05))
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and not err.value.trailers
        assert q.shed[cpb.TIER_DEFAULT] == 0 and q.depths()["default"] == 0
        await q.close()
    run(main())


def test_a_release_checks_the_fleet_once_per_tier_not_once_per_waiter(monkeypatch):
    """A check depends only on (model, tier, now): eight waiters of two tiers cost two checks
    per release attempt, and the first admissible waiter in queue order still goes first."""
    async def main():
        clock = Clock()
        fleet = FakeFleet([view("a", 50_000)])
        q = TierQueue(fleet, clock=clock, poll_s=0.001)
        order: list[int] = []

        async def one(i: int, tier: int):
            await q.enter(Req(tier))
            order.append(i)

        tasks = []
        for i in range(8):
            tasks.append(asyncio.create_task(one(i, cpb.TIER_FLEX if i % 2 else cpb.TIER_DEFAULT)))
            await asyncio.sleep(0)
        await asyncio.sleep(0.005)
        assert q.depths()["default"] == 4 and q.depths()["flex"] == 4
        checks: list[int] = []
        check = TierQueue._check
        monkeypatch.setattr(TierQueue, "_check", lambda self, model, tier, now: (checks.append(tier), check(self, model, tier, now))[1])
        assert not q._release_one()                        # nothing fits: every waiter was looked at
        assert sorted(checks) == [cpb.TIER_DEFAULT, cpb.TIER_FLEX]
        fleet.set_queued([0])
        checks.clear()
        assert q._release_one() and checks == [cpb.TIER_DEFAULT]
        while not order:
            await asyncio.sleep(0.001)
        assert order[0] == 0                               # the oldest waiter went first
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await q.close()
    run(main())
