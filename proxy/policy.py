"""A route's compiled policy and live per-route state, built once when the app starts."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
from dataclasses import dataclass

from .breaker import Breaker
from .budget import RetryBudget
from .classify import Category
from .config import Policy, ProxyConfig, Timeouts
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
        t, r = p.timeouts, p.retry
        return cls(
            name=name, retry=RetryPolicy.from_config(r), connect=float(t.connect), first_byte=float(t.first_byte),
            idle=float(t.idle), total=float(t.total), replay_limit=int(r.replay_limit), timeout=_first_timeout(t),
            budget=RetryBudget(r.budget.ratio, r.budget.min_per_second, float(r.budget.window), clock),
            breaker=breaker,
        )


def _first_timeout(t: Timeouts) -> aiohttp.ClientTimeout:
    """sock_read starts as first_byte; the relay switches it to idle once the headers arrive."""
    return aiohttp.ClientTimeout(total=float(t.total), sock_connect=float(t.connect), sock_read=float(t.first_byte))


def compile_routes(config: ProxyConfig, clock: Callable[[], float],
                   notify: Callable[[BreakerChange], None] = lambda change: None) -> RouteTable[RoutePolicy]:
    """The config's route table with each policy compiled and given its own live state."""
    table = config.routes
    routes = [*table.routes, table.default]
    members: dict[str, list[str]] = {}
    for r in routes:
        members.setdefault(r.policy.breaker.group or r.name, []).append(r.name)
    breakers: dict[str, Breaker] = {}

    def build(route: Route[Policy]) -> Route[RoutePolicy]:
        b = route.policy.breaker
        key = b.group or route.name
        if key not in breakers:
            breakers[key] = Breaker(key, tuple(members[key]), failure_threshold=b.failure_threshold,
                                    reset_timeout=float(b.reset_timeout),
                                    count=frozenset(Category(c) for c in b.count), clock=clock, notify=notify)
        return Route(route.name, route.methods, route.pattern,
                     RoutePolicy.build(route.name, route.policy, clock, breakers[key]))

    return RouteTable([build(r) for r in table.routes], build(table.default))
