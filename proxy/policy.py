"""A route's compiled policy and live per-route state, built once when the app starts."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from .breaker import Breaker
from .budget import RetryBudget
from .classify import Category
from .config import Policy, ProxyConfig
from .events import BreakerChange
from .retry import RetryPolicy
from .routes import Route, RouteTable


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    name: str
    retry: RetryPolicy
    connect: float
    first_byte: float
    idle: float
    total: float
    replay_limit: int
    timeout: aiohttp.ClientTimeout  # the first attempt's; retries get what is left of `total`
    budget: RetryBudget  # live: shared by every request of the route
    breaker: Breaker  # live: the route's own, or its group's, for its first upstream (breakers[0])
    upstreams: tuple[str, ...] = ("default",)  # tried in this order
    breakers: tuple[Breaker, ...] = ()  # one per upstream, in that order
    failover_on: frozenset[Category] = frozenset()
    multi: bool = False  # several upstreams: responses name theirs (x-proxy-upstream)

    @classmethod
    def build(cls, name: str, p: Policy, clock: Callable[[], float], breakers: tuple[Breaker, ...]) -> RoutePolicy:
        """sock_read starts as first_byte; the relay switches it to idle once the headers arrive."""
        t, r = p.timeouts, p.retry
        return cls(
            name=name, retry=RetryPolicy.from_config(r), connect=float(t.connect), first_byte=float(t.first_byte),
            idle=float(t.idle), total=float(t.total), replay_limit=int(r.replay_limit),
            timeout=aiohttp.ClientTimeout(total=float(t.total), sock_connect=float(t.connect),
                                          sock_read=float(t.first_byte)),
            budget=RetryBudget(r.budget.ratio, r.budget.min_per_second, float(r.budget.window), clock),
            breaker=breakers[0], upstreams=p.upstreams, breakers=breakers,
            failover_on=frozenset(map(Category, p.failover_on)), multi=len(p.upstreams) > 1,
        )


def compile_routes(config: ProxyConfig, clock: Callable[[], float],
                   notify: Callable[[BreakerChange], None] = lambda change: None,
                   previous: RouteTable[RoutePolicy] | None = None,
                   moved: frozenset[str] = frozenset()) -> RouteTable[RoutePolicy]:
    """The config's route table with each policy compiled and given its live state. After a reload
    (`previous`), a breaker whose name, routes and settings did not change is kept, open or not, and
    so is the budget of a route whose name and budget settings did not: a reload must not reset an
    outage's breaker nor hand a struggling route a fresh budget. A breaker is per (route or group,
    upstream): one upstream's outage opens nothing for the others; the upstreams in `moved` now
    point elsewhere, so their breakers start afresh."""
    routes = [*config.routes.routes, config.routes.default]
    kept = [*previous.routes, previous.default] if previous is not None else []
    old_breakers = {(b.name, b.upstream): b for r in kept for b in r.policy.breakers}
    old_budgets = {r.name: r.policy.budget for r in kept}
    groups: dict[tuple[str, str], list[Route[Policy]]] = {}  # breaker key -> its routes (config checks they agree)
    for r in routes:
        for upstream in r.policy.upstreams:
            groups.setdefault((r.policy.breaker.group or r.name, upstream), []).append(r)
    breakers: dict[tuple[str, str], Breaker] = {}
    for key, members in groups.items():
        b = members[0].policy.breaker
        breaker = Breaker(key[0], tuple(r.name for r in members), failure_threshold=b.failure_threshold,
                          reset_timeout=float(b.reset_timeout), count=frozenset(map(Category, b.count)),
                          clock=clock, notify=notify, upstream=key[1])
        old = old_breakers.pop(key, None)
        if old is not None:
            if key[1] not in moved and (old.routes, old.settings) == (breaker.routes, breaker.settings):
                breaker = old
            elif change := old.retire():  # its routes' breaker is now the fresh one: closed
                notify(change)
        breakers[key] = breaker
    for gone in old_breakers.values():  # their routes or upstreams left: an open one must not page forever
        if change := gone.retire():
            notify(change)
    compiled = []
    for r in routes:
        name = r.policy.breaker.group or r.name
        policy = RoutePolicy.build(r.name, r.policy, clock, tuple(breakers[name, u] for u in r.policy.upstreams))
        if (budget := old_budgets.get(r.name)) is not None and budget.settings == policy.budget.settings:
            policy = dataclasses.replace(policy, budget=budget)
        compiled.append(Route(r.name, r.methods, r.pattern, policy))
    return RouteTable(compiled[:-1], compiled[-1])
