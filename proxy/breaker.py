"""Circuit breakers: pybreaker's state machine behind a two-method adapter.

The breaker observes classified outcomes, it does not wrap the request: `allow()` before an
attempt, `record(category)` once the outcome is known. The attempt loop records an error, a
body read whole and the half-open probe at the response headers (a 10-minute stream must not
hold the probe); an ordinary stream is recorded once, when it ends, so a stream that breaks
after its headers is one failure, never a success followed by a failure. `admits(at)` answers
without taking anything: whether an attempt at time `at` would pass (asked before reading a
request body, and before waiting a backoff that could only end in a refusal).
pybreaker's own async path needs tornado and admits every concurrent caller when half-open;
here half-open admits exactly one probe at a time (Linkerd's probation): that is the one addition
to pybreaker's state machine. pybreaker counts, trips, and stamps `opened_at` in its storage; the
storage below keeps that stamp on an injected monotonic clock (tests pass a fake one).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pybreaker

from .classify import Category
from .events import BreakerChange, BreakerState as State


_STATES = {pybreaker.STATE_CLOSED: State.CLOSED, pybreaker.STATE_HALF_OPEN: State.HALF_OPEN,
           pybreaker.STATE_OPEN: State.OPEN}


class Permit(enum.Enum):
    PASS = "pass"
    PROBE = "probe"  # the one half-open trial


class _Failure(Exception):
    """What the adapter feeds pybreaker for a counted failure category."""


def _ok() -> None:
    return None


def _fail() -> None:
    raise _Failure


class _ClockStorage(pybreaker.CircuitMemoryStorage):
    """pybreaker's memory storage, with `opened_at` kept on the proxy's monotonic clock: pybreaker
    stamps it when it opens, and reads it back as the datetime its own checks expect."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(pybreaker.STATE_CLOSED)
        self._clock = clock
        self.opened_mono: float | None = None

    @property  # type: ignore[override]
    def opened_at(self) -> datetime | None:
        if self.opened_mono is None:
            return None
        return datetime.now(UTC) - timedelta(seconds=self._clock() - self.opened_mono)

    @opened_at.setter
    def opened_at(self, value: datetime) -> None:
        self.opened_mono = self._clock()

    def open_for(self, at: float | None = None) -> float:
        """Seconds since pybreaker last opened the breaker, now or at monotonic time `at`."""
        now = self._clock() if at is None else at
        return now - (self.opened_mono if self.opened_mono is not None else -math.inf)


class Breaker:
    __slots__ = ("name", "routes", "_cb", "_storage", "_count", "_probing", "_notify")

    def __init__(self, name: str, routes: tuple[str, ...], *, failure_threshold: int, reset_timeout: float,
                 count: frozenset[Category], clock: Callable[[], float],
                 notify: Callable[[BreakerChange], None] = lambda change: None) -> None:
        self.name = name
        self.routes = routes
        self._count = count
        self._probing = False
        self._notify = notify
        self._storage = _ClockStorage(clock)
        self._cb = pybreaker.CircuitBreaker(fail_max=failure_threshold, reset_timeout=reset_timeout, name=name,
                                            throw_new_error_on_trip=False, listeners=[_Listener(self)],
                                            state_storage=self._storage)

    @property
    def state(self) -> State:
        return _STATES[self._cb.current_state]

    def allow(self) -> Permit | None:
        """A permit for one attempt, or None: the breaker is open (or its one probe is out)."""
        state = self._cb.current_state
        if state == pybreaker.STATE_CLOSED:
            return Permit.PASS
        if state == pybreaker.STATE_OPEN:
            if self._storage.open_for() < self._cb.reset_timeout:
                return None
            self._cb.half_open()
        if self._probing:
            return None
        self._probing = True
        return Permit.PROBE

    def admits(self, at: float) -> bool:
        """Whether `allow()` would give a permit at monotonic time `at` (now or after a wait), as far
        as is known now: open until its reset time, and half-open with the probe out, refuse."""
        state = self._cb.current_state
        if state == pybreaker.STATE_CLOSED:
            return True
        if state == pybreaker.STATE_OPEN:
            return self._storage.open_for(at) >= self._cb.reset_timeout
        return not self._probing

    def record(self, category: Category, permit: Permit | None = None) -> None:
        """Feed one classified outcome. Only the `count` categories are failures; any other answer
        (a 401, a quota 429) shows the upstream is up and counts as a success."""
        if permit is Permit.PROBE:
            self._probing = False
        state = self._cb.current_state
        if state == pybreaker.STATE_OPEN or (state == pybreaker.STATE_HALF_OPEN and permit is not Permit.PROBE):
            return  # a late answer from before the breaker opened: only the probe decides now
        if category in self._count:
            try:
                self._cb.call(_fail)
            except _Failure:
                pass
        elif state != pybreaker.STATE_CLOSED or self._cb.fail_counter:
            self._cb.call(_ok)
        # else: a success while closed with no failures counted changes nothing; skip pybreaker's call

    def release(self, permit: Permit | None) -> None:
        """The attempt ended with no outcome (the client left): free the probe for the next request."""
        if permit is Permit.PROBE:
            self._probing = False

    def retry_after(self) -> int:
        """Whole seconds until the breaker may let a probe through (at least 1)."""
        if self._cb.current_state != pybreaker.STATE_OPEN:
            return 1
        return max(1, math.ceil(self._cb.reset_timeout - self._storage.open_for()))

    def _changed(self, old: str | None, new: str) -> None:
        if new == pybreaker.STATE_OPEN:
            self._probing = False
        self._notify(BreakerChange(self.name, self.routes, _STATES.get(old or "", State.CLOSED), _STATES[new]))


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, owner: Breaker) -> None:
        self._owner = owner

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: pybreaker.CircuitBreakerState | None,
                     new_state: pybreaker.CircuitBreakerState) -> None:
        self._owner._changed(old_state.name if old_state else None, new_state.name)
