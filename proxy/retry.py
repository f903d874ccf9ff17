"""The retry decision: pure, one function, and the reason when the answer is no. As in Envoy, the
cheap questions come first (category, attempts, replayability), the budget, which spends, last.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from .backoff import Random, backoff_delay
from .budget import RetryBudget
from .classify import Category, Verdict
from .config import Retry as RetryConfig


class StopReason(enum.StrEnum):
    """Why the proxy stopped retrying (metric label and log field values; design.md)."""

    NOT_RETRYABLE = "not_retryable"  # the category is not in retry_on, or waiting cannot help
    LIMIT = "limit"  # max_attempts used
    BUDGET = "budget"  # the route's retry budget is spent
    DEADLINE = "deadline"  # the wait (backoff or Retry-After) would pass the deadline or retry_after_max
    NOT_REPLAYABLE = "not_replayable"  # the request body was streamed through, it cannot be sent again
    BREAKER = "breaker"  # the route's circuit breaker opened, or will not admit the retry when the wait ends


@dataclass(frozen=True, slots=True)
class RetryAfter:
    delay: float
    reason: str  # "backoff" or "retry_after"
    source: str  # "backoff", or the header the delay came from ("retry-after-ms", "retry-after")


@dataclass(frozen=True, slots=True)
class Stop:
    reason: StopReason


@dataclass(frozen=True, slots=True)
class Failover:
    to: int  # the index, in the route's upstreams, of the one to try next, at once


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int
    retry_on: frozenset[Category]
    initial: float
    maximum: float
    multiplier: float
    retry_after_max: float

    @classmethod
    def from_config(cls, r: RetryConfig) -> RetryPolicy:
        b = r.backoff
        return cls(r.max_attempts, frozenset(Category(c) for c in r.retry_on), float(b.initial), float(b.max),
                   b.multiplier, float(r.retry_after_max))

    @property
    def retries_enabled(self) -> bool:
        return self.max_attempts > 1


def decide(policy: RetryPolicy, verdict: Verdict, *, attempt: int, replayable: bool,
           upstream_forbids: bool, hint: tuple[float, str] | None, remaining: float,
           budget: RetryBudget, rng: Random, admits: Callable[[float], bool] = lambda delay: True) -> RetryAfter | Stop:
    """After failed attempt number `attempt`: wait and retry, or stop and say why.

    `hint` is a parsed Retry-After (seconds, header); `remaining` is the time left before the
    deadline; `admits(delay)` says whether the breaker would let an attempt through once `delay`
    has passed (no waiting for a retry that cannot happen). The budget is asked last, because
    asking spends it.
    """
    if upstream_forbids or verdict.permanent or verdict.category not in policy.retry_on:
        return Stop(StopReason.NOT_RETRYABLE)
    if attempt >= policy.max_attempts:
        return Stop(StopReason.LIMIT)
    if not replayable:
        return Stop(StopReason.NOT_REPLAYABLE)
    if hint is not None:
        delay, source = hint
        if delay > policy.retry_after_max:
            return Stop(StopReason.DEADLINE)  # the upstream asks for a longer wait than we may give
        decision = RetryAfter(delay, "retry_after", source)
    else:
        delay = backoff_delay(attempt, policy.initial, policy.maximum, policy.multiplier, rng)
        decision = RetryAfter(delay, "backoff", "backoff")
    if delay >= remaining:
        return Stop(StopReason.DEADLINE)
    if not admits(delay):
        return Stop(StopReason.BREAKER)
    if not budget.withdraw():
        return Stop(StopReason.BUDGET)
    return decision


def next_upstream(failover_on: frozenset[Category], category: Category, current: int, count: int,
                  admits: Callable[[int], bool]) -> int | None:
    """The first upstream after `current` whose breaker admits a request now, if `category` fails
    over; else None. Order is one way: an upstream left behind is not tried again by this request."""
    if category not in failover_on:
        return None
    return next((i for i in range(current + 1, count) if admits(i)), None)


def decide_failover(policy: RetryPolicy, failover_on: frozenset[Category], verdict: Verdict, *, current: int,
                    count: int, attempt: int, replayable: bool, remaining: float, budget: RetryBudget,
                    admits: Callable[[int], bool]) -> Failover | Stop | None:
    """After failed attempt number `attempt` on upstream `current`: move on at once (Failover), stop,
    or None: no other upstream takes this failure, and `decide` rules on retrying the same one.

    What an upstream says of its own state (a 429 insufficient_quota, `x-should-retry: false`) does
    not keep the request from another account. What protects the upstreams still holds: a failover is
    an attempt (max_attempts counts them all) and a retry (it spends the route's budget), and a body
    streamed through once is never sent to a second upstream.
    """
    if current + 1 >= count:
        return None
    target = next_upstream(failover_on, verdict.category, current, count, admits)
    if target is None:
        return None
    if attempt >= policy.max_attempts:
        return Stop(StopReason.LIMIT)
    if not replayable:
        return Stop(StopReason.NOT_REPLAYABLE)
    if remaining <= 0:
        return Stop(StopReason.DEADLINE)
    if not budget.withdraw():
        return Stop(StopReason.BUDGET)
    return Failover(target)
