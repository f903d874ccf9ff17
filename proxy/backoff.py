"""How long to wait before a retry: capped full jitter, or the upstream's own Retry-After hint.

Full jitter (AWS architecture blog, Envoy): U[0, min(max, initial * multiplier^(n-1))). It
spreads synchronized clients apart, unlike the SDK's 0-25 % downward jitter. Pure; the random
source is a parameter so tests pass a fixed one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime

Random = Callable[[], float]  # returns a float in [0, 1)


def backoff_delay(retry: int, initial: float, maximum: float, multiplier: float, rng: Random) -> float:
    """The wait before retry number `retry` (1 for the first retry)."""
    try:
        ceiling = min(maximum, initial * multiplier ** max(retry - 1, 0))
    except OverflowError:  # past the cap the exact value does not matter
        ceiling = maximum
    return ceiling * rng()


def parse_retry_after(headers: Mapping[str, str], now: float) -> tuple[float, str] | None:
    """(seconds, header name) from `retry-after-ms` > `retry-after` seconds > `retry-after` HTTP-date (against
    `now`, epoch seconds). Unparsable, negative or non-finite values are ignored, as the openai SDK does."""
    ms = _number(headers.get("retry-after-ms"))
    if ms is not None:
        return ms / 1000.0, "retry-after-ms"
    value = headers.get("retry-after")
    seconds = _number(value)
    if seconds is None and value is not None:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = max(when.timestamp() - now, 0.0) if when.tzinfo is not None else None
    return None if seconds is None else (seconds, "retry-after")


def _number(text: str | None) -> float | None:
    try:
        x = float(text) if text else math.nan
    except ValueError:
        return None
    return x if math.isfinite(x) and x >= 0 else None
