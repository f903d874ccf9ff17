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
    breaker: Breaker  # live: the route's own, or its group's

    @classmethod
    def build(cls, name: str, p: Policy, clock: Callable[[], float], breaker: Breaker) -> RoutePolicy:
        """sock_read starts as first_byte; the relay switches it to idle once the headers arrive."""
        t, r = p.timeouts, p.retry
        return cls(
            name=name, retry=RetryPolicy.from_config(r), connect=float(t.connect), first_byte=float(t.first_byte),
            idle=float(t.idle), total=float(t.total), replay_limit=int(r.replay_limit),
            timeout=aiohttp.ClientTimeout(total=float(t.total), sock_connect=float(t.connect),
                                          sock_read=float(t.first_byte)),
            budget=RetryBudget(r.budget.ratio, r.budget.min_per_second, float(r.budget.window), clock),
            breaker=breaker,
        )


def compile_routes(config: ProxyConfig, clock: Callable[[], float],
                   notify: Callable[[BreakerChange], None] = lambda change: None,
                   previous: RouteTable[RoutePolicy] | None = None) -> RouteTable[RoutePolicy]:
    """The config's route table with each policy compiled and given its live state. After a reload
    (`previous`), a breaker whose name, routes and settings did not change is kept, open or not, and
    so is the budget of a route whose name and budget settings did not: a reload must not reset an
    outage's breaker nor hand a struggling route a fresh budget."""
    routes = [*config.routes.routes, config.routes.default]
    kept = [*previous.routes, previous.default] if previous is not None else []
    old_breakers = {r.policy.breaker.name: r.policy.breaker for r in kept}
    old_budgets = {r.name: r.policy.budget for r in kept}
    groups: dict[str, list[Route[Policy]]] = {}  # breaker name -> its routes (config checks they agree)
    for r in routes:
        groups.setdefault(r.policy.breaker.group or r.name, []).append(r)
    breakers: dict[str, Breaker] = {}
    for key, members in groups.items():
        b = members[0].policy.breaker
        breaker = Breaker(key, tuple(r.name for r in members), failure_threshold=b.failure_threshold,
                          reset_timeout=float(b.reset_timeout), count=frozenset(map(Category, b.count)),
                          clock=clock, notify=notify)
        old = old_breakers.get(key)
        keep = old is not None and (old.routes, old.settings) == (breaker.routes, breaker.settings)
        breakers[key] = old if keep and old is not None else breaker
    compiled = []
    for r in routes:
        policy = RoutePolicy.build(r.name, r.policy, clock, breakers[r.policy.breaker.group or r.name])
        if (budget := old_budgets.get(r.name)) is not None and budget.settings == policy.budget.settings:
            policy = dataclasses.replace(policy, budget=budget)
        compiled.append(Route(r.name, r.methods, r.pattern, policy))
    return RouteTable(compiled[:-1], compiled[-1])
