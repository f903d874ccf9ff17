"""What observers (logs, metrics) may see: immutable events emitted by the attempt loop and handler.

Observers are plain callables taking an event; they watch, they never steer a request. Events are
NamedTuples, not frozen dataclasses: built in C, without one object.__setattr__ per field.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import NamedTuple, get_args

from .classify import Category


class RequestStarted(NamedTuple):
    """A client request was routed (the in-flight gauge goes up; RequestFinished brings it down)."""

    route: str


class AttemptFinished(NamedTuple):
    """One upstream call ended (response headers classified, or an exception)."""

    route: str
    attempt: int
    category: Category
    status: int | None  # None: no response (connect, network, timeout)
    duration_s: float
    remaining_requests: int | None = None  # x-ratelimit-remaining-requests, when sent
    remaining_tokens: int | None = None  # x-ratelimit-remaining-tokens, when sent
    upstream: str = "default"  # the upstream's name in the config


class RetryScheduled(NamedTuple):
    """The loop will wait `delay_s` and try again."""

    route: str
    attempt: int  # the attempt that failed
    category: Category
    status: int | None
    delay_s: float
    reason: str  # "backoff" or "retry_after"
    source: str  # "backoff", or the header the delay came from
    request_id: str | None = None  # the client request's id (x-proxy-request-id)
    upstream: str = "default"  # the upstream the retry goes to again


class Failover(NamedTuple):
    """The loop moves to the next upstream of the route at once, without a backoff."""

    route: str
    request_id: str | None
    source: str  # the upstream left ("from" in the log line)
    target: str  # the upstream tried next ("to")
    category: Category  # of the failed attempt, or circuit_open: `source` was skipped without one
    attempt: int  # attempts made so far


class RequestFinished(NamedTuple):
    """One client request is over: the canonical line for logs and the request-level metrics."""

    route: str
    method: str
    path: str
    status: int | None  # None: aborted before any status was sent
    category: Category  # of the final outcome, "ok" for a success
    attempts: int
    stop_reason: str | None  # why retrying stopped, None when it was not needed
    aborted: bool  # the client connection was cut after the commit
    duration_s: float
    ttfb_s: float | None  # until the status line was sent to the client
    bytes_in: int | None
    bytes_out: int
    replayable: bool
    upstream_request_id: str | None
    client_sdk: str | None  # from x-stainless-lang / x-stainless-package-version
    client_request_id: str | None  # x-client-request-id
    request_id: str | None = None  # sent back as x-proxy-request-id: the client's, or generated; never key-shaped
    upstream: str | None = None  # the upstream of the last attempt (None: none was made)
    resumes: int = 0  # cut background streams picked up again (StreamResumed with result "ok")


class StreamResumed(NamedTuple):
    """A cut background Responses stream was reconnected at `starting_after` ("ok": it relays on), or
    the proxy gave up on it ("failed": the client connection is aborted)."""

    route: str
    response_id: str
    starting_after: int  # the sequence number of the last event relayed
    attempt: int  # the request's attempts so far, this reconnect's included
    category: Category  # what broke the stream
    result: str  # "ok" or "failed" (RESUME_RESULTS)
    stop_reason: str | None = None  # why a failed one gave up
    request_id: str | None = None


RESUME_RESULTS = ("ok", "failed")


class BreakerState(enum.IntEnum):
    """Gauge values of openai_proxy_breaker_state (design.md)."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class BreakerChange(NamedTuple):
    """A breaker changed state; `routes` are every route it guards (one, or a group)."""

    breaker: str
    routes: tuple[str, ...]
    old: BreakerState
    new: BreakerState
    upstream: str = "default"  # a breaker guards its routes' calls to one upstream


class ConfigReloaded(NamedTuple):
    """This process now serves a new config (hot reload): new requests use it, in-flight ones finish
    on the old. `routes`: every route name of the new config (metrics add the new ones)."""

    source: str
    changed: tuple[str, ...]  # sections (or restart keys) whose effective values differ
    restart_required: tuple[str, ...]  # of those, the ones a running process cannot apply
    routes: tuple[str, ...]
    pairs: tuple[tuple[str, str], ...] = ()  # every (route, upstream) it may call: their metrics too


Event = (RequestStarted | AttemptFinished | RetryScheduled | RequestFinished | BreakerChange | Failover
         | StreamResumed | ConfigReloaded)
Observer = Callable[[Event], None]
EVENT_TYPES: tuple[type, ...] = get_args(Event)


class Emitter:
    """Fans an event out to the observers that want it (their `event_types` attribute, default all);
    an observer's failure never reaches the request."""

    __slots__ = ("_by_type", "_on_error")

    def __init__(self, observers: Sequence[Observer] = (), on_error: Callable[[BaseException], None] | None = None):
        self._by_type = {cls: tuple(o for o in observers if cls in getattr(o, "event_types", EVENT_TYPES))
                         for cls in EVENT_TYPES}
        self._on_error = on_error

    def __call__(self, event: Event) -> None:
        for observe in self._by_type[type(event)]:
            try:
                observe(event)
            except Exception as exc:  # noqa: BLE001 - an observer must not fail a request
                if self._on_error is not None:
                    self._on_error(exc)
