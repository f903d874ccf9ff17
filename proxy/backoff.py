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
    exponent = max(retry - 1, 0)
    # guard the power against overflow: past the cap the exact value does not matter
    if multiplier > 1 and exponent > math.log(max(maximum / initial, 1.0), multiplier) + 1:
        ceiling = maximum
    else:
        ceiling = min(maximum, initial * multiplier**exponent)
    return ceiling * rng()


def parse_retry_after(headers: Mapping[str, str], now: float) -> tuple[float, str] | None:
    """(seconds, header name) from `retry-after-ms` > `retry-after` seconds > `retry-after` HTTP-date.

    `now` is wall-clock epoch seconds, needed only for the HTTP-date form. Unparsable, negative
    or non-finite values are ignored, as the openai SDK does.
    """
    ms = headers.get("retry-after-ms")
    if ms is not None:
        seconds = _number(ms)
        if seconds is not None:
            return seconds / 1000.0, "retry-after-ms"
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = _number(value)
    if seconds is not None:
        return seconds, "retry-after"
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(when.timestamp() - now, 0.0), "retry-after"


def _number(text: str) -> float | None:
    try:
        x = float(text)
    except ValueError:
        return None
    return x if math.isfinite(x) and x >= 0 else None
