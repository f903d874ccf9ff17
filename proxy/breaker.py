"""Circuit breakers: pybreaker's state machine, fed classified outcomes instead of wrapping the call.

The one addition: half-open admits exactly one probe at a time (Linkerd's probation; pybreaker's
async path needs tornado and admits every caller). Its storage keeps `opened_at` on an injected clock.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from contextlib import suppress
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
    """What pybreaker is fed for a counted failure category."""


def _report(failed: bool) -> None:
    if failed:
        raise _Failure


class _ClockStorage(pybreaker.CircuitMemoryStorage):
    """pybreaker's memory storage, with `opened_at` kept on the proxy's monotonic clock."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(pybreaker.STATE_CLOSED)
        self.clock = clock
        self.opened_mono = 0.0  # stamped when pybreaker opens the breaker; read only while it is open

    @property  # type: ignore[override]
    def opened_at(self) -> datetime:
        return datetime.now(UTC) - timedelta(seconds=self.open_for(self.clock()))

    @opened_at.setter
    def opened_at(self, value: datetime) -> None:
        self.opened_mono = self.clock()

    def open_for(self, at: float) -> float:
        """Seconds from when pybreaker last opened the breaker to monotonic time `at`."""
        return at - self.opened_mono


def _silent(change: BreakerChange) -> None:
    pass


class Breaker(pybreaker.CircuitBreakerListener):
    """One route's (or one group's) breaker; it listens to its own pybreaker for state changes."""

    __slots__ = ("name", "routes", "upstream", "settings", "_cb", "_storage", "_count", "_probing", "_notify")

    def __init__(self, name: str, routes: tuple[str, ...], *, failure_threshold: int, reset_timeout: float,
                 count: frozenset[Category], clock: Callable[[], float],
                 notify: Callable[[BreakerChange], None] = lambda change: None, upstream: str = "default") -> None:
        self.name = name
        self.routes = routes
        self.upstream = upstream  # the one upstream whose calls it judges, for its routes
        self.settings = (failure_threshold, reset_timeout, count)  # a reload keeps the breaker while these stay
        self._count = count
        self._probing = False
        self._notify = notify
        self._storage = _ClockStorage(clock)
        self._cb = pybreaker.CircuitBreaker(fail_max=failure_threshold, reset_timeout=reset_timeout, name=name,
                                            throw_new_error_on_trip=False, listeners=[self],
                                            state_storage=self._storage)

    @property
    def state(self) -> State:
        return _STATES[self._cb.current_state]

    def allow(self) -> Permit | None:
        """A permit for one attempt, or None: the breaker is open (or its one probe is out)."""
        state = self._cb.current_state
        if state == pybreaker.STATE_CLOSED:
            return Permit.PASS
        if not self.admits(self._storage.clock()):
            return None
        if state == pybreaker.STATE_OPEN:
            self._cb.half_open()
        self._probing = True
        return Permit.PROBE

    def admits(self, at: float) -> bool:
        """Whether `allow()` would give a permit at monotonic time `at` (now or after a wait), as far
        as is known now: open until its reset time, and half-open with the probe out, refuse."""
        state = self._cb.current_state
        if state == pybreaker.STATE_OPEN:
            return self._storage.open_for(at) >= self._cb.reset_timeout
        return state == pybreaker.STATE_CLOSED or not self._probing

    def record(self, category: Category, permit: Permit | None = None) -> None:
        """Feed one classified outcome. Only the `count` categories are failures; any other answer
        (a 401, a quota 429) shows the upstream is up and counts as a success."""
        if permit is Permit.PROBE:
            self._probing = False
        state = self._cb.current_state
        if state == pybreaker.STATE_OPEN or (state == pybreaker.STATE_HALF_OPEN and permit is not Permit.PROBE):
            return  # a late answer from before the breaker opened: only the probe decides now
        failed = category in self._count
        if failed or state != pybreaker.STATE_CLOSED or self._cb.fail_counter:  # else nothing would change
            with suppress(_Failure):
                self._cb.call(_report, failed)

    def release(self, permit: Permit | None) -> None:
        """The attempt ended with no outcome (the client left): free the probe for the next request."""
        if permit is Permit.PROBE:
            self._probing = False

    def retire(self) -> BreakerChange | None:
        """A reload replaced this breaker with a fresh (closed) one: requests still in flight may record
        on it, but it no longer speaks for its routes. The change its routes see, if any."""
        self._notify = _silent
        state = self.state
        return None if state is State.CLOSED else BreakerChange(self.name, self.routes, state, State.CLOSED,
                                                                self.upstream)

    def retry_after(self) -> int:
        """Whole seconds until the breaker may let a probe through (at least 1)."""
        if self._cb.current_state != pybreaker.STATE_OPEN:
            return 1
        return max(1, math.ceil(self._cb.reset_timeout - self._storage.open_for(self._storage.clock())))

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: pybreaker.CircuitBreakerState | None,
                     new_state: pybreaker.CircuitBreakerState) -> None:
        """pybreaker's listener hook: a new period starts with no probe out; observers hear of it."""
        if new_state.name == pybreaker.STATE_OPEN:
            self._probing = False
        old = _STATES[old_state.name] if old_state else State.CLOSED
        self._notify(BreakerChange(self.name, self.routes, old, _STATES[new_state.name], self.upstream))
