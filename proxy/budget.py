"""A retry budget over a sliding window (Linkerd / tower's TpsBudget model).

Retries in the window may not exceed `ratio` x requests in the window plus a floor of
`min_per_second` x window, so a route in trouble cannot multiply its own load by max_attempts.
The window is 10 slots; the clock is a parameter (monotonic seconds).
"""

from __future__ import annotations

from collections.abc import Callable

_SLOTS = 10


class RetryBudget:
    __slots__ = ("settings", "_ratio", "_reserve", "_slot_len", "_clock", "_requests", "_retries", "_cur",
                 "_slot_start")

    def __init__(self, ratio: float, min_per_second: float, window: float, clock: Callable[[], float]) -> None:
        if ratio < 0 or min_per_second < 0 or window <= 0:
            raise ValueError("ratio and min_per_second must be >= 0 and window > 0")
        self.settings = (ratio, min_per_second, window)  # a reload keeps the budget while these stay
        self._ratio = ratio
        self._reserve = min_per_second * window
        self._slot_len = window / _SLOTS
        self._clock = clock
        self._requests = [0] * _SLOTS
        self._retries = [0] * _SLOTS
        self._cur = 0
        self._slot_start = clock()

    def _advance(self) -> None:
        elapsed = self._clock() - self._slot_start
        if elapsed < self._slot_len:
            return
        steps = int(elapsed / self._slot_len)
        for _ in range(min(steps, _SLOTS)):
            self._cur = (self._cur + 1) % _SLOTS
            self._requests[self._cur] = 0
            self._retries[self._cur] = 0
        self._slot_start += steps * self._slot_len

    def deposit(self) -> None:
        """Count one client request (not a retry)."""
        self._advance()
        self._requests[self._cur] += 1

    def withdraw(self) -> bool:
        """Take one retry if the budget allows it; False means: do not retry."""
        self._advance()
        allowed = self._ratio * sum(self._requests) + self._reserve
        if sum(self._retries) + 1 > allowed:
            return False
        self._retries[self._cur] += 1
        return True
