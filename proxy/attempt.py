"""THE attempt loop: send -> classify -> decide -> wait -> send again, all before the commit. The
only code that knows every piece (breaker, budget, retry policy, backoff); each is a decision it asks.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import aiohttp
from yarl import URL

from .backoff import Random, parse_retry_after
from .body import RequestBody, Upload
from .breaker import Permit
from .classify import (ERROR_BODY_LIMIT, UPSTREAM_ERRORS, Category, UnrelayableResponse, Verdict,
                       classify_exception, classify_status)
from .events import AttemptFinished, Emitter, Failover as FailoverEvent, RetryScheduled
from .headers import Headers, readable_stream, unrelayable
from .policy import RoutePolicy
from .retry import Failover, RetryAfter, Stop, StopReason, decide, decide_failover, next_upstream
from .sse import StreamEnd, judge
from .upstream import Endpoint, UpstreamResponse, send

Sleep = Callable[[float], Awaitable[None]]

# A known-length body up to this size is read whole before the commit: one write instead of a
# chunk loop, and a failure while reading it can still be retried or answered.
SMALL_BODY = 64 * 1024


@dataclass(slots=True)
class Outcome:
    """What the loop ends with: a response to commit (with any prefetched body) or an error."""

    attempts: int
    verdict: Verdict
    stop: StopReason | None  # None: the last attempt succeeded, no decision was needed
    response: UpstreamResponse | None = None
    prefetched: bytes | None = None  # body bytes already read from `response`
    complete: bool = False  # `prefetched` is the whole body
    error: BaseException | None = None  # set when there is no response
    deferred: bool = False  # a stream the breaker has not heard about yet: stream_ended() tells it
    retry_after: float = 0.0  # never sent: seconds until the breaker would admit a request
    upstream: int = 0  # the index, in the route's upstreams, of the one the last attempt went to

    @classmethod
    def never_sent(cls, route: RoutePolicy) -> Outcome:
        """Every breaker the request may use refused the first attempt: the only case answered
        `circuit_open`; `retry_after` is when the first of them admits a probe."""
        breakers = route.breakers if Category.CIRCUIT_OPEN in route.failover_on else route.breakers[:1]
        return cls(0, Verdict(Category.CIRCUIT_OPEN), StopReason.BREAKER,
                   retry_after=min(b.retry_after() for b in breakers))

    def discard(self) -> None:
        """The response is not wanted (a retry replaces it): drop its connection unless read whole."""
        if self.response is not None:
            if self.complete:
                self.response.release()
            else:
                self.response.close()


class Exchange(NamedTuple):
    """The request side of one client request, fixed before the first attempt."""

    method: str
    path: str  # the client's, which names the endpoint
    url: URL
    headers: Headers
    body: RequestBody
    start: float  # monotonic
    deadline: float  # monotonic: no retry waits past it (timeouts.total, or the client's own timeout)
    request_id: str | None = None  # carried into RetryScheduled, so a retry line names its request
    urls: tuple[URL, ...] = ()  # the request's URL at each of the route's upstreams; () is (url,)

    def at(self, u: int) -> URL:
        """The request's URL at the route's upstream number `u`."""
        return self.urls[u] if u and self.urls else self.url


async def _prefetch(up: UpstreamResponse, method: str) -> tuple[bytes | None, bool]:
    """(bytes read, whether they are the whole body): a small known-length body is read whole (one
    write, and a failure here is still retryable), an error body of unknown length up to the limit."""
    length = up.content_length
    if method == "HEAD" or up.status in (204, 304) or (length is None and up.status < 400):
        return None, False
    if length is not None:
        return (await up.read(), True) if length <= SMALL_BODY else (None, False)
    head = bytearray()
    while len(head) <= ERROR_BODY_LIMIT:
        chunk = await up.content.readany()
        if not chunk:
            return bytes(head), True
        head += chunk
    return bytes(head), False


async def run(endpoints: tuple[Endpoint, ...], route: RoutePolicy, ex: Exchange, emit: Emitter, *,
              clock: Callable[[], float], rng: Random, sleep: Sleep) -> Outcome:
    """Attempts until one succeeds or the policy stops; `endpoints` are the route's upstreams, in order.

    `circuit_open` answers only a request never sent: once an attempt was made, a breaker that
    refuses the next one ends the loop with that attempt's outcome (stop reason `breaker`), unless
    a later upstream takes it. So a failed response is held across the backoff: a body read whole
    stays in memory (its connection back in the pool), any other response stays open until the
    retry replaces it. Moving to the next upstream (a failover) happens at once, without a backoff.
    """
    route.budget.deposit()
    attempt = u = 0  # attempts made; the upstream they go to
    outcome: Outcome | None = None  # the one response held open, discarded if anything raises
    try:
        while True:
            breaker = route.breakers[u]
            permit = breaker.allow()
            if permit is None:
                skip = next_upstream(route.failover_on, Category.CIRCUIT_OPEN, u, len(endpoints),
                                     lambda i: route.breakers[i].admits(clock()))
                if skip is not None:  # skipped without an attempt: no budget, no wait
                    emit(FailoverEvent(route.name, ex.request_id, endpoints[u].name, endpoints[skip].name,
                                       Category.CIRCUIT_OPEN, attempt))
                    u = skip
                    continue
                if outcome is None:
                    return Outcome.never_sent(route)
                outcome.stop = StopReason.BREAKER  # opened during the wait: the last answer stands
                return outcome
            if outcome is not None:
                outcome.discard()
                outcome = None
            attempt += 1
            outcome = await one_attempt(endpoints[u], route, ex, emit, permit, attempt, clock, u)
            category = outcome.verdict.category
            if category == "ok":
                return outcome
            decision = _next(route, ex, outcome, len(endpoints), clock, rng)
            if isinstance(decision, Failover):
                emit(FailoverEvent(route.name, ex.request_id, endpoints[u].name, endpoints[decision.to].name,
                                   category, attempt))
                u = decision.to
                continue
            if not isinstance(decision, RetryAfter):
                outcome.stop = decision.reason
                return outcome
            up = outcome.response
            if outcome.complete and up is not None:
                up.release()  # read whole: keep the bytes, not the connection, across the wait
            emit(RetryScheduled(route.name, attempt, category, up.status if up is not None else None,
                                decision.delay, decision.reason, decision.source, ex.request_id, endpoints[u].name))
            await sleep(decision.delay)
    except BaseException:
        if outcome is not None:
            outcome.discard()
        raise


def _next(route: RoutePolicy, ex: Exchange, outcome: Outcome, count: int, clock: Callable[[], float],
          rng: Random) -> Failover | RetryAfter | Stop:
    """After a failed attempt: the next upstream at once, the same one after a wait, or stop (the
    pure decisions of proxy.retry, asked with the live breakers, budget and clock)."""
    u, up, breakers = outcome.upstream, outcome.response, route.breakers
    remaining = ex.deadline - clock()
    if count > 1:
        moved = decide_failover(route.retry, route.failover_on, outcome.verdict, current=u, count=count,
                                attempt=outcome.attempts, replayable=ex.body.replayable, remaining=remaining,
                                budget=route.budget, admits=lambda i: breakers[i].admits(clock()))
        if moved is not None:
            return moved
    return decide(route.retry, outcome.verdict, attempt=outcome.attempts, replayable=ex.body.replayable,
                  upstream_forbids=up is not None and up.headers.get("x-should-retry") == "false",
                  hint=parse_retry_after(up.headers, time.time()) if up is not None else None,
                  remaining=remaining, budget=route.budget, rng=rng,
                  admits=lambda delay: breakers[u].admits(clock() + delay))


async def one_attempt(endpoint: Endpoint, route: RoutePolicy, ex: Exchange, emit: Emitter, permit: Permit,
                   attempt: int, clock: Callable[[], float], u: int) -> Outcome:
    """One upstream call up to its classified response headers. The breaker hears of it here (a long
    stream must not hold the probe), except an ordinary stream: it hears of that once, at its end
    (stream_ended), so a stream cut after its headers is one failure, not a success and a failure."""
    breaker = route.breakers[u]
    began = clock()
    timeout = route.timeout if attempt == 1 else aiohttp.ClientTimeout(
        total=max(ex.start + route.total - began, 0.001), sock_connect=route.connect, sock_read=route.first_byte)
    up: UpstreamResponse | None = None
    try:
        headers = endpoint.headers(ex.headers) if endpoint.injects else ex.headers
        up = await send(endpoint.pool, ex.method, ex.at(u), headers, ex.body, timeout)
        why = unrelayable(up.reason, up.headers)
        if why is not None:
            raise UnrelayableResponse(why)
        prefetched, complete = await _prefetch(up, ex.method)
        verdict = _small_stream(ex, up, prefetched) if complete else None
        verdict = verdict or classify_status(up.status, prefetched)
        outcome = Outcome(attempt, verdict, None, up, prefetched, complete, upstream=u)
    except UPSTREAM_ERRORS + (UnrelayableResponse,) as exc:
        if up is not None:
            up.close()
            up = None
        outcome = Outcome(attempt, Verdict(classify_exception(exc)), None, error=exc, upstream=u)
    except BaseException:
        breaker.release(permit)
        if up is not None:
            up.close()
        raise
    category = outcome.verdict.category
    if isinstance(ex.body.data, Upload) and ex.body.data.error is not None:
        breaker.release(permit)  # the client's upload broke: that says nothing about the upstream
    elif category == "ok" and not outcome.complete and permit is Permit.PASS and up is not None:
        outcome.deferred = True
    else:
        breaker.record(category, permit)
    emit(AttemptFinished(route.name, attempt, category, up.status if up is not None else None, clock() - began,
                         _header_int(up, "x-ratelimit-remaining-requests"),
                         _header_int(up, "x-ratelimit-remaining-tokens"), endpoint.name))
    return outcome


def refused(route: RoutePolicy, now: float) -> Outcome | None:
    """Asked before the request body is read: open breakers answer at once, without reading it; on a
    route that fails over on circuit_open, only when every upstream's breaker refuses."""
    if route.breaker.admits(now):
        return None
    if route.multi and Category.CIRCUIT_OPEN in route.failover_on and any(b.admits(now) for b in route.breakers):
        return None
    return Outcome.never_sent(route)


def stream_ended(route: RoutePolicy, outcome: Outcome, category: Category, aborted: bool, complete: bool) -> None:
    """After the commit, the breaker hears how the response ended (`category`): a deferred stream
    when it ends, and any success cut after its headers (a probe was recorded at them). A client
    that leaves mid-stream (neither aborted nor complete) says nothing about the upstream."""
    if (outcome.deferred and complete) or (aborted and outcome.verdict.category is Category.OK):
        route.breakers[outcome.upstream].record(category)


def _small_stream(ex: Exchange, up: UpstreamResponse, body: bytes | None) -> Verdict | None:
    """An event stream short enough to be read whole before the commit is judged here, as a long
    one is while it is relayed: cut before its end marker, it is invalid_response (and may still
    be retried); carrying an in-band error, it is a server error."""
    if body is None or up.status != 200 or not readable_stream(up.headers):
        return None
    end = judge(ex.method, ex.path, body)
    if end is StreamEnd.TRUNCATED:
        raise UnrelayableResponse("the event stream ended before its end marker")
    return Verdict(Category.SERVER) if end is StreamEnd.ERROR_EVENT else None


def _header_int(up: UpstreamResponse | None, name: str) -> int | None:
    value = up.headers.get(name) if up is not None else None
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def client_deadline(headers: Mapping[str, str], start: float, total: float) -> float:
    """`timeouts.total`, or sooner when the SDK says how long it will wait (x-stainless-read-timeout):
    retrying for a client that has already given up only adds load."""
    value = headers.get("x-stainless-read-timeout")
    if not value:
        return start + total
    try:
        seconds = float(value)
    except ValueError:
        return start + total
    return start + (seconds if 0 < seconds < total else total)
