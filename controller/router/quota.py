"""Per-tenant, per-tier quotas: requests per minute, tokens per minute, concurrent requests.

Limits come from the tenant's record in etcd (``TenancyView``); a tenant without a record,
or a tier without limits, is unlimited. Each router enforces its **share** of every limit,
from memory, with no etcd round trip per request (an etcd write costs ~1.7 ms of disk
sync): with N live routers (``P/routers/``, watched; a router always counts itself) the
limit L is split into integer parts that add up to L exactly, ``L // N`` each plus one for
the first ``L % N`` routers in router-id order. docs/tenancy.md says how exact that is.

Per (tenant, tier) this router keeps sliding 60 s windows, not token buckets: a bucket
refilled at L/60 per second with a burst of L admits up to 2L in some 60 s span; the
window admits at most L in any 60 s span, which is what "per minute" promises.

* requests: the admit times of the last 60 s (a deque; at most the share's length);
* tokens: ``prompt + max_tokens`` is reserved at admit and settled to ``prompt +
  completion`` when the request ends; entries leave the window 60 s after their admit;
* concurrent: a counter, released by ``Ticket.done``.

Admit and done are O(1) amortised (expired entries are popped from the left).
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import grpc
from prometheus_client import Counter, Gauge

from kvfleet.controller.router.auth import Principal
from kvfleet.controller.router.errors import RequestError
from kvfleet.controller.tenancy import TenancyView, TierQuota, tier_name

WINDOW_S = 60.0

ADMITTED = Counter("kvfleet_router_quota_admitted_total", "Requests past the quota check, by tenant and tier", ["tenant", "tier"])
REJECTED = Counter("kvfleet_router_quota_rejections_total", "Requests refused as over quota, by tenant, tier and limit",
                   ["tenant", "tier", "limit"])
ROUTERS = Gauge("kvfleet_router_quota_routers", "Live routers this router divides every quota among")


def split(limit: int, routers: int, rank: int) -> int:
    """This router's part of ``limit`` when ``routers`` share it and it is ``rank``-th
    (0-based) in router-id order; the parts of all ranks add up to ``limit``."""
    base, extra = divmod(limit, max(routers, 1))
    return base + (1 if rank < extra else 0)


class Ticket:
    """One admitted request; ``done`` once it ends (with the tokens it used)."""

    __slots__ = ()

    def done(self, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:  # noqa: ARG002
        return None

    def refund(self) -> None:
        """The request never reached a node (shed by the tier queue, cancelled while
        queued): it counts against no limit at all."""
        return None


_FREE = Ticket()  # unlimited tenants and tiers


@dataclass(slots=True)
class _Window:
    """One (tenant, tier)'s use on this router."""

    requests: deque = field(default_factory=deque)  # admit times (clock seconds)
    tokens: deque = field(default_factory=deque)    # [admit time, tokens charged, still in window]
    token_sum: int = 0                               # sum of the charged tokens in ``tokens``
    inflight: int = 0

    def expire(self, now: float) -> None:
        cutoff = now - WINDOW_S
        while self.requests and self.requests[0] <= cutoff:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= cutoff:
            entry = self.tokens.popleft()
            entry[2] = False
            self.token_sum -= entry[1]


class _QuotaTicket(Ticket):
    __slots__ = ("window", "entry", "admitted_at", "open")

    def __init__(self, window: _Window, entry: list | None, admitted_at: float | None) -> None:
        self.window = window
        self.entry = entry
        self.admitted_at = admitted_at  # its time in ``window.requests``; None: rpm not limited
        self.open = True

    def refund(self) -> None:
        if not self.open:
            return
        self.done(0, 0)
        if self.admitted_at is not None:
            try:
                self.window.requests.remove(self.admitted_at)  # O(share); refunds are rare
            except ValueError:  # already left the window
                pass

    def done(self, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        if not self.open:
            return
        self.open = False
        self.window.inflight -= 1
        e = self.entry
        if e is not None and e[2]:  # settle the reservation to what the request used
            used = prompt_tokens + completion_tokens
            self.window.token_sum += used - e[1]
            e[1] = used


class Unlimited:
    """No quotas at all."""

    async def admit(self, principal: Principal, tier: int, prompt_tokens: int, max_tokens: int) -> Ticket:  # noqa: ARG002
        return _FREE

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


class Quotas:
    """Enforces this router's share of every tenant's limits.

    ``view`` has ``tenants`` (name -> Tenant) and ``routers`` (id -> RouterEntry);
    ``me`` is this router's id in ``P/routers/`` (how it finds its rank among them: ids are
    unique, addresses need not be, e.g. two routers on ``0.0.0.0:50051`` without --advertise);
    ``clock`` returns seconds (injected by tests)."""

    def __init__(self, view, me: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.view = view
        self.me = me
        self.clock = clock
        self.windows: dict[tuple[str, str], _Window] = {}

    async def start(self) -> None:
        await self.view.start()

    async def close(self) -> None:
        await self.view.close()

    def routers(self) -> tuple[int, int]:
        """``(live routers, this router's rank)``; a router not (yet) registered counts itself last."""
        ids = sorted(e.router_id for e in self.view.routers.values())
        if self.me in ids:
            n, rank = len(ids), ids.index(self.me)
        else:
            n, rank = len(ids) + 1, len(ids)
        ROUTERS.set(n)
        return n, rank

    async def admit(self, principal: Principal, tier: int, prompt_tokens: int, max_tokens: int) -> Ticket:
        """A ticket for a request within quota, else RESOURCE_EXHAUSTED naming the limit
        (with a ``retry-after-ms`` trailer when waiting frees enough of a window)."""
        tname = tier_name(tier)
        tenant = self.view.tenants.get(principal.tenant)
        q: TierQuota | None = tenant.quotas.get(tname) if tenant is not None else None
        if q is None or q.unlimited:
            ADMITTED.labels(principal.tenant, tname).inc()
            return _FREE
        now = self.clock()
        w = self.windows.get((principal.tenant, tname))
        if w is None:
            w = self.windows[(principal.tenant, tname)] = _Window()
        w.expire(now)
        n, rank = self.routers()
        who = f"tenant {principal.tenant} over its tier {tname}"

        def where(share: int) -> str:
            return f" across {n} routers, {share} on this one" if n > 1 else ""

        if q.concurrent:
            share = split(q.concurrent, n, rank)
            if w.inflight >= share:
                raise self._reject(principal, tname, "concurrent",
                                   f"{who} concurrent-requests quota ({q.concurrent}{where(share)}): "
                                   f"{w.inflight} running; retry when one finishes")
        if q.requests_per_min:
            share = split(q.requests_per_min, n, rank)
            if len(w.requests) >= share:
                # Once the oldest (len - share + 1) admits leave the window, one more fits.
                k = len(w.requests) - share
                wait = w.requests[k] + WINDOW_S - now if share else None
                raise self._reject(principal, tname, "requests_per_min",
                                   f"{who} requests-per-minute quota ({q.requests_per_min}/min"
                                   f"{where(share)})", wait)
        cost = prompt_tokens + max_tokens
        entry = None
        if q.tokens_per_min:
            share = split(q.tokens_per_min, n, rank)
            if cost > q.tokens_per_min:
                raise self._reject(principal, tname, "tokens_per_min",
                                   f"{who} tokens-per-minute quota ({q.tokens_per_min}/min): this request alone reserves "
                                   f"{cost} tokens (prompt {prompt_tokens} + max_tokens {max_tokens}); lower max_tokens")
            # A request bigger than this router's share still runs when the window is empty
            # (else it could run nowhere while the whole quota would allow it).
            if w.token_sum + cost > share and w.token_sum > 0:
                raise self._reject(principal, tname, "tokens_per_min",
                                   f"{who} tokens-per-minute quota ({q.tokens_per_min}/min{where(share)}): "
                                   f"{w.token_sum} used or reserved, this request reserves {cost} "
                                   f"(prompt {prompt_tokens} + max_tokens {max_tokens})",
                                   self._token_wait(w, cost, share, now))
            entry = [now, cost, True]
            w.tokens.append(entry)
            w.token_sum += cost
        if q.requests_per_min:
            w.requests.append(now)
        w.inflight += 1
        ADMITTED.labels(principal.tenant, tname).inc()
        return _QuotaTicket(w, entry, now if q.requests_per_min else None)

    @staticmethod
    def _token_wait(w: _Window, cost: int, share: int, now: float) -> float | None:
        """Seconds until enough reservations leave the window for ``cost`` to fit (a hint:
        reservations still running may settle lower and free room sooner)."""
        need = w.token_sum + cost - share
        freed = 0
        for t, amount, _ in w.tokens:
            freed += amount
            if freed >= need:
                return t + WINDOW_S - now
        return None

    @staticmethod
    def _reject(principal: Principal, tier: str, limit: str, message: str, wait_s: float | None = None) -> RequestError:
        REJECTED.labels(principal.tenant, tier, limit).inc()
        trailers: tuple[tuple[str, str], ...] = ()
        if wait_s is not None:
            ms = max(1, math.ceil(wait_s * 1000))
            trailers = (("retry-after-ms", str(ms)),)
            message += f"; retry after {ms / 1000:.1f} s"
        return RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, trailers)


def build_quotas(cfg, registry, router_id: str):
    """Quotas from the tenants in etcd, shared among the live routers (``router_id``: this
    router's entry in ``P/routers/``). Call ``start()`` before serving and ``close()`` at shutdown."""
    return Quotas(TenancyView.of(registry), router_id)
