"""A route's compiled policy and live per-route state, built once when the app starts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .budget import RetryBudget
from .config import Policy, ProxyConfig
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
    budget: RetryBudget  # live: shared by every request of the route

    @classmethod
    def build(cls, name: str, p: Policy, clock: Callable[[], float]) -> RoutePolicy:
        t, r = p.timeouts, p.retry
        return cls(
            name=name, retry=RetryPolicy.from_config(r), connect=float(t.connect), first_byte=float(t.first_byte),
            idle=float(t.idle), total=float(t.total), replay_limit=int(r.replay_limit),
            budget=RetryBudget(r.budget.ratio, r.budget.min_per_second, float(r.budget.window), clock),
        )


def compile_routes(config: ProxyConfig, clock: Callable[[], float]) -> RouteTable[RoutePolicy]:
    """The config's route table with each policy compiled and given its own live state."""
    def build(route: Route[Policy]) -> Route[RoutePolicy]:
        return Route(route.name, route.methods, route.pattern, RoutePolicy.build(route.name, route.policy, clock))

    table = config.routes
    return RouteTable([build(r) for r in table.routes], build(table.default))
