import pytest

from proxy.breaker import Breaker, Permit
from proxy.events import BreakerChange, BreakerState as State
from proxy.classify import Category

COUNT = frozenset({Category.CONNECT, Category.NETWORK, Category.TIMEOUT, Category.SERVER, Category.INVALID_RESPONSE})


@pytest.fixture
def changes():
    return []


@pytest.fixture
def breaker(clock, changes):
    return Breaker("chat", ("chat",), failure_threshold=3, reset_timeout=5.0, count=COUNT, clock=clock,
                   notify=changes.append)


def _fail(b, n, category=Category.SERVER):
    for _ in range(n):
        b.record(category, b.allow())


def test_opens_after_threshold_consecutive_failures(breaker, changes):
    _fail(breaker, 2)
    assert breaker.state is State.CLOSED and breaker.allow() is Permit.PASS
    _fail(breaker, 1)
    assert breaker.state is State.OPEN and breaker.allow() is None
    assert changes == [BreakerChange("chat", ("chat",), State.CLOSED, State.OPEN)]


def test_success_resets_the_count(breaker):
    _fail(breaker, 2)
    breaker.record(Category.OK, breaker.allow())
    _fail(breaker, 2)
    assert breaker.state is State.CLOSED


@pytest.mark.parametrize("category", [Category.AUTHENTICATION, Category.CLIENT, Category.QUOTA_EXCEEDED,
                                      Category.RATE_LIMIT])
def test_business_answers_never_trip_it(breaker, category):
    _fail(breaker, 50, category)
    assert breaker.state is State.CLOSED


def test_half_open_admits_exactly_one_probe(breaker, clock, changes):
    _fail(breaker, 3)
    clock.t += 4.9
    assert breaker.allow() is None and breaker.retry_after() == 1
    clock.t += 0.2
    permits = [breaker.allow() for _ in range(10)]
    assert permits.count(Permit.PROBE) == 1 and permits.count(None) == 9
    assert breaker.state is State.HALF_OPEN


def test_probe_success_closes(breaker, clock, changes):
    _fail(breaker, 3)
    clock.t += 5
    probe = breaker.allow()
    breaker.record(Category.OK, probe)
    assert breaker.state is State.CLOSED and breaker.allow() is Permit.PASS
    assert [(c.old, c.new) for c in changes] == [(State.CLOSED, State.OPEN), (State.OPEN, State.HALF_OPEN),
                                                 (State.HALF_OPEN, State.CLOSED)]


def test_probe_failure_reopens_for_a_new_period(breaker, clock):
    _fail(breaker, 3)
    clock.t += 5
    probe = breaker.allow()
    clock.t += 1
    breaker.record(Category.TIMEOUT, probe)
    assert breaker.state is State.OPEN
    clock.t += 4.5
    assert breaker.allow() is None  # the period restarted when the probe failed
    assert breaker.retry_after() == 1
    clock.t += 1
    assert breaker.allow() is Permit.PROBE


def test_released_probe_lets_the_next_request_probe(breaker, clock):
    _fail(breaker, 3)
    clock.t += 5
    probe = breaker.allow()
    assert breaker.allow() is None
    breaker.release(probe)
    assert breaker.allow() is Permit.PROBE


def test_late_results_while_open_are_ignored(breaker, clock):
    _fail(breaker, 3)
    breaker.record(Category.OK, Permit.PASS)  # a request admitted before it opened
    assert breaker.state is State.OPEN


def test_retry_after_counts_down(breaker, clock):
    _fail(breaker, 3)
    assert breaker.retry_after() == 5
    clock.t += 2.5
    assert breaker.retry_after() == 3


def test_admits_answers_without_taking_the_probe(breaker, clock):
    assert breaker.admits(clock.t)
    _fail(breaker, 3)
    assert not breaker.admits(clock.t) and not breaker.admits(clock.t + 4.9)
    assert breaker.admits(clock.t + 5.0)  # the wait would end when a probe may pass
    clock.t += 5.0
    assert breaker.admits(clock.t) and breaker.admits(clock.t)  # asking twice takes nothing
    probe = breaker.allow()
    assert probe is Permit.PROBE and not breaker.admits(clock.t)  # the one probe is out
    breaker.record(Category.OK, probe)
    assert breaker.admits(clock.t)


def test_late_answers_do_not_decide_a_half_open_breaker(breaker, clock):
    early = breaker.allow()  # admitted while closed, answers after the breaker opened and half-opened
    _fail(breaker, 3)
    clock.t += 5.0
    probe = breaker.allow()
    breaker.record(Category.SERVER, early)
    assert breaker.state is State.HALF_OPEN  # only the probe decides
    breaker.record(Category.OK, probe)
    assert breaker.state is State.CLOSED


def test_pybreakers_own_open_check_runs_on_the_injected_clock(breaker, clock):
    import pybreaker

    _fail(breaker, 3)
    cb = breaker._cb  # pybreaker's object: its own timer check must agree with the adapter's
    with pytest.raises(pybreaker.CircuitBreakerError):
        cb.call(lambda: None)
    clock.t += 4.9
    with pytest.raises(pybreaker.CircuitBreakerError):
        cb.call(lambda: None)
    assert breaker.retry_after() == 1 and not breaker.admits(clock.t)
    clock.t += 0.1
    cb.call(lambda: None)  # pybreaker half-opens after reset_timeout on the fake clock; the call closes it
    assert breaker.state is State.CLOSED
