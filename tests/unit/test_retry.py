import pytest

from proxy.budget import RetryBudget
from proxy.classify import Category, Verdict
from proxy.config import Retry
from proxy.retry import RetryAfter, RetryPolicy, Stop, StopReason, decide

POLICY = RetryPolicy.from_config(Retry())  # 3 attempts; connect network timeout server rate_limit


def _budget(allow=True):
    return RetryBudget(0.0, 1000.0 if allow else 0.0, 10.0, clock=lambda: 0.0)


def _decide(verdict=Verdict(Category.SERVER), *, policy=POLICY, attempt=1, replayable=True, forbids=False,
            hint=None, remaining=100.0, budget=None, rng=lambda: 0.5, admits=lambda delay: True):
    return decide(policy, verdict, attempt=attempt, replayable=replayable, upstream_forbids=forbids, hint=hint,
                  remaining=remaining, budget=budget or _budget(), rng=rng, admits=admits)


@pytest.mark.parametrize("verdict", [Verdict(c) for c in
                                     (Category.CONNECT, Category.NETWORK, Category.TIMEOUT, Category.SERVER,
                                      Category.RATE_LIMIT)])
def test_transient_categories_are_retried_with_backoff(verdict):
    assert _decide(verdict) == RetryAfter(0.25, "backoff", "backoff")  # U[0, 0.5) at 0.5


@pytest.mark.parametrize("verdict", [
    Verdict(Category.CLIENT, True), Verdict(Category.AUTHENTICATION, True), Verdict(Category.QUOTA_EXCEEDED, True),
    Verdict(Category.RATE_LIMIT, permanent=True), Verdict(Category.INVALID_RESPONSE),
])
def test_permanent_or_unlisted_categories_stop_not_retryable(verdict):
    assert _decide(verdict) == Stop(StopReason.NOT_RETRYABLE)


def test_upstream_x_should_retry_false_stops():
    assert _decide(forbids=True) == Stop(StopReason.NOT_RETRYABLE)


def test_limit_after_max_attempts():
    assert isinstance(_decide(attempt=2), RetryAfter)
    assert _decide(attempt=3) == Stop(StopReason.LIMIT)


def test_streamed_body_is_not_replayable():
    assert _decide(replayable=False) == Stop(StopReason.NOT_REPLAYABLE)


def test_retry_after_hint_replaces_backoff():
    assert _decide(Verdict(Category.RATE_LIMIT), hint=(0.15, "retry-after-ms")) == \
        RetryAfter(0.15, "retry_after", "retry-after-ms")


def test_retry_after_longer_than_max_is_not_waited():
    assert _decide(hint=(121.0, "retry-after")) == Stop(StopReason.DEADLINE)


def test_wait_past_the_deadline_stops():
    assert _decide(hint=(5.0, "retry-after"), remaining=4.0) == Stop(StopReason.DEADLINE)
    assert _decide(rng=lambda: 0.99, remaining=0.3) == Stop(StopReason.DEADLINE)


def test_budget_is_asked_last_and_spent_only_on_a_retry():
    budget = RetryBudget(0.0, 0.1, 10.0, clock=lambda: 0.0)  # exactly one retry
    assert _decide(Verdict(Category.CLIENT, True), budget=budget) == Stop(StopReason.NOT_RETRYABLE)
    assert isinstance(_decide(budget=budget), RetryAfter)
    assert _decide(budget=budget) == Stop(StopReason.BUDGET)


def test_no_retry_policy():
    one = RetryPolicy.from_config(Retry(max_attempts=1))
    assert not one.retries_enabled
    assert _decide(policy=one) == Stop(StopReason.LIMIT)


def test_a_retry_the_breaker_will_refuse_stops_before_the_wait_and_the_budget():
    asked = []

    def refuses(delay: float) -> bool:
        asked.append(delay)
        return False

    assert _decide(admits=refuses, budget=_budget(allow=False)) == Stop(StopReason.BREAKER)
    assert asked == [0.25]  # asked about the moment the backoff would end
    assert _decide(attempt=3, admits=refuses) == Stop(StopReason.LIMIT)  # the cheaper reasons first
